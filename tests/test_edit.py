"""gguf-kquant edit: the same bytes as gguf-py's gguf-new-metadata, in place when values keep their size,
typed values of every GGUF type, and misuse refused in one line with every file left as it was."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gguf_kquant
import oracle
from gguf_kquant.cli import main
from gguf_kquant.container.values import GGUFValueType as VT
from gguf_kquant.errors import GGUFError
from gguf_kquant.tools import edit

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama-f16.gguf"
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>\r\n{{ m.content }}{% endfor %}\n"


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def ggml_accepts(path) -> bool:
    """llama.cpp's own GGUF parser (gguf_init_from_file) reads the file."""
    lib = oracle.ggml()
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if ctx:
        lib.gguf_free(ctx)
    return bool(ctx)


def new_metadata(src, dst, *args):
    """gguf-py's gguf-new-metadata, the reference."""
    r = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(src), str(dst), *args,
                        "--force"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return dst.read_bytes()


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture()
def src(tmp_path) -> Path:
    p = tmp_path / "m.gguf"
    shutil.copyfile(FIXTURE, p)
    return p


@pytest.fixture()
def with_templates(tmp_path) -> Path:
    """The fixture with a default and a named chat template (which a new template replaces too)."""
    p = tmp_path / "t.gguf"
    with gguf_kquant.open(FIXTURE) as f:
        md = f.metadata.copy()
        md["tokenizer.chat_template"] = "old"
        md["tokenizer.chat_template.tool_use"] = "old tools"
        md["general.url"] = "https://example.com"
        gguf_kquant.write(p, md, f.tensors)
    return p


def test_rewrite_is_byte_identical_to_gguf_new_metadata(with_templates, tmp_path):
    tfile = tmp_path / "chat.jinja"
    tfile.write_bytes(TEMPLATE.encode())  # CRLF inside: read in text mode by both tools
    ref = new_metadata(with_templates, tmp_path / "ref.gguf", "--general-name", "Renamed", "--pre-tokenizer",
                       "llama-bpe", "--chat-template-file", str(tfile), "--remove-metadata", "general.url",
                       "--special-token-by-id", "eos", "7", "--special-token", "padding", "<unk>")
    argv = ["edit", str(with_templates), "-o", str(tmp_path / "ours.gguf"), "--set", "general.name=str:Renamed",
            "--set", "tokenizer.ggml.pre=str:llama-bpe", "--chat-template-file", str(tfile), "--delete",
            "general.url", "--special-token", "eos=7", "--special-token-text", "padding=<unk>", "-q"]
    assert main(argv) == 0
    assert (tmp_path / "ours.gguf").read_bytes() == ref
    with gguf_kquant.open(tmp_path / "ours.gguf") as f:
        assert f.metadata["tokenizer.chat_template"] == TEMPLATE.replace("\r\n", "\n")
        assert "tokenizer.chat_template.tool_use" not in f.metadata
        pad = f.metadata.typed("tokenizer.ggml.padding_token_id")
        assert pad.type == VT.UINT32 and pad.value == list(f.metadata["tokenizer.ggml.tokens"]).index("<unk>")


def test_new_keys_are_appended_like_gguf_new_metadata(src, tmp_path):
    ref = new_metadata(src, tmp_path / "ref.gguf", "--general-description", "a tiny model")
    r = edit(src, tmp_path / "ours.gguf", set=["general.description=str:a tiny model"])
    assert not r.in_place and r.changed == ["general.description"]
    assert (tmp_path / "ours.gguf").read_bytes() == ref
    assert ggml_accepts(tmp_path / "ours.gguf")


def test_same_size_value_is_patched_in_place(src, tmp_path):
    ref = new_metadata(src, tmp_path / "ref.gguf", "--special-token-by-id", "bos", "5")
    ino = src.stat().st_ino
    r = edit(src, special_tokens=[("bos", 5)], set=["llama.rope.freq_base=float:5e5"])
    assert r.in_place and src.stat().st_ino == ino  # not replaced: overwritten where the values are
    with gguf_kquant.open(src) as f:
        assert f.metadata["llama.rope.freq_base"] == 500000.0
    edit(src, set=["llama.rope.freq_base=float:10000"])
    assert src.read_bytes() == ref


def test_big_endian_file_patched_in_place(src, tmp_path):
    be = tmp_path / "be.gguf"
    with gguf_kquant.open(src) as f:
        gguf_kquant.write(be, f.metadata, f.tensors, byte_order=">")
    ref = new_metadata(be, tmp_path / "ref.gguf", "--special-token-by-id", "bos", "3")
    assert edit(be, special_tokens=[("bos", 3)]).in_place
    assert be.read_bytes() == ref


def test_a_shard_is_edited_alone(src, tmp_path):
    with gguf_kquant.open(src) as f:
        shards = gguf_kquant.write(tmp_path / "s.gguf", f.metadata, f.tensors, split_max_tensors=20)
    second = shards[1].read_bytes()
    edit(shards[0], set=["general.name=str:a longer name than before"])
    assert shards[1].read_bytes() == second
    with gguf_kquant.open(shards[0]) as f, gguf_kquant.open(src) as g:
        assert f.metadata["split.count"] == 2 and f.metadata["general.name"] == "a longer name than before"
        assert [t.raw().tobytes() for t in f.tensors] == [t.raw().tobytes() for t in g.tensors]


def test_rewrite_in_place_is_atomic_and_equal_to_a_copy(src, tmp_path):
    edit(src, tmp_path / "copy.gguf", delete=["tokenizer.ggml.add_eos_token"])
    ino = src.stat().st_ino
    r = edit(src, delete=["tokenizer.ggml.add_eos_token"])
    assert not r.in_place and src.stat().st_ino != ino  # a new file renamed over the old one
    assert src.read_bytes() == (tmp_path / "copy.gguf").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["copy.gguf", "m.gguf"]  # no temp file left


def test_a_failure_mid_write_leaves_the_file_as_it_was(src, monkeypatch):
    from gguf_kquant.container.reader import TensorInfo

    chunks = TensorInfo.chunks
    calls = []

    def failing(self, *a, **kw):
        calls.append(self.name)
        if len(calls) >= 5:  # the fifth tensor and after
            raise OSError(28, "No space left on device")
        return chunks(self, *a, **kw)

    monkeypatch.setattr(TensorInfo, "chunks", failing)
    before = digest(src.parent)
    with pytest.raises(OSError, match="No space"):
        edit(src, delete=["general.name"])
    assert digest(src.parent) == before  # same bytes, no temp file
    assert main(["edit", str(src), "-o", str(src.parent / "new.gguf"), "--delete", "general.name"]) == 1
    assert digest(src.parent) == before


def test_every_gguf_value_type(src, tmp_path):
    sets = ["x.u8=UINT8:255", "x.i8=int8:-128", "x.u16=UINT16:65535", "x.i16=INT16:-32768",
            "x.u32=uint32:4294967295", "x.i32=INT32:-5", "x.f32=FLOAT32:0.1", "x.b=BOOL:true", "x.s=STRING:héllo",
            "x.u64=UINT64:18446744073709551615", "x.i64=INT64:-9223372036854775808", "x.f64=FLOAT64:0.1",
            "x.int=int:7", "x.float=float:1.5", "x.bool=bool:false", "x.str=str:a=b:c",
            "x.ai=ARRAY[INT32]:[1,-2,3]", "x.as=array[string]:[\"a\",\"\"]", "x.af=ARRAY[FLOAT64]:[0.5]",
            "x.ab=ARRAY[BOOL]:[true,false]", "x.ae=ARRAY[UINT8]:[]"]
    edit(src, tmp_path / "o.gguf", set=sets)
    with gguf_kquant.open(tmp_path / "o.gguf") as f:
        md = f.metadata
        got = {k: (md.typed(k).type.name, md.typed(k).element_type) for k in md if k.startswith("x.")}
        assert md["x.u64"] == 2**64 - 1 and md["x.i64"] == -2**63 and md["x.f64"] == 0.1
        assert md["x.f32"] == float(np.float32(0.1)) and md["x.s"] == "héllo" and md["x.str"] == "a=b:c"
        assert list(md["x.ai"]) == [1, -2, 3] and list(md["x.as"]) == ["a", ""] and list(md["x.ab"]) == [True, False]
    assert got["x.int"][0] == "UINT32" and got["x.float"][0] == "FLOAT32" and got["x.bool"][0] == "BOOL"
    assert got["x.ai"] == ("ARRAY", VT.INT32) and got["x.ae"] == ("ARRAY", VT.UINT8)
    assert ggml_accepts(tmp_path / "o.gguf")


def test_rename_keeps_the_place_and_alignment_change_rewrites_offsets(src, tmp_path):
    edit(src, tmp_path / "o.gguf", rename=["general.name=general.basename"],
         set=["general.alignment=UINT32:64"])
    with gguf_kquant.open(src) as a, gguf_kquant.open(tmp_path / "o.gguf") as b:
        assert list(b.metadata)[:2] == ["general.architecture", "general.basename"]
        assert b.alignment == 64 and all(t.offset % 64 == 0 for t in b.tensors)
        assert all(np.array_equal(x.raw(), y.raw()) for x, y in zip(a.tensors, b.tensors))
    assert ggml_accepts(tmp_path / "o.gguf")


MISUSE = {
    "unknown type": (["--set", "general.name=text:x"], "unknown value type"),
    "value does not fit": (["--set", "x.y=UINT8:256"], "does not fit UINT8"),
    "not an integer": (["--set", "x.y=INT32:1.5"], "is not an integer"),
    "float overflow": (["--set", "x.y=FLOAT32:1e39"], "overflows FLOAT32"),
    "bad bool": (["--set", "x.y=bool:yes"], "true or false"),
    "malformed": (["--set", "general.name"], "KEY=TYPE:VALUE"),
    "array of arrays": (["--set", "x.y=ARRAY[ARRAY]:[[1]]"], "arrays of arrays"),
    "bad json": (["--set", "x.y=ARRAY[INT32]:[1,"], "JSON"),
    "delete missing key": (["--delete", "general.nothing"], "no such key"),
    "rename missing key": (["--rename", "a.b=c.d"], "no such key"),
    "rename onto a key": (["--rename", "general.name=general.architecture"], "has a key"),
    "split key": (["--set", "split.count=UINT16:2"], "split"),
    "alignment": (["--set", "general.alignment=UINT32:48"], "power of two"),
    "alignment type": (["--set", "general.alignment=UINT16:64", "--retype"], "power of two"),
    "retype": (["--set", "llama.block_count=str:2"], "fixed types"),
    "element retype": (["--set", "tokenizer.ggml.scores=ARRAY[FLOAT64]:[]"], "fixed types"),
    "token id": (["--special-token", "bos=99999"], "not within the vocabulary"),
    "token text": (["--special-token-text", "bos=<nope>"], "not in the vocabulary"),
    "token name": (["--special-token", "boss=1"], "unknown special token"),
    "twice": (["--set", "general.name=str:a", "--delete", "general.name"], "named twice"),
    "architecture": (["--delete", "general.architecture"], "needs it"),
    "output is input": (["-o", "{src}"], "same file"),
    "output exists": (["-o", "{other}"], "exists"),
    "template not UTF-8": (["--chat-template-file", "{other}"], "not UTF-8"),
    "template missing": (["--chat-template-file", "{src}.jinja"], "No such file"),
}


@pytest.mark.parametrize("case", sorted(MISUSE))
def test_misuse_one_line_nothing_changed(case, src, capsys):
    argv, message = MISUSE[case]
    other = src.parent / "other.gguf"
    other.write_bytes(b"keep\xff")
    before = digest(src.parent)
    argv = [a.format(src=src, other=other) for a in argv]
    assert main(["edit", str(src), *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gguf-kquant edit: error:") and message in err, err
    assert digest(src.parent) == before


def test_library_errors_are_gguf_errors(src):
    with pytest.raises(GGUFError):
        edit(src, set=[("x", 3)])  # a plain value has no GGUF type: pass a Value
    with pytest.raises(GGUFError, match="named twice"):
        edit(src, set=["general.name=str:a"], rename=["general.name=general.x"])


_SCALARS = {"UINT8": (0, 255), "INT8": (-128, 127), "UINT16": (0, 65535), "INT16": (-32768, 32767),
            "UINT32": (0, 2**32 - 1), "INT32": (-2**31, 2**31 - 1), "UINT64": (0, 2**64 - 1),
            "INT64": (-2**63, 2**63 - 1)}


@st.composite
def edits(draw):
    sets = [("general.name", "STRING", draw(st.text(st.characters(codec="utf-8"), max_size=20)))]
    for i in range(draw(st.integers(0, 3))):
        t = draw(st.sampled_from(sorted(_SCALARS) + ["FLOAT32", "FLOAT64", "BOOL", "STRING"]))
        if t in _SCALARS:
            v = draw(st.integers(*_SCALARS[t]))
        elif t == "BOOL":
            v = draw(st.booleans())
        elif t == "STRING":
            v = draw(st.text(st.characters(codec="utf-8"), max_size=10))
        else:
            v = draw(st.floats(width=32 if t == "FLOAT32" else 64, allow_nan=False))
        sets.append((f"x.k{i}", t, v))
    remove = draw(st.lists(st.sampled_from(["general.file_type", "llama.vocab_size", "tokenizer.ggml.add_eos_token",
                                            "tokenizer.ggml.scores"]), unique=True))
    special = draw(st.lists(st.tuples(st.sampled_from(["bos", "eos", "padding", "fim_pre"]), st.integers(0, 1023)),
                            unique_by=lambda t: t[0]))
    return sets, remove, special


@settings(max_examples=12, deadline=None)
@given(e=edits())
def test_property_same_bytes_as_gguf_new_metadata_in_process(e, tmp_path_factory):
    """gguf-new-metadata's own copy_with_new_metadata, called in-process, for random edits it can express."""
    import gguf
    from gguf.scripts import gguf_new_metadata as gnm

    sets, remove, special = e
    d = tmp_path_factory.mktemp("prop")
    new = {k: gnm.MetadataDetails(gguf.GGUFValueType[t], v) for k, t, v in sets}
    new.update({f"tokenizer.ggml.{n}_token_id": gnm.MetadataDetails(gguf.GGUFValueType.UINT32, i) for n, i in special})
    reader = gguf.GGUFReader(FIXTURE, "r")
    writer = gguf.GGUFWriter(d / "ref.gguf", arch="llama", endianess=reader.endianess)
    gnm.copy_with_new_metadata(reader, writer, new, remove)
    del reader
    text = {"BOOL": json.dumps, "FLOAT32": repr, "FLOAT64": repr}
    specs = [f"{k}={t}:{text.get(t, str)(v)}" for k, t, v in sets]
    edit(FIXTURE, d / "ours.gguf", set=specs, delete=remove, special_tokens=special)
    assert (d / "ours.gguf").read_bytes() == (d / "ref.gguf").read_bytes()

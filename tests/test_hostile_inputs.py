"""Hostile inputs beyond the GGUF header (tests/test_reader_hostile.py has those): files that change or are not
files, untrusted checkpoint JSON, metadata of the wrong type, resource bombs, I/O errors.  Every case must
raise a GGUFError subclass naming the file — never another exception, never a crash or a hang.

Cases that could kill or hang the interpreter on a regression run in a child process with a timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.errors import FileChangedError, GGUFError, GGUFIOError

REPO = Path(__file__).resolve().parents[1]


def run_child(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: a SIGBUS or a hang fails the test instead of killing pytest."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail(f"child process hung for {timeout} s")


def _model(path: Path) -> Path:
    tokens = [f"tok{i}" for i in range(200)]  # > LAZY_STRING_ARRAY: decoded on first access
    gguf_kquant.write(path, {"general.architecture": "llama", "tokenizer.ggml.tokens": tokens},
                      {"a": np.arange(64 * 1024, dtype=np.float32).reshape(64, 1024),
                       "b": np.ones((4, 256), np.float32)}, fsync=False)
    return path


# ------------------------------------------------------------------------------------------------------
# files that shrink while open (SIGBUS through the memory map) and files that are not files
# ------------------------------------------------------------------------------------------------------
SHRINK = """
    import os, sys, numpy as np, gguf_kquant
    from gguf_kquant.errors import GGUFIOError
    src, op = {src!r}, {op!r}
    f = gguf_kquant.open(src)
    t = f.tensors["a"]
    os.truncate(src, t.offset + 100)   # another program truncates the file: its data pages are gone
    try:
        if op == "numpy":
            t.numpy()
        elif op == "raw":
            t.raw().sum()
        elif op == "chunks":
            for c in t.chunks(4096):
                pass
        elif op == "tokens":
            f.metadata["tokenizer.ggml.tokens"]
        elif op == "close-then-tokens":
            f.close()
            f.metadata["tokenizer.ggml.tokens"]
        elif op == "write":
            gguf_kquant.write({dst!r}, f.metadata, f.tensors, fsync=False)
    except GGUFIOError as exc:  # FileChangedError, or the writer's error wrapping it
        print("TYPED:", exc)
        sys.exit(0)
    print("no error")
    sys.exit(3)
"""


@pytest.mark.parametrize("op", ["numpy", "raw", "chunks", "tokens", "close-then-tokens", "write"])
def test_file_truncated_while_open_raises_typed_error(tmp_path, op):
    src = _model(tmp_path / "m.gguf")
    if op.endswith("tokens"):  # truncate into the vocabulary instead of the tensor data
        code = SHRINK.replace("t.offset + 100", "200")
    else:
        code = SHRINK
    proc = run_child(code.format(src=str(src), op=op, dst=str(tmp_path / "copy.gguf")))
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "TYPED:" in proc.stdout and str(src) in proc.stdout, proc.stdout
    assert "shrank" in proc.stdout or "ends at offset" in proc.stdout
    assert not (tmp_path / "copy.gguf").exists()


def test_numpy_and_chunks_read_the_same_bytes_as_raw(tmp_path):
    src = _model(tmp_path / "m.gguf")
    with gguf_kquant.open(src) as f:
        t = f.tensors["a"]
        assert np.array_equal(t.numpy(), np.arange(64 * 1024, dtype=np.float32).reshape(64, 1024))
        assert t.numpy().flags.writeable
        assert b"".join(c.tobytes() for c in t.chunks(1000)) == t.raw().tobytes() == t.read().tobytes()
        assert all(c.size % 4 == 0 for c in t.chunks(1000))


def test_closed_file_raises_typed_error(tmp_path):
    src = _model(tmp_path / "m.gguf")
    f = gguf_kquant.open(src)
    t = f.tensors["a"]
    f.close()
    for op in (t.raw, t.numpy, t.read):
        with pytest.raises(GGUFIOError, match="closed"):
            op()


FIFO_OPEN = """
    import sys, gguf_kquant
    from gguf_kquant.errors import GGUFIOError
    try:
        {call}
    except GGUFIOError as exc:
        print("TYPED:", exc)
        sys.exit(0)
    sys.exit(3)
"""


@pytest.mark.parametrize("what", ["gguf", "imatrix", "safetensors"])
def test_fifo_input_is_refused_without_hanging(tmp_path, what):
    fifo = tmp_path / f"pipe.{what}"
    os.mkfifo(fifo)
    call = {
        "gguf": f"gguf_kquant.open({str(fifo)!r})",
        "imatrix": f"from gguf_kquant.model.imatrix import load_imatrix; load_imatrix({str(fifo)!r})",
        "safetensors": f"from gguf_kquant.convert.safetensors import SafetensorsFile; "
                       f"SafetensorsFile({str(fifo)!r})",
    }[what]
    proc = run_child(FIFO_OPEN.format(call=call), timeout=30)
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-2000:])
    assert "FIFO" in proc.stdout and str(fifo) in proc.stdout


def test_directory_missing_and_unreadable_inputs(tmp_path):
    with pytest.raises(GGUFIOError, match="directory") as info:
        gguf_kquant.open(tmp_path)
    assert isinstance(info.value, OSError) and isinstance(info.value, GGUFError)
    missing = tmp_path / "missing.gguf"
    with pytest.raises(GGUFIOError) as info:
        gguf_kquant.open(missing)
    assert info.value.errno == 2 and str(missing) in str(info.value) and "[Errno 2]" in str(info.value)


# ------------------------------------------------------------------------------------------------------
# untrusted checkpoint JSON
# ------------------------------------------------------------------------------------------------------
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from gguf_kquant.errors import ConversionError  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from test_convert_helpers import make_model

    d = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", d, hidden_size=32)
    return d


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _edit(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _convert(model_dir: Path, out: Path):
    """convert_hf must finish, or raise a GGUFError naming a file of the checkpoint — nothing else."""
    if out.exists():
        out.unlink()
    t0 = time.perf_counter()
    try:
        gguf_kquant.convert_hf(model_dir, out, "F32", overwrite=True)
    except GGUFError as exc:
        assert str(model_dir) in str(exc), exc
        return exc
    finally:
        assert time.perf_counter() - t0 < 30
    return None


def _set(key, value):
    def fn(doc):
        doc[key] = value
    return fn


def _deep(n):
    v = []
    for _ in range(n):
        v = [v]
    return v


CONFIG_CASES = [
    ("hidden_size", "64", "config.json: key 'hidden_size' must be an integer"),
    ("num_attention_heads", 0, "key 'num_attention_heads' must be an integer in 1.."),
    ("num_attention_heads", [4], "key 'num_attention_heads'"),
    ("num_hidden_layers", None, "none of ['num_hidden_layers'"),
    # CI's seed at 5a3ca5d drew a layer count this large: gguf-py's name map then filled 24 GB
    ("num_hidden_layers", 2**24 - 1, "layers, but the checkpoint holds"),
    ("num_hidden_layers", 10**6, "layers, but the checkpoint holds"),
    ("vocab_size", 10**12, "key 'vocab_size' must be an integer in 1..4194304"),
    ("intermediate_size", 2**70, "key 'intermediate_size'"),
    ("rms_norm_eps", "1e-5", "key 'rms_norm_eps' must be a number in"),
    # CI's draw at 3a11cd0: finite in float64, inf as the FLOAT32 it is written as (the writer refused it
    # without naming config.json); and one that float32 holds only as 0
    ("rms_norm_eps", 3.4028235677973366e+38, "key 'rms_norm_eps' must be a number in 1.4013e-45..3.40282e+38"),
    ("rope_theta", 1e-46, "key 'rope_theta' must be a number in"),
    ("rope_scaling", [1, 2], "key 'rope_scaling' must be an object"),
    ("rope_parameters", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0},
     "are equal"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
    ("rope_parameters", {"rope_type": 3}, "key 'rope_parameters.rope_type' must be a string"),
    ("rope_parameters", {"rope_type": "linear", "factor": 0}, "key 'rope_parameters.factor' must be a number in"),
    ("architectures", {"LlamaForCausalLM": 1}, "key 'architectures' must be a list of strings"),
    ("architectures", [["LlamaForCausalLM"]], "key 'architectures' must be a list of strings"),
    ("text_config", [1], "key 'text_config' must be an object"),
    ("num_key_value_heads", 3, "config.json implies"),  # 4 heads of 8 for 32 dims: the k_proj shape disagrees
    ("deep", _deep(100_000), "nested too deeply"),
]


@pytest.mark.parametrize("key,value,frag", CONFIG_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CONFIG_CASES)])
def test_hostile_config_json(tiny_llama, tmp_path, key, value, frag):
    d = _copy(tiny_llama, tmp_path / "m")
    if key == "deep":
        (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    elif key == "num_hidden_layers" and value is None:
        _edit(d / "config.json", lambda doc: doc.pop("num_hidden_layers"))
    else:
        _edit(d / "config.json", _set(key, value))
    exc = _convert(d, tmp_path / "out.gguf")
    assert isinstance(exc, ConversionError), exc
    assert frag in str(exc), str(exc)


def _tok_cases():
    def added_id_str(doc):
        doc["added_tokens"][0]["id"] = "0"

    def vocab_list(doc):
        doc["model"]["vocab"] = list(doc["model"]["vocab"])

    def merges_dict(doc):
        doc["model"]["merges"] = {"a": "b"}

    def pre_list(doc):
        doc["pre_tokenizer"]["pretokenizers"] = "Split"

    def post_str(doc):
        doc["post_processor"] = "TemplateProcessing"

    def huge_id(doc):
        doc["model"]["vocab"]["zzz-huge"] = 10**15

    return [
        ("tokenizer.json", added_id_str, "key 'added_tokens[0].id' must be a token id"),
        ("tokenizer.json", vocab_list, "key 'model.vocab' must be an object"),
        ("tokenizer.json", merges_dict, "key 'model.merges' must be a list"),
        ("tokenizer.json", pre_list, "key 'pre_tokenizer.pretokenizers' must be a list"),
        ("tokenizer.json", post_str, "key 'post_processor' must be an object"),
        ("tokenizer.json", huge_id, "must be a token id"),
        ("tokenizer_config.json", _set("add_prefix_space", "yes"), "key 'add_prefix_space' must be true or false"),
        ("tokenizer_config.json", _set("added_tokens_decoder", {"x": {}}), "not a token id"),
        ("tokenizer_config.json", _set("added_tokens_decoder", {"5": "tok"}), "key \"added_tokens_decoder['5']\""),
        ("tokenizer_config.json", _set("bos_token", 7), "key 'bos_token' must be a string or an object"),
        ("tokenizer_config.json", _set("chat_template", [0]), "key 'chat_template[0]' must be an object"),
    ]


@pytest.mark.parametrize("name,fn,frag", _tok_cases(), ids=lambda v: getattr(v, "__name__", None))
def test_hostile_tokenizer_json(tiny_llama, tmp_path, name, fn, frag):
    d = _copy(tiny_llama, tmp_path / "m")
    _edit(d / name, fn)
    exc = _convert(d, tmp_path / "out.gguf")
    assert isinstance(exc, ConversionError), exc
    assert name in str(exc) and frag in str(exc), str(exc)


@pytest.mark.parametrize("readme", [
    "---\nlicense: [1, {a: 2}]\nbase_model: 5\ntags: 3\n---\n",
    "---\n: : :\n---\n",
])
def test_hostile_model_card(tiny_llama, tmp_path, readme):
    d = _copy(tiny_llama, tmp_path / "m")
    (d / "README.md").write_text(readme)
    exc = _convert(d, tmp_path / "out.gguf")
    assert isinstance(exc, ConversionError) and "model card" in str(exc), exc


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", ""])
def test_index_weight_map_cannot_leave_the_model_folder(tiny_llama, tmp_path, target):
    d = _copy(tiny_llama, tmp_path / "m")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    from gguf_kquant.convert.safetensors import SafetensorsFile

    names = list(SafetensorsFile(d / "model.safetensors").tensors)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: (target if i == 0 else "model.safetensors") for i, n in enumerate(names)}}))
    exc = _convert(d, tmp_path / "out.gguf")
    assert isinstance(exc, ConversionError) and "outside the model folder" in str(exc), exc


def test_unknown_pre_tokenizer_name_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ConversionError, match="'no-such-pre' is not a pre-tokenizer llama.cpp knows"):
        gguf_kquant.convert_hf(tiny_llama, tmp_path / "o.gguf", "F32", pre_tokenizer="no-such-pre")
    assert not (tmp_path / "o.gguf").exists()


def test_known_pre_tokenizers_are_llama_cpp_s(oracle):
    import re

    from gguf_kquant.convert.vocab import LLAMA_CPP_PRE_TOKENIZERS

    src = (oracle.vendor_llama_cpp() / "src" / "llama-vocab.cpp").read_text()
    assert LLAMA_CPP_PRE_TOKENIZERS == set(re.findall(r'tokenizer_pre == "([^"]*)"', src))


# ------------------------------------------------------------------------------------------------------
# a read-only installation: no writable __pycache__, no writable HOME (issue 9, item 11)
# ------------------------------------------------------------------------------------------------------
READ_ONLY_INSTALL = """
    import os, sys, numpy as np
    import gguf_kquant
    assert gguf_kquant.__file__.startswith({pkg!r}), gguf_kquant.__file__
    p = {model!r}
    gguf_kquant.write(p, {{"general.architecture": "llama"}}, {{"w": np.arange(64, dtype=np.float32).reshape(2, 32)}},
                      fsync=False)
    with gguf_kquant.open(p) as f:
        assert f.tensors["w"].numpy().sum() == np.arange(64).sum()
        q = gguf_kquant.quantize(f.tensors["w"].numpy(), "Q8_0")
    assert gguf_kquant.dequantize(q, "Q8_0", (2, 32)).shape == (2, 32)
    print("CACHE", os.environ["NUMBA_CACHE_DIR"])
"""


def test_numba_cache_falls_back_when_install_and_home_are_read_only(tmp_path):
    """Even root cannot create a folder where a regular file is: that makes both of Numba's places unusable."""
    pkg = tmp_path / "site"
    shutil.copytree(REPO / "gguf_kquant", pkg / "gguf_kquant", ignore=shutil.ignore_patterns("__pycache__"))
    for d in [pkg / "gguf_kquant", *(p for p in (pkg / "gguf_kquant").rglob("*") if p.is_dir())]:
        (d / "__pycache__").write_bytes(b"")  # no __pycache__ folder can be made here
    blocker = tmp_path / "home-is-a-file"
    blocker.write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_CACHE_DIR", "XDG_CACHE_HOME"))}
    env.update(PYTHONPATH=str(pkg), HOME=str(blocker / "home"), TMPDIR=str(tmp_path / "tmp"),
               PYTHONDONTWRITEBYTECODE="1")
    (tmp_path / "tmp").mkdir()
    code = textwrap.dedent(READ_ONLY_INSTALL.format(pkg=str(pkg), model=str(tmp_path / "m.gguf")))
    for run in range(2):  # the second run loads the kernels the first one cached
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        cache = Path(proc.stdout.split("CACHE ", 1)[1].strip())
        assert cache.parent == tmp_path / "tmp" and any(cache.rglob("*.nbi")), cache


# ------------------------------------------------------------------------------------------------------
# properties: generated hostile GGUF headers and checkpoint JSON
# ------------------------------------------------------------------------------------------------------
import struct  # noqa: E402
import tracemalloc  # noqa: E402

from test_reader_hostile import enc_str, exercise  # noqa: E402

from gguf_kquant.container.reader import HEADER_MEMORY_FACTOR, HEADER_MEMORY_MIN  # noqa: E402
from gguf_kquant.container.values import GGUFValueType as VT  # noqa: E402

_LIES = st.sampled_from([0, 1, 2, 3, 7, 64, 65, 255, 2**16, 2**30, 2**30 + 1, 2**31, 2**32, 2**62, 2**63, 2**64 - 1])
_SCALARS = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
            VT.FLOAT32: "f", VT.BOOL: "B", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d"}


@st.composite
def _value_bytes(draw, depth=0):
    """Type tag + value bytes; counts and lengths are sometimes honest, sometimes lies."""
    vt = draw(st.sampled_from(list(range(14))))  # 13 is invalid
    out = struct.pack("<I", vt)
    if vt in _SCALARS:
        return out + draw(st.binary(min_size=struct.calcsize(_SCALARS[VT(vt)]),
                                    max_size=struct.calcsize(_SCALARS[VT(vt)])))
    if vt == VT.STRING:
        s = draw(st.binary(max_size=12))
        n = draw(st.one_of(st.just(len(s)), _LIES))
        return out + struct.pack("<Q", n) + s
    if vt == VT.ARRAY:
        et = draw(st.sampled_from(list(range(14))))
        count = draw(st.integers(0, 5))
        n = draw(st.one_of(st.just(count), _LIES))
        head = out + struct.pack("<IQ", et, n)
        if et == VT.ARRAY and depth < 18:
            return head + b"".join(draw(_value_bytes(depth + 1))[4:] for _ in range(count))
        return head + draw(st.binary(max_size=8 * count + 8))
    return out + draw(st.binary(max_size=8))


@st.composite
def hostile_headers(draw) -> bytes:
    kvs = [enc_str(draw(st.binary(max_size=6))) + draw(_value_bytes()) for _ in range(draw(st.integers(0, 6)))]
    tensors = []
    for _ in range(draw(st.integers(0, 4))):
        n_dims = draw(st.one_of(st.integers(0, 4), _LIES.map(lambda v: v & 0xFFFFFFFF)))
        dims = [draw(st.one_of(st.integers(-2, 70), _LIES.map(lambda v: v & (2**63 - 1))))
                for _ in range(min(n_dims, 5))]
        type_id = draw(st.one_of(st.integers(-1, 45), st.sampled_from([1023, 1024, 2**31 - 1])))
        tensors.append(enc_str(draw(st.binary(max_size=8))) + struct.pack("<I", n_dims & 0xFFFFFFFF)
                       + struct.pack(f"<{len(dims)}q", *dims) + struct.pack("<i", type_id)
                       + struct.pack("<Q", draw(st.one_of(st.integers(0, 256), _LIES))))
    n_t = draw(st.one_of(st.just(len(tensors)), _LIES.map(lambda v: v - 2**63 if v >= 2**63 else v)))
    n_kv = draw(st.one_of(st.just(len(kvs)), _LIES.map(lambda v: v - 2**63 if v >= 2**63 else v)))
    version = draw(st.sampled_from([3, 2, 1, 0x03000000, 4]))
    data = b"GGUF" + struct.pack("<Iqq", version, n_t, n_kv) + b"".join(kvs) + b"".join(tensors)
    return data + draw(st.binary(max_size=200))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile_headers())
def test_generated_hostile_headers(tmp_path_factory, data):
    """Open and touch everything: a GGUFError naming the file or success, within 1 s and the memory budget."""
    path = tmp_path_factory.mktemp("h", numbered=True) / "h.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        exercise(path)  # asserts: GGUFError with the path in the message, or none; < 1 s
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < max(HEADER_MEMORY_MIN, HEADER_MEMORY_FACTOR * len(data)), peak


_JSON_HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 3), st.sampled_from([10**6, 2**31, 2**63, 10**30, -(10**30)]),
    st.sampled_from([3.4028235677973366e+38, 1e-46]),  # just past float32's range, where FLOAT32 metadata fails
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.sampled_from(["64", "1e-5", ""]),
    st.lists(st.integers(0, 5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_CONFIG_KEYS = ["architectures", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings", "rms_norm_eps",
                "rope_parameters", "rope_scaling", "rope_theta", "text_config", "tie_word_embeddings", "is_causal",
                "_name_or_path", "model_type", "bos_token_id", "eos_token_id"]
_TOKENIZER_PATHS = [("model",), ("model", "vocab"), ("model", "merges"), ("model", "type"), ("added_tokens",),
                    ("added_tokens", 0), ("added_tokens", 0, "id"), ("added_tokens", 0, "content"),
                    ("pre_tokenizer",), ("pre_tokenizer", "pretokenizers"), ("post_processor",), ("decoder",),
                    ("normalizer",)]


def _put(doc, path, value):
    for k in path[:-1]:
        doc = doc[k]
    doc[path[-1]] = value


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.data())
def test_generated_hostile_checkpoint_json(tiny_llama, tmp_path, data):
    """Any value at any key the converters read: converts, or a GGUFError naming a checkpoint file."""
    d = _copy(tiny_llama, tmp_path / "m")
    which = data.draw(st.sampled_from(["config.json", "tokenizer.json", "tokenizer_config.json"]))
    value = data.draw(_JSON_HOSTILE)
    if which == "config.json":
        _edit(d / which, _set(data.draw(st.sampled_from(_CONFIG_KEYS)), value))
    elif which == "tokenizer.json":
        _edit(d / which, lambda doc: _put(doc, data.draw(st.sampled_from(_TOKENIZER_PATHS)), value))
    else:
        key = data.draw(st.sampled_from(["add_prefix_space", "added_tokens_decoder", "bos_token", "eos_token",
                                         "tokenizer_class", "chat_template", "add_bos_token"]))
        _edit(d / which, _set(key, value))
    _convert(d, tmp_path / "out.gguf")


# ------------------------------------------------------------------------------------------------------
# hyper-parameters of the wrong GGUF type (issue 9, item 6): read like llama.cpp's GGUFMeta::GKV<uint32_t>
# ------------------------------------------------------------------------------------------------------
from gguf_kquant.container.values import Value, uint32_key  # noqa: E402
from gguf_kquant.errors import MetadataTypeError  # noqa: E402


@pytest.mark.parametrize("value,per_layer,result", [
    (32, False, 32),
    (Value(32, VT.UINT32), False, 32),
    (Value([8, 8, 4], VT.ARRAY, VT.INT32), True, 8),
    ("32", False, "must be UINT32, not STRING"),
    (Value(32, VT.INT32), False, "must be UINT32, not INT32"),
    (1.5, False, "must be UINT32, not FLOAT32"),
    (Value([8], VT.ARRAY, VT.INT32), False, "must be UINT32, not ARRAY of INT32"),
    (Value([], VT.ARRAY, VT.UINT32), True, "not an empty array"),
    (Value([-1], VT.ARRAY, VT.INT32), True, "not negative values"),
    (["a"], True, "not ARRAY of STRING"),
])
def test_uint32_hyper_parameters_are_type_checked(tmp_path, value, per_layer, result):
    p = tmp_path / "m.gguf"
    gguf_kquant.write(p, {"general.architecture": "llama", "llama.block_count": value}, {}, fsync=False)
    with gguf_kquant.open(p) as f:
        if isinstance(result, int):
            assert uint32_key(f.metadata, "llama.block_count", per_layer=per_layer) == result
        else:
            with pytest.raises(MetadataTypeError, match=result) as info:
                uint32_key(f.metadata, "llama.block_count", per_layer=per_layer, where=str(p))
            assert str(info.value).startswith(f"{p}: metadata key llama.block_count must be")
        assert uint32_key(f.metadata, "llama.missing", 7) == 7


# ------------------------------------------------------------------------------------------------------
# hostile safetensors headers
# ------------------------------------------------------------------------------------------------------
def _safetensors(path: Path, header, data: bytes = b"", raw: bytes | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + data)
    return path


@pytest.mark.parametrize("header,raw,frag", [
    ({"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, None, "bytes for shape"),
    ({"t": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]}}, None, "bytes for shape"),
    ({"t": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, None, "bad shape"),
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 10**30]}}, None, "data ends at offset"),
    ({"t": [1, 2]}, None, "header entry is not an object"),
    ({"__metadata__": [1]}, None, "__metadata__ is not a JSON object"),
    (None, b"[" * 200_000 + b"]" * 200_000, "nests JSON too deeply"),
    (None, b"\xff\xfe", "not valid JSON"),
    (None, b"[]", "not a JSON object"),
])
def test_hostile_safetensors_headers(tmp_path, header, raw, frag):
    from gguf_kquant.convert.safetensors import SafetensorsFile

    p = _safetensors(tmp_path / "m.safetensors", header, bytes(16), raw)
    with pytest.raises(ConversionError, match=frag) as info:
        SafetensorsFile(p)
    assert str(p) in str(info.value)


def test_safetensors_header_length_lies(tmp_path):
    from gguf_kquant.convert.safetensors import SafetensorsFile

    p = tmp_path / "m.safetensors"
    p.write_bytes((2**63).to_bytes(8, "little") + b"{}")
    with pytest.raises(ConversionError, match="does not fit the file"):
        SafetensorsFile(p)
    with pytest.raises(GGUFIOError, match="a directory"):
        SafetensorsFile(tmp_path)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_json_resource_bombs_are_refused_before_parsing(tiny_llama, tmp_path, name):
    from gguf_kquant.errors import LimitExceededError

    d = _copy(tiny_llama, tmp_path / "m")
    bomb = b'{"a": [' + b",".join([b"{}"] * 2_000_000) + b"]}"  # 6 MB of JSON, 150 MB as Python objects
    if name == "model.safetensors":
        _safetensors(d / name, None, raw=bomb)
    else:
        (d / name).write_bytes(bomb)
    tracemalloc.start()
    try:
        exc = _convert(d, tmp_path / "out.gguf")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(exc, LimitExceededError) and "resource bomb" in str(exc) and name in str(exc), exc
    assert peak < 64 << 20, peak


@pytest.mark.parametrize("key,value", [("llama.block_count", "32"), ("llama.attention.head_count", 1.5),
                                       ("llama.expert_count", Value(8, VT.INT64)),
                                       ("general.file_type", Value(1, VT.INT32))])
def test_planning_a_model_type_checks_its_hyper_parameters(tmp_path, key, value):
    from gguf_kquant.model.planner import plan_model

    p = tmp_path / "m.gguf"
    md = {"general.architecture": "llama", "llama.block_count": 1, "llama.attention.head_count": 4, key: value}
    gguf_kquant.write(p, md, {"blk.0.ffn_up.weight": np.zeros((256, 256), np.float32)}, fsync=False)
    with pytest.raises(MetadataTypeError, match=rf"^{re.escape(str(p))}: metadata key {re.escape(key)} must be"):
        plan_model(p, "Q4_K_M")


@pytest.mark.parametrize("name,path", [("tokenizer.json", ("added_tokens",)),  # found by the generated test
                                       ("tokenizer.json", ("pre_tokenizer", "pretokenizers")),
                                       ("tokenizer.json", ("normalizer",)),
                                       ("tokenizer_config.json", ("added_tokens_decoder",))])
def test_null_where_a_list_or_object_may_be(tiny_llama, tmp_path, name, path):
    """JSON null where an optional list or object may stand is read as absent: converts or a GGUFError, never
    a TypeError (test_generated_hostile_checkpoint_json once drew ``"added_tokens": null``)."""
    d = _copy(tiny_llama, tmp_path / "m")
    _edit(d / name, lambda doc: _put(doc, path, None))
    _convert(d, tmp_path / "out.gguf")

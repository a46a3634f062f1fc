"""Quantize-on-the-fly (== convert F16 then llama-quantize), sharded checkpoints, split output, the CLI,
and the errors a bad checkpoint or destination raises."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.convert.safetensors import SafetensorsFile, write_safetensors
from gguf_kquant.errors import ConversionError, GGUFError
from test_convert_helpers import diff_gguf, llama_quantize, make_model, vendor_convert


@pytest.fixture(scope="module")
def llama256(tmp_path_factory):
    d = tmp_path_factory.mktemp("q") / "llama256"
    make_model("llama", d, seed=7, hidden_size=256)  # rows of 256: the k-quants apply
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("t") / "llama"
    make_model("llama", d, seed=8)
    return d


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q6_K"])
def test_mix_equals_convert_then_llama_quantize(tmp_path, llama256, mix):
    ids = {"Q4_K_M": 15, "Q6_K": 18}
    f16 = tmp_path / "f16.gguf"
    gguf_kquant.convert_hf(llama256, f16, "F16")
    ref = tmp_path / "ref.gguf"
    llama_quantize(f16, ref, ids[mix])
    ours = tmp_path / "ours.gguf"
    gguf_kquant.convert_hf(llama256, ours, mix)
    assert diff_gguf(ours, ref) == []
    with gguf_kquant.open(ours) as f:
        kinds = {t.ggml_type.name for t in f.tensors}
    assert "Q6_K" in kinds


def test_sharded_checkpoint_equals_single_file(tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    make_model("qwen2", one, seed=9)
    make_model("qwen2", many, seed=9, shard_size="60KB")
    assert (many / "model.safetensors.index.json").is_file()
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    gguf_kquant.convert_hf(one, a, model_name="m")
    gguf_kquant.convert_hf(many, b, model_name="m")
    assert diff_gguf(a, b) in ([], ["tensor order differs"])  # shards are read in file order, as llama.cpp does
    c, theirs = tmp_path / "c.gguf", tmp_path / "theirs.gguf"
    gguf_kquant.convert_hf(many, c)
    vendor_convert(many, theirs, "f16", pre="qwen2")
    assert diff_gguf(c, theirs) == []


def test_split_output_and_cli(tmp_path, tiny):
    from gguf_kquant.cli import main

    dst = tmp_path / "out.gguf"
    assert main(["convert", str(tiny), str(dst), "--type", "F32", "--split-max-size", "100000", "-q"]) == 0
    shards = sorted(tmp_path.glob("out-*-of-*.gguf"))
    assert len(shards) > 1
    with gguf_kquant.open(shards[0]) as f:
        assert f.metadata["split.count"] == len(shards)
    # refuses to overwrite, then overwrites when asked
    assert main(["convert", str(tiny), str(dst), "--split-max-size", "100000", "-q"]) == 1
    assert main(["convert", str(tiny), str(dst), "--split-max-size", "100000", "-q", "--overwrite"]) == 0


def test_destination_exists(tmp_path, tiny):
    dst = tmp_path / "x.gguf"
    dst.write_bytes(b"keep")
    with pytest.raises(ConversionError, match="exists"):
        gguf_kquant.convert_hf(tiny, dst)
    assert dst.read_bytes() == b"keep"
    gguf_kquant.convert_hf(tiny, dst, overwrite=True)
    assert dst.read_bytes()[:4] == b"GGUF"


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture(tmp_path, tiny):
    d = _copy(tiny, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="FancyNewForCausalLM.*LlamaForCausalLM"):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf")


def test_shape_disagrees_with_config(tmp_path, tiny):
    d = _copy(tiny, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="up_proj.*shape"):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf")


def test_unknown_tokenizer_type(tmp_path, tiny):
    d = _copy(tiny, tmp_path / "m")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["model"]["type"] = "Unigram"
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConversionError, match="Unigram"):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="tokenizer.json"):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf")


def test_missing_and_corrupt_shards(tmp_path):
    d = tmp_path / "m"
    make_model("llama", d, seed=1, shard_size="60KB")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(idx["weight_map"].values()))[-1]
    data = (d / shard).read_bytes()
    (d / shard).write_bytes(data[: len(data) - 100])  # truncated
    with pytest.raises(ConversionError, match="truncated"):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf")
    (d / shard).unlink()
    with pytest.raises(ConversionError, match="missing safetensors shard"):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf")


def test_safetensors_reader_round_trip_and_hostile_headers(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    h = np.arange(6, dtype=np.float16)
    bf = np.array([0x3F80, 0xC000], dtype=np.uint16)  # bf16 1.0, -2.0
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": a, "h": h, "bf": ("BF16", [2], [bf.tobytes()])})
    f = SafetensorsFile(p)
    assert np.array_equal(f.tensors["a"].array(), a) and f.tensors["a"].shape == (3, 4)
    assert np.array_equal(f.tensors["h"].to_float32(), h.astype(np.float32))
    assert f.tensors["bf"].to_float32().tolist() == [1.0, -2.0]
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    cases = {
        "header length": (2**40).to_bytes(8, "little") + raw[8:],
        "JSON": raw[:8] + b"{" * n + raw[8 + n:],
        "unsupported dtype": None, "data_offsets": None, "bytes for shape": None, "overlap": None,
    }
    bad = dict(header)
    bad["a"] = dict(header["a"], dtype="F8_E4M3")
    cases["unsupported dtype"] = bad
    bad = dict(header)
    bad["a"] = dict(header["a"], data_offsets=[0, 10**9])
    cases["data_offsets"] = bad
    bad = dict(header)
    bad["a"] = dict(header["a"], shape=[3, 5])
    cases["bytes for shape"] = bad
    bad = dict(header)
    bad["h"] = dict(header["h"], data_offsets=[0, 12])
    cases["overlap"] = bad
    for what, case in cases.items():
        if isinstance(case, dict):
            j = json.dumps(case).encode()
            j += b" " * (n - len(j)) if len(j) <= n else b""
            case = len(j).to_bytes(8, "little") + j + raw[8 + n:]
        q = tmp_path / "bad.safetensors"
        q.write_bytes(case)
        with pytest.raises(GGUFError):
            SafetensorsFile(q)
    q.write_bytes(b"\x01")
    with pytest.raises(ConversionError, match="truncated"):
        SafetensorsFile(q)


def test_sentencepiece_tokenizers_are_refused_not_mangled(tmp_path, tiny):
    # tokenizer.model is read first (as convert_hf_to_gguf.py does): a corrupt one is an error, not a fallback
    d = _copy(tiny, tmp_path / "m")
    (d / "tokenizer.model").write_bytes(b"\x0a\x00")
    with pytest.raises(ConversionError, match=r"tokenizer\.model: not a SentencePiece model"):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf")
    (d / "tokenizer.model").unlink()
    # byte-fallback BPE that is no Llama-2 fast tokenizer (its decoder is byte-level): GPT-2 tokens would be wrong
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["model"]["byte_fallback"] = True
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConversionError, match="byte_fallback"):
        gguf_kquant.convert_hf(d, tmp_path / "o.gguf")
    # BERT's vocabulary comes from tokenizer.json only, in llama.cpp too
    b = tmp_path / "bert"
    make_model("bert", b, seed=9)
    (b / "tokenizer.json").unlink()
    (b / "tokenizer.model").write_bytes(b"\x0a\x00")
    with pytest.raises(ConversionError, match="only a SentencePiece tokenizer.model, but bert needs tokenizer.json"):
        gguf_kquant.convert_hf(b, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_imatrix_only_with_mixes(tmp_path, tiny):
    with pytest.raises(ConversionError, match="imatrix"):
        gguf_kquant.convert_hf(tiny, tmp_path / "o.gguf", "F16", imatrix="x.dat")


def test_imatrix_mix_equals_convert_then_quantize_model(tmp_path, llama256):
    # gguf_kquant.quantize_model is checked against llama-quantize (incl. imatrix) in test_model_quantize.py
    from gguf_kquant.model.imatrix import write_legacy_imatrix

    f16 = tmp_path / "f16.gguf"
    gguf_kquant.convert_hf(llama256, f16, "F16")
    rng = np.random.default_rng(0)
    with gguf_kquant.open(f16) as f:
        entries = {t.name: rng.uniform(0.1, 2.0, t.shape[-1]).astype(np.float32)
                   for t in f.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    im = tmp_path / "imatrix.dat"
    write_legacy_imatrix(im, entries, chunk_count=4, dataset="synthetic.txt")
    ref = tmp_path / "ref.gguf"
    gguf_kquant.quantize_model(f16, ref, "Q4_K_M", imatrix=str(im), quiet=True)
    ours = tmp_path / "ours.gguf"
    gguf_kquant.convert_hf(llama256, ours, "Q4_K_M", imatrix=str(im))
    assert diff_gguf(ours, ref) == []
    plain = tmp_path / "plain.gguf"
    gguf_kquant.convert_hf(llama256, plain, "Q4_K_M")
    assert diff_gguf(ours, plain) != []  # the imatrix changed something


def test_a_type_that_needs_an_imatrix_is_refused_before_any_work(tmp_path, llama256, capsys):
    """In the library's words (give an imatrix); the command line names its option."""
    from gguf_kquant.cli import main
    from gguf_kquant.errors import ImatrixError

    dst = tmp_path / "o.gguf"
    with pytest.raises(ImatrixError, match="needs an importance matrix; give an imatrix$"):
        gguf_kquant.convert_hf(llama256, dst, "IQ2_XXS")
    assert main(["convert", str(llama256), str(dst), "--type", "IQ2_XXS", "-q"]) == 1
    assert "give an imatrix (--imatrix)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["llama", "optimized"])
def test_moe_imatrix_mix_equals_convert_then_quantize_model(tmp_path, method):
    """Expert tensors have one imatrix per expert (n_expert x n values): each expert's rows get theirs, as
    quantize_model gives them (convert_hf refused such an imatrix as the wrong size)."""
    d = tmp_path / "qwen2moe"
    make_model("qwen2moe", d, hidden_size=256)  # 4 experts, rows of 256: the k-quants apply
    f16 = tmp_path / "f16.gguf"
    gguf_kquant.convert_hf(d, f16, "F16")
    rng = np.random.default_rng(1)
    with gguf_kquant.open(f16) as f:
        entries = {t.name: rng.uniform(0.1, 2.0, t.shape[-1] * (t.shape[0] if len(t.shape) == 3 else 1))
                   .astype(np.float32) for t in f.tensors if t.name.startswith("blk.") and len(t.shape) >= 2}
        assert sum(len(t.shape) == 3 for t in f.tensors if t.name in entries) >= 6  # 3 expert tensors a layer
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    gguf_kquant.quantize_model(f16, ref, "Q4_K_M", imatrix=entries, method=method, quiet=True)
    gguf_kquant.convert_hf(d, ours, "Q4_K_M", imatrix=entries, method=method)
    assert diff_gguf(ours, ref) == []


def test_moe_error_feedback_equals_convert_then_quantize_model(tmp_path, oracle):
    """With a Hessian file, each expert's rows are fed forward through that expert's matrix in convert_hf as in
    quantize_model (Q4_0: rows of 256 are 8 blocks, so every expert has columns to feed)."""
    import copy

    from gguf_kquant.model.hessian import collect_hessians, load_hessians
    from gguf_kquant.model.imatrix import load_imatrix

    d = tmp_path / "qwen2moe"
    make_model("qwen2moe", d, hidden_size=256)
    f16 = tmp_path / "f16.gguf"
    gguf_kquant.convert_hf(d, f16, "F16")
    hessians = tmp_path / "h.gguf"
    tokens = np.random.default_rng(4).integers(3, 200, 128)
    collect_hessians(f16, tokens, hessians, ctx=64, threads=1, quiet=True)
    with load_hessians(hessians) as hs:
        assert len(hs.expert_counts) >= 3 and any(w.endswith("[3]") for w in hs.matrix_of)
    ref, ours, alone = tmp_path / "ref.gguf", tmp_path / "ours.gguf", tmp_path / "alone.gguf"
    gguf_kquant.quantize_model(f16, ref, "Q4_0", imatrix=hessians, method="optimized", quiet=True)
    gguf_kquant.convert_hf(d, ours, "Q4_0", imatrix=hessians, method="optimized")
    assert diff_gguf(ours, ref) == []
    plain = copy.copy(load_imatrix(hessians))
    plain.hessians = None
    gguf_kquant.convert_hf(d, alone, "Q4_0", imatrix=plain, method="optimized")
    with gguf_kquant.open(ours) as a, gguf_kquant.open(alone) as b:  # the experts were fed forward
        experts = [t.name for t in a.tensors if "_exps" in t.name]
        assert experts and all(bytes(a.tensors[n].raw()) != bytes(b.tensors[n].raw()) for n in experts)


@pytest.mark.parametrize("ftype", ["F16", "Q4_K_M"])
def test_nonfinite_or_fp16_overflowing_weights_are_refused(tmp_path, tiny, ftype):
    """NaN/Inf in the checkpoint, or F32 values beyond fp16's range in an F16 output: a clear error naming the
    tensor, row and column; nothing is written."""
    from gguf_kquant.convert.safetensors import open_checkpoint, write_safetensors
    from gguf_kquant.errors import BadTensorDataError

    name = "model.layers.1.mlp.down_proj.weight"
    for bad, expect in ((np.nan, r"blk\.1\.ffn_down\.weight.*nan at row 5, column 7"),
                        (1e6, r"blk\.1\.ffn_down\.weight.*1000000\.0 at row 5, column 7 overflows F16")):
        d = _copy(tiny, tmp_path / f"m{bad}")
        ckpt = open_checkpoint(d)
        arrays = {n: np.array(t.array()) for n, t in ckpt.items()}
        files = {t.file.path for _, t in ckpt.items()}
        assert len(files) == 1 and arrays[name].dtype == np.float32
        arrays[name][5, 7] = bad
        del ckpt
        write_safetensors(next(iter(files)), arrays)
        out = tmp_path / f"o-{ftype}.gguf"
        with pytest.raises(BadTensorDataError, match=expect):
            gguf_kquant.convert_hf(d, out, ftype)
        assert not out.exists() and not list(tmp_path.glob("*.tmp*"))

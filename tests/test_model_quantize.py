"""Whole-model quantization against llama.cpp's own llama_model_quantize (the oracle): byte-identical files.

Models (small, realistic structure; built once per session with fixtures/make_example_model.py):
  gqa  : F32, 8 layers, n_head 8 / n_head_kv 2 (GQA 4), untied output
  tied : F16, 4 layers, GQA 2, tied embeddings
  odd  : F32, rows of 320 and 640 (not multiples of 256 or 128: fallbacks, and Q1_0's refusal)
  moe  : F16, 2 layers, 8 experts (3-D expert tensors), GQA 4

The legacy/k-quant/float mixes (K_MIXES) run on gqa and tied with and without an imatrix, a subset on odd
and moe.  The other file types (IQ*, TQ*, MXFP4_MOE, Q1_0, Q2_0, COPY, the aliases) run as NEW_CASES: every
tensor type they produce, every imatrix-dependent rule both ways, each fallback (IQ -> IQ4_NL, Q2_K/TQ1_0 ->
Q4_0, Q1_0's "no fallback"), the expert rules and MXFP4 on moe, and each refusal — not the full product:
tests/test_model_plan.py checks the tensor -> type plan of every mix x model x imatrix against llama.cpp,
so here each case is chosen for the codec path (imatrix or not, per-expert imatrix slices) it puts through.
"""

from __future__ import annotations

import ctypes
import filecmp
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.errors import BadTensorDataError, ImatrixError, QuantizeError
from gguf_kquant.model.mixes import ONLY_COPY
from gguf_kquant.model.planner import allows_quantization, parse_mix
from oracle import llama_logits

K_MIXES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M",
           "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
SUBSET = ["F16", "Q8_0", "Q4_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_S", "Q6_K"]

MODELS = {
    "gqa": dict(n_layer=8, n_embd=256, n_head=8, n_head_kv=2, n_ff=512, n_vocab=512, dtype="F32"),
    "tied": dict(n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512, dtype="F16",
                 tie_embeddings=True),
    "odd": dict(n_layer=3, n_embd=320, n_head=5, n_head_kv=5, n_ff=640, n_vocab=512, dtype="F32"),
    "moe": dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=1, n_ff=256, n_vocab=512, dtype="F16",
                n_expert=8, n_expert_used=2),
}


# --- the oracle -------------------------------------------------------------------------------------
def _llama():
    import oracle  # noqa: F401  (fails loudly if llama-cpp-python is missing)
    import llama_cpp

    return llama_cpp


def oracle_quantize(src, dst, mix, *, imatrix=None, imatrix_kv=(), nthread=2, **params):
    """llama_model_quantize(src, dst, params) with llama-quantize's conventions.  imatrix: name -> values;
    imatrix_kv: [(key, tag, value)] overrides quantize.cpp would add."""
    lc = _llama()
    p = lc.llama_model_quantize_default_params()
    p.ftype = int(parse_mix(mix)[1])
    p.only_copy = parse_mix(mix)[0] in ONLY_COPY
    p.nthread = nthread
    keep = []
    for k, v in params.items():
        setattr(p, k, v)
    if imatrix:
        arr = (lc.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, vals) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(vals, np.float32)
            keep += [v, name.encode()]
            arr[i].name = keep[-1]
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        p.imatrix = arr
        keep.append(arr)
    if imatrix_kv:
        kvs = (lc.llama_model_kv_override * (len(imatrix_kv) + 1))()
        for i, (key, tag, val) in enumerate(imatrix_kv):
            kvs[i].key = key.encode()
            kvs[i].tag = tag
            if tag == lc.LLAMA_KV_OVERRIDE_TYPE_STR:
                kvs[i].value.val_str = val.encode()[:127]
            elif tag == lc.LLAMA_KV_OVERRIDE_TYPE_INT:
                kvs[i].value.val_i64 = val
            elif tag == lc.LLAMA_KV_OVERRIDE_TYPE_FLOAT:
                kvs[i].value.val_f64 = val
            else:
                kvs[i].value.val_bool = val
        kvs[len(imatrix_kv)].key = b""
        p.kv_overrides = kvs
        keep.append(kvs)
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    assert rc == 0, f"oracle failed to quantize {src} to {mix}"
    return Path(dst)


def imatrix_kv(path, values, datasets=("calibration.txt",), chunks=10):
    lc = _llama()
    kv = [("quantize.imatrix.file", lc.LLAMA_KV_OVERRIDE_TYPE_STR, str(path))]
    if datasets:
        kv.append(("quantize.imatrix.dataset", lc.LLAMA_KV_OVERRIDE_TYPE_STR, datasets[0]))
    kv.append(("quantize.imatrix.entries_count", lc.LLAMA_KV_OVERRIDE_TYPE_INT, len(values)))
    if chunks > 0:
        kv.append(("quantize.imatrix.chunks_count", lc.LLAMA_KV_OVERRIDE_TYPE_INT, chunks))
    return kv


# --- models and imatrices ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def models(tmp_path_factory):
    from make_example_model import build_llama_gguf

    d = tmp_path_factory.mktemp("models")
    return {k: build_llama_gguf(d / f"{k}.gguf", seed=i, **kw) for i, (k, kw) in enumerate(MODELS.items())}


def make_imatrix(model_path, out_path, *, seed=0, fmt="gguf"):
    """Synthetic llama-imatrix output for every quantizable tensor (per-expert for MoE tensors).  Returns the
    values llama-quantize uses (sums / counts), computed here independently of gguf_kquant."""
    rng = np.random.default_rng(seed)
    entries = {}
    with gguf_kquant.open(model_path) as f:
        for t in f.tensors:
            if t.name == "token_embd.weight" or not allows_quantization(t.name, len(t.shape), "llama"):
                continue
            n_mat = t.shape[0] if len(t.shape) == 3 else 1
            sums = (rng.random((n_mat, t.shape[-1])) * 50).astype(np.float32)
            counts = rng.integers(0, 40, n_mat).astype(np.float32) if n_mat > 1 else np.array([37.0], np.float32)
            entries[t.name] = (sums, counts)
    values = {}
    if fmt == "gguf":
        import gguf

        w = gguf.GGUFWriter(str(out_path), arch="imatrix")
        # gguf-py writes general.architecture; llama-imatrix does not, but the loader does not care
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", ["calibration.txt"])
        w.add_uint32("imatrix.chunk_count", 10)
        w.add_uint32("imatrix.chunk_size", 512)
        for name, (sums, counts) in sorted(entries.items()):
            w.add_tensor(name + ".in_sum2", sums)
            w.add_tensor(name + ".counts", counts.reshape(-1, 1))
            c = np.where(counts > 0, counts, 0).astype(np.float32)
            v = np.where(c[:, None] > 0, sums / np.where(c > 0, c, 1)[:, None], np.float32(1)).astype(np.float32)
            values[name] = v.reshape(-1)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    else:
        parts = [struct.pack("<i", len(entries))]
        for name, (sums, _counts) in sorted(entries.items()):
            ncall = 7
            b = name.encode()
            flat = sums.reshape(-1)
            parts += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, flat.size), flat.tobytes()]
            values[name] = (flat / np.float32(ncall)).astype(np.float32)
        parts += [struct.pack("<i", 10), struct.pack("<i", 15), b"calibration.txt"]
        Path(out_path).write_bytes(b"".join(parts))
    return values


@pytest.fixture(scope="session")
def imatrices(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("imatrix")
    out = {}
    for i, (k, path) in enumerate(models.items()):
        fmt = "dat" if k == "tied" else "gguf"  # both formats are exercised
        p = d / f"{k}.imatrix.{fmt}"
        out[k] = (p, make_imatrix(path, p, seed=100 + i, fmt=fmt))
    return out


def _check_same(ours: Path, theirs: Path):
    if filecmp.cmp(ours, theirs, shallow=False):
        return
    a, b = ours.read_bytes(), theirs.read_bytes()
    first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    with gguf_kquant.open(theirs) as f:
        where = [t.name for t in f.tensors if t.offset <= first < t.offset + max(t.nbytes, 1)]
    raise AssertionError(f"{ours.name}: {len(a)} bytes vs oracle {len(b)}; first difference at byte {first} "
                         f"{where or '(header)'}")


# (model, mix, imatrix, what it covers) — see the module docstring
NEW_CASES = [
    ("tied", "IQ2_XXS", True, "tied token_embd -> Q5_K; attn_v, first ffn_down Q2_K"),
    ("gqa", "IQ2_XXS", False, "refused: IQ2_XXS needs an imatrix"),
    ("tied", "IQ2_XS", True, "IQ2_XS with imatrix"),
    ("tied", "IQ2_S", True, "mostly IQ2_XS; IQ3_S attn_v, attn_output, first ffn_down"),
    ("gqa", "IQ2_M", True, "IQ2_S; gqa4 attn_v Q4_K; untied token_embd IQ3_S, output Q5_K"),
    ("tied", "IQ1_S", True, "IQ1_S; attn_output IQ2_XXS"),
    ("moe", "IQ1_M", True, "IQ1_M experts with per-expert imatrix; 8 experts: attn_k Q4_K, attn_output Q5_K"),
    ("odd", "IQ1_M", True, "fallbacks IQ1_M -> IQ4_NL, Q2_K -> Q4_0"),
    ("tied", "IQ1_M", False, "refused without an imatrix"),
    ("gqa", "IQ3_XXS", True, "IQ3_XXS; attn_q/attn_k IQ2_S, attn_output IQ3_S"),
    ("gqa", "IQ3_XXS", False, "refused: its attn_q/attn_k become IQ2_S, which needs an imatrix"),
    ("odd", "IQ3_XXS", False, "no imatrix: attn_v IQ3_S, ffn_down Q4_K/Q3_K, all falling back"),
    ("gqa", "IQ3_XS", True, "IQ3_S; attn_q/attn_k and middle ffn_gate/ffn_up IQ3_XXS"),
    ("tied", "IQ3_S", False, "IQ3_S without imatrix"),
    ("gqa", "IQ3_S", True, "IQ3_S with imatrix; gqa4 attn_v Q4_K"),
    ("tied", "IQ3_M", True, "attn_v, attn_output, first ffn_down Q4_K"),
    ("moe", "IQ3_M", False, "8 experts: attn_output Q5_K, more_bits ffn_down Q4_K"),
    ("tied", "IQ4_NL", False, "IQ4_NL without imatrix"),
    ("odd", "IQ4_NL", True, "IQ4_NL with imatrix on rows of 320; ragged output Q8_0"),
    ("gqa", "IQ4_XS", False, "gqa4 attn_v Q5_K; first ffn_down Q5_K only without imatrix"),
    ("gqa", "IQ4_XS", True, "IQ4_XS with imatrix"),
    ("odd", "IQ4_XS", False, "fallback IQ4_XS -> IQ4_NL"),
    ("gqa", "TQ1_0", False, "TQ1_0; untied token_embd Q4_K"),
    ("odd", "TQ1_0", True, "fallback TQ1_0 -> Q4_0; imatrix keys only"),
    ("tied", "TQ2_0", True, "TQ2_0"),
    ("moe", "MXFP4_MOE", False, "expert tensors MXFP4, the rest Q8_0"),
    ("moe", "MXFP4_MOE", True, "the same with imatrix keys"),
    ("gqa", "MXFP4_MOE", False, "no experts: all Q8_0"),
    ("gqa", "Q1_0", True, "Q1_0"),
    ("odd", "Q1_0", False, "refused: rows of 320 and Q1_0's 128-blocks have no fallback type"),
    ("gqa", "Q2_0", False, "Q2_0; token_embd Q4_K"),
    ("odd", "Q2_0", True, "Q2_0 on rows of 320 and 640"),
    ("gqa", "COPY", False, "every tensor copied"),
    ("gqa", "COPY", True, "copied, imatrix keys added"),
    ("tied", "COPY", False, "F16 source keeps general.file_type 1"),
    ("tied", "Q3_K", False, "alias of Q3_K_M"),
    ("tied", "Q4_K", True, "alias of Q4_K_M"),
    ("moe", "Q5_K", False, "alias of Q5_K_M"),
]


def _cases():
    for mix in K_MIXES:
        for model in ("gqa", "tied"):
            for im in (False, True):
                yield model, mix, im
    for mix in SUBSET:
        yield "odd", mix, False
        yield "moe", mix, False
    for mix in ("Q4_K_M", "Q2_K_S", "Q4_0"):
        yield "odd", mix, True
        yield "moe", mix, True
    for model, mix, im, _why in NEW_CASES:
        yield model, mix, im


@pytest.mark.parametrize("model,mix,use_imatrix", list(_cases()))
def test_byte_identical_to_llama_quantize(models, imatrices, tmp_path, model, mix, use_imatrix):
    src = models[model]
    refusal = _REFUSED.get((model, mix, use_imatrix))
    if refusal is not None:
        _check_refused(src, tmp_path, mix, *refusal)
        return
    kw = {}
    okw = {}
    if use_imatrix:
        path, values = imatrices[model]
        kw["imatrix"] = path
        okw = dict(imatrix=values, imatrix_kv=imatrix_kv(path, values))
    theirs = oracle_quantize(src, tmp_path / "theirs.gguf", mix, **okw)
    res = gguf_kquant.quantize_model(src, tmp_path / "ours.gguf", mix, threads=2, **kw)
    _check_same(tmp_path / "ours.gguf", theirs)
    assert res.dst_nbytes < res.src_nbytes or mix in ("F32", "F16", "BF16", "COPY")


# (model, mix, imatrix) -> (error, message) where llama-quantize refuses too
_REFUSED = {(m, mix, False): (ImatrixError, "importance matrix")
            for m in ("gqa", "tied", "odd", "moe") for mix in ("Q2_K_S",)}
_REFUSED.update({(m, mix, im): (ImatrixError, r"\(%s\) requires an importance matrix: tensor blk\.0\." % mix)
                 for m, mix, im, why in NEW_CASES if why.startswith("refused") and "imatrix" in why})
_REFUSED[("odd", "Q1_0", False)] = (QuantizeError, r"rows of 320 .*no tensor type fallback is defined for type Q1_0")


def _check_refused(src, tmp_path, mix, error, message):
    """llama-quantize fails, and so do we: a typed error naming the cause, before any tensor is converted."""
    with pytest.raises(AssertionError, match="oracle failed"):
        oracle_quantize(src, tmp_path / "theirs.gguf", mix)
    import gguf_kquant.codecs as codecs

    def no_work(*_a, **_k):
        raise AssertionError("a tensor was converted before the refusal")

    saved = codecs.quantize
    codecs.quantize = no_work
    try:
        with pytest.raises(error, match=message):
            gguf_kquant.quantize_model(src, tmp_path / "ours.gguf", mix)
    finally:
        codecs.quantize = saved
    assert not list(tmp_path.glob("ours*"))


# --- options ----------------------------------------------------------------------------------------
OPTION_CASES = [
    ("pure", dict(pure=True), dict(pure=True)),
    ("leave_output", dict(leave_output_tensor=True), dict(quantize_output_tensor=False)),
    ("output_type", dict(output_tensor_type="Q8_0"), dict(output_tensor_type=8)),
    ("embd_type", dict(token_embedding_type="q5_0"), dict(token_embedding_type=6)),
]


@pytest.mark.parametrize("name,ours_kw,oracle_kw", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_options_match_llama_quantize(models, tmp_path, name, ours_kw, oracle_kw):
    src = models["gqa"]
    theirs = oracle_quantize(src, tmp_path / "theirs.gguf", "Q4_K_M", **oracle_kw)
    gguf_kquant.quantize_model(src, tmp_path / "ours.gguf", "Q4_K_M", **ours_kw)
    _check_same(tmp_path / "ours.gguf", theirs)


def test_tensor_type_overrides_and_kv_overrides(models, tmp_path):
    lc = _llama()
    src = models["gqa"]
    tt = (lc.llama_model_tensor_override * 3)()
    pats = [b"attn_q", b"ffn_(up|gate)"]
    tt[0].pattern, tt[0].type = pats[0], 8  # Q8_0
    tt[1].pattern, tt[1].type = pats[1], 6  # Q5_0
    tt[2].pattern = None
    kv = [("general.name", lc.LLAMA_KV_OVERRIDE_TYPE_STR, "renamed"),
          ("custom.answer", lc.LLAMA_KV_OVERRIDE_TYPE_INT, -42),
          ("custom.ratio", lc.LLAMA_KV_OVERRIDE_TYPE_FLOAT, 0.1),
          ("custom.flag", lc.LLAMA_KV_OVERRIDE_TYPE_BOOL, True)]
    theirs = oracle_quantize(src, tmp_path / "theirs.gguf", "Q4_K_M", tt_overrides=tt, imatrix_kv=kv)
    gguf_kquant.quantize_model(
        src, tmp_path / "ours.gguf", "Q4_K_M", tensor_types=["ATTN_Q=q8_0", "ffn_(up|gate)=Q5_0"],
        override_kv=["general.name=str:renamed", "custom.answer=int:-42", "custom.ratio=float:0.1",
                     "custom.flag=bool:true"])
    _check_same(tmp_path / "ours.gguf", theirs)


def test_the_cli_says_the_librarys_argument_names_as_flags_but_not_inside_paths():
    from gguf_kquant.cli import _in_flags

    assert _in_flags("keep_split cannot be combined with split_max_size/split_max_tensors") == \
        "--keep-split cannot be combined with --split-max-size/--split-max-tensors"
    paths = "/data/keep_split/m.gguf: truncated; keep_split.gguf"
    assert _in_flags(paths) == paths
    assert _in_flags("tensor blk.0.attn_q.weight is to become IQ2_XS; give an imatrix") == \
        "tensor blk.0.attn_q.weight is to become IQ2_XS; give an imatrix (--imatrix)"


def test_requantize_needs_flag_and_matches(models, tmp_path, capsys):
    from gguf_kquant.cli import main

    q8 = oracle_quantize(models["gqa"], tmp_path / "q8.gguf", "Q8_0")
    with pytest.raises(QuantizeError, match="without allow_requantize$"):  # the library's own words
        gguf_kquant.quantize_model(q8, tmp_path / "ours.gguf", "Q4_0")
    assert main(["quantize", str(q8), str(tmp_path / "ours.gguf"), "Q4_0"]) == 1
    assert capsys.readouterr().err.endswith("requantizing is disabled without --allow-requantize\n")  # the CLI's
    assert not (tmp_path / "ours.gguf").exists()
    theirs = oracle_quantize(q8, tmp_path / "theirs.gguf", "Q4_0", allow_requantize=True)
    gguf_kquant.quantize_model(q8, tmp_path / "ours.gguf", "Q4_0", allow_requantize=True)
    _check_same(tmp_path / "ours.gguf", theirs)


def test_imatrix_include_exclude(models, imatrices, tmp_path):
    src = models["gqa"]
    path, values = imatrices["gqa"]
    for how, keep in (("include", lambda n: "ffn" in n), ("exclude", lambda n: "attn" not in n)):
        sel = {k: v for k, v in values.items() if keep(k)}
        theirs = oracle_quantize(src, tmp_path / f"theirs_{how}.gguf", "Q4_K_M", imatrix=sel,
                                 imatrix_kv=imatrix_kv(path, sel))
        kw = {"include_weights": ["ffn"]} if how == "include" else {"exclude_weights": ["attn"]}
        gguf_kquant.quantize_model(src, tmp_path / f"ours_{how}.gguf", "Q4_K_M", imatrix=path, **kw)
        _check_same(tmp_path / f"ours_{how}.gguf", theirs)


def _write_split_copy(src, out_path, max_tensors):
    """Re-write ``src`` as shards of at most ``max_tensors`` tensors with gguf-py's split writer."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(out_path), "llama", split_max_tensors=max_tensors)
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vt = field.types[0]
        sub = field.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vt, sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_keep_split_matches(models, tmp_path):
    src = models["tied"]
    with gguf_kquant.open(src) as f:
        n = len(f.tensors)
    _write_split_copy(src, tmp_path / "m.gguf", n // 2 + 1)
    first = sorted(tmp_path.glob("m-00001-of-*.gguf"))[0]
    oracle_quantize(first, tmp_path / "theirs", "Q4_K_M", keep_split=True)
    res = gguf_kquant.quantize_model(first, tmp_path / "ours.gguf", "Q4_K_M", keep_split=True)
    theirs = sorted(tmp_path.glob("theirs-*-of-*.gguf"))
    assert len(theirs) == len(res.paths) == 2
    assert [p.name for p in res.paths] == [p.name.replace("theirs", "ours") for p in theirs]
    for a, b in zip(res.paths, theirs):
        _check_same(Path(a), b)
    # without --keep-split the shards are merged into one file, as llama-quantize does
    oracle_quantize(first, tmp_path / "merged_theirs.gguf", "Q4_K_M")
    gguf_kquant.quantize_model(first, tmp_path / "merged_ours.gguf", "Q4_K_M")
    _check_same(tmp_path / "merged_ours.gguf", tmp_path / "merged_theirs.gguf")


# --- llama.cpp loads our output and computes the same logits -------------------------------------------
@pytest.mark.parametrize("model,mix", [("gqa", "Q4_K_M"), ("moe", "Q3_K_M"), ("odd", "Q5_K_M"), ("tied", "Q2_K")])
def test_llama_cpp_runs_our_output(models, tmp_path, model, mix):
    src = models[model]
    ours = tmp_path / "ours.gguf"
    gguf_kquant.quantize_model(src, ours, mix)
    theirs = oracle_quantize(src, tmp_path / "theirs.gguf", mix)
    tokens = [1, 300, 301, 302, 303, 304, 305]
    a = llama_logits(ours, tokens, tmp_path / "a.npy")
    b = llama_logits(theirs, tokens, tmp_path / "b.npy")
    f = llama_logits(src, tokens, tmp_path / "f.npy")
    assert a.shape == (len(tokens), 512) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    # and quantization changed them only a little (the model is random, so the bound is loose)
    assert np.corrcoef(a.ravel(), f.ravel())[0, 1] > 0.9


# --- refusals ---------------------------------------------------------------------------------------
def test_unknown_mix_lists_valid_ones(models, tmp_path):
    with pytest.raises(QuantizeError, match="Q4_K_M"):
        gguf_kquant.quantize_model(models["gqa"], tmp_path / "o.gguf", "Q4_K_X")


def test_destination_equal_to_source(models):
    with pytest.raises(QuantizeError, match="same"):
        gguf_kquant.quantize_model(models["gqa"], models["gqa"], "Q8_0")


def test_nonfinite_weights_name_tensor_row_column(tmp_path):
    import gguf

    p = tmp_path / "nan.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    x = np.ones((4, 256), np.float32)
    x[2, 17] = np.nan
    w.add_tensor("blk.0.attn_q.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BadTensorDataError, match=r"blk\.0\.attn_q\.weight.*row 2, column 17"):
        gguf_kquant.quantize_model(p, tmp_path / "o.gguf", "Q8_0")
    assert not list(tmp_path.glob("*o.gguf*"))


def test_imatrix_wrong_length_or_nonfinite(models, tmp_path):
    src = models["gqa"]
    bad_len = {"blk.0.attn_q.weight": np.ones(100, np.float32)}
    with pytest.raises(ImatrixError, match="blk.0.attn_q.weight"):
        gguf_kquant.quantize_model(src, tmp_path / "o.gguf", "Q4_K_M", imatrix=bad_len)
    bad_val = {"blk.0.attn_q.weight": np.full(256, np.inf, np.float32)}
    with pytest.raises(ImatrixError, match="non-finite"):
        gguf_kquant.quantize_model(src, tmp_path / "o.gguf", "Q4_K_M", imatrix=bad_val)
    assert not (tmp_path / "o.gguf").exists()


# --- dry run, CLI, report ---------------------------------------------------------------------------
def test_dry_run_writes_nothing_and_cli_report(models, tmp_path, capsys):
    from gguf_kquant.cli import main

    out = tmp_path / "o.gguf"
    assert main(["quantize", str(models["gqa"]), str(out), "q4_k_m", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "blk.0.attn_v.weight" in text and "Q6_K" in text and "quant size" in text
    rep = tmp_path / "r.json"
    assert main(["quantize", str(models["gqa"]), str(out), "Q4_K_M", "--report", str(rep)]) == 0
    doc = json.loads(rep.read_text())
    t = {x["name"]: x for x in doc["tensors"]}
    assert t["output.weight"]["type"] == "Q6_K" and t["output.weight"]["cosine"] > 0.99
    assert t["blk.0.attn_q.weight"]["rmse"] > 0 and t["blk.0.attn_q.weight"]["max_abs_error"] > 0
    assert "worst tensors" in capsys.readouterr().out
    assert main(["quantize", str(models["gqa"]), str(out), "Q9_X", "-q"]) == 1


def test_progress_lines_and_quiet(models, tmp_path, capsys):
    from gguf_kquant.cli import main

    src, out = models["gqa"], tmp_path / "o.gguf"
    assert main(["quantize", str(src), str(out), "Q4_K_M"]) == 0
    lines = capsys.readouterr().err.splitlines()  # progress goes to stderr
    with gguf_kquant.open(src) as f:
        names = {t.name for t in f.tensors}
    per_tensor = [ln for ln in lines if ln.startswith("[")]
    assert len(per_tensor) == len(names)
    assert all(any(f" {n} " in ln for n in names) for ln in per_tensor)
    percents = [float(ln.split("]")[1].split("%")[0]) for ln in per_tensor]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert any("MiB/s" in ln and "->" in ln for ln in per_tensor)
    assert lines[-1].startswith("time") and "MiB/s" in lines[-1]
    out.unlink()
    assert main(["quantize", str(src), str(out), "Q4_K_M", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == captured.err == "" and out.exists()


def test_split_max_tensors_and_size(models, tmp_path):
    """Split output as llama-gguf-split would cut llama-quantize's file: same tensors and bytes, and
    llama.cpp loads it (the logits equal the single file's)."""
    src = models["gqa"]
    single = tmp_path / "single.gguf"
    gguf_kquant.quantize_model(src, single, "Q4_K_M")
    res = gguf_kquant.quantize_model(src, tmp_path / "s.gguf", "Q4_K_M", split_max_tensors=30)
    assert [p.name for p in res.paths] == [f"s-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with gguf_kquant.open(single) as a, gguf_kquant.open(res.paths[0]) as b:
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        assert all(bytes(x.raw()) == bytes(y.raw()) for x, y in zip(a.tensors, b.tensors))
        assert b.metadata["split.count"] == 3 and b.metadata["split.tensors.count"] == len(a.tensors)
        assert list(b.metadata)[-3:] == ["split.no", "split.tensors.count", "split.count"]
    tokens = [1, 300, 301]
    np.testing.assert_array_equal(llama_logits(res.paths[0], tokens, tmp_path / "a.npy"),
                                  llama_logits(single, tokens, tmp_path / "b.npy"))
    res = gguf_kquant.quantize_model(src, tmp_path / "z.gguf", "Q4_K_M", split_max_size="1M")
    assert len(res.paths) == 3 and all(p.stat().st_size < 1_100_000 for p in res.paths)
    res = gguf_kquant.quantize_model(src, tmp_path / "y.gguf", "Q4_K_M", split_max_tensors=len(single_names(single)))
    assert [p.name for p in res.paths] == ["y-00001-of-00001.gguf"]


def single_names(path):
    with gguf_kquant.open(path) as f:
        return [t.name for t in f.tensors]


def test_keep_split_of_a_single_file_names_one_shard(models, tmp_path):
    src = models["tied"]
    oracle_quantize(src, tmp_path / "theirs", "Q8_0", keep_split=True)
    res = gguf_kquant.quantize_model(src, tmp_path / "ours.gguf", "Q8_0", keep_split=True)
    assert [p.name for p in res.paths] == ["ours-00001-of-00001.gguf"]
    _check_same(res.paths[0], tmp_path / "theirs-00001-of-00001.gguf")


def test_report_does_not_depend_on_the_blas_thread_count(tmp_path):
    """The report's sums are numpy's, not a BLAS dot product's (whose last digits follow its thread count:
    test_faults once saw a report written in another process differ from the reference)."""
    import os
    import subprocess
    import sys

    src = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama-f16.gguf"
    code = ("import sys, gguf_kquant; gguf_kquant.quantize_model(sys.argv[1], sys.argv[2], 'Q4_K_M', "
            "report=sys.argv[3])")
    reports = []
    for n in ("1", "2"):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
        out, rep = tmp_path / f"q{n}.gguf", tmp_path / f"q{n}.json"
        subprocess.run([sys.executable, "-c", code, str(src), str(out), str(rep)], check=True, env=env)
        reports.append(rep.read_bytes())
    assert reports[0] == reports[1]

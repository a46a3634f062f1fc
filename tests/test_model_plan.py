"""The planner decides every tensor's type exactly as llama-quantize does, and it works from plain
(name, shape, type) tuples without a file.

Every mix (36, COPY included) on every test model (GQA 4, tied embeddings, rows of 320/640 that trigger the
fallbacks, 8-expert MoE), with and without an importance matrix, is compared with llama_model_quantize's
own plan: its --dry-run log (tensor -> type), its refusals (a tensor that needs an imatrix, a row length
with no fallback type) — 288 cases at the cost of loading the model, no quantization.  Rules the files
cannot reach (70B, falcon, 8-expert llama, 4 experts, glm5-next, bailingmoe3, fused attn_qkv) are compared
with llama.cpp's own llama_quant_compute_types on mock models (llama-ext.h), every mix, no imatrix.
"""

from __future__ import annotations

import ctypes
import re

import pytest

import gguf_kquant
from gguf_kquant.errors import QuantizeError
from gguf_kquant.model.mixes import ALIASES, MIXES, NAMES, NOT_WRITABLE
from gguf_kquant.model.planner import ModelInfo, order_key, parse_mix, plan_model, plan_tensors
from gguf_kquant.types import GGMLType as T, TYPES

from test_model_quantize import _llama, imatrices, models, oracle_quantize  # noqa: F401  (fixtures)


def _types(path):
    with gguf_kquant.open(path) as f:
        return [(t.name, t.type_name) for t in f.tensors]


_DRY_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\S+), size =\s+[\d.]+ MiB"
                       r"(?: ->\s+[\d.]+ MiB \((\S+)\))?$", re.M)


def oracle_plan(src, mix, *, imatrix=None, **params):
    """llama_model_quantize(..., dry_run=True): [(tensor, type name)] in its order, None if it refuses, and
    whether it warns that the real run would need an imatrix.  Read from llama.cpp's log."""
    lc = _llama()
    from llama_cpp import _logger

    text = []

    @lc.llama_log_callback
    def capture(_level, msg, _user):
        text.append(msg.decode("utf-8", "replace"))

    lc.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        oracle_quantize(src, "unused.gguf", mix, imatrix=imatrix, dry_run=True,
                        only_copy=mix == "COPY", **params)
        ok = True
    except AssertionError:
        ok = False
    finally:
        lc.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    log = "".join(text)
    if not ok:
        return None, log
    rows = [(m.group(1), (m.group(3) or m.group(2)).upper()) for m in _DRY_LINE.finditer(log)]
    assert rows, log[-2000:]
    return rows, "will require an imatrix" in log


def _ours(src, mix, use_im):
    """Our plan in the oracle's terms: rows, whether a real run needs an imatrix; None where we refuse."""
    try:
        plan = plan_model(src, mix, imatrix=use_im)
    except QuantizeError as exc:
        return None, str(exc)
    needs = bool(plan.imatrix_required_by)
    assert "output.weight" not in plan.imatrix_required_by and "token_embd.weight" not in plan.imatrix_required_by
    return [(r.name, r.dst_type.name) for r in plan.rows], needs and not use_im


@pytest.mark.parametrize("model", ["gqa", "tied", "odd", "moe"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_plan_matches_oracle(models, imatrices, model, mix):
    src = models[model]
    for use_im in (False, True):
        theirs, t_info = oracle_plan(src, mix, imatrix=imatrices[model][1] if use_im else None)
        ours, o_info = _ours(src, mix, use_im)
        assert (ours is None) == (theirs is None), (use_im, o_info if ours is None else t_info[-500:])
        if ours is not None:
            assert ours == theirs, use_im
            assert o_info == t_info, use_im  # the dry run's "will require an imatrix"


def test_no_fallback_type_is_a_typed_error_naming_the_tensor(models):
    theirs, log = oracle_plan(models["odd"], "Q1_0")
    assert theirs is None and "no tensor type fallback is defined for type q1_0" in log
    # the tensor llama.cpp was planning when it threw: the last one it warned about
    culprit = re.findall(r"warning: (\S+)\s+- ncols\s+320 not divisible by 128", log)[-1]
    with pytest.raises(QuantizeError, match=rf"tensor {re.escape(culprit)}: rows of 320 are not a multiple of "
                                            r"128 .*no tensor type fallback is defined for type Q1_0"):
        plan_model(models["odd"], "Q1_0")
    rows = [("blk.0.attn_q.weight", (8, 96), "F32")]  # NVFP4 (64-blocks) has no fallback either
    with pytest.raises(QuantizeError, match="attn_q.*NVFP4"):
        plan_tensors(rows, ModelInfo("llama", 1, 8, 8), "Q8_0", tensor_types=["attn_q=nvfp4"])


def test_fallback_to_iq4_nl_then_f16():
    """IQ types fall back to IQ4_NL for rows of 32k, and to F16 when even that does not fit."""
    rows = [("token_embd.weight", (64, 256), "F32"), ("output.weight", (64, 256), "F32"),
            ("blk.0.attn_q.weight", (32, 96), "F32"), ("blk.0.attn_k.weight", (32, 80), "F32")]
    plan = {r.name: r for r in plan_tensors(rows, ModelInfo("llama", 1, 8, 8), "IQ4_XS")}
    assert plan["blk.0.attn_q.weight"].dst_type == T.IQ4_NL and plan["blk.0.attn_q.weight"].fallback
    assert plan["blk.0.attn_k.weight"].dst_type == T.F16 and plan["blk.0.attn_k.weight"].fallback


def test_copy_keeps_the_source_file_type(models, tmp_path):
    """COPY writes general.file_type = the source's, or llama_model_loader's guess (with the GUESSED bit)."""
    import gguf

    for model in ("gqa", "tied"):
        theirs = oracle_quantize(models[model], tmp_path / f"{model}.gguf", "COPY", only_copy=True)
        with gguf_kquant.open(theirs) as f:
            assert int(plan_model(models[model], "COPY").file_type) == int(f.metadata["general.file_type"])
    # a source without general.file_type: F16 weights outnumber the F32 norms
    r = gguf.GGUFReader(str(models["tied"]))
    w = gguf.GGUFWriter(str(tmp_path / "noft.gguf"), "llama")
    for fld in r.fields.values():
        if not fld.name.startswith("GGUF.") and fld.name not in ("general.architecture", "general.file_type"):
            vt = fld.types[0]
            w.add_key_value(fld.name, fld.contents(), vt, fld.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, t.data.copy(), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    theirs = oracle_quantize(tmp_path / "noft.gguf", tmp_path / "noft-copy.gguf", "COPY", only_copy=True)
    with gguf_kquant.open(theirs) as f:
        assert f.metadata["general.file_type"] == 1024 + 1
    plan = plan_model(tmp_path / "noft.gguf", "COPY")
    assert plan.file_type == 1024 + 1 and all(r.dst_type == r.src_type for r in plan.rows)


_WRITABLE = [t for t in TYPES if t not in NOT_WRITABLE]


@pytest.mark.parametrize("model", ["gqa", "odd"])
def test_type_options_accept_every_type(models, model):
    """--tensor-type, --output-tensor-type and --token-embedding-type take every type ggml can write (with
    the fallbacks, or llama.cpp's refusal, of types that do not fit the rows), as llama.cpp plans them."""
    lc = _llama()
    n = len(_WRITABLE)
    for k, t in enumerate(_WRITABLE):
        out_t, emb_t = _WRITABLE[(k + 7) % n], _WRITABLE[(k + 13) % n]
        tt = (lc.llama_model_tensor_override * 2)()
        pat = b"attn_(q|output)"
        tt[0].pattern, tt[0].type = pat, int(t)
        tt[1].pattern = None
        theirs, _ = oracle_plan(models[model], "Q4_K_M", tt_overrides=tt, output_tensor_type=int(out_t),
                                token_embedding_type=int(emb_t))
        try:
            plan = plan_model(models[model], "Q4_K_M", tensor_types=[f"ATTN_(Q|OUTPUT)={t.name.lower()}"],
                              output_tensor_type=out_t.name, token_embedding_type=emb_t.name.lower())
        except QuantizeError as exc:
            if "not a multiple" in str(exc) and theirs is not None:
                # llama.cpp's dry run passes; its real run would write a file llama.cpp cannot load
                with gguf_kquant.open(models[model]) as f:
                    ne0 = {x.name: x.shape[-1] for x in f.tensors}
                assert any(ne0[n] % TYPES[T[tn]].block_size for n, tn in theirs), t.name
            else:
                assert theirs is None, t.name
            continue
        assert [(r.name, r.dst_type.name) for r in plan.rows] == theirs, t.name


def test_types_ggml_cannot_write_are_refused_before_work():
    rows = [("token_embd.weight", (64, 256), "F32"), ("blk.0.attn_q.weight", (32, 256), "F32")]
    for t in ("Q8_1", "Q8_K", "I32", "F64"):
        with pytest.raises(QuantizeError, match=f"attn_q.*{t}"):
            plan_tensors(rows, ModelInfo("llama", 1, 8, 8), "Q4_K_M", tensor_types=[f"attn_q={t}"])
    # no fallback applies to --output-tensor-type: a type that does not fit the rows is refused
    rows = [("token_embd.weight", (64, 320), "F32"), ("output.weight", (64, 320), "F32")]
    with pytest.raises(QuantizeError, match="output.weight: rows of 320 .* 256, the block size of Q4_K"):
        plan_tensors(rows, ModelInfo("llama", 1, 8, 8), "Q8_0", output_tensor_type="q4_k")


def test_plan_with_imatrix_changes_q4_0_ffn_down(models, imatrices, tmp_path):
    src = models["gqa"]
    theirs = oracle_quantize(src, tmp_path / "t.gguf", "Q4_0", imatrix=imatrices["gqa"][1])
    plan = plan_model(src, "Q4_0", imatrix=True)
    assert [(r.name, r.dst_type.name) for r in plan.rows] == _types(theirs)
    assert plan.rows[[r.name for r in plan.rows].index("blk.0.ffn_down.weight")].dst_type == T.Q4_1


def test_fallback_count(models):
    plan = plan_model(models["odd"], "Q4_K_M")
    assert plan.n_fallback == sum(r.fallback for r in plan.rows) > 0
    assert any("falling back to" in w for w in plan.warnings)
    assert "required fallback quantization" in plan.format()


def _llama_like(n_layer, n_embd=4096, n_kv=1024, vocab=32000, extra=()):
    rows = [("token_embd.weight", (vocab, n_embd), "F16"), ("output.weight", (vocab, n_embd), "F16"),
            ("output_norm.weight", (n_embd,), "F32")]
    for i in range(n_layer):
        for name, shape in (("attn_q", (n_embd, n_embd)), ("attn_k", (n_kv, n_embd)), ("attn_v", (n_kv, n_embd)),
                            ("attn_output", (n_embd, n_embd)), ("ffn_down", (n_embd, 11008)),
                            ("ffn_up", (11008, n_embd)), ("ffn_gate", (11008, n_embd))):
            rows.append((f"blk.{i}.{name}.weight", shape, "F16"))
        rows.append((f"blk.{i}.attn_norm.weight", (n_embd,), "F32"))
    return rows + list(extra)


def test_plan_from_tuples_70b_and_falcon_rules():
    rows = _llama_like(80)
    m70 = ModelInfo("llama", n_layer=80, n_head=64, n_head_kv=8)
    assert m70.is_70b and not ModelInfo("llama", 80, 64, 64).is_70b
    plan = {r.name: r.dst_type for r in plan_tensors(rows, m70, "Q3_K_S")}
    assert plan["blk.40.attn_v.weight"] == T.Q5_K  # 70B bump of Q3_K
    assert plan["blk.40.ffn_up.weight"] == T.Q3_K
    plan = {r.name: r.dst_type for r in plan_tensors(rows, ModelInfo("falcon", 80, 64, 8), "Q4_K_M")}
    assert plan["output.weight"] == T.Q8_0  # falcon output
    assert plan["blk.0.ffn_down.weight"] == T.Q6_K and plan["blk.79.ffn_down.weight"] == T.Q5_K


def test_order_key_is_llama_loader_order():
    names = ["blk.10.a", "blk.2.b", "output.weight", "blk.2.a", "token_embd.weight", "blk.x"]
    assert sorted(names, key=order_key) == ["blk.x", "output.weight", "token_embd.weight", "blk.2.a",
                                            "blk.2.b", "blk.10.a"]


def test_tensor_type_first_match_wins_and_pure():
    rows = _llama_like(2)
    m = ModelInfo("llama", 2, 32, 8)
    plan = {r.name: r for r in plan_tensors(rows, m, "Q4_K_M", tensor_types=["attn=q8_0", "attn_v=f16"])}
    assert plan["blk.0.attn_v.weight"].dst_type == T.Q8_0 and plan["blk.0.attn_v.weight"].manual
    pure = {r.name: r.dst_type for r in plan_tensors(rows, m, "Q4_K_M", pure=True)}
    assert pure["output.weight"] == T.Q4_K and pure["blk.1.ffn_down.weight"] == T.Q4_K


def test_parse_mix():
    assert parse_mix("q4_k_m")[0] == "Q4_K_M" and parse_mix("Q4_K")[0] == "Q4_K_M" and parse_mix(15)[0] == "Q4_K_M"
    # llama-quantize's 39 names; the aliases name the _M mixes; ftype 0 is F32, not COPY
    assert len(NAMES) == 39 and {n: parse_mix(n)[0] for n in ALIASES} == {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M",
                                                                          "Q5_K": "Q5_K_M"}
    assert parse_mix(0)[0] == "F32" and parse_mix("copy")[0] == "COPY" and parse_mix("iq2_m")[2] == T.IQ2_S
    assert parse_mix("MOSTLY_IQ4_XS")[:2] == ("IQ4_XS", 30) and parse_mix(38)[0] == "MXFP4_MOE"
    with pytest.raises(QuantizeError, match="IQ1_M.*COPY"):
        parse_mix("IQ5_K")
    with pytest.raises(QuantizeError, match="Q5_K_S"):
        parse_mix("Q7_K")


from hypothesis import given, settings, strategies as st  # noqa: E402

_NAMES = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down", "ffn_gate", "attn_norm",
          "ffn_gate_inp", "attn_qkv"]


@settings(max_examples=60, deadline=None)
@given(n_layer=st.integers(1, 12), ne0=st.sampled_from([32, 64, 96, 256, 320, 512, 48]),
       mix=st.sampled_from(list(MIXES)), n_expert=st.sampled_from([0, 4, 8]), tied=st.booleans(),
       picks=st.lists(st.sampled_from(_NAMES), min_size=1, max_size=6, unique=True))
def test_plan_invariants(n_layer, ne0, mix, n_expert, tied, picks):
    rows = [("token_embd.weight", (64, ne0), "F32")] + ([] if tied else [("output.weight", (64, ne0), "F32")])
    for i in range(n_layer):
        rows += [(f"blk.{i}.{n}.weight", (ne0,) if n.endswith("norm") else (32, ne0), "F32") for n in picks]
    try:
        plan = plan_tensors(rows, ModelInfo("llama", n_layer, 8, 2, n_expert), mix, imatrix=True)
    except QuantizeError as exc:  # Q1_0's 128-blocks are the only default with no fallback type
        assert mix == "Q1_0" and ne0 % 128 and "no tensor type fallback" in str(exc)
        return
    assert sorted(r.name for r in plan.rows) == sorted(r[0] for r in rows)
    assert [order_key(r.name) for r in plan.rows] == sorted(order_key(r.name) for r in plan.rows)
    for r in plan.rows:
        from gguf_kquant.types import TYPES

        assert r.shape[-1] % TYPES[r.dst_type].block_size == 0  # fallbacks always fit
        if not r.allows_quantization:
            assert r.dst_type == r.src_type
    assert plan.n_fallback == sum(r.fallback for r in plan.rows)


def test_cli_dry_run_takes_new_mixes_and_any_type(models, tmp_path, capsys):
    from gguf_kquant.cli import main

    lc = _llama()
    tt = (lc.llama_model_tensor_override * 2)()
    tt[0].pattern, tt[0].type = b"attn_q", int(T.IQ2_S)
    tt[1].pattern = None
    theirs, needs_im = oracle_plan(models["gqa"], "IQ4_XS", tt_overrides=tt, output_tensor_type=int(T.MXFP4),
                                   token_embedding_type=int(T.TQ2_0))
    assert needs_im  # attn_q as IQ2_S needs an imatrix: the dry run says so, the real run refuses
    argv = ["quantize", str(models["gqa"]), str(tmp_path / "o.gguf"), "iq4_xs", "--tensor-type", "attn_q=iq2_s",
            "--output-tensor-type", "MXFP4", "--token-embedding-type", "tq2_0"]
    assert main(argv + ["--dry-run"]) == 0
    text = capsys.readouterr().out
    for name, t in theirs:
        assert re.search(rf"\] {re.escape(name)} .*-> {t}\b|\] {re.escape(name)} .*, +{t} ", text), (name, t)
    assert "will require an imatrix" in text
    assert main(argv + ["-q"]) == 1 and not (tmp_path / "o.gguf").exists()


def test_guessed_file_type_and_its_name():
    from gguf_kquant.ftypes import file_type_name, guess_file_type

    # llama_model_loader: the type that first reaches the highest count, in name order
    assert guess_file_type(["F32", "F16", "F16", "F32"]) == 1024 + 1
    assert guess_file_type(["Q4_K", "Q6_K", "Q6_K", "Q4_K"]) == 1024 + 18  # Q6_K reached 2 first
    assert guess_file_type(["Q4_K", "Q6_K", "Q6_K", "F32", "F32", "F32"]) == 1024 + 0
    assert guess_file_type(["Q3_K", "Q3_K"]) == 1024 + 12 and guess_file_type(["I32"]) == 1024  # unknown: F32
    assert file_type_name(1025) == "MOSTLY_F16 (guessed)" and file_type_name(38) == "MOSTLY_MXFP4_MOE"


# --- llama.cpp's own planner on synthetic models (llama-ext.h): architectures and sizes no file covers ---
class _QuantModelDesc(ctypes.Structure):  # struct llama_quant_model_desc (src/llama-ext.h)
    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (f, ctypes.c_uint32) for f in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert",
                                       "n_embd_head_k", "n_embd_head_v")]


class _GGMLInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def oracle_compute_types(arch, tensors, mix, *, n_layer, n_head, n_head_kv, n_expert=0):
    """llama_quant_compute_types (C++ symbols of libllama, no imatrix) on a mock model: the type llama.cpp
    gives each of ``tensors`` — (name, numpy shape, type), in llama-quantize's order — for file type ``mix``.
    Only for tensors whose rows fit: a C++ exception would end the process."""
    from oracle import ggml, libllama

    lc, L, G = _llama(), libllama(), ggml()
    new_model = L._Z31llama_quant_model_from_metadataPK22llama_quant_model_desc
    new_model.restype, new_model.argtypes = ctypes.c_void_p, [ctypes.POINTER(_QuantModelDesc)]
    init = L._Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params
    init.restype, init.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]
    compute = L._Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem
    compute.restype = None
    compute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    L._Z16llama_quant_freeP19quantize_state_impl.argtypes = [ctypes.c_void_p]
    L.llama_model_free.argtypes = [ctypes.c_void_p]
    G.ggml_init.restype, G.ggml_init.argtypes = ctypes.c_void_p, [_GGMLInitParams]
    G.ggml_new_tensor.restype = ctypes.c_void_p
    G.ggml_new_tensor.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    G.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    G.ggml_free.argtypes = [ctypes.c_void_p]

    desc = _QuantModelDesc(arch.encode(), 256, 512, n_layer, n_head, n_head_kv, n_expert, 64, 64)
    model = new_model(ctypes.byref(desc))
    params = lc.llama_model_quantize_default_params()
    qs = init(model, ctypes.addressof(params))
    ctx = G.ggml_init(_GGMLInitParams(1 << 22, None, True))
    try:
        ptrs = (ctypes.c_void_p * len(tensors))()
        for i, (name, shape, t) in enumerate(tensors):
            ne = (ctypes.c_int64 * 4)(*reversed(shape))
            ptrs[i] = G.ggml_new_tensor(ctx, int(T[t]), len(shape), ne)
            G.ggml_set_name(ptrs[i], name.encode())
        out = (ctypes.c_int * len(tensors))()
        compute(qs, int(parse_mix(mix)[1]), ptrs, out, len(tensors))
        return [T(v).name for v in out]
    finally:
        G.ggml_free(ctx)
        L._Z16llama_quant_freeP19quantize_state_impl(qs)
        L.llama_model_free(model)


def _synthetic(n_layer, *, experts=0, fused_qkv=False, extra=(), tied=False):
    rows = [("token_embd.weight", (512, 256), "F16"), ("output_norm.weight", (256,), "F32")]
    rows += [] if tied else [("output.weight", (512, 256), "F16")]
    for i in range(n_layer):
        p = f"blk.{i}."
        attn = [("attn_qkv", (384, 256))] if fused_qkv else [("attn_q", (256, 256)), ("attn_k", (64, 256)),
                                                                ("attn_v", (64, 256))]
        for n, sh in attn + [("attn_output", (256, 256))] + list(extra):
            rows.append((p + n + ".weight", sh, "F16"))
        if experts:
            rows += [(p + "ffn_gate_inp.weight", (experts, 256), "F32")]
            rows += [(p + f"ffn_{n}_exps.weight", (experts, 256, 256), "F16") for n in ("gate", "up", "down")]
        else:
            rows += [(p + f"ffn_{n}.weight", (256, 256), "F16") for n in ("gate", "up", "down")]
        rows.append((p + "attn_norm.weight", (256,), "F32"))
    return sorted(rows, key=lambda r: order_key(r[0]))


SYNTHETIC = {  # name: (arch, n_layer, n_head, n_head_kv, n_expert, tensors) — each reaches rules the files do not
    "llama-70b": ("llama", 80, 64, 8, 0, _synthetic(80)),  # LLM_TYPE_70B: attn_v Q3_K/Q4_K -> Q5_K
    "llama-80-mha": ("llama", 80, 8, 8, 0, _synthetic(80)),  # 80 layers without GQA is not 70B
    "falcon": ("falcon", 16, 8, 1, 0, _synthetic(16, fused_qkv=True)),  # falcon rules, attn_qkv as attn_v
    # 8 experts: attn_k/attn_v Q8_0 ...; a 3-D non-ffn tensor is MXFP4 in MXFP4_MOE (not in bailingmoe3)
    "mixtral": ("llama", 4, 8, 2, 8, _synthetic(4, experts=8, extra=[("attn_mla", (2, 256, 256))])),
    "moe4-tied": ("qwen2moe", 3, 8, 8, 4, _synthetic(3, experts=4, tied=True)),  # IQ2 attn_v by n_expert >= 4
    "glm5-next": ("glm5-next", 2, 8, 8, 0, _synthetic(2, extra=[("attn_q_a", (256, 256)), ("attn_q_b", (256, 256)),
                                                                ("nextn.eh_proj", (256, 256))])),
    "bailingmoe3": ("bailingmoe3", 2, 8, 8, 8, _synthetic(2, experts=8, extra=[("attn_mla", (2, 256, 256))])),
}


@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_plan_matches_llama_cpp_on_synthetic_models(case):
    arch, n_layer, n_head, n_head_kv, n_expert, tensors = SYNTHETIC[case]
    model = ModelInfo(arch, n_layer, n_head, n_head_kv, n_expert)
    checked = 0
    for mix in MIXES:
        if mix in ("COPY", "F32", "F16", "BF16"):
            continue
        plan = plan_tensors(tensors, model, mix)
        theirs = oracle_compute_types(arch, tensors, mix, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                                      n_expert=n_expert)
        assert [(r.name, r.dst_type.name) for r in plan.rows] == list(zip([t[0] for t in tensors], theirs)), mix
        checked += 1
    assert checked == len(MIXES) - 4


_ARCHS = ["llama", "falcon", "qwen2", "bailingmoe3", "glm5-next"]
_PICKS = ["attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_up", "ffn_down", "ffn_gate", "attn_q_a",
          "ffn_up_shexp", "ffn_down_exps", "ffn_gate_exps", "attn_kv_b"]


@settings(max_examples=150, deadline=None)
@given(arch=st.sampled_from(_ARCHS), n_layer=st.integers(1, 20), n_head=st.sampled_from([8, 16]),
       kv_div=st.sampled_from([1, 2, 4, 8]), n_expert=st.sampled_from([0, 2, 4, 8]), tied=st.booleans(),
       ne0=st.sampled_from([256, 512, 320, 96]), mix=st.sampled_from([m for m in MIXES if m != "COPY"]),
       picks=st.lists(st.sampled_from(_PICKS), min_size=1, max_size=7, unique=True))
def test_plan_matches_llama_cpp_on_random_models(arch, n_layer, n_head, kv_div, n_expert, tied, ne0, mix, picks):
    """Random structures, llama.cpp's llama_quant_compute_types as the oracle (no imatrix)."""
    rows = [("token_embd.weight", (64, ne0), "F16")] + ([] if tied else [("output.weight", (64, ne0), "F16")])
    for i in range(n_layer):
        for n in picks:
            shape = (max(n_expert, 2), 32, ne0) if n.endswith("_exps") else (32, ne0)
            rows.append((f"blk.{i}.{n}.weight", shape, "F16"))
    rows.sort(key=lambda r: order_key(r[0]))
    model = ModelInfo(arch, n_layer, n_head, n_head // kv_div, n_expert)
    try:
        plan = plan_tensors(rows, model, mix)
    except QuantizeError:  # llama.cpp throws there too (a C++ exception would end this process: not called)
        return
    theirs = oracle_compute_types(arch, rows, mix, n_layer=n_layer, n_head=n_head, n_head_kv=n_head // kv_div,
                                  n_expert=n_expert)
    assert [r.dst_type.name for r in plan.rows] == theirs

"""The planner decides every tensor's type exactly as llama-quantize does (checked against the types in the
oracle's output files), and it works from plain (name, shape, type) tuples without a file."""

from __future__ import annotations

import pytest

import gguf_kquant
from gguf_kquant.errors import QuantizeError
from gguf_kquant.model.mixes import MIXES
from gguf_kquant.model.planner import ModelInfo, order_key, parse_mix, plan_model, plan_tensors
from gguf_kquant.types import GGMLType as T

from test_model_quantize import imatrices, models, oracle_quantize  # noqa: F401  (fixtures)


def _types(path):
    with gguf_kquant.open(path) as f:
        return [(t.name, t.type_name) for t in f.tensors]


def _plan_cases():
    for model in ("gqa", "tied", "odd", "moe"):
        for mix in MIXES:
            yield model, mix


@pytest.mark.parametrize("model,mix", list(_plan_cases()))
def test_plan_matches_oracle_types(models, imatrices, tmp_path, model, mix):
    src = models[model]
    use_im = mix == "Q2_K_S"  # the oracle refuses Q2_K_S without one
    okw = dict(imatrix=imatrices[model][1]) if use_im else {}
    theirs = oracle_quantize(src, tmp_path / "theirs.gguf", mix, **okw)
    plan = plan_model(src, mix, imatrix=use_im)
    assert [(r.name, r.dst_type.name) for r in plan.rows] == _types(theirs)


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
    plan = plan_tensors(rows, ModelInfo("llama", n_layer, 8, 2, n_expert), mix, imatrix=True)
    assert sorted(r.name for r in plan.rows) == sorted(r[0] for r in rows)
    assert [order_key(r.name) for r in plan.rows] == sorted(order_key(r.name) for r in plan.rows)
    for r in plan.rows:
        from gguf_kquant.types import TYPES

        assert r.shape[-1] % TYPES[r.dst_type].block_size == 0  # fallbacks always fit
        if not r.allows_quantization:
            assert r.dst_type == r.src_type
    assert plan.n_fallback == sum(r.fallback for r in plan.rows)

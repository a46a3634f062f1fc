"""Size-budget mode (gguf_kquant/model/budget.py): quantize_model(target_bpw=/target_size=) and the CLI flags.

Checked: the file fits the budget and nearly fills it, the predicted size is the real one, budgets outside the
achievable range are refused with that range, no imatrix is refused before the source is even opened, the
allocation follows the imatrix (it is measured, not a recipe), it beats llama-quantize's Q4_K_M mix under the
measure it minimises at no larger a size, llama.cpp loads and runs what it writes, and --dry-run prints the
allocation without writing.
"""
from __future__ import annotations

import io
import re

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.codecs.optimized import weighted_error
from gguf_kquant.errors import BadTensorDataError, ImatrixError, QuantizeError
from gguf_kquant.ftypes import LlamaFileType
from gguf_kquant.model.imatrix import write_legacy_imatrix
from gguf_kquant.model.budget import CANDIDATES, plan_budget
from gguf_kquant.types import GGMLType
from oracle import llama_logits


def _imatrix(src, boost=None, seed=7) -> dict:
    """A skewed random imatrix; ``boost``: a name prefix whose tensors' activations are 1000x larger."""
    rng = np.random.default_rng(seed)
    with gguf_kquant.open(src) as f:
        im = {t.name: rng.gamma(0.5, 1.0, t.shape[-1]).astype(np.float32) for t in f.tensors
              if t.name.startswith("blk.") and len(t.shape) == 2}
    if boost:
        for k in im:
            if k.startswith(boost):
                im[k] *= np.float32(1000.0)
    return im


def _types(path) -> dict:
    with gguf_kquant.open(path) as f:
        return {t.name: t.type_name for t in f.tensors}


@pytest.mark.parametrize("bpw", [4.6, 6.0])
def test_file_fits_the_budget_and_nearly_fills_it(example_model, tmp_path, bpw):
    dst = tmp_path / "b.gguf"
    r = gguf_kquant.quantize_model(example_model, dst, target_bpw=bpw, imatrix=_imatrix(example_model))
    a = r.allocation
    size = dst.stat().st_size
    n = r.n_elements
    assert a.target_bytes == int(bpw * n / 8)
    assert size == a.file_bytes  # the size model is exact: header + aligned tensors
    assert size <= a.target_bytes
    assert size >= a.target_bytes - 0.01 * a.target_bytes, (size, a.target_bytes)
    types = _types(dst)
    assert all(types[c.name] == c.type.name for c in a.choices)
    assert types["blk.0.attn_norm.weight"] == "F32"  # what the planner does not quantize stays
    assert len(set(types.values())) > 2  # a mix, not one type everywhere


def test_budget_outside_the_achievable_range_is_refused_with_the_range(example_model, tmp_path):
    im = _imatrix(example_model)
    ranges = []
    for bpw in (1.0, 40.0):
        with pytest.raises(QuantizeError, match=r"outside what this model can be") as e:
            gguf_kquant.quantize_model(example_model, tmp_path / "o.gguf", target_bpw=bpw, imatrix=im)
        m = re.search(r"can be: (\d+) \.\. (\d+) bytes", str(e.value))
        ranges.append((int(m.group(1)), int(m.group(2))))
    assert ranges[0] == ranges[1]
    lo, hi = ranges[0]
    assert not (tmp_path / "o.gguf").exists()
    # both ends are reachable, exactly
    r = gguf_kquant.quantize_model(example_model, tmp_path / "lo.gguf", target_size=lo, imatrix=im)
    assert (tmp_path / "lo.gguf").stat().st_size == lo
    assert {c.type for c in r.allocation.choices} <= {GGMLType.Q2_K}
    r = gguf_kquant.quantize_model(example_model, tmp_path / "hi.gguf", target_size=hi, imatrix=im)
    assert (tmp_path / "hi.gguf").stat().st_size == hi
    assert {c.type for c in r.allocation.choices} == {GGMLType.F16}  # the source's own type: no loss
    with pytest.raises(QuantizeError, match=f"{lo} .. {hi} bytes"):
        gguf_kquant.quantize_model(example_model, tmp_path / "o.gguf", target_size=hi + 1, imatrix=im)


def test_refused_without_imatrix_before_any_work(tmp_path):
    # the source does not even exist: the refusal comes before it is opened
    for kw in ({"target_bpw": 5.0}, {"target_size": "1M"}):
        with pytest.raises(ImatrixError, match="need an imatrix"):
            gguf_kquant.quantize_model(tmp_path / "missing.gguf", tmp_path / "o.gguf", **kw)
    assert not (tmp_path / "o.gguf").exists()


def test_a_non_finite_weight_in_a_measured_row_is_named_by_its_row_in_the_tensor(tmp_path):
    import gguf

    from gguf_kquant.model.budget import _sample

    src = tmp_path / "nan.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_block_count(1)
    row = int(_sample(300)[15])  # a measured row (140 of 300 with 32 rows), not the 16th row of the tensor
    assert row > 15
    x = np.ones((300, 256), np.float32)
    x[row, 17] = np.inf
    w.add_tensor("blk.0.attn_q.weight", x)
    w.add_tensor("blk.0.attn_k.weight", np.ones((300, 256), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = tmp_path / "nan.imatrix"
    write_legacy_imatrix(im, {n: np.ones(256, np.float32) for n in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")})
    with pytest.raises(BadTensorDataError, match=rf"tensor blk\.0\.attn_q\.weight .*inf at row {row}, column 17"):
        gguf_kquant.quantize_model(src, tmp_path / "o.gguf", target_bpw=6.0, imatrix=im)
    assert not list(tmp_path.glob("o.gguf*"))


def test_contradicting_options_refused(example_model, tmp_path):
    im = _imatrix(example_model)
    (tmp_path / "there.gguf").write_bytes(b"keep")
    with pytest.raises(QuantizeError, match="exists"):  # before the measurement
        gguf_kquant.quantize_model(example_model, tmp_path / "there.gguf", target_bpw=5.0, imatrix=im)
    assert (tmp_path / "there.gguf").read_bytes() == b"keep"
    with pytest.raises(QuantizeError, match="input"):
        gguf_kquant.quantize_model(example_model, example_model, target_bpw=5.0, imatrix=im, overwrite=True)
    with pytest.raises(QuantizeError, match="give no mix"):
        gguf_kquant.quantize_model(example_model, tmp_path / "o.gguf", "Q4_K_M", target_bpw=5.0, imatrix=im)
    with pytest.raises(QuantizeError, match="tensor_types cannot be combined"):
        gguf_kquant.quantize_model(example_model, tmp_path / "o.gguf", target_bpw=5.0, imatrix=im,
                                   tensor_types=["attn_q=q8_0"])
    with pytest.raises(QuantizeError, match="either target_bpw or target_size"):
        plan_budget(example_model, target_bpw=5.0, target_size=10**6, imatrix=im)
    with pytest.raises(QuantizeError, match="candidates IQ2_XXS: choose among"):
        plan_budget(example_model, target_bpw=5.0, imatrix=im, candidates=["Q4_K", "IQ2_XXS"])


def test_candidates_limit_the_types(example_model):
    a = plan_budget(example_model, target_bpw=6.0, imatrix=_imatrix(example_model), candidates=["Q4_0", "Q8_0"])
    # the source's F16 is always a candidate (the lossless end of the range)
    assert {c.type for c in a.choices} <= {GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.F16}
    assert a.file_bytes <= a.target_bytes


def test_allocation_does_not_depend_on_the_thread_count(example_model):
    """The candidates are measured side by side on a thread pool: every error, so every pick, is the same."""
    im = _imatrix(example_model)
    one, two = (plan_budget(example_model, target_bpw=5.0, imatrix=im, method="optimized", threads=n)
                for n in (1, 2))
    assert [c.options for c in one.choices] == [c.options for c in two.choices]
    assert one.types == two.types


def test_the_measurement_keeps_blas_on_its_threads(example_model, monkeypatch):
    """Each (tensor, type) is measured on a thread of its own; BLAS threads would spin beside them (on two
    cores they doubled the CPU time of a SmolLM2 plan), so BLAS runs one thread there, and gets its own back."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import gguf_kquant.model.budget as budget

    seen = []
    measure = budget._error

    def recording(*args):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return measure(*args)

    monkeypatch.setattr(budget, "_error", recording)
    with threadpool_limits(2, "blas"):
        plan_budget(example_model, target_bpw=5.0, imatrix=_imatrix(example_model), threads=2)
        after = {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    assert seen and all(s == {1} for s in seen)
    assert after == {2}


def test_allocation_follows_the_imatrix(example_model):
    """Activations 1000x larger in one layer make its errors count more: it gets more bytes, the other less."""
    def layer_bytes(alloc, layer):
        return sum(c.nbytes for c in alloc.choices if c.name.startswith(f"blk.{layer}."))

    a0 = plan_budget(example_model, target_bpw=5.0, imatrix=_imatrix(example_model, boost="blk.0."))
    a3 = plan_budget(example_model, target_bpw=5.0, imatrix=_imatrix(example_model, boost="blk.3."))
    assert layer_bytes(a0, 0) > layer_bytes(a3, 0)
    assert layer_bytes(a3, 3) > layer_bytes(a0, 3)
    assert a0.types != a3.types


def _measured_error(src, path, im) -> float:
    """Sum over the quantized tensors of the imatrix-weighted squared error times the tensor's residual gain
    (what the allocation minimises); tensors without an entry weighted by the imatrix's mean, as the budget
    does."""
    from gguf_kquant.model.budget import _residual_gain
    from gguf_kquant.model.imatrix import Imatrix
    from gguf_kquant.model.planner import ModelInfo, PlanRow

    mean_w = float(np.mean([v.mean() for v in im.values()]))
    total = 0.0
    with gguf_kquant.open(src) as fs, gguf_kquant.open(path) as fq:
        x_by_name = {t.name: t for t in fs.tensors}
        model = ModelInfo.from_metadata(fs.metadata)
        for t in fq.tensors:
            if t.type_name in ("F32", "F16"):
                continue
            x = x_by_name[t.name].numpy().reshape(-1, t.shape[-1])
            w = im.get(t.name, np.full(t.shape[-1], mean_w, np.float32))
            row = PlanRow(t.name, t.shape, GGMLType.F16, t.ggml_type, "", True)
            gain = _residual_gain(row, x_by_name, Imatrix(im), model, {})
            total += gain * weighted_error(x, t.raw().reshape(x.shape[0], -1), t.type_name, w)
    return total


def test_lower_error_than_q4_k_m_at_no_larger_size_and_llama_cpp_loads_it(example_model, tmp_path):
    im = _imatrix(example_model)
    q4, b = tmp_path / "q4_k_m.gguf", tmp_path / "budget.gguf"
    gguf_kquant.quantize_model(example_model, q4, "Q4_K_M", imatrix=im)
    r = gguf_kquant.quantize_model(example_model, b, target_size=q4.stat().st_size, imatrix=im)
    assert b.stat().st_size <= q4.stat().st_size
    e_q4, e_b = _measured_error(example_model, q4, im), _measured_error(example_model, b, im)
    assert e_b < 0.9 * e_q4, (e_b, e_q4)
    # the prediction from the row sample is close to the measured error of the whole file
    predicted = sum(c.error for c in r.allocation.choices)
    assert abs(predicted - e_b) < 0.1 * e_b, (predicted, e_b)
    with gguf_kquant.open(b) as f:  # every type is one stock llama.cpp loads, general.file_type a real mix
        assert {t.ggml_type for t in f.tensors} <= set(CANDIDATES) | {GGMLType.F32}
        assert int(f.metadata["general.file_type"]) == int(LlamaFileType["MOSTLY_" + r.allocation.mix])
    tokens = [1, 300, 301, 302, 303, 304, 305]
    lf = llama_logits(example_model, tokens, tmp_path / "f.npy")
    lb = llama_logits(b, tokens, tmp_path / "b.npy")
    lq = llama_logits(q4, tokens, tmp_path / "q.npy")
    assert lb.shape == lf.shape and np.isfinite(lb).all()
    c_b, c_q4 = (np.corrcoef(v.ravel(), lf.ravel())[0, 1] for v in (lb, lq))
    assert c_b > 0.8 and c_b > c_q4 - 0.05, (c_b, c_q4)


def test_optimized_method_writes_the_same_allocation(example_model, tmp_path):
    im = _imatrix(example_model)
    r = gguf_kquant.quantize_model(example_model, tmp_path / "o.gguf", target_bpw=5.0, imatrix=im,
                                   method="optimized")
    assert (tmp_path / "o.gguf").stat().st_size == r.allocation.file_bytes <= r.allocation.target_bytes


def test_dry_run_prints_the_allocation_without_writing(example_model, tmp_path, capsys):
    from gguf_kquant.cli import main

    im = _imatrix(example_model)
    imf = tmp_path / "im.dat"
    write_legacy_imatrix(imf, im, ncall=1, chunk_count=1, dataset="random")
    dst = tmp_path / "o.gguf"
    assert main(["quantize", str(example_model), str(dst), "--target-bpw", "5", "--imatrix", str(imf),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not dst.exists()
    plan = plan_budget(example_model, target_bpw=5.0, imatrix=str(imf))
    for c in plan.choices:  # each tensor with its chosen type, in the table
        assert re.search(rf"^{re.escape(c.name)}\s+{c.type.name}\s", out, re.M), c.name
    assert f"size budget: {plan.target_bytes} bytes" in out and f"file {plan.file_bytes} bytes" in out
    # the CLI refuses without an imatrix, before any work
    assert main(["quantize", str(example_model), str(dst), "--target-bpw", "5", "-q"]) == 1
    assert not dst.exists()
    s = io.StringIO()
    gguf_kquant.quantize_model(example_model, dst, target_size="2M", imatrix=im, dry_run=True, quiet=False,
                               stream=s)
    assert "size budget: 2000000 bytes" in s.getvalue() and not dst.exists()


class _Stub:
    """What _residual_gain reads of a tensor: name, shape and values."""

    def __init__(self, name, x):
        self.name = name
        self.x = np.asarray(x, np.float32)
        self.shape = self.x.shape

    def numpy(self):
        return self.x


def test_residual_gain_is_the_measured_propagation_factor():
    """attn_v: mean squared column norm of attn_output times n_head/n_head_kv; ffn_up/gate: through ffn_down,
    |down[:, c]|^2 * E[h_c^2] / E[y_c^2]; tensors that write the residual stream: 1."""
    from gguf_kquant.model.budget import _residual_gain
    from gguf_kquant.model.imatrix import Imatrix
    from gguf_kquant.model.planner import ModelInfo, PlanRow

    rng = np.random.default_rng(3)
    up, down, wo = rng.standard_normal((8, 4)), rng.standard_normal((4, 8)), rng.standard_normal((4, 4))
    x2, h2 = rng.gamma(1.0, 1.0, 4), rng.gamma(1.0, 1.0, 8)
    by_name = {n: _Stub(n, v) for n, v in (("blk.0.ffn_up.weight", up), ("blk.0.ffn_down.weight", down),
                                            ("blk.0.attn_v.weight", np.ones((2, 4))),
                                            ("blk.0.attn_output.weight", wo))}
    im = Imatrix({"blk.0.ffn_up.weight": x2.astype(np.float32), "blk.0.ffn_down.weight": h2.astype(np.float32)})
    model = ModelInfo(arch="llama", n_layer=1, n_head=4, n_head_kv=2)

    def row(name):
        return PlanRow(name, by_name[name].shape, GGMLType.F32, GGMLType.F32, "", True)

    up32, down32, wo32 = (a.astype(np.float32).astype(np.float64) for a in (up, down, wo))
    want_up = np.mean((down32 ** 2).sum(0) * h2.astype(np.float32) / ((up32 ** 2) @ x2.astype(np.float32)))
    # float32 sums (the factor's own precision): a wrong formula is off by far more than 1e-6
    norms = {}
    assert _residual_gain(row("blk.0.ffn_up.weight"), by_name, im, model, norms) == pytest.approx(want_up, rel=1e-6)
    assert _residual_gain(row("blk.0.attn_v.weight"), by_name, im, model, norms) == pytest.approx(
        (wo32 ** 2).sum(0).mean() * 2, rel=1e-6)
    assert _residual_gain(row("blk.0.ffn_down.weight"), by_name, im, model, norms) == 1.0
    assert set(norms) == {"blk.0.ffn_down.weight", "blk.0.attn_output.weight"}  # each read once, kept


def test_moe_experts_measured_per_expert_and_loaded(tmp_path):
    """3-D expert tensors: each expert's rows are sampled with its own imatrix slice."""
    from make_example_model import build_llama_gguf

    src = build_llama_gguf(tmp_path / "moe.gguf", seed=3, n_layer=2, n_embd=256, n_head=4, n_head_kv=1, n_ff=256,
                           n_vocab=512, dtype="F16", n_expert=8, n_expert_used=2)
    rng = np.random.default_rng(5)
    with gguf_kquant.open(src) as f:
        im = {t.name: rng.gamma(0.5, 1.0, (t.shape[0] if len(t.shape) == 3 else 1) * t.shape[-1]).astype(np.float32)
              for t in f.tensors if t.name.startswith("blk.") and len(t.shape) >= 2 and "gate_inp" not in t.name}
        assert any(len(t.shape) == 3 for t in f.tensors)
    dst = tmp_path / "b.gguf"
    r = gguf_kquant.quantize_model(src, dst, target_bpw=5.0, imatrix=im)
    assert dst.stat().st_size == r.allocation.file_bytes <= r.allocation.target_bytes
    experts = [c for c in r.allocation.choices if len(c.shape) == 3]
    assert experts and all(e > 0 for c in experts for _b, e, t in c.options if t != GGMLType.F16)
    logits = llama_logits(dst, [1, 300, 301, 302], tmp_path / "b.npy")
    assert np.isfinite(logits).all()

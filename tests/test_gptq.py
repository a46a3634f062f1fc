"""Error-feedback rounding (gguf_kquant.codecs.gptq): lower output error, ordinary ggml blocks, row slabs."""
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from gguf_kquant.codecs import dequantize, quantize
from gguf_kquant.codecs.gptq import (
    ErrorFeedback, FeedbackPlan, _BlockCodec, _off_diagonal, _upper_factor, for_tensor, output_error, quantize_feedback,
    upper_from_packed)
from gguf_kquant.codecs.optimized import REFINERS, quantize_optimized, quantizer
from gguf_kquant.errors import GGUFError, ImatrixError
from gguf_kquant.types import type_info
from oracle import llama_logits

N_TOKENS = 1500


def correlated_hessian(n: int, seed: int = 0) -> np.ndarray:
    """X^T X of activations with shared low-rank structure and a few outlier channels, as real layers have."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((N_TOKENS, 24)) @ rng.standard_normal((24, n)) + 0.3 * rng.standard_normal((N_TOKENS, n))
    a[:, :6] *= 5
    return a.T @ a


def rows(n_rows: int, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_rows, n)).astype(np.float32)


FEEDBACK_TYPES = sorted({t.name for t in REFINERS} | {"IQ2_XS", "IQ3_S"})


@pytest.mark.parametrize("qtype", FEEDBACK_TYPES)
def test_feedback_lowers_the_output_error(qtype):
    """On correlated activations the output error is far below the refiner's alone (which does not see them)
    and below ggml's: the error of each step is compensated by the columns after it."""
    n = 512
    h = correlated_hessian(n)
    x = rows(32, n)
    imatrix = (np.diagonal(h) / N_TOKENS).astype(np.float32)
    fed = quantize_feedback(x, qtype, FeedbackPlan(h, qtype, n_tokens=N_TOKENS))
    alone = quantize_optimized(x, qtype, imatrix)
    ggml = quantize(x, qtype, imatrix)
    e_fed, e_alone, e_ggml = (output_error(x, r, qtype, h) for r in (fed, alone, ggml))
    assert e_fed < 0.5 * e_alone, (e_fed, e_alone)
    assert e_fed < 0.5 * e_ggml, (e_fed, e_ggml)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q2_K", "Q4_K", "Q6_K", "IQ4_XS"])
def test_a_diagonal_hessian_is_the_refiner_alone(qtype):
    """Without correlations nothing is fed forward: the bytes are the refiner's with the plan's weights."""
    n = 512
    h = np.diag(np.random.default_rng(2).random(n) * 10 + 0.1)
    x = rows(8, n)
    plan = FeedbackPlan(h, qtype)
    assert not plan.feeds
    np.testing.assert_array_equal(quantize_feedback(x, qtype, plan), quantize_optimized(x, qtype, plan.weights))


def test_plan_weights_are_the_imatrix_for_a_diagonal_hessian():
    d = np.random.default_rng(3).random(64) * 4 + 1
    plan = FeedbackPlan(np.diag(d * N_TOKENS), "Q4_0", damp=0.0, n_tokens=N_TOKENS)
    np.testing.assert_allclose(plan.weights, d, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_rows=st.integers(1, 9), split=st.integers(1, 8),
       qtype=st.sampled_from(["Q4_0", "Q5_1", "Q3_K", "Q4_K", "IQ4_XS", "Q8_0"]), n=st.sampled_from([256, 768]))
@example(seed=0, n_rows=1, split=1, qtype="Q3_K", n=256)
@example(seed=1958705, n_rows=4, split=1, qtype="Q5_1", n=256)  # a one-row slab: BLAS's vector product rounds otherwise
def test_rows_are_independent(seed, n_rows, split, qtype, n):
    """A slab of rows gives the bytes those rows get with the others (quantize_model streams slabs); 768
    columns: several groups of every block size, each starting with the product of the earlier ones."""
    plan = FeedbackPlan(correlated_hessian(n, seed % 7), qtype, n_tokens=N_TOKENS)
    x = rows(n_rows, n, seed)
    whole = quantize_feedback(x, qtype, plan)
    k = min(split, n_rows)
    parts = np.concatenate([quantize_feedback(x[:k], qtype, plan), quantize_feedback(x[k:], qtype, plan)])
    np.testing.assert_array_equal(whole, parts)
    y = dequantize(whole, qtype, x.shape)
    assert np.isfinite(y).all()


def test_blocks_decode_in_llama_cpp(oracle):
    """The blocks are ordinary ggml blocks: llama.cpp's to_float reads the values we measured."""
    n = 512
    h = correlated_hessian(n)
    x = rows(16, n)
    for qtype in ("Q4_K", "Q2_K", "Q5_0", "IQ4_XS"):
        raw = quantize_feedback(x, qtype, FeedbackPlan(h, qtype, n_tokens=N_TOKENS))
        ours = dequantize(raw, qtype, x.shape)
        theirs = oracle.to_float(type_info(qtype).id, raw, n)
        np.testing.assert_array_equal(ours, theirs)


class _Hessians:
    """Hessians' interface over a dict name -> (H, n_tokens), each weight its own matrix."""

    def __init__(self, table):
        self.table = table
        self.matrix_of = {name: name for name in table}
        self.expert_counts = {}

    def for_weight(self, name):
        return self.table.get(name)

    def factor_for(self, name):  # H itself, as a packed_upper file holds
        return None


def test_the_method_uses_a_tensors_hessian_and_falls_back_without_one():
    n = 256
    h = correlated_hessian(n)
    q = quantizer("optimized", True, _Hessians({"blk.0.attn_q.weight": (h, N_TOKENS)}))
    assert isinstance(q, ErrorFeedback)
    x = rows(4, n)
    w = (np.diagonal(h) / N_TOKENS).astype(np.float32)
    plan = FeedbackPlan(h, "Q4_K", n_tokens=N_TOKENS)
    np.testing.assert_array_equal(for_tensor(q, "blk.0.attn_q.weight")(x, "Q4_K", w),
                                  quantize_feedback(x, "Q4_K", plan))
    # feedback applies where the imatrix does: no imatrix entry, no feedback
    np.testing.assert_array_equal(for_tensor(q, "blk.0.attn_q.weight")(x, "Q4_K", None),
                                  quantize_optimized(x, "Q4_K", None))
    np.testing.assert_array_equal(for_tensor(q, "token_embd.weight")(x, "Q4_K", w), quantize_optimized(x, "Q4_K", w))
    assert for_tensor(quantize, "blk.0.attn_q.weight") is quantize


def test_tensors_sharing_an_input_share_its_factor_whatever_their_block_size(monkeypatch):
    """V does not depend on the block size: attn_q in Q4_K and attn_v in Q8_0 (a size budget can mix them)
    factorise their shared H once, and write the bytes of plans built on their own; files order a layer's
    tensors by name, so a factor outlives the next matrix's (attn_k, attn_output, attn_q, attn_v)."""
    import gguf_kquant.codecs.gptq as gptq

    n = 512
    h, h_out = correlated_hessian(n, 3), correlated_hessian(n, 4)
    hs = _Hessians({"blk.0.attn_k.weight": (h, N_TOKENS), "blk.0.attn_output.weight": (h_out, N_TOKENS)})
    hs.matrix_of.update({"blk.0.attn_q.weight": "blk.0.attn_k.weight", "blk.0.attn_v.weight": "blk.0.attn_k.weight"})
    hs.table.update({"blk.0.attn_q.weight": (h, N_TOKENS), "blk.0.attn_v.weight": (h, N_TOKENS)})
    calls = []
    real = gptq._upper_factor
    monkeypatch.setattr(gptq, "_upper_factor", lambda *a: calls.append(1) or real(*a))
    q = quantizer("optimized", True, hs)
    w = np.ones(n, np.float32)
    got = {name: for_tensor(q, name)(rows(8, n, seed=i), qtype, w) for i, (name, qtype) in enumerate([
        ("blk.0.attn_k.weight", "Q4_K"), ("blk.0.attn_output.weight", "Q4_K"), ("blk.0.attn_q.weight", "Q5_0"),
        ("blk.0.attn_v.weight", "Q8_0")])}
    assert len(calls) == 2  # one per distinct input
    monkeypatch.setattr(gptq, "_upper_factor", real)
    for i, (name, qtype, hh) in enumerate([("blk.0.attn_k.weight", "Q4_K", h), ("blk.0.attn_q.weight", "Q5_0", h),
                                          ("blk.0.attn_v.weight", "Q8_0", h)]):
        want = quantize_feedback(rows(8, n, seed=[0, 2, 3][i]), qtype, FeedbackPlan(hh, qtype, n_tokens=N_TOKENS))
        np.testing.assert_array_equal(got[name], want, err_msg=name)


@pytest.mark.parametrize("bad, match", [
    (lambda n: -np.eye(n), "not positive definite"),
    (lambda n: np.full((n, n), np.nan), "non-finite"),
    (lambda n: np.eye(n + 1), "rows of 256 values"),
])
def test_bad_hessians_are_refused_naming_the_tensor(bad, match):
    q = quantizer("optimized", True, _Hessians({"w": (bad(256), 10)}))
    with pytest.raises(ImatrixError, match=match) as e:
        for_tensor(q, "w")(rows(2, 256), "Q4_K", np.ones(256, np.float32))
    assert "tensor w" in str(e.value)
    assert isinstance(e.value, GGUFError)


def test_a_plan_refuses_rows_it_was_not_built_for():
    plan = FeedbackPlan(np.eye(256), "Q4_0")
    with pytest.raises(ImatrixError):
        quantize_feedback(rows(2, 512), "Q4_K", plan)
    with pytest.raises(ImatrixError):
        quantize_feedback(rows(2, 256), "Q2_K", plan)  # blocks of 256, not 32


@pytest.mark.parametrize("n", [100, 300, 576, 1024])  # one leaf; halves; halves of halves; split products
def test_the_factor_is_the_dampened_hessians(n):
    """V (upper triangular, float32) with H' = V V^T: the Cholesky factor with the order reversed."""
    h = correlated_hessian(n, 4)
    damp = 0.01 * np.diagonal(h).mean()  # the plan's dampening: float32 then suffices
    v = _upper_factor(h, damp)
    h = h + damp * np.eye(n)
    assert v.dtype == np.float32 and not np.tril(v, -1).any() and (np.diagonal(v) > 0).all()
    v = v.astype(np.float64)
    np.testing.assert_allclose(v @ v.T, h, rtol=0, atol=1e-5 * np.abs(h).max())
    want = np.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]  # float64 LAPACK, reversed
    np.testing.assert_allclose(v, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_iq4_nl_feedback_starts_from_the_max_abs_block():
    """IQ4_NL's feedback start: per block d = fp16(max / kvalues[0]) (the value largest in magnitude on the
    lowest level), every value at its nearest level; an all-zero block as ggml writes it."""
    from gguf_kquant.codecs.grids import kvalues_iq4nl
    from gguf_kquant.codecs.optimized import FEEDBACK_STARTS

    x = rows(4, 256, 3)
    x[1, 32:64] = 0.0
    out = np.empty((4, type_info("IQ4_NL").row_bytes(256)), np.uint8)
    FEEDBACK_STARTS[type_info("IQ4_NL").ggml_type](x, out)
    blocks = x.reshape(-1, 32)
    vmax = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(1)]
    d = (vmax / np.float32(kvalues_iq4nl[0])).astype(np.float16).astype(np.float32)
    raw = out.reshape(-1, 18)
    np.testing.assert_array_equal(raw[:, :2].copy().view(np.float16).ravel().astype(np.float32), d)
    y = dequantize(out, "IQ4_NL", x.shape).reshape(-1, 32)
    nearest = np.abs(blocks[:, :, None] - d[:, None, None] * kvalues_iq4nl.astype(np.float32)).min(2)
    np.testing.assert_allclose(np.abs(blocks - y), nearest, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(out[1, 18:36], quantize(x[1:2], "IQ4_NL")[0, 18:36])


# ggml's plain start (two kinds), IQ4_NL's max-abs start, ggml's imatrix start
@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1", "IQ4_NL", "Q4_K"])
def test_the_update_is_gptqs(qtype):
    """The nearest-plane targets are GPTQ's: feeding the errors forward through U = inv(V), as GPTQ does
    (float64, block by block, no lazy batch), with the same block quantizer gives the same blocks."""
    n = 512
    block = type_info(qtype).block_size
    h = correlated_hessian(n, 6)
    x = rows(6, n, 7)
    plan = FeedbackPlan(h, qtype, n_tokens=N_TOKENS)
    v = plan.v.astype(np.float64)
    u = np.linalg.inv(v)
    w = x.astype(np.float64)
    codec = _BlockCodec(type_info(qtype))
    blocks = []
    for b0 in range(0, n, block):
        b1 = b0 + block
        q = np.empty((6, type_info(qtype).type_size), np.uint8)
        codec(np.ascontiguousarray(w[:, b0:b1], np.float32), plan.weights[b0:b1], q,
              np.empty((6, block), np.float32))
        blocks.append(q)
        e = w[:, b0:b1] - dequantize(q, qtype, (6, block))
        w[:, b1:] -= e @ v[b0:b1, b0:b1] @ u[b0:b1, b1:]
    gptq = np.concatenate(blocks, axis=1)
    ours = quantize_feedback(x, qtype, plan)
    assert np.mean(ours == gptq) > 0.99  # float32 against float64: a rare level rounds the other way
    assert abs(output_error(x, ours, qtype, h) / output_error(x, gptq, qtype, h) - 1) < 0.01


# the top products split in two, and the next level's; 32- and 256-wide diagonal blocks
@pytest.mark.parametrize("n, qtype", [(576, "Q4_0"), (1024, "Q4_0"), (1024, "Q4_K")])
def test_a_plan_does_not_depend_on_the_thread_count(n, qtype):
    """Neither BLAS's threads nor ours (the large products of the factorisation are split over them)."""
    from threadpoolctl import threadpool_limits

    plans = []
    for threads in (1, 2):
        with threadpool_limits(threads, "blas"):
            plans.append(FeedbackPlan(correlated_hessian(n, 2), qtype, n_tokens=N_TOKENS, threads=threads))
    one, two = plans
    assert np.array_equal(one.weights, two.weights)
    assert np.array_equal(one.v, two.v) and np.array_equal(one.u_bb, two.u_bb)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 65])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_packed_factor_unpacks_row_by_row(n, threads):
    """Row i of the packed upper triangle is columns i..n-1 (a Hessian file's V); rows are split in pairs."""
    import gguf_kquant
    from gguf_kquant.model.hessian import _row_offsets

    packed = np.arange(1, n * (n + 1) // 2 + 1, dtype=np.float32)
    want = np.zeros((n, n), np.float32)
    want[np.triu_indices(n)] = packed  # row-major order of the upper triangle
    before = gguf_kquant.get_num_threads()
    gguf_kquant.set_num_threads(threads)
    try:
        assert np.array_equal(upper_from_packed(packed, _row_offsets(n)), want)
    finally:
        gguf_kquant.set_num_threads(before)


def test_off_diagonal_values_are_found_anywhere():
    """Feedback runs exactly when H (or V) has a value off its diagonal, found past the first row and column too."""
    m = np.diag(np.arange(1.0, 7.0)).astype(np.float32)
    assert not _off_diagonal(m)
    for i, j, value in ((0, 5, 1.0), (5, 0, 1.0), (3, 4, 1e-30), (4, 2, np.nan)):
        hit = m.copy()
        hit[i, j] = value
        assert _off_diagonal(hit), (i, j)
    assert not _off_diagonal(np.ones((1, 1), np.float32))


def test_a_plan_holds_one_matrix_and_builds_it_in_three():
    """Memory follows the Hessian: V is the one n x n matrix kept (U's diagonal blocks add block/n of it), and
    building it needs the dampened copy and the products' halves besides (it was 4.75 n^2 floats)."""
    import tracemalloc

    n = 1024
    h = correlated_hessian(n, 5).astype(np.float32)
    tracemalloc.start()
    try:
        plan = FeedbackPlan(h, "Q4_K", n_tokens=N_TOKENS)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    square = n * n * 4
    assert kept < 1.4 * square and peak < 3 * square, (kept / square, peak / square)


def test_a_singular_hessian_is_refused():
    with pytest.raises(ImatrixError, match="positive definite"):
        _upper_factor(-np.eye(200))


def test_a_non_finite_weight_is_refused_naming_its_place():
    x = rows(6, 256)
    x[4, 200] = np.inf
    with pytest.raises(GGUFError, match=r"row 4, column 200"):
        quantize_feedback(x, "Q4_K", FeedbackPlan(correlated_hessian(256), "Q4_K", n_tokens=N_TOKENS))


def test_row_bytes_match_the_type():
    x = rows(3, 256)
    for qtype in ("Q4_K", "Q8_0"):
        raw = quantize_feedback(x, qtype, FeedbackPlan(np.eye(256), qtype))
        assert raw.shape == (3, type_info(qtype).row_bytes(256))


# ---------------------------------------------------------------------------------------------------
# Whole models: quantize_model(..., imatrix=<file with Hessians>, method="optimized")
# ---------------------------------------------------------------------------------------------------


def _tensors(path):
    from gguf_kquant.container.reader import open_gguf

    with open_gguf(path) as f:
        return {t.name: (t.type_name, bytes(t.raw())) for t in f.tensors}


def _model_output_error(src, dst, hessians) -> tuple:
    """Summed over the weights with a Hessian: sum_rows (x - deq) H (x - deq)^T, and how many differ."""
    from gguf_kquant.container.reader import open_gguf
    from gguf_kquant.model.hessian import load_hessians

    total, n = 0.0, 0
    with open_gguf(src) as fs, open_gguf(dst) as fd, load_hessians(hessians) as hs:
        out = {t.name: t for t in fd.tensors}
        for t in fs.tensors:
            entry = hs.for_weight(t.name)
            if entry is None or not t.name.startswith("blk."):
                continue
            q = out[t.name]
            x = np.asarray(t.numpy(), np.float32).reshape(-1, t.shape[-1])
            total += output_error(x, np.asarray(q.raw()).reshape(x.shape[0], -1), q.type_name, entry[0])
            n += 1
    return total, n


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q4_0"])
def test_a_factor_file_quantizes_as_the_matrices_it_came_from(example_model, example_hessians,
                                                              example_hessian_matrices, tmp_path, monkeypatch, mix):
    """The file's stored factors are used as they are (nothing is factorised), and the bytes are those of the
    same collection stored as H, which is factorised while quantizing."""
    import gguf_kquant
    from gguf_kquant.codecs import gptq

    from_h = gguf_kquant.quantize_model(example_model, tmp_path / "h.gguf", mix, imatrix=example_hessian_matrices,
                                        method="optimized", quiet=True)

    def no_factorisation(*_a, **_k):
        raise AssertionError("a stored factor was computed again")

    monkeypatch.setattr(gptq, "_upper_factor", no_factorisation)
    from_v = gguf_kquant.quantize_model(example_model, tmp_path / "v.gguf", mix, imatrix=example_hessians,
                                        method="optimized", quiet=True)
    assert _tensors(from_v.paths[0]) == _tensors(from_h.paths[0])
    with pytest.raises(AssertionError, match="computed again"):  # the monkeypatch bites where H is stored
        gguf_kquant.quantize_model(example_model, tmp_path / "h2.gguf", mix, imatrix=example_hessian_matrices,
                                   method="optimized", quiet=True)


# The example model's rows are 256 wide: a k-quant row is one block, so only ffn_down (512) has columns to
# feed; with Q4_0's blocks of 32 every weight has.
@pytest.mark.parametrize("mix, bound", [("Q4_K_M", 0.995), ("Q2_K", 0.995), ("Q4_0", 0.9)])
def test_a_model_with_hessians_has_lower_output_error(example_model, example_hessians, tmp_path, mix, bound):
    import copy

    import gguf_kquant
    from gguf_kquant.model.imatrix import load_imatrix

    im = load_imatrix(example_hessians)
    assert im.hessians is not None and "blk.0.attn_q.weight" in im.entries
    plain = copy.copy(im)
    plain.hessians = None
    fed = gguf_kquant.quantize_model(example_model, tmp_path / "fed.gguf", mix, imatrix=example_hessians,
                                     method="optimized")
    alone = gguf_kquant.quantize_model(example_model, tmp_path / "alone.gguf", mix, imatrix=plain,
                                       method="optimized")
    a, b = _tensors(fed.paths[0]), _tensors(alone.paths[0])
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}  # the same types
    assert fed.paths[0].stat().st_size <= alone.paths[0].stat().st_size + 64  # only the imatrix file name differs
    e_fed, n = _model_output_error(example_model, fed.paths[0], example_hessians)
    e_alone, _ = _model_output_error(example_model, alone.paths[0], example_hessians)
    assert n >= 7 and e_fed < bound * e_alone, (e_fed, e_alone)
    assert a["token_embd.weight"] == b["token_embd.weight"]  # no imatrix entry: no feedback


def test_the_size_budget_writes_its_allocation_with_feedback(example_model, example_hessians, tmp_path):
    """target_bpw with a Hessian file: the allocation is measured as without the matrices (the diagonal is the
    imatrix), and the blocks it chose are written with error feedback."""
    import copy

    import gguf_kquant
    from gguf_kquant.model.imatrix import load_imatrix

    plain = copy.copy(load_imatrix(example_hessians))
    plain.hessians = None
    kw = dict(target_bpw=4.5, method="optimized")
    fed = gguf_kquant.quantize_model(example_model, tmp_path / "fed.gguf", imatrix=example_hessians, **kw)
    alone = gguf_kquant.quantize_model(example_model, tmp_path / "alone.gguf", imatrix=plain, **kw)
    assert fed.allocation.tensor_types() == alone.allocation.tensor_types()
    a, b = _tensors(fed.paths[0]), _tensors(alone.paths[0])
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
    e_fed, n = _model_output_error(example_model, fed.paths[0], example_hessians)
    e_alone, _ = _model_output_error(example_model, alone.paths[0], example_hessians)
    assert n >= 7 and e_fed < 0.995 * e_alone, (e_fed, e_alone)


def test_the_file_does_not_depend_on_the_thread_count(example_model, example_hessians, tmp_path):
    import gguf_kquant

    files = [gguf_kquant.quantize_model(example_model, tmp_path / f"t{t}.gguf", "Q4_0", imatrix=example_hessians,
                                        method="optimized", threads=t).paths[0] for t in (1, 2)]
    assert files[0].read_bytes() == files[1].read_bytes()


def test_method_llama_with_a_hessian_file_uses_its_diagonal(example_model, example_hessians, tmp_path):
    """The file is an imatrix too: method "llama" (llama-quantize's bytes) with its diagonal / tokens."""
    import gguf_kquant
    from gguf_kquant.model.hessian import load_hessians

    with load_hessians(example_hessians) as hs:
        entries = dict(hs.imatrix().entries)
    ours = gguf_kquant.quantize_model(example_model, tmp_path / "a.gguf", "IQ3_XXS", imatrix=example_hessians)
    ref = gguf_kquant.quantize_model(example_model, tmp_path / "b.gguf", "IQ3_XXS", imatrix=entries)
    assert _tensors(ours.paths[0]) == _tensors(ref.paths[0])


def test_several_outputs_and_the_cli_give_the_same_files(example_model, example_hessians, tmp_path):
    import gguf_kquant
    from gguf_kquant.cli import main

    single = {mix: gguf_kquant.quantize_model(example_model, tmp_path / f"{mix}.gguf", mix,
                                              imatrix=example_hessians, method="optimized").paths[0]
              for mix in ("Q4_K_M", "Q3_K_S")}
    multi = gguf_kquant.quantize_model(example_model, {tmp_path / f"m-{m}.gguf": m for m in single},
                                       imatrix=example_hessians, method="optimized")
    assert len(multi) == 2
    for mix, path in single.items():
        assert (tmp_path / f"m-{mix}.gguf").read_bytes() == path.read_bytes()
    assert main(["quantize", str(example_model), str(tmp_path / "cli.gguf"), "Q4_K_M", "--imatrix",
                 str(example_hessians), "--method", "optimized", "--quiet"]) == 0
    assert (tmp_path / "cli.gguf").read_bytes() == single["Q4_K_M"].read_bytes()


def test_llama_cpp_runs_the_file(example_model, example_hessians, tmp_path, oracle):
    import gguf_kquant

    dst = gguf_kquant.quantize_model(example_model, tmp_path / "fed.gguf", "Q4_K_M", imatrix=example_hessians,
                                     method="optimized").paths[0]
    logits = llama_logits(dst, list(range(5, 13)), tmp_path / "fed.npy")  # in a subprocess, as oracle.py says
    assert logits.shape[0] == 8 and np.isfinite(logits).all() and logits[-1].std() > 0


# ---------------------------------------------------------------------------------------------------
# Mixture-of-experts: each expert's rows fed forward through its own matrix (MUL_MAT_ID, per expert)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe_with_hessians(tmp_path_factory, oracle):
    from make_example_model import build_llama_gguf

    from gguf_kquant.model.hessian import collect_hessians

    d = tmp_path_factory.mktemp("moe-hessians")
    model = build_llama_gguf(d / "moe.gguf", n_layer=1, n_embd=128, n_head=2, n_head_kv=1, n_ff=128, n_vocab=512,
                             dtype="F32", n_expert=4, n_expert_used=2)
    tokens = np.random.default_rng(11).integers(3, 512, 256)
    collect_hessians(model, tokens, d / "moe.hessian.gguf", ctx=64, threads=1, quiet=True)
    return model, d / "moe.hessian.gguf"


def _expert_output_errors(src, dst, hessians) -> dict:
    """(3-D weight, expert) -> sum_rows (x - deq) H_e (x - deq)^T over that expert's rows, H_e its matrix."""
    from gguf_kquant.container.reader import open_gguf
    from gguf_kquant.model.hessian import expert_weight, load_hessians

    errors = {}
    with open_gguf(src) as fs, open_gguf(dst) as fd, load_hessians(hessians) as hs:
        out = {t.name: t for t in fd.tensors}
        for t in fs.tensors:
            if t.name not in hs.expert_counts:
                continue
            q = out[t.name]
            x = np.asarray(t.numpy(), np.float32)  # (n_expert, rows, n_in)
            raw = np.asarray(q.raw()).reshape(x.shape[0], x.shape[1], -1)
            for e in range(x.shape[0]):
                entry = hs.for_weight(expert_weight(t.name, e))
                if entry is not None:
                    errors[t.name, e] = output_error(x[e], raw[e], q.type_name, entry[0])
    return errors


@pytest.mark.parametrize("mix", ["Q4_0", "Q4_K_M"])
def test_every_expert_is_fed_forward_through_its_own_matrix(moe_with_hessians, tmp_path, mix):
    import copy

    import gguf_kquant
    from gguf_kquant.model.imatrix import load_imatrix

    model, hessians = moe_with_hessians
    plain = copy.copy(load_imatrix(hessians))
    plain.hessians = None
    kw = dict(method="optimized", quiet=True)
    fed = gguf_kquant.quantize_model(model, tmp_path / "fed.gguf", mix, imatrix=hessians, **kw).paths[0]
    alone = gguf_kquant.quantize_model(model, tmp_path / "alone.gguf", mix, imatrix=plain, **kw).paths[0]
    e_fed, e_alone = (_expert_output_errors(model, p, hessians) for p in (fed, alone))
    assert len(e_fed) == 3 * 4  # gate, up, down: every expert got tokens
    lower = [k for k in e_fed if e_fed[k] < e_alone[k]]
    assert len(lower) >= 10 and sum(e_fed.values()) < 0.95 * sum(e_alone.values()), (e_fed, e_alone)
    # several outputs in one pass take the same expert's matrix for the same rows
    multi = gguf_kquant.quantize_model(model, {tmp_path / "m.gguf": mix, tmp_path / "m8.gguf": "Q8_0"},
                                       imatrix=hessians, **kw)
    assert len(multi) == 2 and (tmp_path / "m.gguf").read_bytes() == fed.read_bytes()

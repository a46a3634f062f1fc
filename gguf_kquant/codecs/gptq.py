"""Error-feedback rounding (GPTQ) into ggml's block formats, driven by the full importance matrix.

Not a port of ggml: used by ``quantize_model(..., method="optimized")`` when the imatrix file also holds each
weight's input covariance ``H = sum_t x_t x_t^T`` (:mod:`gguf_kquant.model.hessian`).  An imatrix is H's
diagonal divided by the token count; the off-diagonal terms are what lets a block's rounding error be
compensated by the columns not yet quantized.

Objective: the error of the layer's output over the calibration tokens, ``sum_rows (w - q) H (w - q)^T``.

Algorithm: GPTQ (Frantar et al. 2022) with the type's block as the step, so that every block is written by
the type's own quantizer with ggml's scales and levels (any ggml type with an imatrix quantizer works, and
llama.cpp decodes the result as usual)::

    H' = H + damp * mean(diag H) * I                 (dampening, as GPTQ: H of few tokens is near-singular)
    H' = V V^T, V upper triangular;  U = inv(V)      so inv(H') = U^T U, and inv(U_bb) = V_bb
    for each block b of B columns, left to right     (B: 32, or 256 for the k-quants and IQ4_XS)
        w_b  = diag(V_bb V_bb^T)                     each column's importance once the later columns may move
        Q_b  = quantize(W_b, type, imatrix=w_b)      ggml's blocks refined by codecs.optimized
        E_b  = W_b - dequantize(Q_b)
        W_r -= E_b @ V_bb @ U_br                     r: the columns after b

Why the update: with the columns F = b + r still free, inv(H'_F) = U_F^T U_F, and fixing W_b at Q_b moves the
quadratic's minimum over W_r by ``-E_b inv(inv(H'_F)_bb) inv(H'_F)_br = -E_b inv(U_bb) U_br``.  With a
diagonal H, U_br = 0: no feedback, and w_b is the imatrix (plus the dampening) — the method without Hessians.
As GPTQ's "lazy batch", the update past a group of :data:`GROUP` columns is one matrix product per group.

The columns inside one block get no feedback from each other: the block's quantizer chooses them jointly,
weighted by w_b, which already discounts what the later blocks can compensate.  Stepping through the
sub-blocks of a 256-value super-block instead (re-quantizing it with the fixed columns pinned by large
weights) was measured and dropped: on synthetic low-rank activations it halved the error again, but on
SmolLM2's real ffn_down Hessians it made Q4_K/Q5_K/IQ4_XS 2-5x *worse* than no feedback (the super-block's
shared scales move the pinned columns), and whole blocks won for every type but Q3_K (0.26 vs 0.22).
Rows are independent (H is shared by all rows of a weight), so a slab of rows gives the bytes of those rows
quantized with the rest.  Cost per weight: U by halves in float32 matrix products (:func:`_inverse_upper_into`,
about n^3 multiply-adds, n^2 floats kept; n = the input width; once per input, as attn_q/k/v share theirs),
``rows * n^2`` multiply-adds for the updates (BLAS, one thread per row range), and one quantization per block
column.  Float32 is GPTQ's precision too: the dampening bounds H's condition number, and the output errors
below are those of float64 factors to three digits.

Measured, output error against ggml's blocks with the same imatrix (refiner alone -> with feedback):
SmolLM2-135M's ffn_down, six layers, Hessians from 4096 tokens: Q2_K 0.78 -> 0.37, Q3_K 0.82 -> 0.26,
Q4_K 0.46 -> 0.40, Q5_K 0.28 -> 0.25, Q6_K 0.66 -> 0.23, IQ4_XS 0.74 -> 0.62.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import ImatrixError
from ..types import type_info
from .chunks import run_chunks

__all__ = ["DEFAULT_DAMP", "ErrorFeedback", "Factor", "FeedbackPlan", "for_tensor", "output_error", "quantize_feedback"]

DEFAULT_DAMP = 0.01  # GPTQ's percdamp: 1% of the mean diagonal
_PLANS_KEPT = 4  # a layer's inputs: attention, its output, the feed-forward, its down projection
GROUP = 128  # columns per lazy-batch group (GPTQ's block size); a 256-value block is its own group


class Factor:
    """U = inv(V) for H' = V V^T (module docstring), which does not depend on the block size: tensors that share
    an input but not a block size (a size budget's attn_q in Q4_K, attn_v in Q8_0) share it; ``feeds``: H has
    off-diagonal terms, so something is fed forward."""

    def __init__(self, hessian: np.ndarray, *, damp: float = DEFAULT_DAMP, threads: Optional[int] = None):
        h = np.asarray(hessian)
        n = h.shape[0] if h.ndim else 0
        if h.ndim != 2 or h.shape != (n, n):
            raise ImatrixError(f"Hessian of shape {h.shape} is not a square matrix")
        if not np.isfinite(h).all():
            raise ImatrixError("Hessian has non-finite values")
        mean = float(np.diagonal(h).astype(np.float64).mean()) if n else 0.0
        # one BLAS thread: the same factors to the bit on any machine, and faster overall (with two, the whole
        # SmolLM2 took 16% longer: OpenBLAS's idle threads spin and slow the row workers that follow); the large
        # products are split over our own threads instead (_Products)
        with _one_blas_thread():
            self.u = _inverse_upper_factor(h, damp * mean if mean > 0 else 1.0, threads)
        self.n = n
        self.feeds = np.count_nonzero(h) > np.count_nonzero(np.diagonal(h))


class FeedbackPlan:
    """The per-weight constants of the update for one block size: the column weights w, and per block b
    ``V_bb`` plus ``V_bb @ U_b,(b..group end)`` (the update inside its group); per group ``U_g,after``.
    ``factor``: the :class:`Factor` of ``hessian`` when it is made already (``hessian`` is then not read)."""

    def __init__(self, hessian: np.ndarray, qtype, *, damp: float = DEFAULT_DAMP, n_tokens: int = 1,
                 threads: Optional[int] = None, factor: Optional["Factor"] = None):
        info = type_info(qtype)
        self.block = block = info.block_size
        self.group = max(GROUP, block)
        if factor is None:
            factor = Factor(hessian, damp=damp, threads=threads)
        if factor.n % block:
            raise ImatrixError(f"Hessian of {factor.n} columns does not fit rows of {info.name} blocks")
        self.factor = factor
        self.feeds = factor.feeds
        with _one_blas_thread():
            self._blocks(factor.u, n_tokens)

    def _blocks(self, u: np.ndarray, n_tokens: int) -> None:
        self.n = n = u.shape[0]
        block, group = self.block, self.group
        self.weights = np.empty(n, np.float32)  # w, in imatrix units (per token)
        self.v_bb = []  # per block: V_bb, float32
        self.local = []  # per block: V_bb @ U_b,(b1..group end), float32
        self.beyond = []  # per group: U_g,(group end..n), float32 views of U (its rows are contiguous)
        for g0 in range(0, n, group):
            g1 = min(g0 + group, n)
            for b0 in range(g0, g1, block):
                b1 = b0 + block
                v_bb = _upper_inverse(u[b0:b1, b0:b1].astype(np.float64))  # V's diagonal block is U_bb's inverse
                self.weights[b0:b1] = (v_bb ** 2).sum(axis=1) / max(int(n_tokens), 1)
                self.v_bb.append(v_bb.astype(np.float32))
                self.local.append(self.v_bb[-1] @ u[b0:b1, b1:g1])
            self.beyond.append(u[g0:g1, g1:])


def _inverse_upper_factor(h: np.ndarray, dampening: float = 0.0, threads: Optional[int] = None) -> np.ndarray:
    """U = inv(V), float32, where h + dampening * I = V V^T with V upper triangular (the Cholesky factor with
    the index order reversed); U^T U is then the inverse of the dampened h.  A matrix that is not positive
    definite is an ImatrixError."""
    a = np.array(h, np.float32)  # a copy: the caller's matrix is not dampened
    a[np.diag_indices(a.shape[0])] += np.float32(dampening)
    u = np.zeros_like(a)
    try:
        _inverse_upper_into(a, u, _Products(threads))
    except np.linalg.LinAlgError:
        raise ImatrixError("Hessian is not positive definite (even after dampening)") from None
    if not np.isfinite(u).all():
        raise ImatrixError("Hessian is too ill-conditioned to factorise in float32 (even after dampening)")
    return u


_LEAF = 128  # below this width LAPACK's own factorisation; above it the halves' matrix products pay


def _upper_inverse(t: np.ndarray) -> np.ndarray:
    """The inverse of a small upper triangular matrix, by halves ([[A, B], [0, D]]^-1 = [[A^-1, -A^-1 B D^-1],
    [0, D^-1]]): LAPACK's general inverse of a 256 x 256 block costs more than the products."""
    n = t.shape[0]
    if n <= 32:
        return np.triu(np.linalg.inv(t))  # inv works by LU: noise below the diagonal
    k = n // 2
    out = np.zeros_like(t)
    out[:k, :k] = a_inv = _upper_inverse(t[:k, :k])
    out[k:, k:] = d_inv = _upper_inverse(t[k:, k:])
    out[:k, k:] = -(a_inv @ t[:k, k:]) @ d_inv
    return out


def _inverse_upper_into(h: np.ndarray, u: np.ndarray, mul) -> None:
    """``u[:] = inv(V)`` (``u`` zero below its diagonal on entry) for h = V V^T, V upper triangular, by halves:
    numpy has no triangular inverse, and its Cholesky runs at a fraction of matrix-product speed.  Only U is
    built (the plan needs V's diagonal blocks alone, inverses of U's); ``mul`` does the matrix products::

        h = [[A, B], [B^T, C]]:   V = [[V11, V12], [0, V22]],   U = [[U11, -U11 V12 U22], [0, U22]]
        V22 V22^T = C,  V12 = B U22^T,  V11 V11^T = A - V12 V12^T        (U = inv(V) of each half)
    """
    n = h.shape[0]
    if n <= _LEAF:  # V = P L P with L LAPACK's lower factor of the reversed matrix (P reverses the order)
        lower = np.linalg.cholesky(h[::-1, ::-1])
        u[...] = np.tril(np.linalg.inv(lower))[::-1, ::-1]  # inv works by LU: noise off the triangle
        return
    k = n // 2
    _inverse_upper_into(h[k:, k:], u[k:, k:], mul)
    v12 = mul(h[:k, k:], u[k:, k:].T)
    _inverse_upper_into(h[:k, :k] - mul(v12, v12.T), u[:k, :k], mul)
    u[:k, k:] = -mul(mul(u[:k, :k], v12), u[k:, k:])


class _Products:
    """``a @ b`` with the rows of a large product in two fixed halves, the second on a pool thread when
    ``threads`` allows: the floats do not depend on the thread count, and each BLAS call stays on one thread
    (see Factor).  n = 1536 factorises in 35 ms on two threads instead of 60, n = 2048 in 83 instead of 137."""

    SPLIT = 256  # rows below which one call is faster than two

    def __init__(self, threads: Optional[int]):
        from . import _threads
        from .chunks import _get_pool

        self.pool = _get_pool() if _threads(threads).wanted > 1 else None

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        m = a.shape[0]
        if m < self.SPLIT:
            return a @ b
        out = np.empty((m, b.shape[1]), np.result_type(a, b))
        half = m // 2
        second = None if self.pool is None else self.pool.submit(np.matmul, a[half:], b, out[half:])
        np.matmul(a[:half], b, out[:half])
        if second is None:
            np.matmul(a[half:], b, out[half:])
        else:
            second.result()
        return out


def quantize_feedback(x, qtype, plan: FeedbackPlan, *, threads: Optional[int] = None) -> np.ndarray:
    """Rows of ``x`` (n_rows x n) quantized to ``qtype`` with error feedback (module docstring).

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    >>> quantize_feedback(x, "Q4_0", FeedbackPlan(np.eye(64), "Q4_0")).shape
    (4, 36)
    """
    from . import _check_fp16_scales, _check_input, _threads, to_float32
    from .optimized import quantize_optimized

    info = type_info(qtype)
    x = to_float32(x)
    x = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    n_rows, n = x.shape
    if n != plan.n or plan.block != info.block_size:
        raise ImatrixError(f"rows of {n} values in {info.name} do not fit a Hessian plan of {plan.n} columns "
                           f"in blocks of {plan.block}")
    if not plan.feeds:  # a diagonal H: the refiner alone (some quantizers look at the whole row)
        return quantize_optimized(x, qtype, plan.weights, threads=threads)
    out = np.empty((n_rows, info.row_bytes(n)), np.uint8)
    with _one_blas_thread(), _threads(threads):  # rows are split over our threads; BLAS's own would fight them
        _check_input(x, info)
        run_chunks(_feedback_rows, n_rows, x, out, _BlockCodec(info), plan)
        _check_fp16_scales(out, info)  # the fed-forward values are new: a scale may overflow where x's did not
    return out


class _BlockCodec:
    """One column of blocks, quantized (ggml's imatrix quantizer, then the refiner) and decoded by the type's
    kernels directly: :func:`quantize`'s checks of its input run once per tensor, not once per block."""

    def __init__(self, info):
        from .optimized import REFINERS
        from ..types import Imatrix

        self.type_size = info.type_size
        uses_weights = info.imatrix is not Imatrix.IGNORED  # Q8_0's ggml quantizer has no imatrix form
        self._quantize = info.kernel("quantize_imatrix" if uses_weights else "quantize")
        self._uses_weights = uses_weights
        self._refine = REFINERS.get(info.ggml_type)
        self._decode = info.kernel("dequantize")

    def __call__(self, xb: np.ndarray, weights: np.ndarray) -> tuple:
        """``(blocks, decoded)`` of the contiguous rows ``xb`` (one block each)."""
        qb = np.empty((xb.shape[0], self.type_size), np.uint8)
        if self._uses_weights:
            self._quantize(xb, weights, qb)
        else:
            self._quantize(xb, qb)
        if self._refine is not None:
            self._refine(xb, weights, qb)
        decoded = np.empty_like(xb)
        self._decode(qb, decoded)
        return qb, decoded


def _feedback_rows(x, out, codec: _BlockCodec, plan: FeedbackPlan, r0: int, r1: int) -> None:
    """Rows [r0, r1) of x into out, on this thread (the kernels run single-threaded here)."""
    from . import _threads

    nbytes = codec.type_size
    w = x[r0:r1].copy()  # updated in place as the error is fed forward
    k = 0  # block index
    with _threads(1):
        for g, g0 in enumerate(range(0, plan.n, plan.group)):
            g1 = min(g0 + plan.group, plan.n)
            f = np.empty((r1 - r0, g1 - g0), np.float32)  # the group's errors times V_bb, for the columns past it
            for b0 in range(g0, g1, plan.block):
                b1 = b0 + plan.block
                xb = np.ascontiguousarray(w[:, b0:b1])
                qb, decoded = codec(xb, plan.weights[b0:b1])
                out[r0:r1, k * nbytes:(k + 1) * nbytes] = qb
                err = xb - decoded
                f[:, b0 - g0:b1 - g0] = err @ plan.v_bb[k]
                if b1 < g1:
                    w[:, b1:g1] -= err @ plan.local[k]
                k += 1
            if g1 < plan.n:
                w[:, g1:] -= f @ plan.beyond[g]


_blas = None


def _one_blas_thread():
    """A context that keeps BLAS (numpy's matrix products) on the calling thread."""
    global _blas
    from threadpoolctl import ThreadpoolController

    if _blas is None:
        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def output_error(x, raw, qtype, hessian) -> float:
    """``sum_rows (x - deq) H (x - deq)^T``: the objective error feedback lowers (H unnormalised)."""
    from . import dequantize, to_float32

    x2d = to_float32(x).reshape(raw.shape[0], -1).astype(np.float64)
    e = x2d - dequantize(raw, qtype, x2d.shape)
    return float(np.einsum("ij,jk,ik->", e, np.asarray(hessian, np.float64), e))


class ErrorFeedback:
    """``method="optimized"`` with Hessians: the quantize function of each tensor (:func:`for_tensor`).

    ``hessians`` is a :class:`gguf_kquant.model.hessian.Hessians`: ``matrix_of`` (weight -> its matrix's name,
    weights sharing an input share one) and ``for_weight(name) -> (H, n_tokens) | None``.  A matrix is read and
    factorised only when a plan for it is not kept already.  Feedback applies where the imatrix applies: a tensor
    without a Hessian, or without an imatrix entry (MoE experts, a tied ``token_embd``, ...), gets the refiner
    alone, as without Hessians.  Called directly (no tensor known), it is
    :func:`~gguf_kquant.codecs.optimized.quantize_optimized`.
    """

    def __init__(self, hessians, damp: float = DEFAULT_DAMP):
        self.hessians = hessians
        self.damp = damp
        self._plans = {}  # (matrix, block) -> FeedbackPlan, the last few: attn_q/k/v (ffn_gate/up) share one
        # matrix -> Factor, the last few (files often order a layer's tensors by name: attn_k, attn_output,
        # attn_q, ...); shared by its plans of any block size.  At most _PLANS_KEPT U's are alive: a factor is
        # dropped once _PLANS_KEPT others were used after its last use, each making a plan, so by then its own
        # plans are dropped too.
        self._factors = {}

    def __call__(self, x, qtype, imatrix=None, *, threads: Optional[int] = None):
        from .optimized import quantize_optimized

        return quantize_optimized(x, qtype, imatrix, threads=threads)

    def for_tensor(self, name: str):
        matrix = self.hessians.matrix_of.get(name)
        if matrix is None:
            return self

        def quantize_tensor(x, qtype, imatrix=None, *, threads: Optional[int] = None):
            if imatrix is None:
                return self(x, qtype, None, threads=threads)
            return quantize_feedback(x, qtype, self._plan(name, matrix, qtype, x.shape[-1], threads),
                                     threads=threads)

        return quantize_tensor

    def _plan(self, name: str, matrix: str, qtype, n: int, threads: Optional[int]) -> FeedbackPlan:
        """The plan of ``matrix`` for ``qtype``'s blocks; the tensor ``name``'s rows are ``n`` values."""
        key = (matrix, type_info(qtype).block_size)
        if key not in self._plans:
            factor, n_tokens = self._factors.pop(matrix, None) or self._factorise(name, threads)
            _keep(self._factors, matrix, (factor, n_tokens))  # the last used last
            if factor.n != n:
                raise ImatrixError(f"tensor {name}: rows of {n} values, but its Hessian is {factor.n} x {factor.n}")
            try:
                plan = FeedbackPlan(None, qtype, n_tokens=n_tokens, factor=factor)
            except ImatrixError as exc:
                raise ImatrixError(f"tensor {name}: {exc}") from None
            _keep(self._plans, key, plan)
        return self._plans[key]

    def _factorise(self, name: str, threads: Optional[int]) -> tuple:
        """(Factor, token count) of the Hessian of tensor ``name``, read from the file."""
        hessian, n_tokens = self.hessians.for_weight(name)
        try:
            return Factor(hessian, damp=self.damp, threads=threads), n_tokens
        except ImatrixError as exc:
            raise ImatrixError(f"tensor {name}: {exc}") from None

    def __getstate__(self):  # pickled to Dask workers: the Hessians (by path), not a plan
        return {"hessians": self.hessians, "damp": self.damp, "_plans": {}, "_factors": {}}


def _keep(cache: dict, key, value) -> None:
    """``cache[key] = value``, the oldest entries dropped to keep the last :data:`_PLANS_KEPT`."""
    while len(cache) >= _PLANS_KEPT:
        del cache[next(iter(cache))]
    cache[key] = value


def for_tensor(quantize_fn, name: str):
    """The quantize function to use for tensor ``name``: per tensor for error feedback, else ``quantize_fn``."""
    return quantize_fn.for_tensor(name) if isinstance(quantize_fn, ErrorFeedback) else quantize_fn

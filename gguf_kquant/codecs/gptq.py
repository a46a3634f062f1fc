"""Error-feedback rounding (GPTQ) into ggml's block formats, driven by the full importance matrix.

Not a port of ggml: used by ``quantize_model(..., method="optimized")`` when the imatrix file also holds each
weight's input covariance ``H = sum_t x_t x_t^T`` (:mod:`gguf_kquant.model.hessian`).  An imatrix is H's
diagonal divided by the token count; the off-diagonal terms are what lets a block's rounding error be
compensated by the columns not yet quantized.

Objective: the error of the layer's output over the calibration tokens, ``sum_rows (w - q) H (w - q)^T``.

Algorithm: GPTQ (Frantar et al. 2022) with the type's block as the step, so that every block is written by
the type's own quantizer with ggml's scales and levels (any ggml type with an imatrix quantizer works, and
llama.cpp decodes the result as usual), in its nearest-plane form (Chen et al. 2025, "GPTQ as Babai's
nearest plane algorithm"), which needs H's factor but not its inverse's::

    H' = H + damp * mean(diag H) * I                 (dampening, as GPTQ: H of few tokens is near-singular)
    H' = V V^T, V upper triangular;  U_bb = inv(V_bb) for V's diagonal blocks only
    for each block b of B columns, left to right     (B: 32, or 256 for the k-quants and IQ4_XS)
        w_b  = diag(V_bb V_bb^T)                     each column's importance once the later columns may move
        T_b  = W_b + (sum_{c<b} G_c V_cb) U_bb       the target: W_b moved to absorb the earlier errors
        Q_b  = quantize(T_b, type, imatrix=w_b)      ggml's blocks refined by codecs.optimized (the legacy
                                                     types from ggml's plain block, IQ4_NL from a max-abs
                                                     one: FEEDBACK_REFINERS, FEEDBACK_STARTS)
        G_b  = W_b - dequantize(Q_b)                 (W's own values, not the target's)

Why: the objective is ``|(W - Q) V|^2``, and column block b of (W - Q) V is ``sum_{c<=b} G_c V_cb``: it does
not depend on the blocks after b.  Taking the blocks in order, Q_b makes its column block's error small given
the earlier ones: ``(T_b - Q_b) V_bb`` with T_b above, whose diagonal weights are w_b.  This is GPTQ's update
``W_r -= E_b V_bb U_br`` (U = inv(V), E_b the error against the moved W_b) summed over the earlier blocks, in
exact arithmetic; computed this way the factorisation costs n^3 / 4 multiply-adds instead of 2 n^3 / 3 for
V and U.  With a diagonal H, V_cb = 0: no feedback, and w_b is the imatrix (plus the dampening) — the method
without Hessians.  As GPTQ's "lazy batch", the sums past a group of :data:`GROUP` columns are added with one
matrix product per group.

The columns inside one block get no feedback from each other: the block's quantizer chooses them jointly,
weighted by w_b, which already discounts what the later blocks can compensate.  Stepping through the
sub-blocks of a 256-value super-block instead (re-quantizing it with the fixed columns pinned by large
weights) was measured and dropped: on synthetic low-rank activations it halved the error again, but on
SmolLM2's real ffn_down Hessians it made Q4_K/Q5_K/IQ4_XS 2-5x *worse* than no feedback (the super-block's
shared scales move the pinned columns), and whole blocks won for every type but Q3_K (0.26 vs 0.22).
Rows are independent (H is shared by all rows of a weight), so a slab of rows gives the bytes of those rows
quantized with the rest.  Cost per weight: V by halves in float32 matrix products (:func:`_upper_factor_into`,
about n^3 / 4 multiply-adds, n^2 floats kept; n = the input width; once per input, as attn_q/k/v share theirs;
none when the Hessian file stores V, as ``gguf-kquant hessian`` writes it by default: :meth:`Factor.stored`),
``rows * n^2 / 2`` multiply-adds for the sums (BLAS, one thread per row range), and one quantization per block
column.  Float32 is GPTQ's precision too: the dampening bounds H's condition number, and the output errors
below are those of float64 factors to three digits.

Measured, output error against ggml's blocks with the same imatrix (refiner alone -> with feedback):
SmolLM2-135M's ffn_down, six layers, Hessians from 4096 tokens: Q2_K 0.78 -> 0.37, Q3_K 0.82 -> 0.26,
Q4_K 0.46 -> 0.40, Q5_K 0.28 -> 0.25, Q6_K 0.66 -> 0.23, IQ4_XS 0.74 -> 0.62.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit

from ..errors import ImatrixError
from ..types import type_info
from .chunks import one_blas_thread, run_chunks

__all__ = ["DEFAULT_DAMP", "ErrorFeedback", "Factor", "FeedbackPlan", "for_tensor", "output_error", "quantize_feedback"]

DEFAULT_DAMP = 0.01  # GPTQ's percdamp: 1% of the mean diagonal
_PLANS_KEPT = 4  # a layer's inputs: attention, its output, the feed-forward, its down projection
# columns per lazy-batch group (GPTQ's block size); a 256-value block is its own group.  Every product's inner
# dimension is a group or a block: above 384, OpenBLAS's float32 product splits it by the row count, and a row's
# bytes would depend on its slab (one product over all earlier groups was 3-10% faster, and did so)
GROUP = 128


class Factor:
    """V, the upper triangular factor of H' = V V^T (module docstring), which does not depend on the block
    size: tensors that share an input but not a block size (a size budget's attn_q in Q4_K, attn_v in Q8_0)
    share it; ``feeds``: H has off-diagonal terms, so something is fed forward."""

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
        with one_blas_thread():
            self.v = _upper_factor(h, damp * mean if mean > 0 else 1.0, threads)
        self.n = n
        self.feeds = _off_diagonal(h)

    @classmethod
    def stored(cls, v: np.ndarray) -> "Factor":
        """The Factor whose V is ``v`` (float32, upper triangular, positive diagonal: a Hessian file's).  V is
        diagonal exactly when H is: nothing is fed forward then."""
        factor = cls.__new__(cls)
        factor.v = v
        factor.n = v.shape[0]
        factor.feeds = _off_diagonal(v)
        return factor


def upper_from_packed(packed: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The n x n upper triangular float32 matrix (zeros below the diagonal) of its upper triangle packed row by
    row, row i (columns i..n-1) at ``packed[starts[i]:]``, as Hessian files store V; rows split over threads."""
    from . import _threads

    n = starts.shape[0]
    v = np.zeros((n, n), np.float32)
    with _threads(None):
        run_chunks(_unpack_upper_rows, (n + 1) // 2, np.ascontiguousarray(packed, np.float32), starts, v)
    return v


@njit(cache=True, nogil=True)
def _unpack_upper_rows(packed, starts, v, p0, p1):
    """Rows p and n-1-p of V for p in [p0, p1): a pair of rows is n + 1 values, so equal shares of pairs are
    equal work (an odd n's middle row is copied twice)."""
    n = v.shape[0]
    for p in range(p0, p1):
        for i in (p, n - 1 - p):
            for j in range(n - i):
                v[i, i + j] = packed[starts[i] + j]


def _off_diagonal(m: np.ndarray) -> bool:
    """Whether square ``m`` has a non-zero value off its diagonal.  A Hessian of real activations has one in its
    first row or column: only a (near-)diagonal matrix is counted through."""
    if m.shape[0] > 1 and (m[0, 1:].any() or m[1:, 0].any()):
        return True
    return np.count_nonzero(m) > np.count_nonzero(np.diagonal(m))


class FeedbackPlan:
    """The per-weight constants of the update for one block size: the column weights w, and per block b
    ``U_bb = inv(V_bb)``; V's other blocks are used as views of the :class:`Factor`.
    ``factor``: the Factor of ``hessian`` when it is made already (``hessian`` is then not read)."""

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
        self.v = factor.v
        self.n = n = factor.n
        v_bb = np.stack([self.v[b0:b0 + block, b0:b0 + block] for b0 in range(0, n, block)]).astype(np.float64)
        self.weights = ((v_bb ** 2).sum(axis=2) / max(int(n_tokens), 1)).reshape(n).astype(np.float32)  # w, per token
        with one_blas_thread():
            self.u_bb = _upper_inverse(v_bb).astype(np.float32)  # per block: inv(V_bb)


def _upper_factor(h: np.ndarray, dampening: float = 0.0, threads: Optional[int] = None) -> np.ndarray:
    """V, float32 upper triangular, with h + dampening * I = V V^T (the Cholesky factor with the index order
    reversed).  A matrix that is not positive definite is an ImatrixError."""
    a = np.array(h, np.float32)  # a copy: the caller's matrix is not dampened
    a[np.diag_indices(a.shape[0])] += np.float32(dampening)
    v = np.zeros_like(a)
    try:
        _upper_factor_into(a, v, _Products(threads), {})
    except np.linalg.LinAlgError:
        raise ImatrixError("Hessian is not positive definite (even after dampening)") from None
    if not np.isfinite(v).all():
        raise ImatrixError("Hessian is too ill-conditioned to factorise in float32 (even after dampening)")
    return v


_LEAF = 128  # below this width LAPACK's own factorisation; above it the halves' matrix products pay


def _upper_inverse(t: np.ndarray) -> np.ndarray:
    """The inverses of small upper triangular matrices (the last two axes), by halves ([[A, B], [0, D]]^-1 =
    [[A^-1, -A^-1 B D^-1], [0, D^-1]]): LAPACK's general inverse of a 256 x 256 block costs more than the
    products."""
    n = t.shape[-1]
    if n <= 32:
        return np.triu(np.linalg.inv(t))  # inv works by LU: noise below the diagonal
    k = n // 2
    out = np.zeros_like(t)
    out[..., :k, :k] = a_inv = _upper_inverse(t[..., :k, :k])
    out[..., k:, k:] = d_inv = _upper_inverse(t[..., k:, k:])
    out[..., :k, k:] = -(a_inv @ t[..., :k, k:]) @ d_inv
    return out


def _upper_factor_into(h: np.ndarray, v: np.ndarray, mul, leaves: dict, at: int = 0) -> None:
    """``v[:] = V`` (``v`` zero below its diagonal on entry) for h = V V^T, V upper triangular, by halves in
    matrix products (numpy's Cholesky runs at a fraction of their speed; about n^3 / 4 multiply-adds).  ``mul``
    does the products; ``leaves`` keeps the transposed inverse of each diagonal leaf of V, by its first index
    ``at``, for the triangular solves above it::

        h = [[A, B], [B^T, C]]:   V = [[V11, V12], [0, V22]]
        V22 V22^T = C,   V12 V22^T = B,   V11 V11^T = A - V12 V12^T
    """
    n = h.shape[0]
    if n <= _LEAF:  # V = P L P with L LAPACK's lower factor of the reversed matrix (P reverses the order)
        v[...] = np.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
        leaves[at] = _upper_inverse(v.astype(np.float64)).astype(np.float32).T
        return
    k = n // 2
    _upper_factor_into(h[k:, k:], v[k:, k:], mul, leaves, at + k)
    v12 = v[:k, k:]
    v12[...] = _solve_transposed(h[:k, k:], v[k:, k:], mul, leaves, at + k)
    _upper_factor_into(h[:k, :k] - mul(v12, v12.T), v[:k, :k], mul, leaves, at)


def _solve_transposed(b: np.ndarray, t: np.ndarray, mul, leaves: dict, at: int) -> np.ndarray:
    """X with X T^T = B, T = V[at:, at:] upper triangular, by the halves of :func:`_upper_factor_into`, which
    end in its leaves (numpy has no triangular solve)::

        T = [[P, Q], [0, R]]:   X = [X1, X2],   X2 R^T = B2,   X1 P^T = B1 - X2 Q^T
    """
    k = t.shape[0]
    if k <= _LEAF:
        return mul(b, leaves[at])
    h = k // 2
    x = np.empty_like(b)
    x[:, h:] = _solve_transposed(b[:, h:], t[h:, h:], mul, leaves, at + h)
    x[:, :h] = _solve_transposed(b[:, :h] - mul(x[:, h:], t[:h, h:].T), t[:h, :h], mul, leaves, at)
    return x


class _Products:
    """``a @ b`` with the rows of a large product in two fixed halves, the second on a pool thread when
    ``threads`` allows: the floats do not depend on the thread count, and each BLAS call stays on one thread
    (see Factor).  n = 1536 factorises in 25 ms on two threads (30 on one), n = 2048 in 53 (71 on one); the
    former V-and-U factorisation took 35 and 83 on two."""

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
    with one_blas_thread(), _threads(threads):  # rows are split over our threads; BLAS's own would fight them
        _check_input(x, info)
        run_chunks(_feedback_rows, n_rows, x, out, _BlockCodec(info), plan)
        _check_fp16_scales(out, info)  # the fed-forward values are new: a scale may overflow where x's did not
    return out


class _BlockCodec:
    """One column of blocks, quantized (ggml's quantizer, then the refiner) and decoded by the type's kernels
    directly: :func:`quantize`'s checks of its input run once per tensor, not once per block."""

    def __init__(self, info):
        from .optimized import FEEDBACK_REFINERS, FEEDBACK_STARTS, REFINERS, feedback_start

        self.type_size = info.type_size
        op, self._uses_weights = feedback_start(info)
        self._quantize = FEEDBACK_STARTS[info.ggml_type] if op == "start" else info.kernel(op)
        self._refine = FEEDBACK_REFINERS.get(info.ggml_type) or REFINERS.get(info.ggml_type)
        self._decode = info.kernel("dequantize")

    def __call__(self, xb: np.ndarray, weights: np.ndarray, qb: np.ndarray, decoded: np.ndarray) -> None:
        """The blocks ``qb`` of the contiguous rows ``xb`` (one block each), and their values ``decoded``."""
        if self._uses_weights:
            self._quantize(xb, weights, qb)
        else:
            self._quantize(xb, qb)
        if self._refine is not None:
            self._refine(xb, weights, qb)
        self._decode(qb, decoded)


def _feedback_rows(x, out, codec: _BlockCodec, plan: FeedbackPlan, r0: int, r1: int) -> None:
    """Rows [r0, r1) of x into out, on this thread (the kernels run single-threaded here).  Block k's target is
    ``x_k + (sum over earlier blocks c of G_c V_ck) U_kk`` with G_c = x_c - decoded_c (module docstring);
    ``acc[k]`` holds those sums, added a group at a time past the current group.

    The slab is held block-major — ``xs[k]``, ``acc[k]``, ``blocks[k]`` are block column k of all its rows,
    contiguous — so that every step is a whole-array operation: row-major, numpy's element-wise steps over
    (rows x 32) slices cost more than the products (measured on SmolLM2's Q5_0 ffn_gate: 15-25% of the
    whole).  A product into later block columns is one batched matmul over them (each still an ordinary
    BLAS product, so the floats, and the bytes, are those of the row-major products)::

        xs[k][i, j] = x[r0 + i, k*B + j]        blocks[k][i] = out[r0 + i, k*type_size:(k+1)*type_size]
    """
    from . import _threads

    if r1 - r0 == 1:  # OpenBLAS computes a one-row product as a vector product, whose floats differ: two rows
        pair, pair_out = np.repeat(x[r0:r1], 2, axis=0), np.empty((2, out.shape[1]), np.uint8)
        _feedback_rows(pair, pair_out, codec, plan, 0, 2)
        out[r0] = pair_out[0]
        return
    rows, B, n = r1 - r0, plan.block, plan.n
    nb, per_group = n // B, plan.group // B
    v = plan.v
    xs = np.ascontiguousarray(x[r0:r1].reshape(rows, nb, B).transpose(1, 0, 2))
    acc = np.zeros((nb, rows, B), np.float32)
    blocks = np.empty((nb, rows, codec.type_size), np.uint8)
    decoded = np.empty((rows, B), np.float32)
    with _threads(1):
        for k0 in range(0, nb, per_group):
            k1 = min(k0 + per_group, nb)
            err = np.empty((rows, (k1 - k0) * B), np.float32)  # the group's G, for the columns past it
            for k in range(k0, k1):
                target = acc[k] @ plan.u_bb[k]
                target += xs[k]
                codec(target, plan.weights[k * B:(k + 1) * B], blocks[k], decoded)
                e = err[:, (k - k0) * B:(k - k0 + 1) * B]
                np.subtract(xs[k], decoded, out=e)
                if k + 1 < k1:
                    acc[k + 1:k1] += np.matmul(e, _later_blocks(v, k * B, (k + 1) * B, k + 1, k1, B))
            if k1 < nb:
                acc[k1:] += np.matmul(err, _later_blocks(v, k0 * B, k1 * B, k1, nb, B))
    out[r0:r1] = blocks.transpose(1, 0, 2).reshape(rows, nb * codec.type_size)


def _later_blocks(v: np.ndarray, c0: int, c1: int, k0: int, k1: int, block: int) -> np.ndarray:
    """Rows [c0, c1) of V in block columns [k0, k1), as a stack of (c1 - c0) x block matrices (a view)."""
    return v[c0:c1, k0 * block:k1 * block].reshape(c1 - c0, k1 - k0, block).transpose(1, 0, 2)


def output_error(x, raw, qtype, hessian) -> float:
    """``sum_rows (x - deq) H (x - deq)^T``: the objective error feedback lowers (H unnormalised)."""
    from . import dequantize, to_float32

    x2d = to_float32(x).reshape(raw.shape[0], -1).astype(np.float64)
    e = x2d - dequantize(raw, qtype, x2d.shape)
    return float(np.einsum("ij,jk,ik->", e, np.asarray(hessian, np.float64), e))


class ErrorFeedback:
    """``method="optimized"`` with Hessians: the quantize function of each tensor (:func:`for_tensor`).

    ``hessians`` is a :class:`gguf_kquant.model.hessian.Hessians`: ``matrix_of`` (weight -> its matrix's name,
    weights sharing an input share one), ``for_weight(name) -> (H, n_tokens) | None``,
    ``factor_for(name) -> (V, n_tokens, damp) | None`` (files that store V) and ``expert_counts`` (3-D expert
    weight -> its number of experts, whose matrices ``matrix_of`` lists by
    :func:`~gguf_kquant.model.hessian.expert_weight`).  A matrix is read (and factorised unless the file holds V
    for this ``damp``) only when a plan for it is not kept already.  Feedback applies
    where the imatrix applies: a tensor without a Hessian, or without an imatrix entry (a tied ``token_embd``,
    an expert no calibration token reached, ...), gets the refiner alone, as without Hessians.  The rows of a
    3-D expert weight are fed forward expert by expert, each through its own matrix (:meth:`for_tensor`).
    Called directly (no tensor known), it is :func:`~gguf_kquant.codecs.optimized.quantize_optimized`.
    """

    def __init__(self, hessians, damp: float = DEFAULT_DAMP):
        self.hessians = hessians
        self.damp = damp
        self._plans = {}  # (matrix, block) -> FeedbackPlan, the last few: attn_q/k/v (ffn_gate/up) share one
        # matrix -> Factor, the last few (files often order a layer's tensors by name: attn_k, attn_output,
        # attn_q, ...); shared by its plans of any block size.  At most _PLANS_KEPT V's are alive: a factor is
        # dropped once _PLANS_KEPT others were used after its last use, each making a plan, so by then its own
        # plans are dropped too.
        self._factors = {}

    def __call__(self, x, qtype, imatrix=None, *, threads: Optional[int] = None):
        from .optimized import quantize_optimized

        return quantize_optimized(x, qtype, imatrix, threads=threads)

    def for_tensor(self, name: str, expert: int = 0):
        """The quantize function of tensor ``name``'s rows (matrix ``expert`` of it, for a 3-D expert weight)."""
        from ..model.hessian import expert_weight

        weight = expert_weight(name, expert) if name in self.hessians.expert_counts else name
        matrix = self.hessians.matrix_of.get(weight)
        if matrix is None:
            return self

        def quantize_tensor(x, qtype, imatrix=None, *, threads: Optional[int] = None):
            if imatrix is None:
                return self(x, qtype, None, threads=threads)
            return quantize_feedback(x, qtype, self._plan(weight, matrix, qtype, x.shape[-1], threads),
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
        """(Factor, token count) of the Hessian of tensor ``name``: the file's own factor when it holds one for
        this dampening, else H read from the file and factorised."""
        stored = self.hessians.factor_for(name)
        if stored is not None and np.float32(stored[2]) == np.float32(self.damp):
            return Factor.stored(stored[0]), stored[1]
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


def for_tensor(quantize_fn, name: str, expert: int = 0):
    """The quantize function to use for the rows of tensor ``name`` in its matrix ``expert`` (an expert of a 3-D
    weight; 0 for a 2-D one): per tensor (and expert) for error feedback, else ``quantize_fn``."""
    return quantize_fn.for_tensor(name, expert) if isinstance(quantize_fn, ErrorFeedback) else quantize_fn

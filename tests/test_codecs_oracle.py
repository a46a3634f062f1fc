"""Every codec in the type table against llama.cpp's ggml (the oracle), in one harness.

Parametrized over the rows of :data:`gguf_kquant.types.TYPES` that name codec modules, by the operations the
row has (:attr:`TypeInfo.ops`), so a type is checked the moment its row and module exist:

* quantize: the bytes of ``ggml_quantize_chunk(type, x, imatrix=NULL)`` — and, where the row takes an
  importance matrix, of ``ggml_quantize_chunk(type, x, imatrix)`` — on a fixed corpus of every distribution
  (tests/codec_corpus.py) and on hypothesis rows;
* dequantize: the floats of ggml's ``to_float``, bit for bit, on random bytes and on blocks whose fp16 fields
  hold NaN, +-Inf, denormals and the extremes.

Types that ``ggml_quantize_chunk`` does not handle are reached through their exported row functions
(Q8_1 / Q8_K ``quantize_row_*_ref``, ``dequantize_row_q8_K``); ggml has no dequantizer at all for Q8_1, whose
meaning x = d*q is checked in tests/test_codecs_legacy.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
from codec_corpus import fixed_corpus, fixed_imatrix, rows
from gguf_kquant.codecs import dequantize, quantize
from gguf_kquant.errors import BadTensorDataError
from gguf_kquant.types import TYPES, GGMLType, TypeInfo

CODEC_ROWS = [r for r in TYPES.values() if r.codec]
QUANTIZE_ROWS = [r for r in CODEC_ROWS if "quantize" in r.ops]
IMATRIX_ROWS = [r for r in CODEC_ROWS if "quantize_imatrix" in r.ops]
DEQUANTIZE_ROWS = [r for r in CODEC_ROWS if r.ggml_type is not GGMLType.Q8_1]  # ggml has no Q8_1 to_float

# ggml's row functions for the types ggml_quantize_chunk / to_float do not cover.
_QUANTIZE_SYMBOL = {GGMLType.Q8_1: "quantize_row_q8_1_ref", GGMLType.Q8_K: "quantize_row_q8_K_ref"}
_DEQUANTIZE_SYMBOL = {GGMLType.Q8_K: "dequantize_row_q8_K"}

# The grid searches (i-quants) are ggml's slowest code: a smaller slice of the corpus keeps the suite short
# while every distribution is still present (the corpus cycles through them).
_GRID_TYPES = {"iq1", "iq2", "iq3"}


def _ids(rows_):
    return [r.name for r in rows_]


def ggml_quantize(row: TypeInfo, x: np.ndarray, imatrix=None) -> np.ndarray:
    if row.ggml_type in _QUANTIZE_SYMBOL:
        return oracle.quantize_row_symbol(_QUANTIZE_SYMBOL[row.ggml_type], row.id, x)
    return oracle.quantize_chunk(row.id, x, imatrix)


def ggml_dequantize(row: TypeInfo, raw: np.ndarray, n_per_row: int) -> np.ndarray:
    if row.ggml_type in _DEQUANTIZE_SYMBOL:
        return oracle.dequantize_row_symbol(_DEQUANTIZE_SYMBOL[row.ggml_type], raw, n_per_row)
    return oracle.to_float(row.id, raw, n_per_row)


def kernel_quantize(row: TypeInfo, x: np.ndarray, imatrix=None) -> np.ndarray:
    """The registered kernel without the public API's refusals (ggml stores an overflowing fp16 scale as inf)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], row.row_bytes(x.shape[1])), np.uint8)
    if imatrix is None:
        row.kernel("quantize")(x, out)
    else:
        row.kernel("quantize_imatrix")(x, np.ascontiguousarray(imatrix, dtype=np.float32), out)
    return out


def assert_same_bytes(row: TypeInfo, ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if np.array_equal(ours, ref):
        return
    size = row.type_size
    bad_rows = (ours != ref).any(axis=1)
    r = int(np.argmax(bad_rows))
    byte = int(np.argmax(ours[r] != ref[r]))
    blk = byte // size
    raise AssertionError(
        f"{row.name}: {int(bad_rows.sum())} of {len(bad_rows)} rows differ; first: row {r}, block {blk}, "
        f"byte {byte - blk * size} of the block\n ours {ours[r, blk * size:(blk + 1) * size].tolist()}\n"
        f" ggml {ref[r, blk * size:(blk + 1) * size].tolist()}"
    )


def assert_same_floats(ours: np.ndarray, ref: np.ndarray) -> None:
    """Bit-identical float32, except that any NaN equals any NaN (IEEE leaves some payloads open)."""
    assert ours.shape == ref.shape
    same = (ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))
    if not same.all():
        r, c = np.argwhere(~same)[0]
        raise AssertionError(f"{int((~same).sum())} values differ; first: row {r}, column {c}: "
                             f"ours {ours[r, c]!r}, ggml {ref[r, c]!r}")


def _has_nonfinite_fp16(row: TypeInfo, raw: np.ndarray) -> bool:
    if row.ggml_type is GGMLType.IQ1_M:  # the fp16 scale is spread over the scales' top nibbles
        from gguf_kquant.codecs.iq1 import iq1_m_scale_bits

        return bool(((iq1_m_scale_bits(raw) & 0x7C00) == 0x7C00).any())
    blocks = raw.reshape(-1).view(row.block_dtype)
    if row.block_dtype.fields is None:  # F16 / BF16 elements themselves
        bits = raw.reshape(-1).view("<u2")
        top = 0x7C00 if row.name == "F16" else 0x7F80
        return bool(((bits & top) == top).any())
    return any(not np.isfinite(blocks[name]).all() for name, (fdt, *_r) in row.block_dtype.fields.items()
               if fdt.base == np.dtype("<f2"))


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    x = fixed_corpus()  # 1024 x 4096, every distribution
    x.setflags(write=False)  # as a memory-mapped tensor is: kernels must accept read-only input
    return x


def _corpus_for(row: TypeInfo, corpus: np.ndarray) -> np.ndarray:
    return corpus[::8] if set(row.codec) & _GRID_TYPES else corpus


def _check_public_api(row: TypeInfo, x: np.ndarray, ref: np.ndarray, imatrix=None) -> None:
    """quantize() gives ggml's bytes, or refuses exactly when ggml would store a non-finite scale."""
    try:
        ours = quantize(x, row.name, imatrix=imatrix)
    except BadTensorDataError:
        assert _has_nonfinite_fp16(row, ref), f"{row.name}: refused data that ggml quantizes to finite scales"
        return
    assert_same_bytes(row, ours, ref)


# --- quantize ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", QUANTIZE_ROWS, ids=_ids(QUANTIZE_ROWS))
def test_quantize_corpus(row, corpus, oracle):
    x = _corpus_for(row, corpus)
    ref = ggml_quantize(row, x)
    assert_same_bytes(row, kernel_quantize(row, x), ref)
    _check_public_api(row, x, ref)


@pytest.mark.parametrize("row", IMATRIX_ROWS, ids=_ids(IMATRIX_ROWS))
def test_quantize_imatrix_corpus(row, corpus, oracle):
    x = _corpus_for(row, corpus)
    w = fixed_imatrix(x.shape[1])
    w.setflags(write=False)
    ref = ggml_quantize(row, x, w)
    assert_same_bytes(row, kernel_quantize(row, x, w), ref)
    _check_public_api(row, x, ref, w)


_HYPOTHESIS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("row", QUANTIZE_ROWS, ids=_ids(QUANTIZE_ROWS))
@_HYPOTHESIS
@given(data=st.data())
def test_quantize_rows(row, data, oracle):
    x = data.draw(rows(block_size=row.block_size), label="x")
    assert_same_bytes(row, kernel_quantize(row, x), ggml_quantize(row, x))


@st.composite
def importance(draw, n: int) -> np.ndarray:
    kind = draw(st.sampled_from(["plausible", "ones", "uniform", "sparse"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "plausible":
        return fixed_imatrix(n, seed=seed)
    if kind == "ones":
        return np.ones(n, np.float32)
    w = rng.uniform(0, 10, n).astype(np.float32)
    if kind == "sparse":
        w[rng.random(n) < 0.7] = 0.0
        w[0] = 1.0  # not all zero
    return w


@pytest.mark.parametrize("row", IMATRIX_ROWS, ids=_ids(IMATRIX_ROWS))
@_HYPOTHESIS
@given(data=st.data())
def test_quantize_imatrix_rows(row, data, oracle):
    x = data.draw(rows(block_size=row.block_size), label="x")
    w = data.draw(importance(x.shape[1]), label="imatrix")
    assert_same_bytes(row, kernel_quantize(row, x, w), ggml_quantize(row, x, w))


# --- dequantize ----------------------------------------------------------------------------------------
_SPECIAL_FP16 = np.array([0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x0000,
                          0x8000], dtype="<u2")


def _random_blocks(row: TypeInfo, n_rows: int, n_per_row: int, seed: int) -> np.ndarray:
    """Random bytes, with the fp16 fields of every other block set to NaN/Inf/denormal/extreme values."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_rows, row.row_bytes(n_per_row)), dtype=np.uint8)
    fields = row.block_dtype.fields or {}
    blocks = raw.reshape(-1).view(row.block_dtype)
    for name, (fdt, *_rest) in fields.items():
        if fdt.base == np.dtype("<f2"):
            col = blocks[name].view("<u2").reshape(len(blocks), -1)
            picks = _SPECIAL_FP16[rng.integers(0, len(_SPECIAL_FP16), col[::2].shape)]
            col[::2] = picks
    return raw


@pytest.mark.parametrize("row", DEQUANTIZE_ROWS, ids=_ids(DEQUANTIZE_ROWS))
def test_dequantize_random_blocks(row, oracle):
    n_per_row = max(row.block_size, 256) * 4
    raw = _random_blocks(row, 64, n_per_row, seed=row.id)
    assert_same_floats(dequantize(raw, row.name, (64, n_per_row)), ggml_dequantize(row, raw, n_per_row))


@pytest.mark.parametrize("row", DEQUANTIZE_ROWS, ids=_ids(DEQUANTIZE_ROWS))
@_HYPOTHESIS
@given(seed=st.integers(0, 2**32 - 1), n_rows=st.integers(1, 4), n_blocks=st.integers(1, 6))
def test_dequantize_random_rows(row, seed, n_rows, n_blocks, oracle):
    n_per_row = row.block_size * n_blocks
    raw = _random_blocks(row, n_rows, n_per_row, seed)
    assert_same_floats(dequantize(raw, row.name, (n_rows, n_per_row)), ggml_dequantize(row, raw, n_per_row))


@pytest.mark.parametrize("row", [r for r in QUANTIZE_ROWS if r.ggml_type is not GGMLType.Q8_1],
                         ids=_ids([r for r in QUANTIZE_ROWS if r.ggml_type is not GGMLType.Q8_1]))
def test_dequantize_of_ggml_bytes(row, corpus, oracle):
    """Decoding what ggml wrote (real scales, every distribution) gives ggml's floats."""
    x = _corpus_for(row, corpus)[::4]  # every distribution (the corpus cycles through them in runs)
    ref = ggml_quantize(row, x)
    assert_same_floats(dequantize(ref, row.name, x.shape), ggml_dequantize(row, ref, x.shape[1]))


# --- the table itself ------------------------------------------------------------------------------------
def test_table_agrees_with_ggml_traits(oracle):
    for row in TYPES.values():
        if row.ggml_type in (GGMLType.Q8_1,) or row.is_integer or row.name == "F64":
            continue
        tr = oracle.type_traits(row.id)
        assert (tr.blck_size, tr.type_size) == (row.block_size, row.type_size), row.name
        requires = bool(oracle.ggml().ggml_quantize_requires_imatrix(row.id))
        assert requires == (row.imatrix.value == "required"), row.name

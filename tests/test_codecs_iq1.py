"""IQ1_S / IQ1_M specifics against llama.cpp's ggml (the general harness is tests/test_codecs_oracle.py).

* ties in the sort of each block (ggml: glibc qsort, a stable merge sort for arrays this small);
* sub-blocks below GROUP_MAX_EPS next to ordinary ones (IQ1_M's final refit still reads them);
* IQ1_M's fp16 super-block scale spread over the top nibbles of ``scales``: every special fp16 value;
* inputs so large that the weighted sums overflow: ggml's full-grid fallback reads input values of later
  rows (reproduced), or ggml aborts (we raise; a subprocess checks that ggml really aborts there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import oracle
from gguf_kquant.codecs import dequantize, quantize
from gguf_kquant.codecs.iq1 import iq1_m_scale_bits
from gguf_kquant.errors import BadTensorDataError
from gguf_kquant.types import TYPES, GGMLType

IQ1_S = TYPES[GGMLType.IQ1_S]
IQ1_M = TYPES[GGMLType.IQ1_M]


def kernel_quantize(row, x, qw=None):
    """The registered kernel (no public-API refusal of overflowing fp16 scales)."""
    out = np.empty((x.shape[0], row.row_bytes(x.shape[1])), np.uint8)
    if qw is None:
        row.kernel("quantize")(x, out)
    else:
        row.kernel("quantize_imatrix")(x, qw, out)
    return out


def assert_like_ggml(row, x, qw=None):
    ours = kernel_quantize(row, x, qw)
    ref = oracle.quantize_chunk(row.id, x, qw)
    bad = (ours != ref).any(axis=1)
    assert not bad.any(), f"{row.name}: rows {np.flatnonzero(bad).tolist()} differ from ggml"


CASES = [(IQ1_S, True), (IQ1_M, False), (IQ1_M, True)]
CASE_IDS = ["IQ1_S-imatrix", "IQ1_M", "IQ1_M-imatrix"]


def _imatrix(n, rng):
    qw = rng.random(n).astype(np.float32) + np.float32(0.01)
    qw[rng.random(n) < 0.1] = 0.0
    return qw


@pytest.mark.parametrize("row,with_qw", CASES, ids=CASE_IDS)
def test_ties_keep_index_order(row, with_qw, oracle):
    rng = np.random.default_rng(1)
    x = rng.integers(-2, 3, (16, 512)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = -0.0  # -0.0 and 0.0 compare equal in iq1_sort_helper
    x[8:] *= np.float32(0.5)
    assert_like_ggml(row, x, _imatrix(512, rng) if with_qw else None)


@pytest.mark.parametrize("row,with_qw", CASES, ids=CASE_IDS)
def test_tiny_sub_blocks(row, with_qw, oracle):
    """Sub-blocks with max |x| under GROUP_MAX_EPS_IQ1_S (1e-12) / _IQ1_M (1e-7), beside ordinary ones."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 512)).astype(np.float32)
    blocks = x.reshape(12, -1, 16)
    blocks[rng.random(blocks.shape[:2]) < 0.4] *= np.float32(1e-9)
    blocks[rng.random(blocks.shape[:2]) < 0.2] *= np.float32(1e-6)
    x[0] = 0.0
    x[1] *= np.float32(1e-13)
    assert_like_ggml(row, x, _imatrix(512, rng) if with_qw else None)


@pytest.mark.parametrize("nibbles_of", [0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x0001, 0x8001, 0x03FF, 0x7BFF, 0x3C00, 0])
def test_iq1_m_spread_scale(nibbles_of, oracle):
    """IQ1_M's fp16 scale s: nibble i of s is bits 15..12 of the little-endian uint16 scales[i]."""
    rng = np.random.default_rng(nibbles_of)
    raw = rng.integers(0, 256, (4, 4 * IQ1_M.type_size), dtype=np.uint8)
    blocks = raw.reshape(-1).view(IQ1_M.block_dtype)
    sc = blocks["scales"].view("<u2").reshape(-1, 4)
    for i in range(4):
        sc[:, i] = (sc[:, i] & 0x0FFF) | (((nibbles_of >> (4 * i)) & 0xF) << 12)
    assert (iq1_m_scale_bits(raw) == nibbles_of).all()
    ours = dequantize(raw, "IQ1_M", (4, 1024))
    ref = oracle.to_float(IQ1_M.id, raw, 1024)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    if nibbles_of == 0x3C00:  # s = 1.0: the first value is (2*l + 1) * (grid + delta) with l = scales[0] & 7
        l = int(sc[0, 0] & 7)
        idx = int(blocks["qs"][0, 0]) | (int(blocks["qh"][0, 0]) & 7) << 8
        from gguf_kquant.codecs.grids import iq1s_grid

        g = iq1s_grid[idx : idx + 1].view(np.int8)[0]
        delta = -0.125 if blocks["qh"][0, 0] & 0x08 else 0.125
        assert ours[0, 0] == np.float32((2 * l + 1) * (g + delta))


def _pattern_row(sc, seed, n=256):
    """A row whose first 32 values are {-1, 0, 1} * sc: weighted sums overflow float32 for large sc."""
    rng = np.random.default_rng(seed)
    x = np.zeros((1, n), np.float32)
    x[0, :32] = rng.choice(np.array([-1, 0, 0, 1], np.float32), 32) * np.float32(sc)
    x[0, 32:] = rng.standard_normal(n - 32)
    qw = rng.choice(np.array([0, 1, 1, 2], np.float32), n)
    return x, qw


def test_overflow_fallback_reads_later_rows(oracle):
    """No neighbour of an off-grid group has a finite error: ggml scans the whole grid with xval[i] for grid
    index i — values of the following rows.  Reproduced while they exist; refused past the input's end."""
    x, qw = _pattern_row(1e14, 5)
    with pytest.raises(BadTensorDataError, match="past the end"):
        kernel_quantize(IQ1_S, x, qw)
    more = np.random.default_rng(1).standard_normal((10, 256)).astype(np.float32)
    assert_like_ggml(IQ1_S, np.concatenate([x, more]), qw)

    x, _ = _iq1_m_pattern(1e10)
    with pytest.raises(BadTensorDataError, match="past the end"):
        kernel_quantize(IQ1_M, x)
    more = np.random.default_rng(2).standard_normal((10, 256)).astype(np.float32)
    assert_like_ggml(IQ1_M, np.concatenate([x, more]))


_ABORT_PROBE = """
import ctypes, sys
import numpy as np
lib = ctypes.CDLL(sys.argv[1])
lib.ggml_quantize_chunk.restype = ctypes.c_size_t
lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
t = int(sys.argv[2])
x = np.load(sys.argv[3])
qw = np.load(sys.argv[4]) if len(sys.argv) > 4 else None
out = np.zeros(x.size, np.uint8)
lib.ggml_quantize_init(t)
lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                        None if qw is None else qw.ctypes.data)
"""


def _ggml_aborts(row, x, qw=None) -> bool:
    """Run ggml_quantize_chunk in a child process; True if it died of SIGABRT (a failed GGML_ASSERT)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-c", _ABORT_PROBE, str(oracle.lib_dir() / "libggml-base.so"), str(row.id)]
        np.save(os.path.join(tmp, "x.npy"), x)
        args.append(os.path.join(tmp, "x.npy"))
        if qw is not None:
            np.save(os.path.join(tmp, "qw.npy"), qw)
            args.append(os.path.join(tmp, "qw.npy"))
        proc = subprocess.run(args, capture_output=True, env={**os.environ, "GGML_NO_BACKTRACE": "1"}, timeout=300)
    return proc.returncode == -6


def _iq1_m_pattern(sc):
    x = np.zeros((1, 256), np.float32)
    x[0, :16] = np.array([1, 0, 0, 0, 1, -1, 0, -1, -1, 1, 0, 0, 0, -1, 1, 0], np.float32) * np.float32(sc)
    return x, None


_ABORTS = {
    "IQ1_S-a": (IQ1_S, lambda: _pattern_row(1e16, 0)),
    "IQ1_S-b": (IQ1_S, lambda: _pattern_row(1e16, 27)),
    "IQ1_M": (IQ1_M, lambda: _iq1_m_pattern(4.5e11)),
}


@pytest.mark.parametrize("case", list(_ABORTS))
def test_refuses_where_ggml_aborts(case, oracle):
    row, make = _ABORTS[case]
    x, qw = make()
    x = np.concatenate([x, np.random.default_rng(3).standard_normal((10, 256)).astype(np.float32)])
    with pytest.raises(BadTensorDataError, match="aborts"):
        kernel_quantize(row, x, qw)
    with pytest.raises(BadTensorDataError):
        quantize(x, row.name, qw)
    assert _ggml_aborts(row, x, qw)


def test_thread_count_does_not_matter():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    qw = _imatrix(512, rng)
    for name, w in (("IQ1_S", qw), ("IQ1_M", None), ("IQ1_M", qw)):
        assert np.array_equal(quantize(x, name, w, threads=1), quantize(x, name, w, threads=2))


def test_iq1_m_overflowing_scale_is_ggml_s_inf(oracle):
    """Values ~1e6 overflow IQ1_M's fp16 super-block scale: ggml stores inf in the nibbles, and so do the
    kernels; iq1_m_scale_bits is how a caller sees it (IQ1_M has no fp16 field)."""
    x = (np.random.default_rng(6).standard_normal((2, 256)) * 1e6).astype(np.float32)
    ours = kernel_quantize(IQ1_M, x)
    assert np.array_equal(ours, oracle.quantize_chunk(IQ1_M.id, x, None))
    assert (iq1_m_scale_bits(ours) == 0x7C00).all()

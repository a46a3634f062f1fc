"""Float codecs: F32, F16, BF16 (ggml.c: ggml_fp32_to_fp16_row, ggml_fp32_to_bf16_row_ref and their inverses).

``ggml_quantize_chunk`` stores F32 as a copy, F16 with ``GGML_FP32_TO_FP16`` (round to nearest even, NaN ->
quiet NaN keeping the sign, overflow -> inf) and BF16 with ``ggml_compute_fp32_to_bf16`` (round to nearest even
on the bit pattern, NaN forced quiet).  The kernels handle NaN/Inf/subnormals exactly like ggml; the public API
rejects non-finite input before it gets here.

Elements are read and written byte by byte (little endian), so raw buffers at any alignment work.

    F16 element (2 bytes LE):  [15] sign | [14:10] exponent | [9:0] mantissa
    BF16 element (2 bytes LE): [15] sign | [14:7] exponent  | [6:0] mantissa   (= top half of an fp32)
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..types import register_kernel

from .chunks import run_chunks
from .helpers import bf16_bits_to_fp32, fp16_bits_to_fp32, fp32_to_bf16_bits, fp32_to_fp16_bits

# Unsigned (np.uint64) indices skip numba's negative-index wraparound, which keeps LLVM from vectorizing.
_U = np.uint64


@njit(cache=True, nogil=True)
def _fp32_to_fp16_row(x, y):
    for jj in range(x.shape[0]):
        j = _U(jj)
        h = fp32_to_fp16_bits(x[j])
        y[_U(2) * j] = np.uint8(h & np.uint16(0xFF))
        y[_U(2) * j + _U(1)] = np.uint8(h >> np.uint16(8))


@njit(cache=True, nogil=True)
def _fp16_to_fp32_row(raw, y):
    for jj in range(y.shape[0]):
        j = _U(jj)
        y[j] = fp16_bits_to_fp32(np.uint16(raw[_U(2) * j]) | (np.uint16(raw[_U(2) * j + _U(1)]) << np.uint16(8)))


@njit(cache=True, nogil=True)
def _fp32_to_bf16_row_ref(x, y):
    for jj in range(x.shape[0]):
        j = _U(jj)
        h = fp32_to_bf16_bits(x[j])
        y[_U(2) * j] = np.uint8(h & np.uint16(0xFF))
        y[_U(2) * j + _U(1)] = np.uint8(h >> np.uint16(8))


@njit(cache=True, nogil=True)
def _bf16_to_fp32_row(raw, y):
    for jj in range(y.shape[0]):
        j = _U(jj)
        y[j] = bf16_bits_to_fp32(np.uint16(raw[_U(2) * j]) | (np.uint16(raw[_U(2) * j + _U(1)]) << np.uint16(8)))


@njit(cache=True, nogil=True)
def _fp32_to_bytes_row(x, y):
    for jj in range(x.shape[0]):
        j = _U(jj)
        u = np.float32(x[j]).view(np.uint32)
        for k in range(4):
            y[_U(4) * j + _U(k)] = np.uint8((u >> np.uint32(8 * k)) & np.uint32(0xFF))


@njit(cache=True, nogil=True)
def _bytes_to_fp32_row(raw, y):
    for jj in range(y.shape[0]):
        j = _U(jj)
        p = _U(4) * j
        u = (np.uint32(raw[p]) | (np.uint32(raw[p + _U(1)]) << np.uint32(8))
             | (np.uint32(raw[p + _U(2)]) << np.uint32(16)) | (np.uint32(raw[p + _U(3)]) << np.uint32(24)))
        y[j] = np.uint32(u).view(np.float32)


@register_kernel("F32", "quantize")
def quantize_f32(x, out):
    run_chunks(_quantize_f32_rows, x.shape[0], x, out)


@njit(cache=True, nogil=True)
def _quantize_f32_rows(x, out, r0, r1):
    for r in range(r0, r1):
        _fp32_to_bytes_row(x[r], out[r])


@register_kernel("F32", "dequantize")
def dequantize_f32(raw, out):
    run_chunks(_dequantize_f32_rows, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_f32_rows(raw, out, r0, r1):
    for r in range(r0, r1):
        _bytes_to_fp32_row(raw[r], out[r])


@register_kernel("F16", "quantize")
def quantize_f16(x, out):
    run_chunks(_quantize_f16_rows, x.shape[0], x, out)


@njit(cache=True, nogil=True)
def _quantize_f16_rows(x, out, r0, r1):
    for r in range(r0, r1):
        _fp32_to_fp16_row(x[r], out[r])


@register_kernel("F16", "dequantize")
def dequantize_f16(raw, out):
    run_chunks(_dequantize_f16_rows, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_f16_rows(raw, out, r0, r1):
    for r in range(r0, r1):
        _fp16_to_fp32_row(raw[r], out[r])


@register_kernel("BF16", "quantize")
def quantize_bf16(x, out):
    run_chunks(_quantize_bf16_rows, x.shape[0], x, out)


@njit(cache=True, nogil=True)
def _quantize_bf16_rows(x, out, r0, r1):
    for r in range(r0, r1):
        _fp32_to_bf16_row_ref(x[r], out[r])


@register_kernel("BF16", "dequantize")
def dequantize_bf16(raw, out):
    run_chunks(_dequantize_bf16_rows, out.shape[0], raw, out)


@njit(cache=True, nogil=True)
def _dequantize_bf16_rows(raw, out, r0, r1):
    for r in range(r0, r1):
        _bf16_to_fp32_row(raw[r], out[r])

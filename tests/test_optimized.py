"""method="optimized": same types and sizes as llama-quantize's plan, valid ggml blocks, lower weighted error.

The optimized kernels (gguf_kquant/codecs/optimized.py) are not ports, so there are no golden bytes: the checks
are that ggml itself decodes what they write exactly as we do, that llama.cpp loads and runs the model, and
that no tensor's imatrix-weighted error is above the default's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.codecs.optimized import REFINERS, quantize_optimized, weighted_error
from gguf_kquant.errors import ImatrixError, InvalidArgumentError
from gguf_kquant.types import GGMLType
from oracle import llama_logits, to_float

REFINED = sorted(t.name for t in REFINERS)


def _realish(rng, n_rows, n_per_row):
    """Heavy-tailed rows with a few outlier columns, and a skewed imatrix (as trained layers have)."""
    x = rng.standard_t(4, (n_rows, n_per_row)).astype(np.float32) * np.float32(0.02)
    x[:, rng.choice(n_per_row, 4, replace=False)] *= np.float32(8.0)
    w = rng.gamma(0.5, 1.0, n_per_row).astype(np.float32)
    return x, w


@pytest.mark.parametrize("qtype", REFINED)
def test_blocks_decode_in_ggml_with_lower_weighted_error(qtype):
    rng = np.random.default_rng(13)
    x, w = _realish(rng, 64, 512)
    ours = quantize_optimized(x, qtype, w)
    default = gguf_kquant.quantize(x, qtype, w)
    assert ours.shape == default.shape and ours.dtype == np.uint8
    # ggml's own to_float reads our blocks as we do: a standard block of this type
    np.testing.assert_array_equal(to_float(GGMLType[qtype].value, ours, 512),
                                  gguf_kquant.dequantize(ours, qtype, x.shape))
    for r in range(x.shape[0]):  # never worse, row by row
        assert weighted_error(x[r:r + 1], ours[r:r + 1], qtype, w) <= weighted_error(
            x[r:r + 1], default[r:r + 1], qtype, w) * (1 + 1e-12)
    assert weighted_error(x, ours, qtype, w) < 0.97 * weighted_error(x, default, qtype, w)


def test_every_k_quant_and_legacy_type_has_a_refiner():
    # issue 13: an improved weighted scale search for every k-quant and legacy type ggml quantizes rows to
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"} <= set(REFINED)


def test_types_without_refiner_are_ggml_bytes():
    x, w = _realish(np.random.default_rng(1), 8, 256)
    assert GGMLType.IQ3_S not in REFINERS
    np.testing.assert_array_equal(quantize_optimized(x, "IQ3_S", w), gguf_kquant.quantize(x, "IQ3_S", w))


def test_q8_0_keeps_the_blocks_it_cannot_improve():
    """Rows that are Q8_0 values already (an F32 file dequantized from Q8_0, as SmolLM2's token_embd is): ggml's
    blocks are exact there, a tie keeps ggml's bytes; the other rows still improve."""
    x, w = _realish(np.random.default_rng(5), 16, 512)
    exact = gguf_kquant.dequantize(gguf_kquant.quantize(x[:8], "Q8_0"), "Q8_0", (8, 512))
    x2 = np.concatenate([exact, x[8:]])
    ours, default = quantize_optimized(x2, "Q8_0", w), gguf_kquant.quantize(x2, "Q8_0", w)
    assert weighted_error(x2[:8], default[:8], "Q8_0", w) == 0.0
    np.testing.assert_array_equal(ours[:8], default[:8])
    assert weighted_error(x2[8:], ours[8:], "Q8_0", w) < 0.9 * weighted_error(x2[8:], default[8:], "Q8_0", w)


def test_the_iq4_lanes_take_the_nearest_level_of_the_rounded_value():
    """The IQ4_NL refiner ranks candidates with levels summed from compares, IQ4_XS's with a table: for every
    t, the kvalue nearest to round(t), a tie to the upper one, and the end levels beyond them."""
    from numba import njit

    from gguf_kquant.codecs.grids import kvalues_iq4nl
    from gguf_kquant.codecs.optimized import _LEVEL_TABLE, _lane_level, _table_level

    levels = njit(lambda ts: np.array([_lane_level(t) for t in ts], np.float32))
    table_levels = njit(lambda ts: np.array([_table_level(_LEVEL_TABLE, t) for t in ts], np.float32))
    rng = np.random.default_rng(4)
    t = np.concatenate([np.arange(-300, 300, 0.5), rng.uniform(-400, 400, 4000)]).astype(np.float32)
    kv = np.sort(kvalues_iq4nl.astype(np.float64))
    r = np.clip(np.round(t.astype(np.float64)), -256, 255)  # half to even, as the magic number rounds
    dist = np.abs(r[:, None] - kv[None, :])
    want = kv[len(kv) - 1 - np.argmin(dist[:, ::-1], axis=1)]  # from the top: a tie goes up
    np.testing.assert_array_equal(levels(t), want.astype(np.float32))
    np.testing.assert_array_equal(table_levels(t), want.astype(np.float32))  # IQ4_XS's narrow lanes


def _imatrix(src: Path) -> dict:
    rng = np.random.default_rng(7)
    with gguf_kquant.open(src) as f:
        return {t.name: rng.gamma(0.5, 1.0, t.shape[-1]).astype(np.float32) for t in f.tensors
                if t.name.startswith("blk.") and len(t.shape) == 2}


def test_bytes_do_not_depend_on_threads():
    x, w = _realish(np.random.default_rng(2), 24, 512)
    for qtype in REFINED:
        np.testing.assert_array_equal(quantize_optimized(x, qtype, w, threads=1),
                                      quantize_optimized(x, qtype, w, threads=2), err_msg=qtype)


@pytest.mark.parametrize("mix", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q4_0", "IQ4_XS", "Q6_K", "Q8_0"])
def test_same_plan_and_size_loads_in_llama_cpp(example_model, tmp_path, mix):
    im = _imatrix(example_model)
    a, b = tmp_path / "llama.gguf", tmp_path / "optimized.gguf"
    gguf_kquant.quantize_model(example_model, a, mix, imatrix=im)
    gguf_kquant.quantize_model(example_model, b, mix, imatrix=im, method="optimized")
    assert a.stat().st_size == b.stat().st_size
    changed = 0
    with gguf_kquant.open(example_model) as src, gguf_kquant.open(a) as fa, gguf_kquant.open(b) as fb:
        assert [(t.name, t.shape, t.type_name) for t in fa.tensors] == \
            [(t.name, t.shape, t.type_name) for t in fb.tensors]
        x_by_name = {t.name: t for t in src.tensors}
        for ta, tb in zip(fa.tensors, fb.tensors):
            if ta.type_name in ("F32", "F16") or ta.name not in im:
                continue
            x = x_by_name[ta.name].numpy().reshape(-1, ta.shape[-1])
            ra, rb = (t.raw().reshape(x.shape[0], -1) for t in (ta, tb))
            ea = weighted_error(x, ra, ta.type_name, im[ta.name])
            eb = weighted_error(x, rb, tb.type_name, im[tb.name])
            assert eb <= ea * (1 + 1e-12), ta.name
            changed += not np.array_equal(ra, rb)
    assert changed > 0
    tokens = [1, 300, 301, 302, 303, 304, 305]
    lf = llama_logits(example_model, tokens, tmp_path / "f.npy")
    lo = llama_logits(b, tokens, tmp_path / "o.npy")
    ll = llama_logits(a, tokens, tmp_path / "l.npy")
    assert lo.shape == lf.shape and lo.shape[0] == len(tokens) and np.isfinite(lo).all()
    # the model and its imatrix are random, so only: as close to F16 as the default file, give or take
    c_opt, c_llama = (np.corrcoef(v.ravel(), lf.ravel())[0, 1] for v in (lo, ll))
    assert c_opt > 0.8 and c_opt > c_llama - 0.05, (c_opt, c_llama)


def test_optimized_refuses_without_imatrix_before_any_work(tmp_path):
    # the source does not even exist: the refusal comes before it is opened
    with pytest.raises(ImatrixError, match="needs an imatrix"):
        gguf_kquant.quantize_model(tmp_path / "missing.gguf", tmp_path / "o.gguf", "Q4_K_M", method="optimized")
    assert not (tmp_path / "o.gguf").exists()


def test_unknown_method_refused(example_model, tmp_path):
    with pytest.raises(InvalidArgumentError, match="optimized"):
        gguf_kquant.quantize_model(example_model, tmp_path / "o.gguf", "Q4_K_M", method="best",
                                   imatrix=_imatrix(example_model))
    assert not (tmp_path / "o.gguf").exists()


def test_convert_hf_method_optimized_is_convert_then_quantize(tmp_path):
    from test_convert_helpers import make_model

    hf = tmp_path / "hf"
    make_model("llama", hf, hidden_size=256, seed=3)
    f16 = tmp_path / "f16.gguf"
    gguf_kquant.convert_hf(hf, f16, "F16")
    im = _imatrix(f16)
    ours, llama, two_step = (tmp_path / f"{n}.gguf" for n in ("ours", "llama", "two-step"))
    gguf_kquant.convert_hf(hf, ours, "Q4_K_M", imatrix=im, method="optimized")
    gguf_kquant.convert_hf(hf, llama, "Q4_K_M", imatrix=im)
    gguf_kquant.quantize_model(f16, two_step, "Q4_K_M", imatrix=im, method="optimized")
    with gguf_kquant.open(ours) as a, gguf_kquant.open(two_step) as b, gguf_kquant.open(llama) as c:
        assert [(t.name, t.type_name) for t in a.tensors] == [(t.name, t.type_name) for t in c.tensors]
        assert any(t.type_name == "Q4_K" for t in a.tensors)
        for ta, tb, tc in zip(a.tensors, b.tensors, c.tensors):
            assert np.array_equal(ta.raw(), tb.raw()), ta.name  # the same blocks as convert, then quantize
        assert any(not np.array_equal(ta.raw(), tc.raw()) for ta, tc in zip(a.tensors, c.tensors))
    assert ours.stat().st_size == llama.stat().st_size
    from gguf_kquant.cli import main

    from gguf_kquant.model.imatrix import write_legacy_imatrix

    cli, im_file = tmp_path / "cli.gguf", tmp_path / "im.dat"
    write_legacy_imatrix(im_file, im)  # the mean per column, as given
    assert main(["convert", str(hf), str(cli), "--type", "Q4_K_M", "--imatrix", str(im_file), "--method",
                 "optimized", "-q"]) == 0
    with gguf_kquant.open(cli) as a, gguf_kquant.open(ours) as b:  # the metadata names the imatrix file
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        assert all(np.array_equal(ta.raw(), tb.raw()) for ta, tb in zip(a.tensors, b.tensors))
    with pytest.raises(ImatrixError, match="needs an imatrix"):
        gguf_kquant.convert_hf(hf, tmp_path / "x.gguf", "Q4_K_M", method="optimized")
    with pytest.raises(gguf_kquant.errors.ConversionError, match="quantization mixes"):
        gguf_kquant.convert_hf(hf, tmp_path / "x.gguf", "F16", method="optimized")
    assert not (tmp_path / "x.gguf").exists()

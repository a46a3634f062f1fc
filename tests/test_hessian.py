"""Full input covariances collected through llama.cpp (gguf_kquant.model.hessian) and their file format."""

from __future__ import annotations

import argparse
import ctypes
import sys

import numpy as np
import pytest

import gguf_kquant
from gguf_kquant.container.values import GGUFValueType as V, Value
from gguf_kquant.errors import GGUFError, InvalidArgumentError
from gguf_kquant.model import hessian
from gguf_kquant.model.hessian import (HessianError, LlamaCppMissingError, collect_hessians, load_hessians)

CTX = 64
N_CHUNK = 3
ATTN = ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight")


@pytest.fixture(scope="module")
def llama():
    import oracle  # noqa: F401  (a missing llama-cpp-python fails here, loudly)
    import llama_cpp

    return llama_cpp


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(7).integers(3, 1024, N_CHUNK * CTX + 10)


@pytest.fixture(scope="module")
def collected(tmp_path_factory, example_model, tokens, llama):
    out = tmp_path_factory.mktemp("hessian") / "h.gguf"
    summary = collect_hessians(example_model, tokens, out, ctx=CTX, threads=1, quiet=True)
    return out, summary


@pytest.fixture(scope="module")
def collected_h(tmp_path_factory, example_model, tokens, llama):
    """The same collection storing H itself (``factor=False``)."""
    out = tmp_path_factory.mktemp("hessian") / "h-packed.gguf"
    collect_hessians(example_model, tokens, out, ctx=CTX, threads=1, quiet=True, factor=False)
    return out


def _first_attn_input(model, tokens) -> np.ndarray:
    """rms_norm(token_embd[tokens]) * blk.0.attn_norm.weight, in float32 as ggml's CPU kernel computes it."""
    with gguf_kquant.open(model) as f:
        emb = f.tensors["token_embd.weight"].numpy()
        norm = f.tensors["blk.0.attn_norm.weight"].numpy()
        eps = np.float32(f.metadata["llama.attention.layer_norm_rms_epsilon"])
    x = emb[np.asarray(tokens)]
    mean = ((x.astype(np.float64) * x).sum(axis=1) / x.shape[1]).astype(np.float32)
    scale = np.float32(1) / np.sqrt(mean + eps)
    return x * scale[:, None] * norm


# --- (1) an independent check of what is collected --------------------------------------------------
def test_first_layer_attention_input_matches_numpy(collected, example_model, tokens):
    out, summary = collected
    x = _first_attn_input(example_model, tokens[:N_CHUNK * CTX]).astype(np.float64)
    ref = x.T @ x
    with load_hessians(out) as hs:
        got, n = hs.for_weight("blk.0.attn_q.weight")
        assert n == N_CHUNK * CTX
        assert got.shape == (256, 256) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
        # attn_k and attn_v read the same input: one matrix in the file, shared
        assert {hs.matrix_of[w] for w in ATTN} == {"blk.0.attn_q.weight.hessian"}
        assert hs.matrix_of["blk.0.ffn_gate.weight"] == hs.matrix_of["blk.0.ffn_up.weight"]
        assert hs.matrix_of["blk.0.ffn_down.weight"] != hs.matrix_of["blk.0.ffn_up.weight"]
    assert summary.matrices["blk.0.attn_q.weight.hessian"] == ["blk.0.attn_q.weight", "blk.0.attn_v.weight",
                                                              "blk.0.attn_k.weight"]
    with gguf_kquant.open(out) as f:  # 4 distinct inputs per layer (attn, attn_output, ffn, ffn_down) + output
        assert len(f.tensors) == 2 * (4 * 4 + 1)  # each a factor and H's diagonal
        assert f.metadata["general.type"] == "hessian"


def test_text_is_tokenized_with_bos_per_chunk(tmp_path, example_model, llama):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the first model of the city was made at the university"] * 40))
    out = tmp_path / "h.gguf"
    s = collect_hessians(example_model, text, out, ctx=32, chunks=2, threads=1, quiet=True)
    assert s.n_tokens == 64 and s.chunk_count == 2 and s.chunk_size == 32
    ids = _llama_tokenize(llama, example_model, text.read_bytes())
    assert len(ids) > 64 and ids[0] == 1  # BOS added by the tokenizer
    ids = ids[:64].copy()
    ids[32] = 1  # llama-imatrix: each chunk starts with BOS
    x = _first_attn_input(example_model, ids).astype(np.float64)
    with load_hessians(out) as hs:
        got, n = hs.for_weight("blk.0.attn_k.weight")
        assert n == 64 and hs.datasets == [str(text)] and hs.chunk_size == 32 and hs.chunk_count == 2
    ref = x.T @ x
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())


def _llama_tokenize(L, model, text: bytes) -> np.ndarray:
    mp = L.llama_model_default_params()
    mp.vocab_only = True
    m = L.llama_model_load_from_file(str(model).encode(), mp)
    try:
        buf = (L.llama_token * (len(text) + 8))()
        n = L.llama_tokenize(L.llama_model_get_vocab(m), text, len(text), buf, len(buf), True, False)
        return np.array(buf[:n])
    finally:
        L.llama_model_free(m)


# --- (2) properties of every matrix ---------------------------------------------------------------------
def test_every_matrix_symmetric_psd_and_counted(collected, collected_h):
    out, summary = collected
    assert summary.n_tokens == N_CHUNK * CTX and summary.skipped == {}
    with load_hessians(collected_h) as hs:  # H as summed (the factor file's V V^T is H to float32 rounding)
        assert sorted(hs.weights) == sorted(summary.weights) and len(hs.weights) == 4 * 7 + 1
        for w in hs.weights:
            assert hs.for_weight(w)[1] == N_CHUNK * CTX  # every token of every chunk, output.weight included
        for name in summary.matrices:
            h = hs.matrix(name)
            assert np.array_equal(h, h.T), name
            if name in ("blk.0.attn_q.weight.hessian", "blk.3.ffn_down.weight.hessian"):  # both widths
                assert _psd(h), name
        assert hs.for_weight("token_embd.weight") is None  # GET_ROWS, not a matrix multiplication
    with gguf_kquant.open(collected_h) as f:
        assert f.metadata["hessian.layout"] == "packed_upper"
        assert {t.name: t.shape for t in f.tensors} == {
            name: ((512 * 513 // 2,) if "ffn_down" in name else (256 * 257 // 2,)) for name in summary.matrices}
    with gguf_kquant.open(out) as f:  # upper triangles: half the size of the squares; then the diagonals
        assert f.metadata["hessian.layout"] == "factor_upper"
        assert f.metadata["hessian.diagonals"] == [name + ".diagonal" for name in summary.matrices]
        assert {t.name: t.shape for t in f.tensors} == {
            **{name: ((512 * 513 // 2,) if "ffn_down" in name else (256 * 257 // 2,)) for name in summary.matrices},
            **{name + ".diagonal": ((512,) if "ffn_down" in name else (256,)) for name in summary.matrices}}


def _psd(h: np.ndarray) -> bool:
    """Cholesky of ``h + 1e-7 trace/n I`` succeeds: no eigenvalue below minus that shift (F32 storage moves a
    rank-deficient H's zero eigenvalues by ~3e-8 trace/n).  Written out with numpy element-wise ops
    (LAPACK's threads crawl on a busy machine: eigvalsh took 5 s for 512 x 512 here)."""
    a = h + 1e-7 * np.trace(h) / len(h) * np.eye(len(h))
    for k in range(len(a)):
        if not a[k, k] > 0:
            return False
        a[k, k] = np.sqrt(a[k, k])
        a[k + 1:, k] /= a[k, k]
        a[k + 1:, k + 1:] -= np.outer(a[k + 1:, k], a[k + 1:, k])
    return True


def test_the_stored_factor_is_the_one_error_feedback_computes_from_h(collected, collected_h):
    """A factor_upper file holds, per matrix, the V that gptq.Factor computes from the packed_upper file's H,
    bit for bit; H's diagonal exactly (the imatrix is the same); H's other values to float32 rounding."""
    from gguf_kquant.codecs.gptq import DEFAULT_DAMP, Factor

    out, summary = collected
    with load_hessians(out) as hs, load_hessians(collected_h) as hh:
        assert hs.layout == "factor_upper" and hh.factor_for("blk.0.attn_q.weight") is None
        assert hs.damp == pytest.approx(DEFAULT_DAMP, rel=1e-7)
        for name, weights in summary.matrices.items():
            v, n_tokens, damp = hs.factor_for(weights[0])
            h, n_h = hh.for_weight(weights[0])
            assert n_tokens == n_h == N_CHUNK * CTX and damp == hs.damp
            np.testing.assert_array_equal(v, Factor(h, damp=DEFAULT_DAMP).v, err_msg=name)
            assert np.array_equal(np.triu(v), v) and (np.diagonal(v) > 0).all()
            got = hs.matrix(name)
            np.testing.assert_array_equal(np.diagonal(got), np.diagonal(h))
            np.testing.assert_allclose(got, h, rtol=0, atol=1e-5 * np.abs(h).max(), err_msg=name)
        for process_output in (False, True):
            a, b = hs.imatrix(process_output=process_output), hh.imatrix(process_output=process_output)
            assert a.entries.keys() == b.entries.keys()
            for k in a.entries:
                np.testing.assert_array_equal(a.entries[k], b.entries[k])


def test_a_file_of_matrices_factorises_into_the_file_a_collection_writes(collected, collected_h, tmp_path):
    from gguf_kquant.model.hessian import factorise_hessians

    out, summary = collected
    s = factorise_hessians(collected_h, tmp_path / "f.gguf")
    assert (tmp_path / "f.gguf").read_bytes() == out.read_bytes()
    assert s.matrices == summary.matrices and s.tokens == summary.tokens
    # files of the square matrices (before packed_upper) too
    with load_hessians(collected_h) as hs:
        names = list(hs.widths)
        squares = {name: hs.matrix(name) for name in names}
        keys = {k: hs._f.metadata.typed(k) for k in hs._f.metadata if k != "hessian.layout"}
    gguf_kquant.write(tmp_path / "full.gguf", keys, squares)
    factorise_hessians(tmp_path / "full.gguf", tmp_path / "f2.gguf")
    assert (tmp_path / "f2.gguf").read_bytes() == out.read_bytes()
    with pytest.raises(HessianError, match="holds factors already"):
        factorise_hessians(out, tmp_path / "f3.gguf")
    with pytest.raises(HessianError, match="input"):
        factorise_hessians(collected_h, collected_h, overwrite=True)
    with pytest.raises(HessianError, match="exists"):
        factorise_hessians(collected_h, tmp_path / "f.gguf")
    assert not (tmp_path / "f3.gguf").exists()


def test_a_bad_matrix_leaves_no_factorised_file(tmp_path):
    from gguf_kquant.model.hessian import factorise_hessians

    h = _spd(300)
    h[7, 9] = h[9, 7] = np.nan
    path = _write(tmp_path / "bad.gguf", PACKED, tensors={"blk.0.a.weight.hessian": _packed(h)})
    with pytest.raises(HessianError, match=r"non-finite value nan at \[7, 9\]"):
        factorise_hessians(path, tmp_path / "f.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_psd_check_can_fail():
    x = np.random.default_rng(3).standard_normal((8, 16))
    h = x.T @ x
    assert _psd(h)
    h[3, 3] -= 1.0  # one negative eigenvalue (rank 8 of 16: the null space sees the change)
    assert not _psd(h)


def test_same_bytes_whatever_the_thread_count(example_model, tokens, tmp_path, llama):
    for n in (1, 2):
        collect_hessians(example_model, tokens, tmp_path / f"t{n}.gguf", ctx=CTX, chunks=1, threads=n, quiet=True)
    assert (tmp_path / "t2.gguf").read_bytes() == (tmp_path / "t1.gguf").read_bytes()


@pytest.mark.parametrize("room", [1, 2, 5])  # widest matrices a pass may hold: 9, 4 and 2 passes
def test_passes_bound_the_memory_and_give_the_same_file(collected, example_model, tokens, tmp_path, room, llama):
    """Below what the matrices take, the text is evaluated again for the rest: the allocations stay under
    max_memory (the float32 copy written included) plus 1 MiB (the output file's buffers, 4 x 256 KiB), and
    the file is byte for byte the one-pass file."""
    import io
    import re
    import tracemalloc

    out, summary = collected
    limit = hessian._collect_bytes([512] * room, CTX)  # 512: the example model's widest input (ffn_down)
    assert limit < hessian._collect_bytes([256] * 13 + [512] * 4, CTX)  # what one pass would take
    stream = io.StringIO()
    tracemalloc.start()
    try:
        s = collect_hessians(example_model, tokens, tmp_path / "p.gguf", ctx=CTX, threads=1, stream=stream,
                             max_memory=limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= limit + 2**20
    assert (tmp_path / "p.gguf").read_bytes() == out.read_bytes()
    assert s.matrices == summary.matrices and s.tokens == summary.tokens
    passes = int(re.search(r"(\d+) passes", stream.getvalue()).group(1))
    assert passes == {1: 9, 2: 4, 5: 2}[room]
    assert f"pass {passes}/{passes}, chunk {N_CHUNK}:" in stream.getvalue()


def test_a_matrix_above_max_memory_is_refused_by_name(example_model, tokens, tmp_path, llama):
    out = tmp_path / "h.gguf"
    with pytest.raises(HessianError, match=r"blk\.0\.ffn_down\.weight is 512 wide.*above max_memory.*max_n_in"):
        collect_hessians(example_model, tokens, out, ctx=CTX, quiet=True,
                         max_memory=hessian._collect_bytes([512], CTX) - 1)
    assert list(tmp_path.iterdir()) == []
    for bad in (0, -5, "lots", "1.5G", True):
        with pytest.raises(InvalidArgumentError, match="max_memory"):
            collect_hessians(example_model, tokens, out, ctx=CTX, quiet=True, max_memory=bad)


def test_an_error_in_the_callback_stops_the_run(tmp_path, example_model, tokens, monkeypatch, llama):
    def fail(self, t):
        raise KeyboardInterrupt  # what Ctrl-C raises inside the callback: it crosses llama.cpp's frames

    monkeypatch.setattr(hessian._GGML, "rows", fail)
    with pytest.raises(KeyboardInterrupt):
        collect_hessians(example_model, tokens, tmp_path / "h.gguf", ctx=CTX, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_an_error_in_a_later_pass_leaves_no_file(tmp_path, example_model, tokens, monkeypatch, llama):
    """Later passes run while the file is being written: Ctrl-C there removes the partial file too."""
    real = hessian._GGML.rows

    def fail_in_pass_2(self, t):
        if collectors[-1].pass_no == 2:
            raise KeyboardInterrupt
        return real(self, t)

    collectors = []
    init = hessian._Collector.__init__

    def keep(self, *args):
        init(self, *args)
        collectors.append(self)

    monkeypatch.setattr(hessian._Collector, "__init__", keep)
    monkeypatch.setattr(hessian._GGML, "rows", fail_in_pass_2)
    out = tmp_path / "h.gguf"
    with pytest.raises(KeyboardInterrupt):
        collect_hessians(example_model, tokens, out, ctx=CTX, quiet=True,
                         max_memory=hessian._collect_bytes([512] * 2, CTX))
    assert collectors[-1].pass_no == 2 and list(tmp_path.iterdir()) == []


def test_a_struct_layout_other_than_ggml_h_is_refused(tmp_path, example_model, tokens, monkeypatch, llama):
    class Shifted(ctypes.Structure):  # ggml_tensor without its buffer pointer: every later field moves
        _fields_ = [f for f in hessian._GGMLTensor._fields_ if f[0] != "buffer"]

    monkeypatch.setattr(hessian, "_GGMLTensor", Shifted)
    with pytest.raises(HessianError, match="layout of ggml.h"):
        collect_hessians(example_model, tokens, tmp_path / "h.gguf", ctx=CTX, quiet=True)


# --- (3) the diagonal is llama-imatrix's statistic ------------------------------------------------------
def _imatrix_like_llama(L, model, tokens, ctx, n_chunk, experts=None) -> dict:
    """llama-imatrix's collect_imatrix: per weight, float32 acc[j] += x[j]*x[j] over rows, count += rows;
    returns name -> acc / count.  No sharing of inputs: every weight counts on its own.  For MUL_MAT_ID, as
    imatrix.cpp: for each slot idx and token row, expert ex = ids[idx, row] adds src1[:, idx % ne1, row] to its
    acc and count, and ``experts`` (if given) gets name -> (per-expert float64 sums of x x^T, counts)."""
    ggml = hessian._GGML()
    sums: dict = {}

    def cb(ptr, ask, _user):
        t = ggml.tensor(ptr)
        op = ggml.op_name(t.op)
        if op not in (b"MUL_MAT", b"MUL_MAT_ID"):
            return False
        src0, src1 = t.src[0].contents, t.src[1].contents
        if ggml.op_name(src0.op) != b"NONE" or not src0.name.endswith(b".weight"):
            return False
        if ask:
            return True
        name = src0.name.decode()
        x = ggml.rows(src1).astype(np.float32)
        if op == b"MUL_MAT_ID":
            n_as, ne1 = src0.ne[2], src1.ne[1]
            ids = ggml.values(t.src[2].contents, np.dtype(np.int32))  # [row][idx]
            acc, count = sums.get(name, (np.zeros((n_as, x.shape[1]), np.float32), np.zeros(n_as, np.int64)))
            hs, _ = experts.setdefault(name, (np.zeros((n_as, x.shape[1], x.shape[1])), count)) if experts is not None \
                else (None, None)
            for idx in range(ids.shape[1]):
                for row in range(ids.shape[0]):
                    ex = ids[row, idx]
                    xr = x[row * ne1 + idx % ne1]
                    acc[ex] += xr * xr
                    count[ex] += 1
                    if hs is not None:
                        hs[ex] += np.outer(xr.astype(np.float64), xr)
            sums[name] = (acc, count)
            return True
        acc, count = sums.get(name, (np.zeros(x.shape[1], np.float32), 0))
        for row in x:
            acc += row * row
        sums[name] = (acc, count + x.shape[0])
        return True

    callback = L.ggml_backend_sched_eval_callback(cb)
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = False
    m = L.llama_model_load_from_file(str(model).encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = ctx
    cp.n_threads = cp.n_threads_batch = 1
    cp.cb_eval = callback
    c = L.llama_init_from_model(m, cp)
    b = L.llama_batch_init(ctx, 0, 1)
    try:
        for i in range(n_chunk):
            for k, tok in enumerate(tokens[i * ctx:(i + 1) * ctx].tolist()):
                b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, k, 1, 1
                b.seq_id[k][0] = 0
            b.n_tokens = ctx
            L.llama_memory_clear(L.llama_get_memory(c), True)
            assert L.llama_decode(c, b) == 0
    finally:
        L.llama_batch_free(b)
        L.llama_free(c)
        L.llama_model_free(m)
    means = {}
    for name, (acc, count) in sums.items():
        if np.ndim(count):  # experts: as its legacy writer, 1 for an expert no token reached ("partial data")
            acc = np.where(count[:, None] > 0, acc, np.float32(1))
            count = np.maximum(count, 1).astype(np.float32)[:, None]
            means[name] = (acc / count).reshape(-1)
        else:
            means[name] = acc / np.float32(count)
    return means


def test_diagonal_over_tokens_is_the_imatrix(collected, example_model, tokens, llama):
    out, _ = collected
    ref = _imatrix_like_llama(llama, example_model, tokens, CTX, N_CHUNK)
    with load_hessians(out) as hs:
        im, with_output = hs.imatrix(), hs.imatrix(process_output=True)
    assert im.path == str(out) and im.chunk_count == N_CHUNK and im.datasets == []
    assert sorted(im.entries) == sorted(set(ref) - {"output.weight"})  # llama-imatrix without --process-output
    assert sorted(with_output.entries) == sorted(ref)
    for name, v in ref.items():
        assert with_output.entries[name].dtype == np.float32
        np.testing.assert_allclose(with_output.entries[name], v, rtol=1e-5, err_msg=name)
    # usable as an imatrix by the quantizer
    from gguf_kquant.model.quantize import _prepare_imatrix

    assert _prepare_imatrix(im, (), ()) is not None


# --- (4) bad files and refused paths ------------------------------------------------------------------
_GOOD_KEYS = {
    "general.type": Value("hessian", V.STRING),
    "hessian.datasets": Value(["t.txt"], V.ARRAY, V.STRING),
    "hessian.chunk_size": Value(4, V.UINT32),
    "hessian.chunk_count": Value(1, V.UINT32),
    "hessian.weights": Value(["blk.0.a.weight", "blk.0.b.weight"], V.ARRAY, V.STRING),
    "hessian.matrices": Value(["blk.0.a.weight.hessian", "blk.0.a.weight.hessian"], V.ARRAY, V.STRING),
    "hessian.tokens": Value([4], V.ARRAY, V.UINT32),
}


def _spd(n=8):
    x = np.random.default_rng(1).standard_normal((4, n)).astype(np.float32)
    return x.T @ x


def _packed(h):
    return np.concatenate([h[i, i:] for i in range(len(h))])


PACKED = {"hessian.layout": Value("packed_upper", V.STRING)}


def _write(path, keys=None, tensors=None, drop=()):
    keys = {k: v for k, v in {**_GOOD_KEYS, **(keys or {})}.items() if k not in drop}
    tensors = {"blk.0.a.weight.hessian": _spd()} if tensors is None else tensors
    gguf_kquant.write(path, keys, tensors)
    return path


def test_a_written_file_loads(tmp_path):
    with load_hessians(_write(tmp_path / "ok.gguf")) as hs:
        h, n = hs.for_weight("blk.0.b.weight")
        assert n == 4 and np.allclose(h, _spd())
        assert hs.imatrix().entries["blk.0.a.weight"].shape == (8,)
    one_count = _write(tmp_path / "one.gguf", {"hessian.tokens": Value(4, V.UINT32)})
    with load_hessians(one_count) as hs:
        assert hs.for_weight("blk.0.a.weight")[1] == 4
    h = _spd(300)  # more than one slab of the unpacking
    full = _write(tmp_path / "full.gguf", tensors={"blk.0.a.weight.hessian": h})
    packed = _write(tmp_path / "packed.gguf", PACKED, tensors={"blk.0.a.weight.hessian": _packed(h)})
    with load_hessians(full) as a, load_hessians(packed) as b:
        assert np.array_equal(a.for_weight("blk.0.a.weight")[0], b.for_weight("blk.0.a.weight")[0])
        assert np.array_equal(a.imatrix().entries["blk.0.b.weight"], b.imatrix().entries["blk.0.b.weight"])
        assert np.array_equal(b.for_weight("blk.0.a.weight")[0], h)


@pytest.mark.parametrize("keys, tensors, drop, words", [
    ({}, {"blk.0.a.weight.hessian": np.zeros((4, 5), np.float32)}, (), ["blk.0.a.weight.hessian", "square", "[4, 5]"]),
    ({}, None, ("hessian.matrices",), ["missing key hessian.matrices"]),
    ({"hessian.matrices": Value(["blk.0.a.weight.hessian"], V.ARRAY, V.STRING)}, None, (), ["2 names", "1"]),
    ({"hessian.matrices": Value(["blk.0.a.weight.hessian", "c.hessian"], V.ARRAY, V.STRING)}, None, (),
     ["'c.hessian'", "blk.0.b.weight", "not a tensor"]),
    ({}, {"blk.0.a.weight.hessian": _spd(), "x.hessian": _spd()}, (), ["'x.hessian'", "no weight"]),
    ({"general.type": Value("imatrix", V.STRING)}, None, (), ["general.type", "'imatrix'"]),
    ({"hessian.tokens": Value([0], V.ARRAY, V.UINT32)}, None, (), ["'blk.0.a.weight.hessian'", "token count of 0"]),
    ({"hessian.tokens": Value([4, 4], V.ARRAY, V.UINT32)}, None, (), ["2 counts for 1 tensors"]),
    ({"hessian.chunk_size": Value("4", V.STRING)}, None, (), ["hessian.chunk_size", "UINT32", "STRING"]),
    ({}, {"blk.0.a.weight.hessian": _spd().astype(np.float16)}, (), ["blk.0.a.weight.hessian", "F16"]),
    (PACKED, {"blk.0.a.weight.hessian": np.ones(35, np.float32)}, (), ["'blk.0.a.weight.hessian'", "n (n + 1) / 2",
                                                                       "[35]"]),
    (PACKED, None, (), ["'blk.0.a.weight.hessian'", "upper triangle", "[8, 8]"]),  # a square under the key
    ({"hessian.layout": Value("lower", V.STRING)}, None, (), ["hessian.layout", "'lower'", "packed_upper"]),
    ({"hessian.layout": Value(1, V.UINT32)}, None, (), ["hessian.layout", "STRING", "UINT32"]),
    ({"hessian.expert_weights": Value(["blk.0.e.weight"], V.ARRAY, V.STRING)}, None, (),
     ["missing key hessian.expert_counts"]),
    ({"hessian.expert_weights": Value(["blk.0.e.weight"], V.ARRAY, V.STRING),
      "hessian.expert_counts": Value([2, 2], V.ARRAY, V.UINT32)}, None, (), ["1 names", "2 counts"]),
    ({"hessian.weights": Value(["blk.0.e.weight[2]", "blk.0.b.weight"], V.ARRAY, V.STRING),
      "hessian.expert_weights": Value(["blk.0.e.weight"], V.ARRAY, V.STRING),
      "hessian.expert_counts": Value([2], V.ARRAY, V.UINT32)}, None, (),
     ["'blk.0.e.weight[2]'", "2 experts of 'blk.0.e.weight'"]),
])
def test_malformed_files_are_refused_by_name(tmp_path, keys, tensors, drop, words):
    path = _write(tmp_path / "bad.gguf", keys, tensors, drop)
    with pytest.raises(HessianError) as e:
        load_hessians(path)
    for w in words + [str(path)]:
        assert w in str(e.value)


@pytest.mark.parametrize("poison, words", [
    (lambda h: h.__setitem__((2, 3), np.nan), ["non-finite", "nan", "[2, 3]"]),
    (lambda h: h.__setitem__((2, 3), h[2, 3] + 1.0), ["not symmetric"]),
    (lambda h: h.__setitem__((-1, -3), h[-1, -3] + 1.0), ["not symmetric"]),  # the last slab of rows
    (lambda h: h.__setitem__((1, -1), h[1, -1] + 1.0), ["not symmetric"]),  # above the diagonal
    (lambda h: h.__setitem__((5, 5), -1.0), ["diagonal", "-1.0", "[5, 5]"]),
])
def test_bad_values_are_refused_when_read(tmp_path, poison, words):
    h = _spd(300)  # wider than the symmetry check's slabs of 128 rows
    poison(h)
    path = _write(tmp_path / "bad.gguf", tensors={"blk.0.a.weight.hessian": h})
    _check_refused(path, words)


@pytest.mark.parametrize("place", [(2, 3), (0, 0), (299, 299), (150, 200)])
def test_bad_values_of_a_packed_file_are_refused_by_place(tmp_path, place):
    h = _spd(300)
    h[place] = h[place[::-1]] = np.nan
    path = _write(tmp_path / "bad.gguf", PACKED, tensors={"blk.0.a.weight.hessian": _packed(h)})
    _check_refused(path, ["non-finite", "nan", f"[{place[0]}, {place[1]}]"])
    h = _spd(300)
    h[place[0], place[0]] = -1.0
    path = _write(tmp_path / "neg.gguf", PACKED, tensors={"blk.0.a.weight.hessian": _packed(h)})
    _check_refused(path, ["diagonal", "-1.0", f"[{place[0]}, {place[0]}]"])


def _factor_file(path, n=8, keys=None, tensors=None, drop=()):
    """A factor_upper file of one matrix: V of the dampened _spd(n), H's diagonal as its own tensor."""
    from gguf_kquant.codecs.gptq import DEFAULT_DAMP, Factor

    h = _spd(n)
    base = {"hessian.layout": Value("factor_upper", V.STRING), "hessian.damp": Value(DEFAULT_DAMP, V.FLOAT32),
            "hessian.diagonals": Value(["d"], V.ARRAY, V.STRING)}
    stored = {"blk.0.a.weight.hessian": _packed(Factor(h, damp=DEFAULT_DAMP).v), "d": np.diagonal(h).copy()}
    return _write(path, {**base, **(keys or {})}, {**stored, **(tensors or {})} if tensors is not False else None,
                  drop)


def test_a_factor_file_loads(tmp_path):
    with load_hessians(_factor_file(tmp_path / "f.gguf", 300)) as hs:
        v, n, damp = hs.factor_for("blk.0.b.weight")
        assert n == 4 and v.shape == (300, 300) and damp == np.float32(0.01)
        h, _ = hs.for_weight("blk.0.a.weight")
        np.testing.assert_array_equal(np.diagonal(h), np.diagonal(_spd(300)))
        np.testing.assert_allclose(h, _spd(300), rtol=0, atol=1e-5 * np.abs(_spd(300)).max())
        np.testing.assert_array_equal(hs.imatrix().entries["blk.0.b.weight"], np.diagonal(_spd(300)) / 4)


@pytest.mark.parametrize("keys, tensors, drop, words", [
    ({}, None, ("hessian.damp",), ["missing key hessian.damp"]),
    ({"hessian.damp": Value(0.0, V.FLOAT32)}, None, (), ["hessian.damp", "0.0", "positive"]),
    ({"hessian.damp": Value(float("nan"), V.FLOAT32)}, None, (), ["hessian.damp", "nan"]),
    ({"hessian.damp": Value(1, V.UINT32)}, None, (), ["hessian.damp", "FLOAT32", "UINT32"]),
    ({}, None, ("hessian.diagonals",), ["missing key hessian.diagonals"]),
    ({"hessian.diagonals": Value(["d", "d"], V.ARRAY, V.STRING)}, None, (), ["2 names for 1 matrices"]),
    ({"hessian.diagonals": Value(["e"], V.ARRAY, V.STRING)}, None, (), ["'e'", "'blk.0.a.weight.hessian'",
                                                                        "not a tensor of its own"]),
    ({"hessian.diagonals": Value(["blk.0.a.weight.hessian"], V.ARRAY, V.STRING)}, None, (),
     ["not a tensor of its own"]),
    ({}, {"d": np.ones(7, np.float32)}, (), ["'d'", "diagonal of 'blk.0.a.weight.hessian'", "8 F32", "[7]"]),
    ({}, {"d": np.ones(8, np.float16)}, (), ["'d'", "F16"]),
    ({}, {"x": np.ones(8, np.float32)}, (), ["'x'", "no weight"]),
])
def test_malformed_factor_files_are_refused_by_name(tmp_path, keys, tensors, drop, words):
    path = _factor_file(tmp_path / "bad.gguf", keys=keys, tensors=tensors, drop=drop)
    with pytest.raises(HessianError) as e:
        load_hessians(path)
    for w in words + [str(path)]:
        assert w in str(e.value)


def test_one_diagonal_for_two_matrices_is_refused(tmp_path):
    from gguf_kquant.codecs.gptq import Factor

    v = _packed(Factor(_spd()).v)
    keys = {"hessian.layout": Value("factor_upper", V.STRING), "hessian.damp": Value(0.01, V.FLOAT32),
            "hessian.diagonals": Value(["d", "d"], V.ARRAY, V.STRING),
            "hessian.matrices": Value(["blk.0.a.weight.hessian", "blk.0.b.weight.hessian"], V.ARRAY, V.STRING),
            "hessian.tokens": Value([4, 4], V.ARRAY, V.UINT32)}
    path = _write(tmp_path / "bad.gguf", keys, {"blk.0.a.weight.hessian": v, "blk.0.b.weight.hessian": v,
                                                "d": np.diagonal(_spd()).copy()})
    with pytest.raises(HessianError, match="hessian.diagonals names a tensor twice"):
        load_hessians(path)


@pytest.mark.parametrize("value, words", [(0.0, ["diagonal value 0.0", "[5, 5]", "positive"]),
                                          (-2.0, ["diagonal value -2.0", "[5, 5]", "positive"]),
                                          (np.inf, ["non-finite", "inf", "[5, 5]"])])
def test_bad_values_of_a_factor_are_refused_by_place(tmp_path, value, words):
    from gguf_kquant.codecs.gptq import DEFAULT_DAMP, Factor

    v = Factor(_spd(), damp=DEFAULT_DAMP).v
    v[5, 5] = value
    path = _factor_file(tmp_path / "bad.gguf", tensors={"blk.0.a.weight.hessian": _packed(v)})
    with load_hessians(path) as hs:  # the header is fine: the values are checked when the factor is read
        for read in (hs.factor_for, hs.for_weight):
            with pytest.raises(HessianError) as e:
                read("blk.0.a.weight")
            for w in words + [str(path), "'blk.0.a.weight.hessian'"]:
                assert w in str(e.value)
    d = np.diagonal(_spd()).copy()
    d[3] = -1.0
    path = _factor_file(tmp_path / "neg.gguf", tensors={"d": d})
    with load_hessians(path) as hs, pytest.raises(HessianError, match=r"'d' has the diagonal value -1\.0 at \[3, 3\]"):
        hs.imatrix()


def _check_refused(path, words):
    with load_hessians(path) as hs:  # the header is fine: the values are checked when the matrix is read
        with pytest.raises(HessianError) as e:
            hs.for_weight("blk.0.a.weight")
    for w in words + [str(path), "'blk.0.a.weight.hessian'"]:
        assert w in str(e.value)


def test_truncated_file_is_refused(tmp_path):
    path = _write(tmp_path / "t.gguf")
    data = path.read_bytes()
    for cut in (len(data) - 7, 100, 3):
        path.write_bytes(data[:cut])
        with pytest.raises(GGUFError) as e:
            load_hessians(path)
        assert str(path) in str(e.value)


def test_output_may_not_be_an_input(tmp_path, example_model, tokens, llama):
    text = tmp_path / "calib.txt"
    text.write_text("hello world " * 100)
    model = tmp_path / "m.gguf"
    model.write_bytes(example_model.read_bytes())
    before = model.read_bytes()
    for out, source in ((model, tokens), (text, text)):
        with pytest.raises(HessianError, match="refusing to write over an input"):
            collect_hessians(model, source, out, ctx=CTX, overwrite=True, quiet=True)
    assert model.read_bytes() == before and text.read_text() == "hello world " * 100
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"keep")
    with pytest.raises(HessianError, match="overwrite"):
        collect_hessians(model, tokens, taken, ctx=CTX, quiet=True)
    assert taken.read_bytes() == b"keep"


def test_bad_arguments(tmp_path, example_model, tokens, llama):
    out = tmp_path / "h.gguf"
    for kw in (dict(ctx=0), dict(chunks=-1), dict(threads=True), dict(max_n_in=0)):
        with pytest.raises(InvalidArgumentError):
            collect_hessians(example_model, tokens, out, quiet=True, **{"ctx": CTX, **kw})
    with pytest.raises(InvalidArgumentError, match="token ids must lie in"):
        collect_hessians(example_model, [5] * 63 + [5000], out, ctx=CTX, quiet=True)
    with pytest.raises(HessianError, match="do not fill one chunk"):
        collect_hessians(example_model, tokens[:CTX - 1], out, ctx=CTX, quiet=True)
    not_a_model = tmp_path / "m.gguf"
    not_a_model.write_text("hello")
    with pytest.raises(GGUFError, match="m.gguf"):
        collect_hessians(not_a_model, tokens, out, ctx=CTX, quiet=True)
    with pytest.raises(GGUFError, match="missing.txt"):
        collect_hessians(example_model, tmp_path / "missing.txt", out, ctx=CTX, quiet=True)
    assert not out.exists()


def test_wide_inputs_are_skipped(tmp_path, example_model, tokens, llama):
    s = collect_hessians(example_model, tokens, tmp_path / "h.gguf", ctx=CTX, chunks=1, max_n_in=300, quiet=True)
    assert sorted(s.skipped) == [f"blk.{i}.ffn_down.weight" for i in range(4)]  # 512 wide, the others 256
    assert "input width 512 above the limit 300" in s.skipped["blk.0.ffn_down.weight"]
    with load_hessians(tmp_path / "h.gguf") as hs:
        assert hs.for_weight("blk.0.ffn_down.weight") is None and hs.for_weight("blk.0.ffn_up.weight") is not None


def _moe_model(path, n_expert):
    from make_example_model import build_llama_gguf

    return build_llama_gguf(path, n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=64, n_vocab=512,
                            dtype="F16", n_expert=n_expert, n_expert_used=2, tie_embeddings=True)


EXPERT_WEIGHTS = ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight")


def test_each_expert_gets_the_matrix_of_its_tokens_and_tied_embeddings_are_collected(tmp_path, llama):
    """MUL_MAT_ID: expert e's H sums x x^T over the (token, slot) pairs routed to it — llama-imatrix's
    gather, whose per-expert means are the imatrix; gate and up share their experts' input."""
    from gguf_kquant.model.hessian import expert_weight

    model = _moe_model(tmp_path / "moe.gguf", 4)
    toks = np.random.default_rng(2).integers(3, 512, 64)
    s = collect_hessians(model, toks, tmp_path / "h.gguf", ctx=32, threads=1, quiet=True)
    assert s.skipped == {}
    sums: dict = {}
    ref = _imatrix_like_llama(llama, model, toks, 32, 2, experts=sums)
    with load_hessians(tmp_path / "h.gguf") as hs:
        assert hs.expert_counts == {w: 4 for w in EXPERT_WEIGHTS}
        im = hs.imatrix()
        for w in EXPERT_WEIGHTS:
            np.testing.assert_allclose(im.entries[w], ref[w], rtol=1e-5, err_msg=w)
            want_h, counts = sums[w]
            assert counts.sum() == 64 * 2  # every token, each of its two experts
            for e in range(4):
                h, n = hs.for_weight(expert_weight(w, e))
                assert n == counts[e]
                np.testing.assert_allclose(h, want_h[e], rtol=1e-4, atol=1e-4 * np.abs(want_h[e]).max())
        gate, up = (hs.matrix_of[expert_weight(w, 1)] for w in EXPERT_WEIGHTS[:2])
        assert gate == up != hs.matrix_of[expert_weight(EXPERT_WEIGHTS[2], 1)]
        assert hs.for_weight("blk.0.ffn_up_exps.weight") is None  # the 3-D weight itself has no one matrix
        assert hs.for_weight("token_embd.weight")[1] == 64  # the output multiplies by token_embd (tied): its input
    few = collect_hessians(model, toks, tmp_path / "h-passes.gguf", ctx=32, threads=1, quiet=True,
                           max_memory=hessian._collect_bytes([64] * 3, 32))  # 3 matrices a pass: the experts split
    assert (tmp_path / "h-passes.gguf").read_bytes() == (tmp_path / "h.gguf").read_bytes()
    assert few.tokens == s.tokens
    collect_hessians(model, toks, tmp_path / "h-packed.gguf", ctx=32, threads=1, quiet=True, factor=False)
    hessian.factorise_hessians(tmp_path / "h-packed.gguf", tmp_path / "h2.gguf")  # the expert counts carried over
    assert (tmp_path / "h2.gguf").read_bytes() == (tmp_path / "h.gguf").read_bytes()


def test_an_expert_no_token_reaches_has_no_matrix(tmp_path, llama):
    """Its weights fall back to the imatrix, whose values for it are llama-imatrix's 1 ("partial data")."""
    from gguf_kquant.model.hessian import expert_weight

    model = _moe_model(tmp_path / "moe.gguf", 16)
    toks = np.random.default_rng(3).integers(3, 512, 4)  # 4 tokens x 2 slots: 8 of 16 experts at most
    s = collect_hessians(model, toks, tmp_path / "h.gguf", ctx=4, threads=1, quiet=True)
    sums: dict = {}
    ref = _imatrix_like_llama(llama, model, toks, 4, 1, experts=sums)
    unrouted = [e for e in range(16) if sums[EXPERT_WEIGHTS[2]][1][e] == 0]
    assert len(unrouted) >= 8
    assert sorted(s.skipped) == sorted(expert_weight(w, e) for w in EXPERT_WEIGHTS for e in unrouted)
    assert all(why == "no calibration token was routed to this expert" for why in s.skipped.values())
    with load_hessians(tmp_path / "h.gguf") as hs:
        assert all(hs.for_weight(expert_weight(w, e)) is None for w in EXPERT_WEIGHTS for e in unrouted)
        for w in EXPERT_WEIGHTS:
            np.testing.assert_allclose(hs.imatrix().entries[w], ref[w], rtol=1e-5, err_msg=w)


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16"])
def test_activations_are_read_by_their_strides_and_type(type_name, llama):
    """_GGML.rows on a hand-made tensor (a host buffer over numpy memory): padded rows, 3-D, F16/BF16."""
    from gguf_kquant.types import GGMLType

    values = np.random.default_rng(5).standard_normal((2, 3, 5)).astype(np.float32)  # ne = [5, 3, 2]
    if type_name == "BF16":
        values = (values.view(np.uint32) & 0xFFFF0000).view(np.float32)  # exactly representable
        stored = (values.view(np.uint32) >> 16).astype(np.uint16)
    else:
        stored = values.astype(np.float16 if type_name == "F16" else np.float32)
    item = stored.dtype.itemsize
    raw = np.zeros(2 * 3 * 8 * item + 64, np.uint8)  # ggml_backend_cpu_buffer_from_ptr wants 32-byte alignment
    start = -raw.ctypes.data % 32
    memory = raw[start:start + 2 * 3 * 8 * item].view(stored.dtype).reshape(2, 3, 8)  # rows padded to 8 values
    memory[:, :, :5] = stored
    ggml = hessian._GGML()
    ggml.lib.ggml_backend_cpu_buffer_from_ptr.restype = ctypes.c_void_p
    ggml.lib.ggml_backend_cpu_buffer_from_ptr.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ggml.lib.ggml_backend_buffer_free.argtypes = [ctypes.c_void_p]
    buffer = ggml.lib.ggml_backend_cpu_buffer_from_ptr(memory.ctypes.data, memory.nbytes)
    try:
        t = hessian._GGMLTensor(type=int(getattr(GGMLType, type_name)), buffer=buffer, data=memory.ctypes.data)
        t.ne[:] = [5, 3, 2, 1]
        t.nb[:] = [item, 8 * item, 24 * item, 48 * item]
        got = ggml.rows(t)
    finally:
        ggml.lib.ggml_backend_buffer_free(buffer)
    assert got.dtype == np.float64 and got.shape == (6, 5)
    np.testing.assert_array_equal(got, stored.astype(np.float32).reshape(6, 5) if type_name != "BF16"
                                  else values.reshape(6, 5))


def test_missing_llama_cpp_is_a_clear_error(tmp_path, example_model, tokens, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(LlamaCppMissingError, match="pip install llama-cpp-python"):
        collect_hessians(example_model, tokens, tmp_path / "h.gguf", ctx=CTX, quiet=True)


# --- (5) the command line -------------------------------------------------------------------------------
def test_cli_round_trip(tmp_path, example_model, llama, capsys):
    from gguf_kquant import hessian_cli

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["hello model quantize llama weight tensor file"] * 30))
    out = tmp_path / "h.gguf"
    parser = argparse.ArgumentParser()
    hessian_cli.add_arguments(parser)
    args = parser.parse_args([str(example_model), "-f", str(text), "-o", str(out), "-c", "32", "--chunks", "2",
                              "--threads", "1"])
    assert hessian_cli.run(args) == 0
    err = capsys.readouterr().err
    assert "[   2/   2] chunk 2: 32 tokens" in err and f"wrote {out}: 17 matrices for 29 weights" in err
    with load_hessians(out) as hs:
        assert hs.chunk_size == 32 and hs.chunk_count == 2 and hs.for_weight("output.weight")[1] == 64
    args = parser.parse_args([str(example_model), "-f", str(text), "-o", str(out), "-c", "32", "--chunks", "1",
                              "--overwrite", "-q"])
    assert hessian_cli.run(args) == 0
    assert capsys.readouterr().err == ""
    with load_hessians(out) as hs:
        assert hs.chunk_count == 1
    one_pass = out.read_bytes()
    args = parser.parse_args([str(example_model), "-f", str(text), "-o", str(out), "-c", "32", "--chunks", "1",
                              "--overwrite", "--max-memory", "5M"])
    assert hessian_cli.run(args) == 0
    assert "MiB, above max_memory (4.8 MiB): 8 passes" in capsys.readouterr().err and out.read_bytes() == one_pass
    args = parser.parse_args([str(example_model), "-f", str(text), "-o", str(out), "-c", "32", "--chunks", "1",
                              "--overwrite", "-q", "--no-factor"])
    assert hessian_cli.run(args) == 0
    with load_hessians(out) as hs:
        assert hs.layout == "packed_upper" and hs.factor_for("output.weight") is None
    args = parser.parse_args(["--factorise", str(out), "-o", str(tmp_path / "f.gguf")])
    assert hessian_cli.run(args) == 0
    assert f"wrote {tmp_path / 'f.gguf'}: 17 matrices factorised in" in capsys.readouterr().err
    with load_hessians(tmp_path / "f.gguf") as hs:
        assert hs.layout == "factor_upper" and hs.factor_for("output.weight") is not None
    for bad in (["--factorise", str(out), str(example_model), "-o", str(tmp_path / "g.gguf")],
                [str(example_model), "-o", str(tmp_path / "g.gguf")]):
        with pytest.raises(InvalidArgumentError, match="-f TEXT"):
            hessian_cli.run(parser.parse_args(bad))


def test_the_sums_keep_blas_on_one_thread(tmp_path, example_model, tokens, llama, monkeypatch):
    """OpenBLAS's threads would spin beside llama.cpp's (twice the time on two cores) and make the sums depend
    on the machine's core count: one BLAS thread while collecting, the caller's setting back after."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    seen = []
    add = hessian._Collector._add
    monkeypatch.setattr(hessian._Collector, "_add", staticmethod(lambda g, x: (seen.append(blas_threads()),
                                                                                 add(g, x))))
    with threadpool_limits(2, "blas"):
        collect_hessians(example_model, tokens[:CTX], tmp_path / "h.gguf", ctx=CTX, threads=1, quiet=True)
        after = blas_threads()
    assert seen and all(s == {1} for s in seen)
    assert after == {2}

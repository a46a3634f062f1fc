"""The test oracle: llama.cpp's own ggml, from llama-cpp-python (PyPI, built from source), via ctypes.

Tests that need the oracle import it from here.  A missing oracle is an error, not a skip: CI installs it
(.ci/run), and a green run without it would prove nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np


class OracleMissing(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def lib_dir() -> Path:
    try:
        import llama_cpp  # noqa: F401  (its import also loads libllama and libggml)
    except Exception as exc:  # pragma: no cover - the failure is the point
        raise OracleMissing(
            "llama-cpp-python (the llama.cpp oracle) is not installed: run `pip install -e '.[test]'`"
        ) from exc
    return Path(llama_cpp.__file__).parent / "lib"


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml 0.25.3 (ggml.h) — note blck_size_interleave.
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64)


@functools.lru_cache(maxsize=None)
def ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(lib_dir() / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    return lib


def type_traits(type_id: int) -> _TypeTraits:
    return ggml().ggml_get_type_traits(type_id).contents


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def quantize_chunk(type_id: int, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk over all rows of float32 ``x`` (n_rows, n_per_row) -> uint8 (n_rows, row_bytes)."""
    lib = ggml()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_rows, n_per_row = x.shape
    row_size = lib.ggml_row_size(type_id, n_per_row)
    out = np.zeros((n_rows, row_size), dtype=np.uint8)
    lib.ggml_quantize_init(type_id)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    written = lib.ggml_quantize_chunk(type_id, _ptr(x), _ptr(out), 0, n_rows, n_per_row,
                                      None if qw is None else _ptr(qw))
    assert written == out.size
    return out


def from_float_ref(type_id: int, x: np.ndarray) -> np.ndarray:
    """The type's from_float_ref row function (only way to reach Q8_K's reference quantizer)."""
    tr = type_traits(type_id)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_rows, n_per_row = x.shape
    out = np.zeros((n_rows, ggml().ggml_row_size(type_id, n_per_row)), dtype=np.uint8)
    fn = _FROM_FLOAT(tr.from_float_ref)
    for r in range(n_rows):
        fn(x[r].ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out[r].ctypes.data, n_per_row)
    return out


def to_float(type_id: int, raw: np.ndarray, n_per_row: int) -> np.ndarray:
    """ggml's to_float of each row of uint8 ``raw`` (n_rows, row_bytes) -> float32 (n_rows, n_per_row)."""
    tr = type_traits(type_id)
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n_rows = raw.shape[0]
    out = np.empty((n_rows, n_per_row), dtype=np.float32)
    if type_id == 0:  # F32 has no to_float: it is the identity
        return raw.view(np.float32).reshape(n_rows, n_per_row).copy()
    fn = _TO_FLOAT(tr.to_float)
    fn(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_rows * n_per_row)
    return out


def libllama() -> ctypes.CDLL:
    return ctypes.CDLL(str(lib_dir() / "libllama.so"), mode=ctypes.RTLD_GLOBAL)


ORACLE_SRC = Path(__file__).resolve().parents[1] / "oracle-src"  # git-ignored


@functools.lru_cache(maxsize=None)
def vendor_llama_cpp() -> Path:
    """llama.cpp's source tree from the sdist of the installed llama-cpp-python (the library's own source).

    ``GGUF_KQUANT_LLAMA_CPP_SRC`` points at an unpacked tree (.ci/run sets it); otherwise the sdist is
    fetched once with pip into ``oracle-src/`` (pip's cache usually has it from building the oracle), so the
    README's test command works on a fresh machine by itself.
    """
    env = os.environ.get("GGUF_KQUANT_LLAMA_CPP_SRC")
    if env:
        if not (Path(env) / "src" / "llama-quant.cpp").is_file():
            raise OracleMissing(f"GGUF_KQUANT_LLAMA_CPP_SRC={env} is not a llama.cpp source tree")
        return Path(env)
    from importlib.metadata import version
    import subprocess
    import sys
    import tarfile

    ver = version("llama-cpp-python")
    tree = ORACLE_SRC / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp"
    if not (tree / "src" / "llama-quant.cpp").is_file():
        ORACLE_SRC.mkdir(exist_ok=True)
        sdist = ORACLE_SRC / f"llama_cpp_python-{ver}.tar.gz"
        if not sdist.is_file():
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
                                "--no-deps", f"llama-cpp-python=={ver}", "-d", str(ORACLE_SRC)],
                               capture_output=True, text=True)
            if r.returncode != 0 or not sdist.is_file():
                raise OracleMissing(f"could not download the llama-cpp-python {ver} sdist: {r.stderr[-2000:]}")
        with tarfile.open(sdist) as tar:
            tar.extractall(ORACLE_SRC, filter="data")
    return tree


def quantize_row_symbol(symbol: str, type_id: int, x: np.ndarray) -> np.ndarray:
    """Call an exported row quantizer such as ``quantize_row_q8_K_ref`` over all of ``x`` at once."""
    fn = _FROM_FLOAT(ctypes.cast(getattr(ggml(), symbol), ctypes.c_void_p).value)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_rows, n_per_row = x.shape
    out = np.zeros((n_rows, ggml().ggml_row_size(type_id, n_per_row)), dtype=np.uint8)
    fn(x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.ctypes.data, x.size)
    return out


def dequantize_row_symbol(symbol: str, raw: np.ndarray, n_per_row: int) -> np.ndarray:
    """Call an exported row dequantizer such as ``dequantize_row_q8_K``."""
    fn = _TO_FLOAT(ctypes.cast(getattr(ggml(), symbol), ctypes.c_void_p).value)
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty((raw.shape[0], n_per_row), dtype=np.float32)
    fn(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)
    return out


# llama-cpp-python's high-level Llama() crashes (SIGSEGV) evaluating quantized models on this machine's
# CPU-repack ("extra buffer") path; the low-level API with use_extra_bufts=False works.  A subprocess keeps a
# crash from taking pytest down.
_LOGITS_DRIVER = """
import sys, numpy as np, llama_cpp as L
L.llama_backend_init()
mp = L.llama_model_default_params(); mp.use_extra_bufts = False
m = L.llama_model_load_from_file(sys.argv[1].encode(), mp)
assert m, "llama.cpp could not load " + sys.argv[1]
cp = L.llama_context_default_params(); cp.n_ctx = 64; cp.n_batch = 64; cp.n_threads = 1; cp.n_threads_batch = 1
ctx = L.llama_init_from_model(m, cp)
toks = [int(t) for t in sys.argv[3].split(",")]
b = L.llama_batch_init(len(toks), 0, 1)
for i, t in enumerate(toks):
    b.token[i] = t; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1
b.n_tokens = len(toks)
assert L.llama_decode(ctx, b) == 0
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(m))
np.save(sys.argv[2], np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(toks), n_vocab)).copy())
"""




def llama_logits(path, tokens, out) -> np.ndarray:
    """llama.cpp's logits (n_tokens, n_vocab) for ``tokens`` through model file ``path`` (saved to ``out``)."""
    import subprocess
    import sys

    libllama()
    r = subprocess.run([sys.executable, "-c", _LOGITS_DRIVER, str(path), str(out), ",".join(map(str, tokens))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"llama.cpp failed on {path}: rc {r.returncode}\n{r.stderr[-2000:]}"
    return np.load(out)

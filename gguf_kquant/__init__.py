"""gguf_kquant: read, write, inspect and quantize GGUF files, bit-for-bit faithful to llama.cpp.

Compiled kernels are cached by Numba (``cache=True``), looked up in this order (:mod:`gguf_kquant._jitcache`):

1. ``NUMBA_CACHE_DIR``, when set: Numba's own layout there (the kernels shipped in the wheel are not used);
2. ``gguf_kquant/_nbcache`` inside the installed package, when writable: a wheel built by ``pip install .``
   ships every kernel compiled there for the build machine's CPU (entries are keyed by the source file's
   content, Numba's version and the CPU, so another CPU simply compiles lazily);
3. ``$XDG_CACHE_HOME/gguf-kquant/`` (``~/.cache/gguf-kquant``) for a read-only install, first filled from
   the shipped entries;
4. ``$TMPDIR/gguf-kquant-numba-<uid>`` (a private folder) when none of these is writable.

``gguf-kquant precompile TYPE... | --all`` fills the cache ahead of time; ``gguf-kquant precompile --clear``
deletes every cache file of this package in all of these places (run it before ``pip uninstall``, which
removes only the files the wheel shipped).
"""

import os as _os
import sys as _sys
import tempfile as _tempfile


def _writable_dir(path: str) -> bool:
    """Numba's own test (caching._CacheLocator.ensure_cache_path): create the folder, write a file in it."""
    try:
        _os.makedirs(path, exist_ok=True)
        _tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _private_dir(path: str) -> bool:
    """A folder only we can write (cached kernels are pickles: a folder others can write would run their code)."""
    try:
        _os.makedirs(path, mode=0o700, exist_ok=True)
        st = _os.lstat(path)
    except OSError:
        return False
    import stat

    return (stat.S_ISDIR(st.st_mode) and st.st_uid == _os.getuid() and not st.st_mode & 0o022
            and _writable_dir(path))


def _ensure_numba_cache_dir() -> None:
    """Pick a writable NUMBA_CACHE_DIR when Numba's own places are not, so that cache=True never fails."""
    if _os.environ.get("NUMBA_CACHE_DIR") or not hasattr(_os, "getuid"):
        return
    in_tree = _os.path.join(_os.path.dirname(__file__), "codecs", "__pycache__")
    xdg = _os.environ.get("XDG_CACHE_HOME") or _os.path.join(_os.path.expanduser("~"), ".cache")
    if _writable_dir(in_tree) or _writable_dir(_os.path.join(xdg, "numba")):
        return
    fallback = _os.path.join(_tempfile.gettempdir(), f"gguf-kquant-numba-{_os.getuid()}")
    if not _private_dir(fallback):
        try:
            fallback = _tempfile.mkdtemp(prefix="gguf-kquant-numba-")  # this process only
        except OSError:
            return  # nowhere to write at all: Numba will say so
    _os.environ["NUMBA_CACHE_DIR"] = fallback
    if "numba" in _sys.modules:  # imported before us: its config has already read the environment
        _sys.modules["numba"].config.CACHE_DIR = fallback


# our Numba cache locator (the shipped kernels), installed before any codec module is decorated
from . import _jitcache  # noqa: E402

_jitcache.install()
_ensure_numba_cache_dir()

from .errors import *  # noqa: F401,F403  (the GGUFError family is part of the public API)
from .errors import GGUFError
from .types import GGMLType, TypeInfo, TYPES, type_info
from .codecs import quantize, dequantize, set_num_threads, get_num_threads

__version__ = "0.1.0"


def __getattr__(name):
    # Container and whole-model APIs are imported lazily: `import gguf_kquant` stays cheap.
    if name in ("open", "GGUFFile", "TensorInfo"):
        from .container import reader

        return getattr(reader, {"open": "open_gguf"}.get(name, name))
    if name in ("GGUFWriter", "write", "Value", "GGUFValueType"):
        from .container import writer

        return getattr(writer, name)
    if name in ("quantize_model",):
        from .model import quantize as _q

        return _q.quantize_model
    if name in ("convert_hf",):
        from .convert import convert_hf

        return convert_hf
    if name in ("convert_lora",):
        from .convert.lora import convert_lora

        return convert_lora
    raise AttributeError(f"module 'gguf_kquant' has no attribute {name!r}")

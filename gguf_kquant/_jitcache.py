"""Where Numba caches this package's compiled kernels: inside the package, keyed by source content.

A wheel is built with every kernel already compiled (setup.py runs :func:`gguf_kquant.precompile.build_cache`
into the build's copy of the package), so a fresh install compiles nothing.  For that cache to be found
after ``pip install`` two things differ from Numba's own ``__pycache__`` locator:

* the folder is ``gguf_kquant/_nbcache/<subpackage>/`` — a path relative to the package, the same at build
  time and once installed;
* an entry is valid while the source file's *content* is unchanged (a SHA-256 of its bytes): pip does not
  keep file modification times, which older Numba versions stamp entries with.  (A source tree's first use
  copies the entries Numba's own locator left in ``__pycache__``: with this stamp they are still valid.)

Entries also carry Numba's own keys (Numba version, Python version, the function's bytecode, and the CPU
name and features): an entry compiled for another CPU is a miss, compiled again and added next to it.

Where the cache lives, first match wins:

1. ``NUMBA_CACHE_DIR`` if the user set it: Numba's own layout in that folder (no shipped entries are used);
2. ``<package>/_nbcache`` if it is writable (a user's venv; an editable install's source tree);
3. ``$XDG_CACHE_HOME/gguf-kquant/<install>/`` (default ``~/.cache/gguf-kquant``) for a read-only install
   (system site-packages): seeded once with copies of the shipped entries, then written there;
4. otherwise Numba's own locators, then the private ``$TMPDIR`` folder ``gguf_kquant/__init__`` picks.

``gguf-kquant precompile --clear`` deletes all of these (:func:`clear`), including what ``pip uninstall``
leaves behind (entries added after installation are not in the wheel's file list): run it before uninstalling.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile

from numba.core import caching, config

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CACHE_DIRNAME = "_nbcache"
CACHE_SUFFIXES = (".nbi", ".nbc")

# NUMBA_CACHE_DIR as the user gave it, before gguf_kquant/__init__ may set its own fallback
_user_numba_cache_dir = None


def package_cache_dir() -> str:
    """The shipped cache: ``<package>/_nbcache``."""
    return os.path.join(PACKAGE_DIR, CACHE_DIRNAME)


def user_cache_root() -> str:
    """Where read-only installs keep their writable copies: ``$XDG_CACHE_HOME/gguf-kquant`` (``~/.cache``)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "gguf-kquant")


def user_cache_dir() -> str:
    """This installation's folder under :func:`user_cache_root` (one per package path, like Numba's)."""
    tag = hashlib.sha1(PACKAGE_DIR.encode()).hexdigest()[:16]
    return os.path.join(user_cache_root(), f"{os.path.basename(PACKAGE_DIR)}_{tag}")


@functools.lru_cache(maxsize=None)
def _writable(path: str) -> bool:
    """Numba's test (_CacheLocator.ensure_cache_path), once per folder and process."""
    from . import _writable_dir  # defined before the package imports this module

    return _writable_dir(path)


@functools.lru_cache(maxsize=None)
def _content_hash(path: str, mtime: float, size: int) -> bytes:
    # mtime and size only key the memo (a file edited while we run is hashed again), never the stamp.  The
    # same stamp as Numba 0.68's own, so entries it wrote to __pycache__ stay valid here (see _seed).
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


@functools.lru_cache(maxsize=None)
def _seed(shipped: str, target: str) -> None:
    """Copy cache entries from ``shipped`` (a read-only install's cache, or the ``__pycache__`` Numba's own
    locator used) into ``target``, once per folder and process: missing files, and files older than the
    shipped ones (written for a previous installation at this path)."""
    try:
        names = [n for n in os.listdir(shipped) if n.endswith(CACHE_SUFFIXES)]
    except OSError:
        return
    for name in names:
        src, dst = os.path.join(shipped, name), os.path.join(target, name)
        try:
            if not os.path.exists(dst) or os.stat(dst).st_mtime < os.stat(src).st_mtime:
                tmp = f"{dst}.{os.getpid()}.tmp"
                try:
                    os.link(src, tmp)  # Numba replaces cache files, never writes into them: a link is safe
                except OSError:
                    shutil.copyfile(src, tmp)
                os.replace(tmp, dst)  # atomic: a concurrent process never reads half a file
        except OSError:
            pass  # a miss, compiled and saved as usual


class PackageCacheLocator(caching._CacheLocator):
    """Numba cache locator for functions defined in this package's source files (see the module docstring)."""

    def __init__(self, py_func, py_file, cache_path):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = cache_path

    def get_cache_path(self):
        return self._cache_path

    def ensure_cache_path(self):
        if not _writable(self._cache_path):
            raise OSError(f"cache folder not writable: {self._cache_path}")

    def get_source_stamp(self):
        st = os.stat(self._py_file)
        return _content_hash(self._py_file, st.st_mtime, st.st_size)

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        if config.CACHE_DIR or not os.path.isfile(py_file):
            return None  # NUMBA_CACHE_DIR: Numba's UserProvidedCacheLocator (listed before us) takes it
        src_dir = os.path.dirname(os.path.abspath(py_file))
        rel = os.path.relpath(src_dir, PACKAGE_DIR)
        if rel.startswith(os.pardir) or os.path.isabs(rel):
            return None  # not our source file
        shipped = os.path.normpath(os.path.join(package_cache_dir(), rel))
        new = not os.path.isdir(shipped)
        if _writable(shipped):
            if new:  # first use in a source tree that cached in __pycache__ before: keep those kernels
                _seed(os.path.join(src_dir, "__pycache__"), shipped)
            return cls(py_func, py_file, shipped)
        own = os.path.normpath(os.path.join(user_cache_dir(), rel))
        if _writable(own):
            _seed(shipped, own)
            return cls(py_func, py_file, own)
        return None


def _impl_class():
    return getattr(caching, "CacheImpl", None) or caching._CacheImpl  # older Numba: _CacheImpl


def install() -> None:
    """Put :class:`PackageCacheLocator` right after Numba's NUMBA_CACHE_DIR locator (idempotent).  Must run
    before any ``@njit(cache=True)`` of this package is decorated: the locator is chosen then."""
    global _user_numba_cache_dir
    locators = _impl_class()._locator_classes
    if PackageCacheLocator in locators:
        return
    _user_numba_cache_dir = os.environ.get("NUMBA_CACHE_DIR") or None
    first = locators[0] if locators and "UserProvided" in locators[0].__name__ else None
    locators.insert(1 if first else 0, PackageCacheLocator)


def _numba_subdirs(root: str) -> list:
    """Numba's own cache folders for our source folders under ``root`` (its UserProvided/UserWide layout)."""
    out = []
    for d, _, files in os.walk(PACKAGE_DIR):
        if CACHE_DIRNAME in d.split(os.sep) or not any(f.endswith(".py") for f in files):
            continue
        out.append(os.path.join(root, caching._CacheLocator.get_suitable_cache_subpath(os.path.join(d, "x.py"))))
    return out


def cache_locations() -> list:
    """Every folder that may hold this package's compiled kernels, whichever rule placed them there."""
    places = [package_cache_dir(), user_cache_root()]
    for d, _, files in os.walk(PACKAGE_DIR):  # Numba's in-tree __pycache__ (before this locator existed)
        if any(f.endswith(".py") for f in files) and CACHE_DIRNAME not in d.split(os.sep):
            places.append(os.path.join(d, "__pycache__"))
    roots = [r for r in (config.CACHE_DIR, _user_numba_cache_dir) if r]
    try:
        from numba.misc.appdirs import AppDirs

        roots.append(AppDirs(appname="numba", appauthor=False).user_cache_dir)
    except Exception:
        pass
    if hasattr(os, "getuid"):
        roots.append(os.path.join(tempfile.gettempdir(), f"gguf-kquant-numba-{os.getuid()}"))
    for root in dict.fromkeys(roots):
        places += _numba_subdirs(root)
    return list(dict.fromkeys(places))


def clear() -> int:
    """Delete every cache file of this package (see :func:`cache_locations`); returns how many."""
    removed = 0
    for place in cache_locations():
        if not os.path.isdir(place):
            continue
        for d, _, files in os.walk(place, topdown=False):
            for f in files:
                if f.endswith(CACHE_SUFFIXES) or (f.endswith(".tmp") and ".nb" in f):
                    try:
                        os.remove(os.path.join(d, f))
                        removed += 1
                    except OSError:
                        pass
            if os.path.basename(d) != "__pycache__":
                try:
                    os.rmdir(d)  # only if now empty
                except OSError:
                    pass
    return removed

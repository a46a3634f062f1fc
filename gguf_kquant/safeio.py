"""Safe output for every command that writes files: plan the paths, refuse collisions, commit all or nothing.

``quantize_model``, ``convert_hf`` and the GGUF writer share three steps:

1. :func:`check_outputs` — before any work, every path that will be written (each output shard, the report)
   is compared with every path that is read (source shards, imatrix, checkpoint files).  Two names are the
   same file when they resolve to the same inode (``st_dev``/``st_ino``: symlinks and hard links included) or,
   for files that do not exist yet, the same ``realpath``.  Refused with one line naming the paths: a
   collision, two outputs that are one file, a missing destination folder, a destination that is a folder
   or not a regular file (a FIFO, ``/dev/null``), and with ``overwrite=False`` an existing destination.  For
   split outputs any existing shard of the same prefix (``m-00001-of-00003.gguf`` when writing
   ``m-0000i-of-00002.gguf``) counts as an existing destination; with ``overwrite=True`` only the new shard
   names are replaced (old shards of another count stay).  Temp files cannot collide with anything: they are
   created with ``O_EXCL`` under fresh random names.
2. :class:`AtomicFiles` — each target is written to a temp file ``.gguf-kquant-XXXXXXXX.tmp`` in the
   target's own folder: the same file system, so the rename is atomic, and a short fixed-length name, so
   targets whose names are up to NAME_MAX = 255 bytes long work.  A destination that is a symlink is
   followed (the file it names is replaced, the link stays, as ``open(path, "wb")`` would do).  Only after
   *every* file is complete and fsync'ed are the temps renamed over their targets, in the order given (the
   model's shards, then the report), then the folders are fsync'ed.  On any exception the temps are removed
   and no target is touched.
3. Signals — while the files are open, SIGINT, SIGTERM and SIGHUP (what Ctrl-C, ``timeout``, systemd and
   ``docker stop`` send) interrupt the work, the temps are removed, the previous handlers are restored and
   the signal takes its normal course: SIGINT raises ``KeyboardInterrupt`` (the CLI exits 130), SIGTERM
   and SIGHUP with their default action kill the process with status 128 + signum.  During the renames and
   the clean-up a signal is held back until they are finished.  Handlers are installed only in the main
   thread (Python allows no other) and a signal that is ignored (``nohup``) stays ignored.  SIGXFSZ is
   ignored while writing, so a file-size limit (``ulimit -f``) is an EFBIG error naming the file.

What POSIX cannot make atomic, and how it is kept small:

* *Several targets* (shards, model + report) are renamed one after another; there is no multi-file rename.
  The renames run back to back after all data is written and fsync'ed, with signals held back, so the
  window is a few system calls long.  Only SIGKILL, a power loss or a kernel crash inside it leaves some
  targets new and some old (and the remaining ``.gguf-kquant-*.tmp`` files, which may be deleted).
* *SIGKILL* (and a crash of the interpreter) cannot be caught: the targets stay untouched, but the temp
  files of the interrupted job remain in the destination folders.
* ``overwrite=False`` checks that no target exists before the work starts; a file another process creates
  at a target name while the job runs is replaced by the rename (two writers to one target: the last
  rename wins, and the target is always one complete file).
* Python runs signal handlers between bytecodes of the main thread: a signal arriving inside a long native
  codec call takes effect when that call returns (at most one slab of rows).
* Without the final folder fsync a power loss may undo a rename (the old target reappears, whole).

>>> check_outputs(["out.gguf", "out.json"], ["model-f16.gguf"])               # doctest: +SKIP
>>> with AtomicFiles(["out.gguf", "out.json"]) as out:                        # doctest: +SKIP
...     with out.writing(0) as fh:
...         fh.write(b"GGUF...")
...     out.write_bytes(1, b"{}")
...     out.commit()                       # both appear together, or neither
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

from .container.split import parse_shard_path
from .errors import GGUFIOError, WriteError

__all__ = ["check_outputs", "AtomicFiles", "Interrupted", "TEMP_PREFIX", "TEMP_SUFFIX"]

TEMP_PREFIX = ".gguf-kquant-"
TEMP_SUFFIX = ".tmp"
HANDLED_SIGNALS = tuple(getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s))


class Interrupted(BaseException):
    """A write stopped by SIGTERM or SIGHUP.  Only seen when the program's own handler for the signal
    returns instead of ending the process (with the default action the process ends with 128 + signum).
    A ``BaseException``, like ``KeyboardInterrupt``, so ``except Exception`` in a producer cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; nothing was written")
        self.signum = signum


# ------------------------------------------------------------------------------------------------------
# Path planning
# ------------------------------------------------------------------------------------------------------
def _file_id(path: Path) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _real(path: Path) -> str:
    return os.path.realpath(os.path.abspath(path))


def check_outputs(outputs: Iterable, inputs: Iterable = (), *, overwrite: bool = True,
                  error: type = WriteError) -> list:
    """Refuse (raise ``error``, one line) before any work if an output is an input, two outputs are one
    file, an output's folder is missing, an output is a folder, or an output exists and not ``overwrite``.

    Returns the outputs as ``Path`` objects.

    >>> check_outputs(["m.gguf"], ["m.gguf"])                                     # doctest: +SKIP
    Traceback (most recent call last):
    WriteError: m.gguf: refusing to write over an input of this job: it is the same file as m.gguf
    """
    outs = [Path(os.fspath(p)) for p in outputs]
    ins = [Path(os.fspath(p)) for p in inputs if p is not None and os.fspath(p) != ""]
    for p in outs + ins:
        if "\0" in str(p):
            raise error(f"{str(p)!r}: a file name cannot contain a NUL byte")
    in_ids = {}
    for p in ins:
        fid = _file_id(p)
        if fid is not None:
            in_ids.setdefault(fid, p)
    in_real = {_real(p): p for p in ins}
    seen: dict = {}
    for out in outs:
        fid = _file_id(out)
        real = _real(out)
        hit = in_ids.get(fid) if fid is not None else None
        hit = hit if hit is not None else in_real.get(real)
        if hit is not None:
            raise error(f"{out}: refusing to write over an input of this job: it is the same file as {hit}")
        key = fid if fid is not None else real
        if key in seen:
            raise error(f"{out}: written twice by this job (also as {seen[key]})")
        seen[key] = out
        folder = out.parent
        if not folder.is_dir():
            raise error(f"{out}: the destination folder {folder} does not exist")
        if out.is_dir():
            raise error(f"{out}: is a folder, not a file name")
        if fid is not None and not out.is_file():  # a FIFO, socket or device (/dev/null) is not replaced
            raise error(f"{out}: is not a regular file; refusing to replace it")
        if not overwrite:
            taken = out if fid is not None or out.is_symlink() else _sibling_shard(out)
            if taken is not None:
                what = "destination exists" if taken == out else f"a shard of the same split output exists ({taken})"
                raise error(f"{out}: {what}; pass overwrite=True (--overwrite) to replace it")
    return outs


def _sibling_shard(out: Path) -> Optional[Path]:
    """An existing ``{prefix}-*-of-*.gguf`` shard with the prefix of shard name ``out`` (plain string
    comparison: ``[``, ``*`` and ``?`` in names are characters, not patterns)."""
    parsed = parse_shard_path(out.name)
    if parsed is None:
        return None
    with os.scandir(out.parent) as it:
        for entry in it:
            other = parse_shard_path(entry.name)
            if other is not None and other[0] == parsed[0]:
                return out.parent / entry.name
    return None


# ------------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------------
class _SignalGuard:
    """Turns SIGINT/SIGTERM/SIGHUP into exceptions while installed; can hold them back (``deferred``)."""

    def __init__(self):
        self.previous: dict = {}
        self.deferring = 0
        self.pending: Optional[int] = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works in the main thread; the default actions stay
        for s in HANDLED_SIGNALS:
            prev = signal.getsignal(s)
            if prev is None or prev == signal.SIG_IGN:
                continue  # set from C (unknown to Python, cannot be restored) or ignored on purpose (nohup)
            self.previous[s] = prev
            signal.signal(s, self._handler)
        if hasattr(signal, "SIGXFSZ") and signal.getsignal(signal.SIGXFSZ) == signal.SIG_DFL:
            # beyond RLIMIT_FSIZE, SIGXFSZ's default action kills the process; ignored, write() fails with
            # EFBIG and the temps are cleaned up (Python ignores it already unless embedded)
            self.previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def restore(self) -> None:
        for s, prev in self.previous.items():
            signal.signal(s, prev)
        self.previous = {}

    def _handler(self, signum, frame) -> None:
        if self.deferring:
            self.pending = self.pending or signum
            return
        raise self._exception(signum)

    def _exception(self, signum: int) -> BaseException:
        if signum == signal.SIGINT and self.previous.get(signum) is signal.default_int_handler:
            return KeyboardInterrupt()
        return Interrupted(signum)

    @contextmanager
    def deferred(self):
        """Hold signals back for a few system calls that must not be cut in half."""
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1

    def redeliver(self, signum: int) -> None:
        """After clean-up and ``restore()``: let the signal do what it would have done without us."""
        signal.raise_signal(signum)  # SIG_DFL ends the process (128 + signum); a Python handler runs now


# ------------------------------------------------------------------------------------------------------
# Temp files committed together
# ------------------------------------------------------------------------------------------------------
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _create_temp(folder: Path, target: Path) -> Path:
    for _ in range(100):
        tmp = folder / f"{TEMP_PREFIX}{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:  # 0o666 and the umask give the target the permissions a plain open() would
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o666))
            return tmp  # closed again: a split output may have more shards than a process may open files
        except FileExistsError:
            continue
        except OSError as exc:
            raise _io_error(target, exc, "cannot create a temp file in its folder") from None
    raise WriteError(f"{target}: cannot find a free temp file name in {folder}")


def _io_error(target: Path, exc: OSError, doing: str) -> GGUFIOError:
    return GGUFIOError.wrap(target, exc, doing)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


class _TargetFile:
    """A temp file's writer that names the target in its errors."""

    def __init__(self, fh, target: Path, tmp: Path):
        self.fh, self.target, self.tmp = fh, target, tmp

    def _error(self, exc: OSError) -> GGUFIOError:
        return _io_error(self.target, exc, f"writing failed (temp file {self.tmp.name})")

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            raise self._error(exc) from None

    def tell(self) -> int:
        return self.fh.tell()

    def finish(self, fsync: bool) -> None:
        try:
            self.fh.flush()
            if fsync:
                os.fsync(self.fh.fileno())
        except OSError as exc:
            raise self._error(exc) from None

    def close(self) -> None:
        try:
            self.fh.close()
        except OSError:
            pass  # only after an error already raised: closing with unwritable buffered data fails again


class AtomicFiles:
    """Temp files for ``targets``, renamed over them together by :meth:`commit` (see the module docstring).

    Entering creates every temp file (so a read-only folder fails before any work) and installs the signal
    handlers; leaving removes the temps that were not committed and restores the handlers.
    """

    def __init__(self, targets: Iterable, *, fsync: bool = True):
        # a symlinked destination is followed (the file it names is replaced, the link stays), as open() would
        self.targets = [Path(os.path.realpath(t)) if os.path.islink(t) else Path(os.fspath(t)) for t in targets]
        self.fsync = fsync
        self.temps: list = []
        self._guard = _SignalGuard()

    def __enter__(self) -> "AtomicFiles":
        self._guard.install()
        try:
            for t in self.targets:
                self.temps.append(_create_temp(t.parent, t))
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    @contextmanager
    def writing(self, i: int):
        """A buffered binary file on temp ``i`` (``write``, ``tell``); its OS errors (disk full, EFBIG...)
        become :class:`~gguf_kquant.errors.GGUFIOError` naming the target — errors of the code producing
        the data pass unchanged.  The data is flushed (and fsync'ed) when the block ends."""
        target, tmp = self.targets[i], self.temps[i]
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | _O_CLOEXEC | _O_NOFOLLOW)
        except OSError as exc:
            raise _io_error(target, exc, f"cannot open the temp file {tmp.name}") from None
        fh = _TargetFile(os.fdopen(fd, "wb", buffering=1 << 20), target, tmp)
        try:
            yield fh
            fh.finish(self.fsync)
        finally:
            fh.close()

    def write_bytes(self, i: int, data: bytes) -> None:
        with self.writing(i) as fh:
            fh.write(data)

    def commit(self) -> list:
        """Rename every temp over its target, back to back with signals held back; returns the targets."""
        with self._guard.deferred():
            done = 0
            try:
                for tmp, target in zip(self.temps, self.targets):
                    os.replace(tmp, target)
                    done += 1
            except OSError as exc:  # e.g. the target became a folder meanwhile
                self.temps = self.temps[done:]
                raise _io_error(self.targets[done], exc, "cannot rename the finished temp file into place") \
                    from None
            self.temps = []
            if self.fsync:
                for folder in dict.fromkeys(t.parent for t in self.targets):
                    _fsync_dir(folder)
        pending, self._guard.pending = self._guard.pending, None
        if pending is not None:  # arrived during the renames: the job is complete, now stop as asked
            raise self._guard._exception(pending)
        return list(self.targets)

    def __exit__(self, exc_type, exc, tb) -> None:
        with self._guard.deferred():
            for tmp in self.temps:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            self.temps = []
        pending, self._guard.pending = self._guard.pending, None
        self._guard.restore()
        signum = exc.signum if isinstance(exc, Interrupted) else pending
        if signum is not None:
            self._guard.redeliver(signum)
            if pending is not None and exc is None:
                raise Interrupted(pending)

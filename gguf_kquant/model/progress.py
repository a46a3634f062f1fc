"""Progress of whole-file jobs (quantize, convert, and split/merge/diff through :meth:`Progress.advance`).

Three modes, chosen from the stream:

* a terminal: one live tqdm bar — bytes of input done, rate, ETA — with warnings printed above it;
* not a terminal (a log file, a pipe, CI): one plain line per tensor, then a summary, as before::

    [  27/  39]  62.1% of 5.51 MiB  blk.2.ffn_down.weight  - [  512,  256],  F16 -> Q6_K  0.25 MiB -> ...

* ``quiet=True`` (the CLI's ``--quiet``): nothing.

The bar closes itself after the last tensor (``total`` steps) or on :meth:`close`/:meth:`summary`, so a
caller that only creates the object and reports tensors needs nothing else.

>>> p = Progress(total=2, quiet=True, total_bytes=2 * 1048576)
>>> p.tensor("output.weight", (256, 1024), "F32", "Q6_K", 1048576, 215040, 0.01)
>>> p.bytes_done
1048576
"""

from __future__ import annotations

import sys
import time
from typing import Optional


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class Progress:
    """``bar=None`` picks the live bar when ``stream`` is a terminal; ``True``/``False`` force a mode."""

    def __init__(self, total: int, *, quiet: bool = False, stream=None, total_bytes: Optional[int] = None,
                 bar: Optional[bool] = None, desc: Optional[str] = None):
        self.total = total
        self.total_bytes = total_bytes
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.index = 0
        self.bytes_done = 0
        self.start = time.perf_counter()
        self.desc = desc
        # live bar mode; the bar itself appears with the first step (a dry run or a failed check draws none)
        self.live = not quiet and (bar if bar is not None else _is_terminal(self.stream))
        self._bar = None

    @property
    def bar(self):
        """The live tqdm bar while it is drawn, else ``None``."""
        return self._bar

    def _open_bar(self):
        from tqdm import tqdm  # imported only when a bar is drawn

        self._bar = tqdm(total=self.total_bytes or None, unit="B", unit_scale=True, unit_divisor=1024,
                         file=self.stream, desc=self.desc, dynamic_ncols=True, leave=True, smoothing=0.1)
        return self._bar

    def say(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)  # above the bar, which is redrawn below
        else:
            print(text, file=self.stream, flush=True)

    def advance(self, nbytes: int, label: str = "") -> None:
        """One step of ``nbytes`` input bytes (a tensor, a shard...): the bar moves, or one plain line."""
        self.index += 1
        self.bytes_done += nbytes
        if self.quiet:
            return
        if self.live:
            self._step_bar(nbytes, label)
            return
        done = ""
        if self.total_bytes:
            done = f" {100.0 * self.bytes_done / self.total_bytes:5.1f}% of {_size(self.total_bytes)} "
        self.say(f"[{self.index:4d}/{self.total:4d}]{done} {label}")

    def tensor(self, name: str, ne, src: str, dst: str, before: int, after: int, seconds: float) -> None:
        if self.live or self.quiet:
            self.advance(before, f"{name} {src}->{dst}" if src != dst else name)
            return
        shape = ", ".join(str(d) for d in ne)
        if src != dst:
            rate = before / 2**20 / seconds if seconds > 0 else float("inf")
            what = (f"{src:>6s} -> {dst:<6s} {before / 2**20:8.2f} MiB -> {after / 2**20:8.2f} MiB "
                    f"({rate:7.1f} MiB/s)")
        else:
            what = f"{src:>6s}  (copy)  {before / 2**20:8.3f} MiB"
        self.advance(before, f"{name:<36s} - [{shape:>18s}], {what}")

    def _step_bar(self, nbytes: int, label: str) -> None:
        bar = self._bar if self._bar is not None else self._open_bar()
        bar.set_postfix_str(label, refresh=False)
        bar.update(nbytes)
        if self.index >= self.total:
            self.close()

    def close(self) -> None:
        """Finish the bar (idempotent); plain and quiet modes have nothing to close."""
        self.live = False  # steps after the end are plain lines, never a second bar
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.set_postfix_str("", refresh=False)
            bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self, before: int, after: int, n_elements: int, n_fallback: int = 0) -> None:
        self.close()
        elapsed = time.perf_counter() - self.start
        ne = max(n_elements, 1)
        self.say(f"model size  = {before / 2**20:8.2f} MiB ({before * 8.0 / ne:.2f} BPW)")
        self.say(f"quant size  = {after / 2**20:8.2f} MiB ({after * 8.0 / ne:.2f} BPW)")
        if n_fallback:
            self.say(f"WARNING: {n_fallback} of {self.total} tensor(s) required fallback quantization")
        rate = before / 2**20 / elapsed if elapsed > 0 else float("inf")
        self.say(f"time        = {elapsed:8.2f} s ({rate:.1f} MiB/s of input)")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"

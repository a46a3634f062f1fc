"""A tiny progress printer for whole-model jobs (quantize, convert): one line per tensor and a summary.

Each line names the tensor, its types and sizes, the rate of that tensor, and — when the job's total input
size is known — how much of the whole input is done::

    [  27/  39]  62.1% of 5.51 MiB  blk.2.ffn_down.weight  - [  512,  256],  F16 -> Q6_K  0.25 MiB -> 0.10 MiB (135.1 MiB/s)

>>> p = Progress(total=2, quiet=True, total_bytes=2 * 1048576)
>>> p.tensor("output.weight", (256, 1024), "F32", "Q6_K", 1048576, 215040, 0.01)
>>> p.bytes_done
1048576
"""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    def __init__(self, total: int, *, quiet: bool = False, stream=None, total_bytes: Optional[int] = None):
        self.total = total
        self.total_bytes = total_bytes
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.index = 0
        self.bytes_done = 0
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def tensor(self, name: str, ne, src: str, dst: str, before: int, after: int, seconds: float) -> None:
        self.index += 1
        self.bytes_done += before
        if self.quiet:
            return
        shape = ", ".join(str(d) for d in ne)
        if src != dst:
            rate = before / 2**20 / seconds if seconds > 0 else float("inf")
            what = (f"{src:>6s} -> {dst:<6s} {before / 2**20:8.2f} MiB -> {after / 2**20:8.2f} MiB "
                    f"({rate:7.1f} MiB/s)")
        else:
            what = f"{src:>6s}  (copy)  {before / 2**20:8.3f} MiB"
        done = ""
        if self.total_bytes:
            done = f" {100.0 * self.bytes_done / self.total_bytes:5.1f}% of {_size(self.total_bytes)} "
        self.say(f"[{self.index:4d}/{self.total:4d}]{done} {name:<36s} - [{shape:>18s}], {what}")

    def summary(self, before: int, after: int, n_elements: int, n_fallback: int = 0) -> None:
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

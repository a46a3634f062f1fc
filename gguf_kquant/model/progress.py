"""A tiny progress printer for whole-model jobs (quantize, convert): one line per tensor and a summary.

>>> p = Progress(total=2, quiet=True)
>>> p.tensor("output.weight", (256, 1024), "F32", "Q6_K", 1048576, 215040, 0.01)
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, *, quiet: bool = False, stream=None):
        self.total = total
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.index = 0
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def tensor(self, name: str, ne, src: str, dst: str, before: int, after: int, seconds: float) -> None:
        self.index += 1
        if self.quiet:
            return
        shape = ", ".join(str(d) for d in ne)
        if src != dst:
            rate = before / 2**20 / seconds if seconds > 0 else float("inf")
            what = (f"{src:>6s} -> {dst:<6s} {before / 2**20:8.2f} MiB -> {after / 2**20:8.2f} MiB "
                    f"({rate:7.1f} MiB/s)")
        else:
            what = f"{src:>6s}  (copy)  {before / 2**20:8.3f} MiB"
        self.say(f"[{self.index:4d}/{self.total:4d}] {name:<36s} - [{shape:>18s}], {what}")

    def summary(self, before: int, after: int, n_elements: int, n_fallback: int = 0) -> None:
        elapsed = time.perf_counter() - self.start
        ne = max(n_elements, 1)
        self.say(f"model size  = {before / 2**20:8.2f} MiB ({before * 8.0 / ne:.2f} BPW)")
        self.say(f"quant size  = {after / 2**20:8.2f} MiB ({after * 8.0 / ne:.2f} BPW)")
        if n_fallback:
            self.say(f"WARNING: {n_fallback} of {self.total} tensor(s) required fallback quantization")
        self.say(f"time        = {elapsed:8.2f} s")

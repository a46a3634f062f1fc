"""Progress output: a live tqdm bar on a terminal, one line per tensor elsewhere, nothing with quiet."""

import io
import re

import gguf_kquant
from gguf_kquant.model.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _tensor_lines(text):
    return [ln for ln in text.splitlines() if ln.startswith("[")]


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(3, stream=out, total_bytes=3 * 2**20)
    assert not p.live
    for i in range(3):
        p.tensor(f"blk.{i}.w", (256, 4), "F32", "Q8_0", 2**20, 2**18, 0.01)
    lines = _tensor_lines(out.getvalue())
    assert len(lines) == 3 and "100.0% of 3.00 MiB" in lines[-1] and "F32 -> Q8_0" in lines[-1]
    assert "\r" not in out.getvalue()


def test_one_live_bar_on_a_terminal():
    out = _Terminal()
    p = Progress(4, stream=out, total_bytes=4 * 2**20, desc="quantize")
    assert p.live and p.bar is None  # drawn from the first step on
    p.say("WARNING: something")  # printed above the bar
    for i in range(4):
        p.tensor(f"blk.{i}.w", (256, 4), "F16", "Q4_K", 2**20, 2**18, 0.01)
        assert (p.bar is not None) == (i < 3)
    assert p.bar is None  # closed after the last tensor
    text = out.getvalue()
    assert "WARNING: something\n" in text
    assert not _tensor_lines(text)  # no per-tensor lines
    final = text.rstrip("\n").split("\r")[-1]
    assert final.startswith("quantize: 100%") and "4.00M/4.00M " in final  # bytes done/total
    assert re.search(r"B/s", final)  # a rate
    assert p.bytes_done == 4 * 2**20


def test_quiet_prints_nothing_even_on_a_terminal():
    out = _Terminal()
    p = Progress(2, stream=out, quiet=True, total_bytes=10)
    p.say("x")
    p.advance(5, "a")
    p.summary(10, 5, 10)
    assert out.getvalue() == "" and p.bar is None and p.bytes_done == 5


def test_advance_for_other_tools():
    out = io.StringIO()
    with Progress(2, stream=out, total_bytes=300) as p:
        p.advance(100, "shard 1")
        p.advance(200, "shard 2")
    assert _tensor_lines(out.getvalue()) == ["[   1/   2]  33.3% of 0.00 MiB  shard 1",
                                             "[   2/   2] 100.0% of 0.00 MiB  shard 2"]


def test_quantize_model_draws_one_bar_on_a_terminal(example_model, tmp_path):
    out = _Terminal()
    gguf_kquant.quantize_model(example_model, tmp_path / "q.gguf", "Q8_0", quiet=False, stream=out)
    text = out.getvalue()
    assert not _tensor_lines(text)
    bar_lines = [ln for ln in text.split("\n") if "%|" in ln]
    assert len(bar_lines) == 1  # one bar, redrawn in place with \r
    assert bar_lines[0].split("\r")[-1].startswith("100%")
    assert "model size" in text and "time" in text


def test_dry_run_draws_no_bar(example_model, tmp_path):
    out = _Terminal()
    gguf_kquant.quantize_model(example_model, tmp_path / "q.gguf", "Q4_K_M", dry_run=True, quiet=False, stream=out)
    text = out.getvalue()
    assert "%|" not in text and "\r" not in text and "blk.0.attn_q.weight" in text


def test_convert_draws_one_bar_on_a_terminal(tmp_path, monkeypatch):
    from test_convert_helpers import make_model

    d = tmp_path / "llama"
    make_model("llama", d, hidden_size=32)
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    gguf_kquant.convert_hf(d, tmp_path / "o.gguf", "F16", quiet=False)
    text = err.getvalue()
    bar_lines = [ln for ln in text.split("\n") if "%|" in ln]
    assert len(bar_lines) == 1 and bar_lines[0].split("\r")[-1].startswith("100%")  # the total is known
    assert not _tensor_lines(text) and "converted" in text

"""Second oracle: our conversion equals llama.cpp's own convert_hf_to_gguf.py on the same checkpoint —
same metadata keys, types and values, same tensor names, shapes, types and bytes, in the same order."""

from __future__ import annotations

import pytest

import gguf_kquant
from test_convert_helpers import assert_same_gguf, make_model, vendor_convert, vendor_convert_jobs

# tokenizer.ggml.pre: our trained tokenizers are not in llama.cpp's hash table; convert_hf_to_gguf.py is given
# the name our converter infers from the split regex (its hash lookup would refuse them).
PRE = {"llama": "llama-bpe", "mistral": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "gemma3": "llama-bpe",
       "bert": "default"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("vendor")


def _check(model_dir, root, name, ftype, outtype, pre):
    ours = root / f"{name}.ours.gguf"
    theirs = root / f"{name}.theirs.gguf"
    gguf_kquant.convert_hf(model_dir, ours, ftype, overwrite=True)
    vendor_convert(model_dir, theirs, outtype, pre=pre)
    return assert_same_gguf(ours, theirs)


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "bert")
OUTTYPES = ("F32", "F16", "BF16", "Q8_0")


@pytest.fixture(scope="module")
def vendor_files(root):
    """Each architecture's checkpoint and convert_hf_to_gguf.py's file of it at every outtype (one process)."""
    for i, arch in enumerate(ARCHS):
        make_model(arch, root / arch, seed=3 + 10 * i)
    vendor_convert_jobs([(root / a, root / f"{a}.{t}.theirs.gguf", t.lower(), PRE[a])
                         for a in ARCHS for t in OUTTYPES])
    return root


@pytest.mark.parametrize("ftype", OUTTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_convert_hf_to_gguf(vendor_files, arch, ftype):
    ours = vendor_files / f"{arch}.{ftype}.ours.gguf"
    gguf_kquant.convert_hf(vendor_files / arch, ours, ftype)
    meta = assert_same_gguf(ours, vendor_files / f"{arch}.{ftype}.theirs.gguf")
    assert meta["tokenizer.ggml.pre"][2] == PRE[arch]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_match(root, dtype):
    d = root / f"gemma3-{dtype}"
    make_model("gemma3", d, seed=5, dtype=dtype)  # gemma3 adds 1 to its norms: in the source dtype
    _check(d, root, f"gemma3-{dtype}", "F16", "f16", PRE["gemma3"])


def test_sentence_transformers_pooling_matches(root):
    import json

    d = root / "bert-mean"
    make_model("bert", d, seed=6)
    (d / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "x.Transformer"},
                                                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "x.Pooling"}]))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    meta = _check(d, root, "bert-mean", "F16", "f16", PRE["bert"])
    assert meta["bert.pooling_type"][2] == 1  # MEAN


def test_llama3_rope_factors_match(root):
    import json

    d = root / "llama3-rope"
    make_model("llama", d, seed=10)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                              "rope_theta": 500000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    _check(d, root, "llama3-rope", "F16", "f16", PRE["llama"])
    import gguf_kquant

    with gguf_kquant.open(root / "llama3-rope.ours.gguf") as f:
        assert f.tensors[0].name == "rope_freqs.weight"

"""Convert a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) to a GGUF LoRA adapter.

>>> import gguf_kquant
>>> gguf_kquant.convert_lora("my-adapter/", "my-adapter-f16.gguf", base="models/tiny-llama", outtype="F16")
...                                                                                  # doctest: +SKIP
[PosixPath('my-adapter-f16.gguf')]

The output equals llama.cpp's ``convert_lora_to_gguf.py``: for each adapted weight ``W`` (out x in) of the
base, ``<gguf name of W>.lora_a`` (rank x in; the token embeddings' transposed) and ``.lora_b`` (out x rank),
sorted by the adapter's tensor names; norms some tools add to an adapter (mergekit-extract-lora) come first, as that script yields them
while it pairs A with B.  Metadata: ``general.type = adapter``, ``adapter.type = lora``, the adapter's
model card, ``adapter.lora.alpha`` — no vocabulary, no hyper-parameters (llama.cpp takes those from the base).
Only the base's ``config.json`` is read, as by that script (its weights, when present, check the shapes).

An architecture's tensor transforms must act on rows alone to carry over to ``lora_b`` (``W = B @ A``: a row
permutation of ``W`` is that permutation of ``B``'s rows); :data:`LORA_ARCHITECTURES` lists those verified.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import gguf
import numpy as np

from ..errors import ConversionError
from ..safeio import check_outputs
from ..types import GGMLType
from .base import FLOAT32_MAX, FLOAT_DTYPES, FLOAT_FTYPES, REGISTRY, PlannedTensor, _bid, load_config, load_model_card
from .safetensors import SafetensorsFile, open_checkpoint, read_json

__all__ = ["convert_lora", "LORA_ARCHITECTURES"]

# Converters whose transforms are row permutations only (llama's q/k un-permutation; qwen: none).
LORA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class _Shape:  # what Converter.plan_tensor reads of a checkpoint tensor: the base weight's shape
    def __init__(self, shape):
        self.shape = tuple(shape)


def _base_name(name: str) -> str:
    """convert_lora_to_gguf.py's get_base_tensor_name: the base model's tensor this adapter tensor adapts."""
    name = name.replace("base_model.model.", "")
    for part in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"):
        name = name.replace(part, ".weight")
    return name


def _read_adapter(adapter_dir: Path):
    """(adapter_config.json as a dict, the adapter's safetensors file), checked."""
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{cfg_path}: missing (is this a PEFT LoRA adapter directory?)")
    lcfg = read_json(cfg_path)
    if lcfg.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{cfg_path}: peft_type {lcfg['peft_type']!r} is not LORA")
    alpha = lcfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not abs(alpha) <= FLOAT32_MAX:
        raise ConversionError(f"{cfg_path}: key 'lora_alpha' must be a number a float32 holds, not {alpha!r:.40}")
    for key in ("use_dora", "invocation_string"):  # DoRA magnitudes; aLoRA strings need the base's tokenizer
        if lcfg.get(key):
            raise ConversionError(f"{cfg_path}: {key} adapters are not supported")
    tokens = lcfg.get("alora_invocation_tokens")
    if tokens is not None and not (isinstance(tokens, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in tokens)):
        raise ConversionError(f"{cfg_path}: key 'alora_invocation_tokens' must be a list of token ids")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConversionError(f"{weights}: missing (only safetensors adapters are supported, not "
                              f"adapter_model.bin)")
    return lcfg, SafetensorsFile(weights)


def _base_shapes(base_dir: Path, h: dict) -> dict:
    """Shape of each adaptable base weight, by name suffix: the base checkpoint's when present, else what
    config.json implies for the projections every supported architecture has."""
    if any(base_dir.glob("*.safetensors")):
        return {name: tuple(t.shape) for name, t in open_checkpoint(base_dir).items()}
    n_embd, n_head = h["hidden_size"], h["num_attention_heads"]
    n_kv = h.get("num_key_value_heads", n_head)
    head_dim = h.get("head_dim") or n_embd // n_head
    n_ff = h.get("intermediate_size")
    shapes = {"q_proj.weight": (n_head * head_dim, n_embd), "k_proj.weight": (n_kv * head_dim, n_embd),
              "v_proj.weight": (n_kv * head_dim, n_embd), "o_proj.weight": (n_embd, n_head * head_dim),
              "lm_head.weight": (h["vocab_size"], n_embd), "embed_tokens.weight": (h["vocab_size"], n_embd)}
    if n_ff is not None:
        shapes.update({"gate_proj.weight": (n_ff, n_embd), "up_proj.weight": (n_ff, n_embd),
                       "down_proj.weight": (n_embd, n_ff)})
    return shapes


def _expected(shapes: dict, name: str):
    if name in shapes:
        return shapes[name]
    return next((s for suffix, s in shapes.items() if name.endswith("." + suffix)), None)


def _plan(conv, ad: SafetensorsFile, shapes: dict, out_type: GGMLType) -> list:
    """The output tensors in convert_lora_to_gguf.py's order: norms as met, then (lora_a, lora_b) per weight."""
    path = ad.path
    norms, pairs = [], {}
    for src in sorted(ad.tensors):
        t = ad.tensors[src]
        if t.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"{path}: tensor {src!r} has dtype {t.dtype}; only F32, F16 and BF16 are supported")
        is_a = ".lora_A.weight" in src or ".lora_embedding_A" in src
        is_b = ".lora_B.weight" in src or ".lora_embedding_B" in src
        name = conv.filter_name(_base_name(src))
        if name is None:
            continue
        if not (is_a or is_b):
            if ".base_layer.weight" in src:
                continue
            if ("_layernorm" in src or ".norm" in src) and len(t.shape) == 1:
                norms.append((name, t))
                continue
            raise ConversionError(f"{path}: tensor {src!r} is not a lora_A or lora_B weight (full weights such as "
                                  f"embeddings or modules_to_save are not supported in a LoRA GGUF)")
        pairs.setdefault(name, {})["A" if is_a else "B"] = t
    planned = []
    for name, t in norms:
        planned += [PlannedTensor(n, tuple(s), t, fn, GGMLType.F32) for n, s, fn in conv.plan_tensor(name, t, None)]
    tied = conv.hparams.get("tie_word_embeddings", False)
    for name, ab in pairs.items():
        if len(ab) != 2:
            have, miss = ("A", "B") if "A" in ab else ("B", "A")
            raise ConversionError(f"{path}: tensor {name!r} has lora_{have} but no lora_{miss}")
        a, b = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise ConversionError(f"{path}: tensor {name!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                                  f"are not (rank, in) and (out, rank) matrices of one rank")
        if name == "lm_head.weight" and tied:
            raise ConversionError(f"{path}: tensor {name!r} adapts lm_head, but the base ties it to the token "
                                  f"embeddings (tie_word_embeddings), which llama.cpp keeps as one tensor")
        outs = list(conv.plan_tensor(name, _Shape((b.shape[0], a.shape[1])), _bid(name)))
        if len(outs) != 1:
            raise ConversionError(f"{path}: tensor {name!r}: the base weight is split on conversion; not supported")
        new_name, _, fn = outs[0]
        # an embedding's delta is (B @ A)^T: A (rank x n_vocab), B (n_embd x rank); llama.cpp gathers token
        # rows of lora_a, so the script writes A transposed (llm_build_inp_embd)
        embd = new_name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
        want = _expected(shapes, name)
        got = (a.shape[1], b.shape[0]) if embd else (b.shape[0], a.shape[1])
        if want is None:
            raise ConversionError(f"{path}: tensor {name!r} adapts no weight of the base model")
        if tuple(want) != got:
            raise ConversionError(f"{path}: tensor {name!r} is a LoRA of a {list(got)} weight but the base's "
                                  f"weight is {list(want)}")
        a_out = ((a.shape[1], a.shape[0]), lambda x: np.ascontiguousarray(x.T)) if embd else (a.shape, None)
        for suffix, t, (shape, make) in ((".lora_a", a, a_out), (".lora_b", b, (b.shape, fn))):
            qtype = out_type
            if qtype == GGMLType.Q8_0 and shape[-1] % 32:
                qtype = GGMLType.F16  # convert_lora_to_gguf.py falls back to F16 when Q8_0 does not fit (ranks < 32)
            planned.append(PlannedTensor(new_name + suffix, tuple(shape), t, make, qtype))
    if not pairs:
        raise ConversionError(f"{path}: no lora_A/lora_B tensors")
    return planned


def _total_parameters(planned: list) -> int:
    """gguf-py's get_total_parameter_count for an adapter: each pair counts as its (out x in) weight, and the
    total is negated (its sign for "not exact")."""
    total = 0
    for p in planned:
        if p.name.endswith(".lora_a"):
            rank_in = p.shape[-1]
        elif p.name.endswith(".lora_b"):
            total += math.prod(p.shape[:-1]) * rank_in
        else:
            total += math.prod(p.shape)
    return -total


def _metadata(conv, adapter_dir: Path, lcfg: dict, planned: list) -> list:
    """The keys convert_lora_to_gguf.py writes, typed and ordered as it writes them."""
    from . import _kv_from_gguf_writer

    w = gguf.GGUFWriter(path=None, arch=conv.arch_name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    meta = load_model_card(adapter_dir, None, _total_parameters(planned))
    if meta.name is None:
        meta.name = conv.dir.name  # the script falls back to the base model's folder name
    meta.set_gguf_meta_model(w)
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lcfg["lora_alpha"]))
    if tokens := lcfg.get("alora_invocation_tokens"):
        w.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, tokens, gguf.GGUFValueType.ARRAY,
                        gguf.GGUFValueType.UINT32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return _kv_from_gguf_writer(w)


def convert_lora(adapter_dir, dst, *, base, outtype: str = "F32", overwrite: bool = False,
                 quiet: bool = True, progress=None) -> list:
    """Convert the PEFT LoRA adapter in ``adapter_dir`` for the Hugging Face model in ``base`` to ``dst``.

    ``outtype``: ``F32`` (default, as convert_lora_to_gguf.py), ``F16``, ``BF16`` or ``Q8_0``.  ``base`` needs
    its ``config.json`` (weights, if there, check the adapter's shapes).  Bad input — no adapter_config.json,
    an unsupported architecture, ranks or shapes that disagree with the base, an output that is an input —
    raises :class:`~gguf_kquant.errors.ConversionError` before anything is written.  Returns the paths written.

    >>> convert_lora("adapter/", "adapter-f16.gguf", base="base-model/", outtype="F16")    # doctest: +SKIP
    """
    from . import _hparams_defaults, _producer

    t0 = time.perf_counter()
    adapter_dir, base_dir, dst = Path(adapter_dir), Path(base), Path(dst)
    for d in (adapter_dir, base_dir):
        if not d.is_dir():
            raise ConversionError(f"{d}: not a directory")
    name = str(outtype).upper()
    if name not in FLOAT_FTYPES:
        raise ConversionError(f"LoRA output type {outtype!r}: use one of {', '.join(FLOAT_FTYPES)}")
    inputs = ([p for p in adapter_dir.iterdir() if p.is_file() and not p.name.endswith(".gguf")]
              + [p for p in base_dir.iterdir() if p.is_file() and not p.name.endswith(".gguf")])
    check_outputs([dst], inputs, overwrite=overwrite, error=ConversionError)

    lcfg, ad = _read_adapter(adapter_dir)
    cfg = load_config(base_dir)
    hf_arch = (cfg.get("architectures") or [None])[0]
    if hf_arch not in LORA_ARCHITECTURES:
        raise ConversionError(f"{base_dir / 'config.json'}: LoRA adapters of architecture {hf_arch!r} are not "
                              f"supported; supported: {', '.join(LORA_ARCHITECTURES)}")
    hparams = _hparams_defaults(hf_arch, cfg)
    conv = REGISTRY[hf_arch](base_dir, hparams, None)
    planned = _plan(conv, ad, _base_shapes(base_dir, hparams), FLOAT_FTYPES[name][1])
    metadata = _metadata(conv, adapter_dir, lcfg, planned)

    from ..container.writer import GGUFWriter

    if progress is None:
        from ..model.progress import Progress

        progress = Progress(len(planned), quiet=quiet, total_bytes=sum(p.source.nbytes for p in planned))
    w = GGUFWriter(dst, metadata, inputs=inputs, overwrite=overwrite)
    for p in planned:
        w.add_tensor(p.name, _producer(p, None, progress), shape=p.shape, ggml_type=p.qtype.name)
    check_outputs(w.output_paths(), inputs, overwrite=overwrite, error=ConversionError)
    paths = w.close()
    if hasattr(progress, "say"):
        progress.say(f"converted {len(planned)} LoRA tensors to {', '.join(map(str, paths))} "
                     f"in {time.perf_counter() - t0:.1f} s")
    return paths

"""``gguf-kquant convert-lora ADAPTER_DIR DST --base BASE_DIR`` — wiring only; the work is in
:func:`gguf_kquant.convert.lora.convert_lora`."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("adapter_dir", help="PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("dst", help="output GGUF path")
    p.add_argument("--base", required=True, metavar="BASE_DIR",
                   help="the base model's Hugging Face directory (config.json; weights optional)")
    p.add_argument("--outtype", "--type", dest="outtype", default="F32", type=str.upper,
                   choices=["F32", "F16", "BF16", "Q8_0"], help="tensor type (default F32, as convert_lora_to_gguf.py)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def run(args) -> int:
    from .lora import convert_lora

    paths = convert_lora(args.adapter_dir, args.dst, base=args.base, outtype=args.outtype,
                         overwrite=args.overwrite, quiet=args.quiet)
    if not args.quiet:
        for p in paths:
            print(p)
    return 0

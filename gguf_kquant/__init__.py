"""gguf_kquant: read, write, inspect and quantize GGUF files, bit-for-bit faithful to llama.cpp."""

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
    raise AttributeError(f"module 'gguf_kquant' has no attribute {name!r}")

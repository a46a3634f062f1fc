"""The one exception family of gguf_kquant.

Every failure the library detects raises a subclass of :class:`GGUFError`, which is a ``ValueError`` so that
callers who already catch ``ValueError`` keep working.  Messages name the file, tensor, offset, row or
column involved, so a user can find the problem without a debugger.
"""

from __future__ import annotations


class GGUFError(ValueError):
    """Base class of every error gguf_kquant raises on bad input."""


# --- container (reader / writer) -------------------------------------------------------------------
class BadMagicError(GGUFError):
    """The file does not start with the GGUF magic."""


class UnsupportedVersionError(GGUFError):
    """A GGUF version other than 2 or 3."""


class TruncatedFileError(GGUFError):
    """The file ends before a field or tensor it declares."""


class LimitExceededError(GGUFError):
    """A count, length or size is beyond what llama.cpp accepts (hostile or corrupt header)."""


class MalformedFileError(GGUFError):
    """The header is structurally invalid: bad value type, duplicate key, misaligned offset, overlap..."""


class DuplicateError(MalformedFileError):
    """A metadata key or tensor name occurs twice."""


class SplitError(GGUFError):
    """A split model's shards are missing or disagree."""


class WriteError(GGUFError):
    """What the writer was asked to write is something llama.cpp would reject."""


# --- files --------------------------------------------------------------------------------------------
class GGUFIOError(GGUFError, OSError):
    """A file could not be opened, read or written: missing, a directory or FIFO, no permission, disk full,
    file too large.  Also an ``OSError`` whose ``errno``/``strerror``/``filename`` are those of the cause;
    the message always names the file."""

    def __init__(self, message: str, *, errno=None, strerror=None, filename=None):
        super().__init__(message)
        self.errno, self.strerror, self.filename = errno, strerror, filename

    def __str__(self):
        return str(self.args[0]) if self.args else ""

    @classmethod
    def wrap(cls, path, exc: OSError, doing: str = "cannot read") -> "GGUFIOError":
        """``path: cannot read: [Errno 28] No space left on device`` from an ``OSError``.

        >>> raise GGUFIOError.wrap("m.gguf", exc, "cannot open")                # doctest: +SKIP
        """
        why = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None else str(exc)
        return cls(f"{path}: {doing}: {why}", errno=exc.errno, strerror=exc.strerror, filename=str(path))


class FileChangedError(GGUFIOError):
    """A file being read shrank or was replaced while it was open (its mapped bytes are gone)."""


class MetadataTypeError(GGUFError):
    """A metadata key llama.cpp reads with a fixed type holds another (``block_count`` as a STRING...)."""


class InvalidArgumentError(GGUFError):
    """An argument of the wrong type or out of range: ``threads=0``, ``split_max_tensors="abc"``..."""


# --- types and codecs ------------------------------------------------------------------------------
class UnknownTypeError(GGUFError):
    """A ggml type name or id we do not know, or one we have no codec for."""


class ShapeError(GGUFError):
    """A shape that does not fit the type: row length not a multiple of the block size, wrong rank..."""


class BadTensorDataError(GGUFError):
    """Tensor values that cannot be encoded: NaN/Inf, a scale that overflows fp16, wrong byte count."""


class ImatrixError(GGUFError):
    """An importance matrix of the wrong length, with non-finite values, or missing where required."""


# --- whole-model operations ------------------------------------------------------------------------
class QuantizeError(GGUFError):
    """A whole-model quantization request that cannot be carried out (unknown mix, requantize...)."""


class ConversionError(GGUFError):
    """A Hugging Face checkpoint that cannot be converted."""

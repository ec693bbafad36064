"""ArrowQuant V2: quantize diffusion models to real INT2/INT4/INT8 weights in Apache Arrow/Parquet."""
from ._version import __version__  # noqa: F401

from .errors import (  # noqa: F401
    ArrowQuantError,
    ClusterError,
    ConfigurationError,
    ExportError,
    ModelFormatError,
    ModelNotFoundError,
    MultiModelError,
    OutputError,
    QuantizationError,
    StoreFormatError,
    ValidationError,
)
from .config import DiffusionQuantConfig  # noqa: F401,E402
from .api import ArrowQuantV2  # noqa: F401,E402
from .store import load_quantized, QuantizedModel  # noqa: F401,E402
from . import ggml_types  # noqa: F401,E402 - registers ggml's block types (q8_0, q4_k, ...) with encodings

__all__ = [
    "ArrowQuantV2", "DiffusionQuantConfig", "load_quantized", "QuantizedModel",
    "ArrowQuantError", "ConfigurationError", "QuantizationError", "ValidationError",
    "ModelNotFoundError", "ModelFormatError", "OutputError", "MultiModelError", "ExportError", "ClusterError",
    "StoreFormatError",
]


def __getattr__(name):  # the async API pulls in asyncio machinery; load it on first use
    if name == "AsyncArrowQuantV2":
        from .aio import AsyncArrowQuantV2

        return AsyncArrowQuantV2
    raise AttributeError(f"module 'arrow_quant_v2' has no attribute {name!r}")

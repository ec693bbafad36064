"""ArrowQuant V2: quantize diffusion models to real INT2/INT4/INT8 weights in Apache Arrow/Parquet."""
__version__ = "0.1.0"

from .errors import (  # noqa: F401
    ArrowQuantError,
    ConfigurationError,
    ModelFormatError,
    ModelNotFoundError,
    MultiModelError,
    OutputError,
    QuantizationError,
    ValidationError,
)

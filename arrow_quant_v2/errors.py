"""The typed errors of ArrowQuant V2.

Every error a user can trigger is one of these, and its message names the file,
tensor or config field concerned and, where there is one, the fix.
"""


class ArrowQuantError(Exception):
    """Base of every error raised by arrow_quant_v2."""


class ConfigurationError(ArrowQuantError, ValueError):
    """A config field has a value outside what is allowed (the message names field, value and choices)."""


class QuantizationError(ArrowQuantError):
    """Quantizing a model failed (bad input, unreadable file, output problem, accuracy miss under fail_fast)."""


class ModelNotFoundError(QuantizationError, FileNotFoundError):
    """The model path does not exist or holds no safetensors weights."""


class ModelFormatError(QuantizationError):
    """A safetensors file is damaged: truncated, bad header, bad offsets, unsupported dtype."""


class OutputError(QuantizationError):
    """The output path cannot be used: it exists, lies inside the input, is unwritable, or the disk is full."""


class ClusterError(QuantizationError):
    """The Dask cluster could not run a job: no scheduler at the address, the scheduler went
    away mid-job, or workers kept dying on it (the message names the scheduler)."""


class ValidationError(ArrowQuantError):
    """Validating a quantized store against its source failed (missing store, mismatched source, corrupt data)."""


class StoreFormatError(ValidationError):
    """A quantized store breaks the format: a bad manifest field, an unsafe file name, a row whose
    blobs, range or sizes do not match its encoding, a shard whose checksum differs.

    ``store``, ``tensor`` (None for store-level problems) and ``field`` say where; the message
    names all three. See docs/format.md, "Validation".
    """

    def __init__(self, store, field: str, problem: str, tensor=None):
        self.store, self.field, self.tensor = str(store), field, tensor
        where = f"{store}: " + (f"tensor {tensor!r}: " if tensor is not None else "")
        super().__init__(f"{where}{field}: {problem}")


class MultiModelError(QuantizationError):
    """Some models of a multi-model run failed.

    ``failures`` lists ``(index, model_path, exception)`` for each failed model and
    ``results`` holds one entry per model: its result dict, or the exception it raised.
    """

    def __init__(self, message, failures, results):
        super().__init__(message)
        self.failures = failures
        self.results = results


class ExportError(ArrowQuantError):
    """A store cannot be exported to the asked format without changing its weights (the message names
    the tensors and the fix, e.g. quantize with ``target_runtime="gguf"``), or the model folder lacks
    what the target runtime needs."""

"""Numba kernels, one module per role.

* :mod:`~arrow_quant_v2.kernels.packing`: the LSB-first code bitstream (format).
* :mod:`~arrow_quant_v2.kernels.decode`: the format's decoders and the grids of the
  non-uniform encoding: all a reader needs besides packing.
* :mod:`~arrow_quant_v2.kernels.rounding`: the encoders' exact last step: round to codes with
  parameters exactly as stored and fuse the error statistics of what decoding will produce.
* :mod:`~arrow_quant_v2.kernels.search`: encoder-only parameter searches (scales, clipping,
  scale codes). They only *propose* parameters, so they may use relaxed floating point.
* :mod:`~arrow_quant_v2.kernels.solver`: calibration's error-compensated rounding (GPTQ-class):
  codes on an encoding's fixed grid that lower the layer's output error on its inputs.
* :mod:`~arrow_quant_v2.kernels.ggml_decode` and :mod:`~arrow_quant_v2.kernels.ggml_search`: the
  same two roles for ggml's block types (``ggml_types``): decoders bit-identical to gguf-py's
  reference (what a reader runs), and the encoders' searches with the block packers.

Every kernel is serial, ``nogil=True`` and ``cache=True``. Parallelism comes from calling
them from several Python threads on disjoint chunks of rows (the engine's kernel pool) and
from several jobs at once. We deliberately avoid ``parallel=True``: numba's default
``workqueue`` threading layer aborts when two Python threads launch parallel kernels
concurrently, which is exactly what the async API does.

Layouts (the one place they are written down):

* Codes are an LSB-first bitstream over the chunk in row-major order: code ``i``
  occupies bits ``[i*b, (i+1)*b)`` of the stream, bit ``k`` of the stream is bit
  ``k % 8`` of byte ``k // 8``. At 2 bits that is 4 codes per byte, at 4 bits 2.
  The stream is padded with zero bits to a whole byte.
* Groups run along the last axis: row ``r`` has ``ceil(cols / g)`` groups, the last
  one possibly shorter; group parameters are stored row-major ``(rows, groups)``.
* The grids of the non-uniform encoding (``decode.GRIDS``) are format too; each encoding's
  docstring in ``encodings`` states how its blobs use these pieces.

Numba's cache (``cache=True``) is invalidated by a change of the kernel's own file only. So a
kernel calls compiled helpers of its own module alone; the one thing shared across modules is
the format's constants: the grids, which are frozen into the kernels that round to them and never
change in place (a new grid is a new encoding), and ggml's half-precision conversion (IEEE binary16).
"""

#: Exact kernels: what they compute is what the store holds.
JIT = dict(nogil=True, cache=True, fastmath=False)
#: Search kernels only propose parameters, so re-associated sums (vectorised) are fine.
SEARCH = dict(nogil=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp", "nnan"})
#: Final rounding kernels: the dequantized value ``y`` is one exact float32 product,
#: as in dequantization; only the float64 statistics sums may be re-associated
#: (so they vectorise). No "contract": it could fuse the product into an FMA.
FINAL = dict(nogil=True, cache=True, fastmath={"reassoc"})
#: Helpers inlined into the kernels of their own module.
INLINE = dict(nogil=True, cache=True, inline="always")

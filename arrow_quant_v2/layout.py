"""How a tensor is cut into store rows: a leaf that the engine (which writes the rows), the budget
(which prices them) and the store validator all read, so they can never disagree.

A store row holds a chunk: a block of consecutive rows of the tensor's 2-D view (first axis by
the product of the rest). The cut depends only on the tensor's shape, never on the thread count
or the machine, so the same inputs always give the same store bytes (resume relies on it).
"""
from __future__ import annotations

import math
from typing import List, Tuple

#: The ``encoding`` of a row stored losslessly: ``codes`` holds the source bytes in its dtype.
RAW = "raw"

#: Largest chunk, in elements (32 MiB of float32): bounds memory and cancel latency.
CHUNK_ELEMENTS = 8 << 20
#: Large tensors are cut in this many chunks (so threads share them) but never into
#: chunks smaller than MIN_SPLIT_ELEMENTS.
SPLIT_WAYS = 8
MIN_SPLIT_ELEMENTS = 1 << 18


def chunk_ranges(rows: int, cols: int) -> List[Tuple[int, int]]:
    """The ``[row_start, row_end)`` ranges of a ``(rows, cols)`` 2-D view that become its store rows.

    An empty tensor still gets one (empty) row, so every tensor is in the store.
    """
    numel = rows * cols
    if numel == 0:
        return [(0, rows)]
    per = min(CHUNK_ELEMENTS, max(MIN_SPLIT_ELEMENTS, math.ceil(numel / SPLIT_WAYS)))
    step = max(1, per // max(cols, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]

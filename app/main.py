"""The ArrowQuant V2 app: ``panel serve app`` (or ``arrow-quant serve``, which binds to localhost).

Composes the views of :mod:`arrow_quant_v2.ui`; all state and behaviour live there.
Environment: ARROW_QUANT_MODEL_ROOTS (model folders, os.pathsep-separated),
ARROW_QUANT_OUTPUT_ROOT (where stores go), ARROW_QUANT_CACHE (sample models),
ARROW_QUANT_ALLOW_REMOTE=1 (answer browsers on other machines).
"""
import sys
from pathlib import Path

try:
    import arrow_quant_v2  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import holoviews as hv
import panel as pn

from arrow_quant_v2.ui.serving import TITLE, page

pn.extension(design="bootstrap")
hv.extension("bokeh", logo=False)

page().servable(title=TITLE)

"""``panel serve app`` from a source checkout: the same app ``arrow-quant serve`` serves.

The page lives in :mod:`arrow_quant_v2.ui.app` (so an installed wheel has it too); see there
for the environment variables it reads.
"""
import sys
from pathlib import Path

try:
    import arrow_quant_v2  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arrow_quant_v2.ui.app import serve  # noqa: E402

serve()

"""Panel views over the state classes: the pieces of the app and of the notebook dashboard.

Every view is a :class:`panel.viewable.Viewer`; widgets are made from parameters
(``from_param`` / ``pn.Param``). The shared state (library, job manager) is process-wide,
each browser tab gets its own views. The job board refreshes from the shared jobs on a
per-session periodic callback (every 0.1 s), so every tab sees every job and nothing of a
closed tab lingers. One module per view; :mod:`.html` holds the stylesheet and HTML helpers.
"""
from .compare import CompareView
from .compute import ComputeChoice
from .dashboard import Dashboard, dashboard
from .exports import ExportPanel, ExportRow, GGUFCheckForm
from .html import CSS, budget_text, watch_shared
from .jobs import POLL_MS, JobBoard, JobRow
from .launcher import Launcher, config_form
from .library import LibraryView
from .quality import QualityView

__all__ = ["CSS", "POLL_MS", "CompareView", "ComputeChoice", "Dashboard", "ExportPanel", "ExportRow", "GGUFCheckForm", "JobBoard",
           "JobRow", "Launcher", "LibraryView",
           "QualityView", "budget_text", "config_form", "dashboard", "watch_shared"]

"""The whole app in one view: launcher, job board, quality, comparison and the model library."""
from __future__ import annotations

from typing import Optional

import panel as pn
import param
from panel.viewable import Viewer

from ..jobs import Job, JobManager, shared_manager
from .compare import CompareView
from .exports import GGUFCheckForm
from .html import in_served_page
from .jobs import JobBoard
from .launcher import Launcher
from .library import LibraryView
from .quality import QualityView


class Dashboard(Viewer):
    """Launcher, job board, quality and comparison, and the model library: the whole app.

    In a served app ``sidebar`` and ``main`` go into a template; in a notebook the
    dashboard displays itself as one row.
    """

    manager = param.ClassSelector(class_=JobManager)

    def __init__(self, manager: Optional[JobManager] = None, **params):
        super().__init__(manager=manager or shared_manager(), **params)
        self.library_view = LibraryView(library=self.manager.library)
        self.launcher = Launcher(manager=self.manager)
        self.board = JobBoard(manager=self.manager, on_open=self.open_quality)
        # a served page draws a tab when it is shown; a notebook draws every tab now, so the saved
        # notebook and any static export show them filled (nothing will switch tabs for them later)
        self._lazy_tabs = in_served_page()
        self.quality = QualityView(manager=self.manager, live=not self._lazy_tabs)
        self.gguf_check = GGUFCheckForm(manager=self.manager, on_started=lambda job: setattr(self.tabs, "active", 0))
        self.compare = CompareView(manager=self.manager, live=not self._lazy_tabs)
        self.tabs = pn.Tabs(
            ("Jobs", self.board), ("Quality", pn.Column(self.gguf_check, self.quality, sizing_mode="stretch_width")),
            ("Compare", self.compare), ("Models", self.library_view),
            sizing_mode="stretch_width", dynamic=False,
        )
        self.board.param.watch(self._on_jobs_changed, "changed")
        self.tabs.param.watch(self._on_tab, "active")

    def _on_tab(self, *_):
        if self._lazy_tabs:
            self.quality.live = self.tabs.active == 1
            self.compare.live = self.tabs.active == 2

    def _on_jobs_changed(self, *_):
        self.quality.refresh_options()
        self.compare.refresh_options()

    def open_quality(self, job: Job) -> None:
        self.quality.show(job)
        self.tabs.active = 1

    def open_compare(self, a: Job, b: Job) -> None:
        self.compare.compare(a, b)
        self.tabs.active = 2

    @property
    def sidebar(self) -> pn.viewable.Viewable:
        return self.launcher

    @property
    def main(self) -> pn.viewable.Viewable:
        return self.tabs

    def __panel__(self):
        self.board.start_polling()
        return pn.Row(pn.Column(self.launcher, width=330), self.tabs, sizing_mode="stretch_width")


def dashboard(manager: Optional[JobManager] = None, **kwargs) -> Dashboard:
    """The whole dashboard in one call (for notebooks): ``arrow_quant_v2.ui.dashboard()``.

    ``kwargs`` go to :class:`JobManager` when no manager is given (e.g. ``output_root=``,
    ``library=ModelLibrary(roots=[...])``).
    """
    if manager is None:
        manager = JobManager(**kwargs) if kwargs else shared_manager()
    return Dashboard(manager=manager)

"""The app's state and views.

State (plain ``param``, no Panel: import and test it without a server):
:class:`ModelLibrary`, :class:`QuantSettings`, :class:`Job`, :class:`JobManager`,
:func:`shared_manager`, :class:`QualityReport`.

Views (Panel, loaded on first use): :class:`Dashboard`, :class:`Launcher`, :class:`JobBoard`,
:class:`QualityView`, :class:`CompareView`, :class:`LibraryView`, and :func:`dashboard`,
the one-call entry for notebooks.
"""
from .jobs import Job, JobManager, reset_shared_manager, shared_manager  # noqa: F401
from .library import ModelEntry, ModelLibrary  # noqa: F401
from .quality import QualityReport, heatmap_frame, layer_frame, parse_block_module  # noqa: F401
from .roots import PathNotAllowed  # noqa: F401
from .settings import QuantSettings  # noqa: F401

_VIEWS = ("Dashboard", "Launcher", "JobBoard", "JobRow", "QualityView", "CompareView", "LibraryView", "dashboard")

__all__ = ["Job", "JobManager", "shared_manager", "ModelEntry", "ModelLibrary", "QualityReport", "QuantSettings",
           "PathNotAllowed", "parse_block_module", "layer_frame", "heatmap_frame", *_VIEWS]


def __getattr__(name):
    if name in _VIEWS:
        from . import views

        return getattr(views, name)
    raise AttributeError(f"module 'arrow_quant_v2.ui' has no attribute {name!r}")

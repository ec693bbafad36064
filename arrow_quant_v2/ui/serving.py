"""What the served app needs beyond the views: the page, a localhost guard, sample preparation.

``panel serve`` listens on every interface unless told ``--address``; the app therefore
refuses, by itself, any browser that is not on this machine unless
``ARROW_QUANT_ALLOW_REMOTE=1`` is set (``arrow-quant serve`` also binds to 127.0.0.1).
Everything the page loads comes from the Panel server: no template with web fonts, no CDN.

:func:`harden_server` (run by ``arrow-quant serve`` through ``panel serve --setup``, since
Panel has no option for response headers) adds framing protection to every response
(``X-Frame-Options: DENY``, ``Content-Security-Policy: frame-ancestors 'none'``,
``X-Content-Type-Options: nosniff``) and stops Panel's ``/components/<module>/...`` route
from importing modules a GET names (Panel 1.9.4 imports any importable module there; it
then serves only files the named component lists, but the import itself runs the
module's top-level code). With the guard, only modules already imported are looked up.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import sys
import threading
from typing import Optional

import panel as pn

from .jobs import JobManager, shared_manager
from .views import CSS, Dashboard

log = logging.getLogger(__name__)

ALLOW_REMOTE_ENV = "ARROW_QUANT_ALLOW_REMOTE"
PREPARE_SAMPLES_ENV = "ARROW_QUANT_PREPARE_SAMPLES"
TITLE = "ArrowQuant V2"

#: Below NARROW_PX the launcher leaves the side and becomes a scrollable strip above the tabs (the
#: header's toggle still folds it away), so the tabs get the whole window width.
NARROW_PX = 1100
#: The rules on the sidebar read ``body #sidebar``: the template's own ``#sidebar { max-width:
#: var(--sidebar-width) !important }`` comes later in the page and would win a tie.
PAGE_CSS = """
body { background: #f5f7fa; }
#header { background: #1e293b !important; }
.aq-sub { color: #cbd5e1; font-size: 13px; margin-left: 12px; }
#main { min-width: 0; }
@media (max-width: %dpx) {
  #content { flex-direction: column; flex-wrap: nowrap; }
  body #sidebar { max-width: none !important; width: 100%% !important; height: auto !important; max-height: 42vh;
                  border-right: none; border-bottom: 1px solid #cbd5e1; }
  #main { height: auto !important; flex: 1 1 auto; }
  .aq-sub { display: none; }
}
""" % NARROW_PX

_prepare_lock = threading.Lock()
_prepare_started = False


def is_loopback(host: Optional[str]) -> bool:
    if not host:
        return False
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_is_local() -> bool:
    """True if this session's browser connects from this machine (or remote use is allowed)."""
    if os.environ.get(ALLOW_REMOTE_ENV, "").lower() in ("1", "true", "yes"):
        return True
    doc = pn.state.curdoc
    ctx = getattr(doc, "session_context", None) if doc is not None else None
    request = getattr(ctx, "request", None) if ctx is not None else None
    if request is None:  # a notebook or a test document: no remote browser involved
        return True
    return is_loopback(getattr(request, "remote_ip", None))


def start_sample_preparation(manager: JobManager) -> None:
    """Build missing sample models once per process, off the event loop, so they are ready to use.

    Set ``ARROW_QUANT_PREPARE_SAMPLES=0`` to build them only when a job first needs one.
    """
    global _prepare_started
    if os.environ.get(PREPARE_SAMPLES_ENV, "1").lower() in ("0", "false", "no"):
        return
    with _prepare_lock:
        if _prepare_started or all(e.available for e in manager.library.models if e.kind == "sample"):
            _prepare_started = True
            return
        _prepare_started = True
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return

    def done(fut):
        failed = fut.result() if not fut.exception() else {"samples": str(fut.exception())}
        for name, err in failed.items():
            log.warning("sample %s could not be prepared (it will be retried when a job uses it): %s", name, err)
        manager.library.refresh()

    fut = loop.run_in_executor(None, lambda: manager.library.prepare_samples(refresh=False))
    fut.add_done_callback(lambda f: loop.call_soon_threadsafe(done, f))


#: Headers added to every response of the served app.
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def harden_server() -> None:
    """Add :data:`SECURITY_HEADERS` to every tornado response of this process and make Panel's
    ``/components`` route refuse (404) modules that are not imported yet. Idempotent; call
    before the server starts (``panel serve --setup``, as ``arrow-quant serve`` does)."""
    import tornado.web
    from panel.io import server as panel_server

    handler = tornado.web.RequestHandler
    if not getattr(handler.set_default_headers, "_aq_hardened", False):
        original = handler.set_default_headers

        def set_default_headers(self):
            original(self)
            for name, value in SECURITY_HEADERS.items():
                self.set_header(name, value)
        set_default_headers._aq_hardened = True
        handler.set_default_headers = set_default_headers

    components = panel_server.ComponentResourceHandler
    if not getattr(components.parse_url_path, "_aq_hardened", False):
        resolve = components.parse_url_path

        def parse_url_path(self, path: str) -> str:
            if path.split("/", 1)[0] not in sys.modules:
                raise tornado.web.HTTPError(404, "Module not found")
            return resolve(self, path)
        parse_url_path._aq_hardened = True
        components.parse_url_path = parse_url_path


def refusal_page() -> pn.viewable.Viewable:
    return pn.pane.Markdown(
        f"## {TITLE}\n\nThis app only answers browsers on the machine it runs on. "
        f"Open it there, or restart it with `{ALLOW_REMOTE_ENV}=1` if you really mean to share it.",
        margin=30,
    )


def page(manager: Optional[JobManager] = None) -> pn.viewable.Viewable:
    """The served page: header, launcher in the sidebar, tabs (Jobs, Quality, Compare, Models)."""
    if not client_is_local():
        return refusal_page()
    manager = manager or shared_manager()
    start_sample_preparation(manager)
    dash = Dashboard(manager=manager)
    dash.board.start_polling()
    template = pn.template.BootstrapTemplate(
        title=TITLE, sidebar=[dash.sidebar], main=[dash.main], sidebar_width=340, header_background="#1e293b",
        raw_css=[PAGE_CSS], busy_indicator=None, header=[pn.pane.HTML(
            "<span class='aq-sub'>quantize diffusion models to INT2 / INT4 / INT8 · watch · inspect per-layer quality</span>",
            stylesheets=[CSS], margin=(12, 0))],
    )
    template.dashboard = dash  # handy for tests and for scripting a served page
    return template

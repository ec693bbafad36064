"""Fixtures of the browser tests: a served app (``panel serve app`` in a subprocess) and
Debian's Chromium driven by Playwright. Run them apart from the rest:

    python -m pytest -m ui tests/ui

Screenshots go to ``test-artifacts/`` (gitignored).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
#: A model big enough that two jobs side by side run for several seconds (168M BF16 parameters).
MEDIUM = dict(hidden=1024, intermediate=2816, layers=12, heads=8, kv_heads=2, vocab=16000, seed=1,
              max_shard_bytes=200 * 2**20)
#: Lines of the server's stderr that mean something went wrong.
BAD_LOG = re.compile(r"Traceback|\bERROR\b|Exception in callback|error handling message")
#: A browser tab closed while the server was writing to it: tornado logs the closed socket, nothing failed.
CLOSED_SOCKET = re.compile(r"^tornado\.websocket\.WebSocketClosedError|^tornado\.iostream\.StreamClosedError")
#: The last frame of Bokeh's traceback when a message arrives for a tab that has just closed.
SESSION_GONE = 'bokeh/server/connection.py", line 65, in session'
#: Seconds a page may take to show what the server changed (generous: the suite must pass on a
#: loaded 2-core machine; a condition met sooner returns at once).
PAGE_WAIT = 60
#: Seconds ``panel serve`` may take to answer (a loaded 2-core machine imports HoloViews slowly).
SERVER_START_S = 240


# -- helpers shared by the browser tests -------------------------------------------------

def wait_until(cond, timeout=30.0, every=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def progress(page, job_id) -> int:
    loc = page.locator(f".aq-progress-{job_id} progress")
    return int(loc.evaluate("e => e.value")) if loc.count() else -1


def status(page, job_id) -> str:
    loc = page.locator(f".aq-job-{job_id} .aq-badge")
    return loc.inner_text().strip().lower() if loc.count() else ""


def select_model(page, prefix: str) -> str:
    select = page.locator(".aq-model select")
    labels = select.evaluate("e => Array.from(e.options).map(o => o.text)")
    label = next(lbl for lbl in labels if lbl.startswith(prefix))
    select.select_option(label=label)
    return label


def choose_profile(page, profile: str) -> None:
    """Click a profile and wait until the server has loaded it (the planned output name says it)."""
    page.get_by_role("button", name=profile, exact=True).click()
    # the output is named <model>-<label>, and the label starts with the profile (edge, local-gguf, cloud · 17 MiB)
    wait_until(lambda: re.search(f"-{profile}(-|$)", page.locator("code").first.inner_text().strip()), PAGE_WAIT,
               what=f"the {profile} profile in the form")


def start(page, profile: str) -> None:
    choose_profile(page, profile)
    page.get_by_role("button", name=re.compile("Start quantizing")).click()


def heatmap_data(page) -> dict:
    """What the page's Bokeh heatmaps hold: the tensor names of their cells, the colour values and each
    colour mapper's range (read from BokehJS's document, so it checks what is drawn, not the server)."""
    return page.evaluate("""() => {
        const out = {names: [], values: [], mappers: []};
        for (const doc of Bokeh.documents) {
          for (const m of doc.all_models) {
            const kind = m.constructor.__name__ || m.constructor.name;
            const data = kind === 'ColumnDataSource' ? (m.data instanceof Map ? Object.fromEntries(m.data) : m.data) : null;
            if (data && data.name && data.value && data.cosine) {
              // a grid cell with no tensor (HoloViews fills the grid) has no name and a NaN value
              const names = Array.from(data.name), values = Array.from(data.value);
              names.forEach((n, i) => {
                const v = values[i] === null || values[i] === '' ? NaN : Number(values[i]);  // may come as text
                if (typeof n === 'string' && n && isFinite(v)) {
                  out.names.push(n); out.values.push(v);
                }
              });
            }
            if (kind === 'LinearColorMapper') out.mappers.push([m.low, m.high]);
          }
        }
        return out;
    }""")


def no_sideways_scroll(page) -> bool:
    """The main area fits the window: nothing is cut off or needs a horizontal scroll bar."""
    return page.evaluate("() => { const m = document.querySelector('#main'); "
                         "return m.scrollWidth <= m.clientWidth + 2 && document.documentElement.scrollWidth "
                         "<= window.innerWidth + 2; }")


def cut_off_controls(page) -> list:
    """The controls (buttons, inputs, selects) a person cannot fully see sideways: each displayed one must lie
    within the window's width and within every ancestor that clips what overflows it (shadow roots crossed).
    Returns ``"<control text>: <why>"`` for each that does not (vertical scrolling is allowed)."""
    return page.evaluate("""() => {
        const W = document.documentElement.clientWidth, out = [];
        const up = e => e.parentElement || (e.getRootNode() instanceof ShadowRoot ? e.getRootNode().host : null);
        const name = e => (e.innerText || e.value || e.getAttribute('aria-label') || e.tagName).trim().slice(0, 40);
        function visit(root) {
          for (const el of root.querySelectorAll('*')) {
            if (el.shadowRoot) visit(el.shadowRoot);
            if (!el.matches('button, input, select, textarea') || !el.checkVisibility()) continue;
            const r = el.getBoundingClientRect();
            if (r.width === 0 || r.height === 0) continue;
            if (r.left < -1 || r.right > W + 1) { out.push(`${name(el)}: ${r.left.toFixed(0)}..${r.right.toFixed(0)} px, window ${W}`); continue; }
            for (let a = up(el); a && a !== document.documentElement; a = up(a)) {
              if (!(a instanceof Element) || getComputedStyle(a).overflowX === 'visible') continue;
              const c = a.getBoundingClientRect();
              if (r.left < c.left - 1 || r.right > c.right + 1) {
                out.push(`${name(el)}: ${r.left.toFixed(0)}..${r.right.toFixed(0)} px, outside ${a.id ? '#' + a.id : a.className || a.tagName} (${c.left.toFixed(0)}..${c.right.toFixed(0)})`);
                break;
              }
            }
          }
        }
        visit(document);
        return out;
    }""")


def tab(page, name: str):
    return page.locator(".bk-tab").filter(has_text=re.compile(f"^{name}$")).first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    from arrow_quant_v2.samples import generate_dream

    root = tmp_path_factory.mktemp("models")
    generate_dream(root / "dream-medium", **MEDIUM)
    return root


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, env: dict):
        self.url, self.proc, self.log, self.env = url, proc, log, env

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def problems(self):
        """Lines that mean something went wrong, but not the traceback of a tab closed mid-write
        (tornado's closed socket, or Bokeh finding the closed tab's session gone), nor the log
        line that introduces such a traceback."""
        lines, out = self.log_text().splitlines(), []
        for i, line in enumerate(lines):
            if not BAD_LOG.search(line):
                continue
            tb = i if line.startswith("Traceback") else next(
                (k for k in range(i + 1, min(i + 3, len(lines))) if lines[k].startswith("Traceback")), None)
            if tb is not None and closed_tab_traceback(lines, tb):
                continue
            out.append(line)
        return out


def closed_tab_traceback(lines, i: int) -> bool:
    """Whether the traceback starting at ``lines[i]`` (chained ones included) is a closed tab's.

    The whole block is read, whatever its length: how many frames lead to Bokeh's session
    check depends on the tornado version.
    """
    j = next((j for j in range(i + 1, len(lines)) if lines[j] and not lines[j][0].isspace()
              and not lines[j].startswith(("Traceback", "During handling"))), len(lines))
    end = lines[j] if j < len(lines) else ""
    return bool(CLOSED_SOCKET.match(end)) or (
        end.startswith("AssertionError") and any(SESSION_GONE in x for x in lines[i:j]))


def start_server(tmp: Path, model_root: Path, extra_env=None) -> Server:
    port = free_port()
    env = dict(os.environ)
    env.update({
        "ARROW_QUANT_CACHE": str(tmp / "cache"),
        "HF_HUB_CACHE": str(tmp / "hf-hub"),  # the library lists the Hugging Face cache: keep the user's out
        "ARROW_QUANT_OUTPUT_ROOT": str(tmp / "outputs"),
        "ARROW_QUANT_MODEL_ROOTS": str(model_root),
        "ARROW_QUANT_OFFLINE": "1",  # the real samples are not fetched in tests: only tiny-dream is built
        "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        "BOKEH_LOG_LEVEL": "info",
    })
    env.update(extra_env or {})
    log = tmp / f"server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "panel", "serve", "app", "--port", str(port), "--address", "127.0.0.1",
         "--allow-websocket-origin", f"127.0.0.1:{port}", "--num-procs", "1"],
        cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/app"
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"panel serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            # a static file: answered without building a page (a page request that times out and is
            # asked again would leave the server building pages for nobody)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/js/bokeh.min.js", timeout=10):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.terminate()
        raise RuntimeError(f"panel serve did not start:\n{log.read_text(errors='replace')}")
    return Server(url, proc, log, env)


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_root):
    tmp = tmp_path_factory.mktemp("served")
    srv = start_server(tmp, model_root)
    yield srv
    stop_server(srv)
    problems = srv.problems()
    (ARTIFACTS / "server.log").write_text(srv.log_text())
    assert not problems, "server logged errors:\n" + srv.log_text()[-6000:]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Watched:
    """A page whose console errors, page errors and off-machine requests are recorded."""

    def __init__(self, page):
        self.page = page
        self.errors = []
        self.requests = []
        self.external = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", self._on_request)
        # nothing may leave the machine: abort (and record) any request to another host
        page.route(re.compile(r"^(?!https?://(127\.0\.0\.1|localhost)[:/]).*"), self._block)

    def _on_request(self, req):
        self.requests.append(req.url)

    def _block(self, route):
        url = route.request.url
        if url.startswith(("data:", "blob:", "about:")):
            return route.continue_()
        self.external.append(url)
        return route.abort()


def new_context(browser, width: int, height: int, **options):
    """A browser context whose waits suit a loaded 2-core machine: a page served while jobs load both
    cores (or an exported notebook of several MB) can take longer than Playwright's 30 s default."""
    ctx = browser.new_context(viewport={"width": width, "height": height}, **options)
    ctx.set_default_navigation_timeout(SERVER_START_S * 1000)
    ctx.set_default_timeout(PAGE_WAIT * 1000)
    return ctx


@pytest.fixture
def open_page(browser, server):
    pages = []

    def _open(width=1440, height=1000):
        ctx = new_context(browser, width, height)
        w = Watched(ctx.new_page())
        w.page.goto(server.url)
        w.page.wait_for_selector("text=Start quantizing", timeout=SERVER_START_S * 1000)
        pages.append((ctx, w))
        return w

    yield _open
    for ctx, w in pages:
        ctx.close()
    for _, w in pages:
        assert not w.errors, f"browser console errors: {w.errors}"
        assert not w.external, f"requests left the machine: {w.external}"

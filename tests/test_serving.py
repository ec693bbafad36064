"""The served app's HTTP hardening (no browser): framing headers on every response, and Panel's
``/components/<module>/...`` route no longer imports a module an unauthenticated GET names."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``arrow-quant serve`` on a free port, with a module on the path that leaves a mark when imported."""
    tmp = tmp_path_factory.mktemp("serve")
    mark = tmp / "imported.txt"
    (tmp / "aq_canary.py").write_text(f"open({str(mark)!r}, 'w').write('imported')\nclass X:\n    __css__ = []\n")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp)]), ARROW_QUANT_CACHE=str(tmp / "cache"),
               ARROW_QUANT_OUTPUT_ROOT=str(tmp / "out"), ARROW_QUANT_MODEL_ROOTS=str(tmp), ARROW_QUANT_OFFLINE="1",
               ARROW_QUANT_PREPARE_SAMPLES="0")
    log = tmp / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "arrow_quant_v2", "serve", "--port", str(port)], cwd=tmp, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text(errors="replace")
            try:
                urllib.request.urlopen(base + "/", timeout=2).close()
                break
            except OSError:
                time.sleep(0.3)
        yield base, mark
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_every_page_forbids_framing(served):
    base, _ = served
    with urllib.request.urlopen(base + "/app", timeout=60) as r:
        assert r.status == 200
        assert r.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_components_route_does_not_import_what_a_request_names(served):
    base, mark = served
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(base + "/components/aq_canary/X/__css__/x.css", timeout=30)
    assert info.value.code == 404
    assert not mark.exists(), "the GET imported a module"

"""The documentation: it builds strictly, and every code block in it runs.

* ``test_docs_build_strict``: ``mkdocs build --strict`` (broken links, missing
  cross-references, unknown generated blocks and any warning fail). mkdocs is a dev
  dependency: if it is missing this test fails, it is not skipped.
* ``test_page_code_blocks[<page>]``: the fenced ``python`` and ``bash`` blocks of each page are
  run in order, in one subprocess per page, in a fresh temporary working directory, as a
  reader following the page would (Python blocks share one namespace; a block with a
  top-level ``await`` runs on the page's event loop, like ``python -m asyncio`` or a
  notebook; bash blocks run with this interpreter's ``bin/`` first on ``PATH`` so
  ``arrow-quant`` is the installed one). A block whose info string carries
  ``title="not run"`` is shown but not run; each such block says why on the page.
* ``test_public_api_documented``: every public name of the package root, and each of its
  public methods, has a docstring (they are what the API reference shows).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
                   re.M | re.S)
RUN_LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
NOT_RUN = re.compile(r'title="not run[^"]*"')
PAGE_TIMEOUT = 240


def pages():
    return sorted(p for p in DOCS.rglob("*.md") if not {"_build", "generated"} & set(p.relative_to(DOCS).parts))


def code_blocks(page: Path):
    """``(language, first line number, code, runs)`` of each fenced block of a page."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        info = m.group("info").strip()
        lang = info.split()[0].lstrip(".{").rstrip("}") if info else ""
        if lang not in RUN_LANGS:
            continue
        line = text.count("\n", 0, m.start("body")) + 1
        body = textwrap.dedent(m.group("body")) if m.group("indent") else m.group("body")
        out.append((RUN_LANGS[lang], line, body, not NOT_RUN.search(info)))
    return out


DRIVER = r'''
import ast, asyncio, inspect, json, os, subprocess, sys, time, traceback
blocks = json.load(open(sys.argv[1]))
page = sys.argv[2]
ns = {"__name__": "__main__"}
loop = asyncio.new_event_loop()
started = time.perf_counter()
for lang, line, code in blocks:
    print(f"--- {page}:{line} ({lang}) at {time.perf_counter() - started:.1f} s", flush=True)
    if lang == "bash":
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", code])
        if r.returncode:
            print(f"FAILED: {page}:{line}: bash block exited {r.returncode}", flush=True)
            sys.exit(1)
        continue
    try:
        compiled = compile("\n" * (line - 1) + code, page, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        if compiled.co_flags & inspect.CO_COROUTINE:
            loop.run_until_complete(eval(compiled, ns))
        else:
            exec(compiled, ns)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: {page}:{line}: python block raised", flush=True)
        sys.exit(1)
print(f"ALL BLOCKS RAN in {time.perf_counter() - started:.1f} s", flush=True)
'''


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("NO_MKDOCS_2_WARNING", "1")
    return env


def test_docs_build_strict(tmp_path):
    import mkdocs  # noqa: F401
    import mkdocstrings  # noqa: F401

    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings)
    for page in pages():
        html = tmp_path / "site" / page.relative_to(DOCS).with_suffix(".html")
        assert html.is_file(), f"{page} was not built"


@pytest.mark.parametrize("page", [p.relative_to(DOCS).as_posix() for p in pages()])
def test_page_code_blocks(page, tmp_path):
    blocks = code_blocks(DOCS / page)
    runnable = [(lang, line, code) for lang, line, code, runs in blocks if runs]
    if not runnable:
        assert all(not runs for *_, runs in blocks)
        return
    (tmp_path / "blocks.json").write_text(json.dumps(runnable))
    (tmp_path / "driver.py").write_text(DRIVER)
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "blocks.json"), f"docs/{page}"],
                       cwd=work, env=_env(), capture_output=True, text=True, timeout=PAGE_TIMEOUT)
    assert r.returncode == 0 and "ALL BLOCKS RAN" in r.stdout, (
        f"a code block of docs/{page} failed\n--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-6000:]}")


def test_not_run_blocks_are_few():
    """Blocks that are shown but not run stay the exception."""
    skipped = [(p.name, line) for p in pages() for _, line, _, runs in code_blocks(p) if not runs]
    ran = [1 for p in pages() for *_, runs in code_blocks(p) if runs]
    assert len(skipped) <= max(12, len(ran) // 4), skipped


def test_public_api_documented():
    import inspect

    import arrow_quant_v2
    from arrow_quant_v2 import AsyncArrowQuantV2

    names = list(arrow_quant_v2.__all__) + ["AsyncArrowQuantV2"]
    missing = []
    for name in names:
        obj = getattr(arrow_quant_v2, name)
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(name)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if callable(fn) or isinstance(member, property):
                    if not (inspect.getdoc(fn) or "").strip():
                        missing.append(f"{name}.{attr}")
    assert AsyncArrowQuantV2 is arrow_quant_v2.aio.AsyncArrowQuantV2
    assert not missing, f"public names without a docstring: {missing}"

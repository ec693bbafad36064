"""The app's Export actions and GGUF checks, as state (no Panel, no browser)."""
from __future__ import annotations

import time
from pathlib import Path

import gguf
import pytest

import gguf_helpers
from arrow_quant_v2 import DiffusionQuantConfig, load_quantized
from arrow_quant_v2.ui.exports import Exports, can_export, check_gguf
from arrow_quant_v2.ui.jobs import JobManager
from arrow_quant_v2.ui.library import ModelLibrary
from arrow_quant_v2.ui.roots import MODEL_ROOTS_ENV, PathNotAllowed


@pytest.fixture
def manager(tmp_path, monkeypatch):
    monkeypatch.setenv("ARROW_QUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(MODEL_ROOTS_ENV, raising=False)
    gguf_helpers.make_dream(tmp_path / "models" / "dream")
    return JobManager(ModelLibrary([tmp_path / "models"], include_samples=False), output_root=tmp_path / "out",
                      progress_interval=0.01)


async def test_export_actions_write_beside_the_store_with_progress_and_size(manager, tmp_path):
    job = await manager.run("dream", DiffusionQuantConfig(bit_width=8, encoding="gguf_ref_q8_0"), label="q8")
    assert job.status == "done" and can_export(job)
    exports = Exports(manager)
    first = exports.start(job, "gguf")
    second = exports.start(job, "gguf")  # two at once: two names, nothing clobbered
    floats = exports.start(job, "safetensors", dtype="bfloat16")
    for e in (first, second, floats):
        await exports.wait(e)
        assert e.status == "done", e.error
        assert Path(e.output_path).is_absolute() and Path(e.output_path).parent == tmp_path / "out"
        assert e.fraction == 1.0
    assert [Path(e.output_path).name for e in (first, second, floats)] == ["dream-q8.gguf", "dream-q8-2.gguf",
                                                                           "dream-q8-bfloat16"]
    assert first.size_bytes == Path(first.output_path).stat().st_size
    assert gguf.GGUFReader(first.output_path).get_field("general.architecture").contents() == "dream"
    assert exports.for_store(job.output_path) == [floats, second, first]


async def test_a_job_cancelled_during_validation_keeps_its_export_actions(manager):
    from arrow_quant_v2.ui.jobs import Job

    done = await manager.run("dream", DiffusionQuantConfig(bit_width=8, encoding="gguf_ref_q8_0"), label="q8")
    kept = Job(model_name="dream", output_path=done.output_path, status="cancelled", label="q8")
    nothing = Job(model_name="dream", output_path=done.output_path + "-never-written", status="cancelled")
    assert can_export(kept) and not can_export(nothing)
    exports = Exports(manager)
    export = await exports.wait(exports.start(kept, "gguf"))
    assert export.status == "done" and Path(export.output_path).is_file()
    with pytest.raises(ValueError, match="no finished store"):
        exports.start(nothing, "gguf")


async def test_export_of_arrowquant_encodings_fails_with_the_fix(manager):
    job = await manager.run("dream", DiffusionQuantConfig(bit_width=4), label="int4")
    exports = Exports(manager)
    e = await exports.wait(exports.start(job, "gguf"))
    assert e.status == "failed" and "ExportError" in e.error and "target_runtime" in e.error
    assert not Path(e.output_path).exists()


async def test_cancelled_export_leaves_nothing(manager, monkeypatch):
    from arrow_quant_v2.gguf_io import writer

    job = await manager.run("dream", DiffusionQuantConfig(bit_width=8, encoding="gguf_ref_q8_0"), label="q8")
    tensor_bytes = writer._tensor_bytes
    monkeypatch.setattr(writer, "_tensor_bytes", lambda *a: (time.sleep(0.05), tensor_bytes(*a))[1])
    exports = Exports(manager)
    e = exports.start(job, "gguf")
    while e.fraction == 0.0 and e.active:
        await __import__("asyncio").sleep(0.01)
    assert exports.cancel(e)
    await exports.wait(e)
    assert e.status == "cancelled"
    assert sorted(p.name for p in Path(job.output_path).parent.iterdir()) == ["dream-q8"]


async def test_a_gguf_file_is_checked_like_a_store(manager, tmp_path):
    job = await manager.run("dream", DiffusionQuantConfig(bit_width=8, encoding="gguf_ref_q8_0"), label="q8")
    path = tmp_path / "out" / "dream-q8.gguf"
    load_quantized(job.output_path).to_gguf(path)
    check = check_gguf(manager, "dream", path)
    assert check in manager.jobs and check.active
    await manager.wait(check)
    assert check.status == "done", check.error
    assert check.report["format"] == "gguf" and check.report["passed"]
    assert check.report["per_layer_accuracy"] == pytest.approx(job.report["per_layer_accuracy"], abs=1e-9)
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(path.read_bytes())
    with pytest.raises(PathNotAllowed):
        check_gguf(manager, "dream", outside)


async def test_job_row_shows_the_path_and_export_actions_once_done(manager, tmp_path):
    from arrow_quant_v2.ui.views import Dashboard, JobRow

    job = manager.submit("dream", DiffusionQuantConfig(bit_width=8, encoding="gguf_ref_q8_0"), label="q8")
    row = JobRow(manager, job=job)
    assert row._ship is None  # running: nothing to ship yet
    await manager.wait(job)
    row.sync()
    panel = row._ship
    assert panel is not None and panel._path.value == str(Path(job.output_path).resolve())
    panel._path.value = "/etc/passwd"  # the path is there to be copied, not edited
    assert panel._path.value == str(Path(job.output_path).resolve())
    export = panel._start("gguf")
    await exports_wait(manager, export)
    row.sync()
    shown = panel._rows[export.export_id]._line.object
    assert export.output_path in shown and ("MiB" in shown or "KiB" in shown)
    assert panel._start("onnx") is None and "onnx" in panel._msg.object
    board = Dashboard(manager=manager)
    board.gguf_check.model = "dream"
    board.gguf_check.gguf_path = str(tmp_path / "nope.gguf")  # outside the roots: refused on the form
    assert board.gguf_check.start() is None and "outside" in board.gguf_check._msg.object
    board.gguf_check.gguf_path = str(tmp_path / "out" / "nope.gguf")
    check = board.gguf_check.start()
    await manager.wait(check)
    assert check.status == "failed" and "no such GGUF file" in check.error and board.tabs.active == 0


async def exports_wait(manager, export):
    from arrow_quant_v2.ui.exports import exports_for

    return await exports_for(manager).wait(export)


def test_runtime_choice_sits_by_the_profile_and_survives_profile_changes():
    from arrow_quant_v2.ui.settings import RUNTIME_FIELD, QuantSettings

    s = QuantSettings("local")
    assert RUNTIME_FIELD not in QuantSettings.advanced_fields() and s.label == "local"
    s.target_runtime = "gguf"
    assert s.label == "local-gguf"
    s.profile = "edge"
    assert s.target_runtime == "gguf" and s.label == "edge-gguf"
    assert s.to_config().target_runtime == "gguf" and s.to_config().bit_width == 2

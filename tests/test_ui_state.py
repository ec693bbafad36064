"""The app's state classes, without a server: library + root confinement, settings form,
job lifecycle through AsyncArrowQuantV2 (real quantizations of small models), cancel,
and the heatmap data layout."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from arrow_quant_v2 import ArrowQuantError, ConfigurationError, DiffusionQuantConfig, QuantizationError
from arrow_quant_v2.config import field_specs
from arrow_quant_v2.ui import JobManager, ModelLibrary, PathNotAllowed, QualityReport, QuantSettings
from arrow_quant_v2.ui.quality import (
    block_rows, cosine_label, diff_frame, fits_block_grid, heatmap_frame, layer_frame, nines, page_of,
    parse_block_module, place,
)
from arrow_quant_v2.ui.roots import MODEL_ROOTS_ENV, unique_path
from arrow_quant_v2.ui.settings import parameter_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty sample cache: samples are listed but not built (nothing is downloaded)."""
    monkeypatch.setenv("ARROW_QUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))  # the library lists it: keep the user's out
    monkeypatch.delenv(MODEL_ROOTS_ENV, raising=False)
    monkeypatch.delenv("ARROW_QUANT_OUTPUT_ROOT", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def roots(tmp_path, make_model):
    """A model root with a model, a nested org/model, a store, and a symlink leading out."""
    import shutil

    models = tmp_path / "models"
    shutil.copytree(make_model("small"), models / "small-lm")
    shutil.copytree(make_model("tiny"), models / "org" / "tiny-lm")
    outside = tmp_path / "outside"
    shutil.copytree(make_model("tiny"), outside / "secret-lm")
    (models / "escape").symlink_to(outside / "secret-lm", target_is_directory=True)
    (models / "a-store").mkdir()
    (models / "a-store" / "manifest.json").write_text("{}")
    (models / "a-store" / "weights.safetensors").write_bytes(b"")
    return models, outside


# ----------------------------------------------------------------------------- library


def test_library_lists_samples_and_root_models(cache, roots):
    models, _ = roots
    lib = ModelLibrary([models])
    by_name = {e.name: e for e in lib.models}
    assert {"tiny-dream", "terrain-unet", "minilm"} <= set(by_name)
    assert all(by_name[n].kind == "sample" and not by_name[n].available for n in ("tiny-dream", "terrain-unet"))
    assert by_name["tiny-dream"].params > 30_000_000  # known before it is built
    small = by_name["small-lm"]
    assert small.kind == "folder" and not small.error
    assert small.params > 200_000 and small.dtype == "F32" and small.shards == 1
    assert small.size_bytes > small.params * 4 and small.modality in ("text", "image")
    assert "tiny-lm" in by_name  # root/org/model is found
    assert "a-store" not in by_name  # a quantized store is not a model
    assert "escape" not in by_name and "secret-lm" not in by_name  # the symlink leads out of the root


def test_library_roots_from_env(cache, roots, monkeypatch, tmp_path):
    models, _ = roots
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv(MODEL_ROOTS_ENV, os.pathsep.join([str(models), str(other)]))
    lib = ModelLibrary()
    assert [Path(r) for r in lib.roots] == [models.resolve(), other.resolve()]
    assert any(e.name == "small-lm" for e in lib.models)


def test_paths_outside_roots_are_refused(cache, roots):
    models, outside = roots
    lib = ModelLibrary([models])
    for bad in (outside / "secret-lm", models / ".." / "outside" / "secret-lm", models / "escape", "/etc",
                "../outside/secret-lm"):
        with pytest.raises(PathNotAllowed, match="outside the allowed model folders"):
            lib.add_path(bad)
        assert "outside the allowed" in lib.message and f"{MODEL_ROOTS_ENV}=" in lib.message  # how to add a root
    entry = lib.add_path(models / "org" / ".." / "small-lm")  # `..` that stays inside is fine
    assert entry.path == str((models / "small-lm").resolve()) and lib.message == ""
    assert "already listed" in lib.notice  # the root scan found it: said, not silently accepted


def test_a_root_itself_or_a_folder_without_weights_is_refused_with_the_reason(cache, roots):
    from arrow_quant_v2.errors import ModelNotFoundError

    models, _ = roots
    (models / "pictures").mkdir()
    (models / "pictures" / "terrain.png").write_bytes(b"\x89PNG")
    lib = ModelLibrary([models])
    before = [e.name for e in lib.models]
    with pytest.raises(ModelNotFoundError, match="is a model root, not a model"):
        lib.add_path(models)
    with pytest.raises(ModelNotFoundError, match="no model weights here"):
        lib.add_path(models / "pictures")
    assert "no model weights here" in lib.message and [e.name for e in lib.models] == before


def test_unique_output_never_clobbers(tmp_path):
    (tmp_path / "m-edge").mkdir()
    (tmp_path / "m-edge-2").mkdir()
    assert unique_path(tmp_path, "m-edge").name == "m-edge-3"
    assert unique_path(tmp_path, "m-edge", reserved=[tmp_path / "m-edge-3"]).name == "m-edge-4"
    assert unique_path(tmp_path, "../../etc/passwd").parent == tmp_path


# ----------------------------------------------------------------------------- settings


def test_settings_form_is_generated_from_field_specs():
    s = QuantSettings("edge")
    for name in field_specs():
        if name != "deployment_profile":
            assert name in s.param, name
            assert s.param[name].doc == field_specs()[name]["doc"]
    assert s.to_config() == DiffusionQuantConfig.from_profile("edge")
    s.profile = "cloud"
    assert s.bit_width == 8 and s.to_config() == DiffusionQuantConfig.from_profile("cloud") and s.label == "cloud"
    s.bit_width = 4
    assert s.label == "int4" and s.to_config().bit_width == 4
    s.group_size = 32
    assert s.label == "int4-g32" and s.to_config().group_size == 32
    s.bit_rules = {"*.q_proj.weight": 7}
    with pytest.raises(ConfigurationError, match="bit_rules"):
        s.to_config()
    assert set(s.param.bit_width.objects) == {2, 3, 4, 5, 6, 8}
    assert s.param.min_accuracy.bounds == (0.0, 1.0) and s.param.min_accuracy.allow_None


@pytest.mark.parametrize("text,why", [("abc", "“abc” is not a number"), ("-5", "must be at least 0.001"),
                                      ("0", "must be at least 0.001"), ("nan", "not a finite number")])
def test_a_size_budget_it_cannot_use_is_refused_in_the_forms_words(text, why):
    """Typed text the config cannot use leaves the field as it was and blocks the config, saying why
    with the form's name for the field; a good value clears it; empty means no budget."""
    s = QuantSettings("local")
    assert s.set_text("target_model_size_mb", "17") is None and s.target_model_size_mb == 17.0 and s.valid
    message = s.set_text("target_model_size_mb", text)
    assert message.startswith("Size budget (MiB): ") and why in message and "target_model_size_mb" not in message
    assert not s.valid and s.target_model_size_mb == 17.0
    with pytest.raises(ConfigurationError, match="Size budget"):
        s.to_config()
    assert s.set_text("target_model_size_mb", "") is None and s.valid and s.target_model_size_mb is None
    assert s.set_text("num_time_groups", "2.5") == "Noise levels: “2.5” is not a whole number"
    assert s.set_text("num_time_groups", "") == "Noise levels: needs a value"
    s.profile = "edge"  # a profile sets every field again: what was mistyped goes with it
    assert s.valid


def test_a_budget_is_met_only_within_the_documented_tolerance():
    from arrow_quant_v2.budget import MET_TOLERANCE
    from arrow_quant_v2.ui.format import budget_verdict

    assert MET_TOLERANCE == 0.01 and "at most **1 %** over" in (ROOT / "docs" / "configuration.md").read_text()
    assert budget_verdict(16.5, 17.0) == (True, "✓ met")
    met, words = budget_verdict(17.01, 17.0)
    assert met and "over by 0.06 %" in words and "1 % tolerance" in words
    assert budget_verdict(17.6, 17.0) == (False, "✗ over by 3.5 %")


def test_jobs_are_labelled_by_what_makes_them_different():
    s = QuantSettings("local")
    s.set_text("target_model_size_mb", "17")
    assert s.label == "local · 17 MiB"
    s.min_accuracy = 0.95
    assert s.label == "local · min cos 0.95 · 17 MiB"
    s.target_model_size_mb = None
    s.bit_width, s.min_accuracy = 2, None
    assert s.label == "int2"
    s.calibration = "graph"  # a toggle beside the profile: kept when the profile changes, and named
    s.profile = "edge"
    assert s.calibrated and s.label == "edge · calibrated" and s.to_config().calibration == "graph"
    assert "calibration" not in QuantSettings.advanced_fields()


def test_a_new_config_field_gets_a_widget_parameter():
    p = parameter_for("new_knob", {"default": 3, "doc": "a knob", "choices": None, "bounds": (1, 9), "kind": None,
                                   "type": "int"})
    assert p.bounds == (1, 9) and p.default == 3 and p.doc == "a knob"
    p = parameter_for("mode", {"default": "a", "doc": "", "choices": ("a", "b"), "bounds": None, "kind": None, "type": "str"})
    assert p.objects == ["a", "b"]


def test_calibration_is_a_toggle_that_refuses_a_model_without_a_graph(cache, roots, tmp_path):
    from arrow_quant_v2.ui.views import Launcher

    models, _ = roots
    launcher = Launcher(manager=_manager(tmp_path, models, scan_outputs=False))
    launcher.model = next(e.name for e in launcher.manager.library.models if e.name.endswith("small-lm"))
    assert launcher.form_problem() is None and launcher._calibration_note.object == ""
    launcher._calibrate.value = True
    assert launcher.settings.calibration == "graph" and launcher._start.disabled
    assert "needs the model's graph" in launcher._calibration_note.object.replace('&#x27;', "'") and "Calibration" in launcher.form_problem()
    (models / "small-lm" / "model.onnx").write_bytes(b"")  # the graph is there: the toggle says what it will do
    launcher.settings.num_time_groups = 4
    assert launcher.form_problem() is None
    assert "graph at 4 noise levels" in launcher._calibration_note.object
    launcher.settings.profile = "edge"  # a profile sets widths, not the calibration
    assert launcher._calibrate.value and launcher.settings.label == "edge · calibrated"


def test_calibration_is_its_own_stage_on_the_job_row(tmp_path):
    from arrow_quant_v2.progress import ProgressEvent
    from arrow_quant_v2.ui import Job
    from arrow_quant_v2.ui.views import JobRow

    job = Job(model_name="terrain", output_path=str(tmp_path / "out"), label="edge · calibrated", status="running")
    row = JobRow(JobManager(ModelLibrary([], include_samples=False), output_root=tmp_path, scan_outputs=False), job=job)
    job.on_event(ProgressEvent(stage="calibrate", fraction=0.0, stage_fraction=0.35, tensors_total=181,
                               message="calibration: forward pass 7/20 through the graph"))
    row.sync()
    line = row._line.object
    assert "<b>calibrating</b> 35%" in line and "forward pass 7/20" in line and "[0/181]" not in line


def test_reachable_sizes_in_a_notebook_cell_are_waited_for_a_bounded_time(monkeypatch):
    """Past the bound the cell says they were not computed and how to compute them; they show when they come."""
    import threading

    from arrow_quant_v2.ui import settings as st

    release = threading.Event()
    monkeypatch.setattr(st, "size_range_now", lambda path, config: release.wait(600) and {"min_mb": 1.0, "max_mb": 2.0})
    sizes = st.ReachableSizes()
    sizes.request(("some-model", DiffusionQuantConfig()), wait=0.05)
    assert sizes.value is None and not sizes.computing
    assert "not computed" in sizes.reason and "size_range(model, config) gives them" in sizes.reason
    release.set()
    deadline = time.monotonic() + 60
    while sizes.value is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sizes.value == {"min_mb": 1.0, "max_mb": 2.0} and sizes.reason == ""


def test_compare_says_what_calibration_did_to_the_network_output():
    from arrow_quant_v2.ui import Job
    from arrow_quant_v2.ui.quality import output_error_change

    def job(calibration, mean, worst):
        e2e = {"available": True, "mean_cosine": mean, "worst_cosine": worst}
        return Job(config={"calibration": calibration}, report={"end_to_end": e2e}).summary()

    plain, calibrated = job(None, 0.95, 0.80), job("graph", 0.995, 0.98)
    assert calibrated["calibrated"] and not plain["calibrated"]
    assert (calibrated["output_cosine"], calibrated["output_worst"]) == (0.995, 0.98)
    assert output_error_change(plain, calibrated) == "output error (1 − cosine) of B: mean 0.1×, worst 0.1× A's"
    no_graph = Job(report={"end_to_end": {"available": False, "reason": "no graph"}}).summary()
    assert no_graph["output_cosine"] is None and output_error_change(plain, no_graph) is None


# ----------------------------------------------------------------------------- jobs


def _manager(tmp_path, models, **kw):
    return JobManager(ModelLibrary([models], include_samples=False), output_root=tmp_path / "out", **kw)


async def test_job_lifecycle_real_quantization(cache, roots, tmp_path):
    models, _ = roots
    mgr = _manager(tmp_path, models, progress_interval=0.01)
    job = mgr.submit("small-lm", DiffusionQuantConfig.from_profile("edge"))
    assert job.status == "queued" and job.active
    await mgr.wait(job)
    assert job.status == "done", job.error
    assert Path(job.output_path) == tmp_path / "out" / "small-lm-edge"
    assert (Path(job.output_path) / "manifest.json").is_file()
    assert job.events >= 2 and job.fraction == 1.0 and job.elapsed > 0
    s = job.summary()
    assert s["compression_ratio"] > 1 and 0.8 < s["min_cosine"] <= s["cosine"] <= 1 and s["passed"] is not None
    assert job.report["per_layer"] and job.result["quantized_path"] == job.output_path
    # the same model and profile again: a fresh folder, the first store untouched
    before = sorted(p.name for p in Path(job.output_path).iterdir())
    job2 = await mgr.run("small-lm", DiffusionQuantConfig.from_profile("edge"))
    assert job2.status == "done" and Path(job2.output_path).name == "small-lm-edge-2"
    assert sorted(p.name for p in Path(job.output_path).iterdir()) == before
    assert [j.job_id for j in mgr.results("small-lm")] == [job2.job_id, job.job_id]
    # a new manager (a restarted server) finds both stores as finished results
    again = _manager(tmp_path, models)
    found = {Path(j.output_path).name: j for j in again.jobs}
    assert set(found) == {"small-lm-edge", "small-lm-edge-2"} and found["small-lm-edge"].from_disk
    assert found["small-lm-edge"].model_name == "small-lm" and found["small-lm-edge"].label == "edge"


async def test_two_jobs_run_together_and_one_is_cancelled(cache, roots, tmp_path, make_model):
    import shutil

    models, _ = roots
    shutil.copytree(make_model("large"), models / "large-lm")
    mgr = _manager(tmp_path, models, progress_interval=0.01)
    mgr.library.refresh()
    keep = mgr.submit("small-lm", DiffusionQuantConfig.from_profile("local"))
    victim = mgr.submit("large-lm", DiffusionQuantConfig.from_profile("edge"))
    assert mgr.active_jobs == [victim, keep]
    for _ in range(6000):  # the first event may wait for a kernel compile after a code change
        if victim.status == "running":
            break
        await asyncio.sleep(0.01)
    assert victim.status == "running"
    assert mgr.cancel(victim)
    await mgr.wait(victim)
    await mgr.wait(keep)
    assert victim.status == "cancelled" and not victim.active
    assert not Path(victim.output_path).exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no partial store left
    assert keep.status == "done"
    assert mgr.cancel(keep) is False


async def test_failed_job_shows_its_error(cache, roots, tmp_path):
    models, _ = roots

    class Broken:
        async def quantize_diffusion_model_async(self, *a, **kw):
            raise QuantizationError("model.layers.0.mlp.up_proj.weight: disk on fire")

    mgr = _manager(tmp_path, models, quantizer=Broken())
    job = await mgr.run("small-lm")
    assert job.status == "failed" and "disk on fire" in job.error and "QuantizationError" in job.error
    with pytest.raises(KeyError):
        mgr.submit("no-such-model")


def test_shared_manager_is_one_per_process(cache):
    from arrow_quant_v2.ui.jobs import reset_shared_manager, shared_manager

    reset_shared_manager()
    try:
        assert shared_manager(scan_outputs=False) is shared_manager()
    finally:
        reset_shared_manager()


# ----------------------------------------------------------------------------- quality layout

DREAM_NAMES = [f"model.layers.{i}.{m}.weight" for i in range(3) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")] + ["model.embed_tokens.weight", "lm_head.weight"]
BERT_NAMES = [f"encoder.layer.{i}.{m}.weight" for i in range(2) for m in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")] + ["embeddings.word_embeddings.weight", "pooler.dense.weight"]
UNET_NAMES = ["network.input_blocks.1.0.in_layers.2.weight", "network.middle_block.0.out_layers.3.weight",
              "network.time_embed.0.weight", "network.out.2.weight"]


def _per_layer(names, seed=0, bits=4):
    rng = np.random.default_rng(seed)
    return {n: {"cosine": float(1 - 10 ** -rng.uniform(1, 4)), "rel_error": 0.05, "sqnr_db": 25.0, "bits": bits,
                "encoding": "affine", "shape": [64, 32], "numel": 2048, "bits_per_weight": 4.5,
                "reason": "int4 g64" if i % 5 else "int8 g64: fallback from int4, cos 0.98 < 0.99",
                "threshold": 0.99, "passed": True} for i, n in enumerate(names)}


def test_block_module_parse():
    assert parse_block_module("model.layers.3.mlp.down_proj.weight") == (3, "down")
    assert parse_block_module("model.layers.12.self_attn.q_proj.weight") == (12, "q")
    assert parse_block_module("encoder.layer.5.attention.self.query.weight") == (5, "q")
    assert parse_block_module("encoder.layer.5.attention.output.dense.weight") == (5, "o")
    assert parse_block_module("encoder.layer.5.intermediate.dense.weight") == (5, "up")
    assert parse_block_module("encoder.layer.5.output.dense.weight") == (5, "down")
    assert parse_block_module("transformer.h.2.attn.c_attn.weight") == (2, "qkv")
    assert parse_block_module("blocks.7.adaLN_modulation.1.weight") == (7, "adaLN")
    assert parse_block_module("model.embed_tokens.weight") == (None, None)
    # U-Nets: ADM/LDM rows in, mid, out; diffusers rows down N.M (resnet M and attention M together)
    assert parse_block_module("network.input_blocks.1.0.in_layers.2.weight") == ("in 1", "in_layers")
    assert parse_block_module("network.input_blocks.11.1.qkv.weight") == ("in 11", "qkv")
    assert parse_block_module("network.middle_block.1.proj_out.weight") == ("mid 1", "proj_out")
    assert parse_block_module("network.output_blocks.3.0.emb_layers.1.weight") == ("out 3", "emb_layers")
    assert parse_block_module("network.input_blocks.0.0.weight") == ("in 0", "conv")
    assert parse_block_module("down_blocks.1.resnets.0.conv1.weight") == ("down 1.0", "conv1")
    assert parse_block_module("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight") == ("down 1.0", "x.k")
    assert parse_block_module("mid_block.resnets.1.time_emb_proj.weight") == ("mid 1", "time_emb_proj")
    assert parse_block_module("up_blocks.2.upsamplers.0.conv.weight") == ("up 2", "resample")
    assert parse_block_module("blocks.3.attn.qkv.weight") == (3, "qkv")  # DiT


def test_a_name_outside_every_block_says_why():
    for name in ("network.time_embed.0.weight", "model.embed_tokens.weight", "network.out.2.weight"):
        where = place(name)
        assert where.block is None and "no numbered block" in where.why
    assert place("network.input_blocks.4.x.weight").why.startswith("input_blocks.4: expected a numbered layer")
    q = QualityReport(report={"per_layer": _per_layer(UNET_NAMES)})
    assert q.outside_blocks()["why not in a block"].str.contains("no numbered block").all()


@pytest.mark.parametrize("names,blocks,modules", [
    (DREAM_NAMES, 3, ["q", "k", "v", "o", "gate", "up", "down"]),
    (BERT_NAMES, 2, ["q", "k", "v", "o", "up", "down"]),
])
def test_transformer_heatmap_is_block_by_module(names, blocks, modules):
    frame = layer_frame(_per_layer(names))
    assert fits_block_grid(frame)
    cells, layout = heatmap_frame(frame)
    assert layout == "block"
    assert len(cells) == blocks * len(modules)
    assert list(dict.fromkeys(cells["x"])) == modules  # module order q, k, v, o, gate, up, down
    assert sorted(cells["y"].unique()) == list(range(blocks))
    row = cells[(cells["y"] == 1) & (cells["x"] == "down")].iloc[0]
    assert row["name"] in ("model.layers.1.mlp.down_proj.weight", "encoder.layer.1.output.dense.weight")
    assert row["value"] == pytest.approx(-np.log10(1 - row["cosine"]))
    q = QualityReport(report={"per_layer": _per_layer(names)})
    assert len(q.outside_blocks()) == 2 and len(q.worst()) == 10
    assert not q.fallbacks().empty and q.fallbacks()["why"].str.contains("fallback").all()


def test_unet_heatmap_is_block_by_module_in_model_order():
    names = [f"network.{stage}.{i}.{m}.weight" for stage in ("input_blocks", "output_blocks") for i in (2, 10)
             for m in ("0.in_layers.2", "0.out_layers.3", "0.emb_layers.1", "1.qkv", "1.proj_out")]
    names += ["network.middle_block.0.in_layers.2.weight", "network.middle_block.1.qkv.weight",
              "network.time_embed.0.weight"]
    cells, layout = heatmap_frame(layer_frame(_per_layer(names)))
    assert layout == "block"
    assert set(cells["name"]) == set(names) - {"network.time_embed.0.weight"}  # every tensor in a block has a cell
    assert block_rows(cells) == ["in 2", "in 10", "mid 0", "mid 1", "out 2", "out 10"]  # encoder, middle, decoder
    assert set(cells["x"]) == {"in_layers", "out_layers", "emb_layers", "qkv", "proj_out"}


def test_other_models_are_layer_by_metric():
    names = ["net.conv_in.weight", "net.time_mlp.0.weight", "net.final.weight"]
    frame = layer_frame(_per_layer(names))
    assert not fits_block_grid(frame)
    cells, layout = heatmap_frame(frame)
    assert layout == "metric" and len(cells) == 3 * len(names)
    assert set(cells["x"]) == {"cosine", "rel. error", "SQNR"} and set(cells["y"]) == set(names)


def test_long_models_are_paged():
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(95)]
    cells, _ = heatmap_frame(layer_frame(_per_layer(names)), "metric")
    first, pages = page_of(cells, 0, 40)
    last, _ = page_of(cells, 9, 40)  # past the end: the last page
    assert pages == 3 and len(block_rows(first)) == 40 and len(block_rows(last)) == 15
    assert set(block_rows(first)) | set(block_rows(page_of(cells, 1, 40)[0])) | set(block_rows(last)) == set(names)


def test_colour_scale_separates_nines():
    assert list(nines([0.9, 0.99, 0.999, 0.9999])) == pytest.approx([1, 2, 3, 4])
    assert nines(1.0) == 7.0 and cosine_label(2) == "0.99" and cosine_label(3) == "0.999"


def test_difference_of_two_results():
    a, b = layer_frame(_per_layer(DREAM_NAMES, seed=1)), layer_frame(_per_layer(DREAM_NAMES, seed=2))
    cells, layout = diff_frame(a, b)
    assert layout == "block" and len(cells) == 21
    r = cells.iloc[0]
    assert r["value"] == pytest.approx(nines(r["cosine_b"]) - nines(r["cosine_a"]))


def test_a_calibrated_stores_output_sensitivity_is_drawn_like_its_weights():
    """The manifest's per-layer output sensitivity gets the weight heatmap's layout, a cell per calibrated
    tensor coloured by its output cosine, with no pass threshold (nothing marked failed)."""
    import holoviews as hv

    from arrow_quant_v2.ui.plots import quality_heatmap

    per_layer = _per_layer(DREAM_NAMES)
    calibrated = [n for n in DREAM_NAMES if "layers" in n]
    entry = {"tensors": {n: {"bits": 4, "output_cosine": 1 - 10 ** -(2 + i / 10), "plain_output_cosine": 0.99,
                             "output_rel_error2": 1e-3} for i, n in enumerate(calibrated)}}
    q = QualityReport(report={"per_layer": per_layer}, sensitivity=entry)
    cells, layout = q.sensitivity_cells()
    assert layout == q.cells()[1] == "block" and sorted(cells["name"]) == sorted(calibrated)
    assert cells["value"].tolist() == pytest.approx([nines(entry["tensors"][n]["output_cosine"]) for n in cells["name"]])
    labels = [e for e in quality_heatmap(cells, layout) if isinstance(e, hv.Labels)][0]
    assert not any(t.startswith("✗") for t in labels.data["text"])
    assert QualityReport(report={"per_layer": per_layer}).sensitivity_cells() is None


def test_state_modules_do_not_import_panel():
    code = ("import sys, arrow_quant_v2.ui as ui; ui.ModelLibrary; ui.JobManager; ui.QualityReport; "
            "bad = [m for m in ('panel', 'holoviews', 'bokeh') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------- budget and fidelity


async def test_terrain_unet_budget_range_and_fidelity(tmp_path, monkeypatch):
    """The reachable sizes are computed off the loop once per model and config (whatever the target);
    a budgeted job reports its budget, and its report keeps the per-noise-level figures for the chart."""
    import math

    from arrow_quant_v2 import budget
    from arrow_quant_v2.samples import sample_path
    from arrow_quant_v2.ui import settings as ui_settings
    from arrow_quant_v2.ui.quality import PSNR_CAP_DB, fidelity_frame
    from arrow_quant_v2.ui.settings import (
        BUDGET_FIELD, cached_size_range, check_target, describe_range, size_range_async,
    )

    assert BUDGET_FIELD not in QuantSettings.main_fields() + QuantSettings.advanced_fields()  # shown by the profile
    model = sample_path("terrain-unet")
    calls = []
    real = budget.size_range
    monkeypatch.setattr(budget, "size_range", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(ui_settings, "_RANGES", {})
    s = QuantSettings("edge")
    s.num_time_groups = 3
    assert cached_size_range(model, s.to_config()) is None
    r = await size_range_async(model, s.to_config())
    uni = r["uniform_mb"]
    assert 0 < r["min_mb"] < r["max_mb"] and uni["int2"] < uni["int4"] < uni["int8"]
    assert r["min_mb"] <= uni["int2"] * (1 + 1e-9) and uni["int8"] <= r["max_mb"] * (1 + 1e-9)
    target = round(r["uniform_mb"]["int4"], 3)
    s.target_model_size_mb = target
    assert await size_range_async(model, s.to_config()) is r and len(calls) == 1  # the target is not part of the key
    assert cached_size_range(model, s.to_config()) is r
    text = describe_range(r)
    assert text.startswith("≈ ") and "MiB (int2 ≈ " in text and "int4 ≈ " in text
    check_target(target, r)
    with pytest.raises(ConfigurationError, match="cannot be reached"):
        check_target(r["max_mb"] * 3, r, "terrain-unet")
    s.bit_width = 4  # another config: another range
    assert cached_size_range(model, s.to_config()) is None
    s.bit_width = 2

    mgr = JobManager(ModelLibrary([model.parent], include_samples=False), output_root=tmp_path / "out")
    job = await mgr.run("terrain-unet", s.to_config(), label=s.label)
    assert job.status == "done", job.error
    b = job.result["budget"]
    assert b["target_mb"] == pytest.approx(target) and b["measured_mb"] > 0 and isinstance(b["met"], bool)
    q = QualityReport(report=job.report, result=job.result)
    assert q.end_to_end["available"], q.end_to_end["reason"]
    levels = q.fidelity()
    assert len(levels) == 3 and list(levels["sigma"]) == sorted(levels["sigma"]) and (levels["sigma"] > 0).all()
    # a budget near int2: on e2e's held-out inputs the top noise level is far below the others (0.87 measured)
    assert levels["cosine"].between(0.5, 1.0).all() and levels["psnr_db"].map(math.isfinite).all()
    assert q.end_to_end["worst_cosine"] == pytest.approx(levels["cosine"].min())

    # identical outputs (infinite PSNR) are clipped; no figures: one reason, no rows
    inf = fidelity_frame({"available": True, "levels": [{"sigma": 0.5, "cosine": 1.0, "rel_error": 0.0,
                                                         "psnr_db": math.inf, "update_cosine": 1.0}]})
    assert inf["psnr_db"].iloc[0] == PSNR_CAP_DB and inf["psnr_capped"].iloc[0]
    none = QualityReport(report={"per_layer": {}, "recorded": True})
    assert not none.end_to_end["available"] and "not run" in none.end_to_end["reason"] and none.fidelity().empty


def test_broken_stores_in_the_output_root_are_listed_as_broken(cache, roots, tmp_path, make_model):
    """A bad neighbour in the output root (manifest `[]`, not JSON, another project's manifest,
    a damaged shard) is listed as broken with its error; the good store and the rest still work."""
    import shutil

    from arrow_quant_v2.engine import quantize_model
    from arrow_quant_v2.ui.quality import report_from_store

    models, _ = roots
    out = tmp_path / "out"
    quantize_model(make_model("tiny"), out / "good")
    shutil.copytree(out / "good", out / "damaged-shard")
    shard = next((out / "damaged-shard").glob("weights-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-100])
    for name, text in (("list", "[]"), ("not-json", "{nope"), ("foreign", '{"name": "my app", "totals": "x"}')):
        (out / name).mkdir()
        (out / name / "manifest.json").write_text(text)
    mgr = _manager(tmp_path, models)
    jobs = {Path(j.output_path).name: j for j in mgr.jobs}
    assert set(jobs) == {"good", "damaged-shard", "list", "not-json", "foreign"}
    for name in ("list", "not-json", "foreign"):
        assert jobs[name].status == "failed" and jobs[name].error.startswith("broken store:"), name
        assert "manifest.json" in jobs[name].error or "format" in jobs[name].error
    assert jobs["good"].status == "done" and report_from_store(jobs["good"].output_path)["per_layer"]
    assert [j.output_path for j in mgr.results()] and all(j.status == "done" for j in mgr.results())
    with pytest.raises(ArrowQuantError, match="damaged-shard"):  # its manifest is fine; the shard is caught on open
        report_from_store(jobs["damaged-shard"].output_path)
    assert mgr.library.models  # the library still lists models

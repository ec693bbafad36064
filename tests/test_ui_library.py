"""The app's model library (state, no server): the Hugging Face cache listed by repo id, roots searched
at any depth, a root that is itself a model refused, rescans cached and off the event loop."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from arrow_quant_v2.ui import library as library_module
from arrow_quant_v2.ui.library import ModelLibrary
from arrow_quant_v2.ui.roots import MODEL_ROOTS_ENV

from hubcache import add_snapshot, folder_files


def tiny_model(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"model.layers.0.mlp.up_proj.weight": rng.standard_normal((32, 16)).astype(np.float32)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("ARROW_QUANT_CACHE", str(tmp_path / "aq-cache"))
    monkeypatch.delenv(MODEL_ROOTS_ENV, raising=False)
    return tmp_path


def names(lib: ModelLibrary) -> dict:
    return {e.name: e for e in lib.models}


def test_hub_cache_listed_by_repo_id_with_revisions_when_several(env):
    files = folder_files(tiny_model(env / "src"))
    a = add_snapshot(env / "hf", "org/a", files)
    b_main = add_snapshot(env / "hf", "org/b", files, commit="b" * 40)
    b_v1 = add_snapshot(env / "hf", "org/b", folder_files(tiny_model(env / "src2", seed=1)), refs=("v1",), commit="c" * 40)
    add_snapshot(env / "hf", "org/config-only", {"config.json": b"{}"})  # nothing to quantize: not listed
    lib = ModelLibrary([], include_samples=False)
    listed = names(lib)
    assert set(listed) == {"org/a", "org/b@main", "org/b@v1"}
    assert {e.kind for e in listed.values()} == {"hub"}
    assert (listed["org/a"].path, listed["org/b@main"].path, listed["org/b@v1"].path) == (str(a), str(b_main), str(b_v1))
    assert listed["org/a"].params == 32 * 16 and listed["org/a"].usable
    assert listed["org/a"].label == "org/a (hub)" and lib.rows()[0]["source"] == "hub"
    # a job can use it: found by name, inside the allowed roots
    assert lib.get("org/b@v1") is listed["org/b@v1"]
    assert lib.materialize(listed["org/b@v1"]) == b_v1.resolve()
    assert "org/a" not in names(ModelLibrary([], include_samples=False, include_hub=False))
    # typed in the Models tab: a cached id (by commit, say) is added under that name; a missing one says how to get it
    added = lib.add_path("org/b@" + "c" * 40)
    assert added.usable and added.path == str(b_v1) and lib.get("org/b@" + "c" * 40).path == str(b_v1)
    missing = lib.add_path("org/missing")
    assert not missing.usable and str(env / "hf") in lib.message and "--download" in lib.message


def test_roots_searched_at_any_depth_and_a_root_model_refused(env):
    root = env / "models"
    deep = tiny_model(root / "team" / "project" / "2025" / "checkpoints" / "deep-model")
    tiny_model(root / "shallow")
    store_like = root / "stores" / "sd-int4"
    tiny_model(store_like / "vae")  # a pipeline store's copied component
    (store_like / "manifest.json").write_text("{}")
    lib = ModelLibrary([root], include_samples=False, include_hub=False)
    assert {e.name: e.path for e in lib.models} == {"deep-model": str(deep), "shallow": str(root / "shallow")}
    assert not lib.message
    # a root that is a model itself is not listed as one, and the person is told what to do
    lib = ModelLibrary([deep], include_samples=False, include_hub=False)
    assert lib.models == [] and "itself a model folder" in lib.message and "parent" in lib.message


def test_a_hub_cache_as_root_names_snapshots_by_repo(env):
    files = folder_files(tiny_model(env / "src"))
    add_snapshot(env / "cache-copy", "org/one", files)
    add_snapshot(env / "cache-copy", "org/two", files, commit="d" * 40)
    add_snapshot(env / "cache-copy", "org/two", folder_files(tiny_model(env / "s2", seed=2)), refs=("v2",), commit="e" * 40)
    lib = ModelLibrary([env / "cache-copy"], include_samples=False, include_hub=False)
    assert sorted(e.name for e in lib.models) == ["org/one", "org/two@dddddddddddd", "org/two@eeeeeeeeeeee"]


def test_hundreds_of_repos_rescans_read_only_what_changed(env, monkeypatch):
    files = folder_files(tiny_model(env / "src"))
    for i in range(300):
        add_snapshot(env / "hf", f"org/model-{i:03d}", files)
    lib = ModelLibrary([], include_samples=False)
    assert len(lib.models) == 300 and all(e.usable for e in lib.models)

    calls = {"scan": 0, "describe": 0}
    real_scan, real_describe = library_module.hub.cached_models, library_module.describe_model

    def counting_scan(*a, **k):
        calls["scan"] += 1
        return real_scan(*a, **k)

    def counting_describe(*a, **k):
        calls["describe"] += 1
        return real_describe(*a, **k)

    monkeypatch.setattr(library_module.hub, "cached_models", counting_scan)
    monkeypatch.setattr(library_module, "describe_model", counting_describe)
    lib.refresh()
    assert len(lib.models) == 300 and calls == {"scan": 0, "describe": 0}
    add_snapshot(env / "hf", "org/new", files)
    lib.refresh()
    assert len(lib.models) == 301 and calls == {"scan": 1, "describe": 1}


async def test_refresh_async_scans_off_the_event_loop(env, monkeypatch):
    add_snapshot(env / "hf", "org/a", folder_files(tiny_model(env / "src")))
    lib = ModelLibrary([], include_samples=False, scan=False)
    threads = []
    real = lib.scan

    def recording_scan():
        threads.append(threading.current_thread())
        return real()

    monkeypatch.setattr(lib, "scan", recording_scan)
    await lib.refresh_async()
    assert threads and threads[0] is not threading.main_thread()
    assert [e.name for e in lib.models] == ["org/a"]


async def test_a_job_on_a_cached_hub_model(env):
    from arrow_quant_v2 import DiffusionQuantConfig
    from arrow_quant_v2.store import load_quantized
    from arrow_quant_v2.ui import JobManager

    snapshot = add_snapshot(env / "hf", "org/a", folder_files(tiny_model(env / "src")))
    mgr = JobManager(ModelLibrary([], include_samples=False), output_root=env / "out", progress_interval=0.01)
    job = await mgr.run("org/a", DiffusionQuantConfig.from_profile("cloud"))
    assert job.status == "done", job.error
    assert Path(job.output_path) == env / "out" / "a-cloud"
    assert load_quantized(job.output_path).manifest["source"]["path"] == str(snapshot.resolve())
    assert job.report["passed"]

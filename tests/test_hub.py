"""Hugging Face repo ids as model paths, offline (HF_HUB_OFFLINE=1), against a hub cache laid out
exactly as huggingface_hub writes it (its own scan_cache_dir reads it back)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arrow_quant_v2 import ArrowQuantV2, AsyncArrowQuantV2, ConfigurationError, ModelNotFoundError, ValidationError
from arrow_quant_v2 import hub
from arrow_quant_v2.config import DiffusionQuantConfig
from arrow_quant_v2.store import load_quantized

import huggingface_hub  # the [hub] extra, part of [dev]
from hubcache import add_snapshot, folder_files

COMMIT_V1 = "1" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, make_model):
    """A hub cache with org/tiny (main) and org/tiny@v1 (another revision, with fewer layers)."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main = add_snapshot(cache, "org/tiny", folder_files(make_model(size="tiny")))
    v1 = add_snapshot(cache, "org/tiny", folder_files(make_model(size=(64, 128, 1, 256))), refs=("v1",), commit=COMMIT_V1)
    return cache, main, v1


def test_fake_cache_has_huggingface_hub_layout(hub_cache):
    cache, main, v1 = hub_cache
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == ("org/tiny", "model")
    revisions = {r.commit_hash: r for r in repo.revisions}
    assert set(revisions) == {main.name, COMMIT_V1}
    assert revisions[main.name].refs == {"main"} and revisions[COMMIT_V1].refs == {"v1"}
    assert {f.file_name for f in revisions[main.name].files} == {"model.safetensors", "config.json"}
    # huggingface_hub itself resolves it offline to the same folder
    assert Path(huggingface_hub.snapshot_download("org/tiny", cache_dir=cache, local_files_only=True)) == main


@pytest.mark.parametrize("spec, expected", [
    ("org/name", ("org/name", None)), ("Org-1/na.me_2@v1.0", ("Org-1/na.me_2", "v1.0")),
    ("org/name@" + "a" * 40, ("org/name", "a" * 40)), ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("name", None), ("/abs/path", None), ("./org/name", None), ("a/b/c", None), ("org--x/name", None),
    ("org/../x", None), ("org/name@", None), ("C:\\models\\x", None),
])
def test_parse_repo_id(spec, expected):
    assert hub.parse_repo_id(spec) == expected


def test_resolve_ids_revisions_and_paths(hub_cache, tmp_path, monkeypatch):
    cache, main, v1 = hub_cache
    assert hub.resolve("org/tiny") == main
    assert hub.resolve("org/tiny@v1") == v1 == hub.resolve("org/tiny", revision="v1")
    assert hub.resolve(f"org/tiny@{COMMIT_V1}") == v1
    assert hub.resolve("org/tiny@v1", revision="main") == main  # the argument wins
    # an existing folder of that name is a path, not an id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    assert hub.resolve("org/tiny") == Path("org/tiny")
    assert hub.resolve(Path("org/other")) == Path("org/other")  # a Path object is never an id
    with pytest.raises(ConfigurationError, match="revision"):
        hub.resolve(str(main), revision="v1")


def test_id_not_cached_says_where_and_how(hub_cache):
    cache, _, _ = hub_cache
    for spec in ("org/missing", "org/tiny@v9"):
        with pytest.raises(ModelNotFoundError) as e:
            hub.resolve(spec)
        msg = str(e.value)
        assert str(cache) in msg and "--download" in msg and "hf download" in msg and "download=True" in msg
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        hub.resolve("org/missing", download=True)


def test_quantize_validate_and_inspect_by_id_sync_api(hub_cache, tmp_path):
    cache, main, v1 = hub_cache
    q = ArrowQuantV2()
    result = q.quantize_diffusion_model("org/tiny", tmp_path / "s", DiffusionQuantConfig.from_profile("cloud"))
    store = load_quantized(result["quantized_path"])
    assert store.manifest["source"]["path"] == str(main)
    assert q.validate_quality("org/tiny", tmp_path / "s")["passed"]
    # a store made from one revision is refused against another
    with pytest.raises(ValidationError, match="different model"):
        q.validate_quality("org/tiny@v1", tmp_path / "s")
    q.quantize_diffusion_model("org/tiny", tmp_path / "s1", revision="v1")
    assert load_quantized(tmp_path / "s1").manifest["source"]["path"] == str(v1)
    with pytest.raises(ModelNotFoundError, match=str(cache)):
        q.quantize_diffusion_model("org/missing", tmp_path / "never")
    assert not (tmp_path / "never").exists()


async def test_quantize_by_id_async_api(hub_cache, tmp_path):
    _, _, v1 = hub_cache
    q = AsyncArrowQuantV2()
    result = await q.quantize_diffusion_model_async("org/tiny@v1", tmp_path / "a")
    assert load_quantized(result["quantized_path"]).manifest["source"]["path"] == str(v1)
    assert (await q.validate_quality_async("org/tiny@v1", tmp_path / "a"))["passed"]
    with pytest.raises(ModelNotFoundError, match="--download"):
        await q.quantize_diffusion_model_async("org/missing", tmp_path / "b", download=False)


def test_cli_by_id_offline(hub_cache, tmp_path, repo_root):
    cache, main, v1 = hub_cache
    env = dict(os.environ, PYTHONPATH=str(repo_root))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "arrow_quant_v2", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    r = run("quantize", "org/tiny", "s", "--json")
    assert r.returncode == 0, r.stderr
    assert load_quantized(tmp_path / "s").manifest["source"]["path"] == str(main)
    r = run("validate", "org/tiny", "s", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["passed"], r.stderr
    r = run("inspect", "org/tiny", "--revision", "v1", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["tensors"]) == len(tensor_names(v1)) < len(tensor_names(main))
    r = run("quantize", "org/missing", "never")
    assert r.returncode == 3
    assert str(cache) in r.stderr and "arrow-quant quantize org/missing OUTPUT --download" in r.stderr
    r = run("quantize", "org/missing", "never", "--download")
    assert r.returncode == 3 and "HF_HUB_OFFLINE" in r.stderr


def tensor_names(folder: Path):
    from arrow_quant_v2.source import open_model

    return list(open_model(folder).tensors)


def test_cached_models_lists_ids_and_revisions(hub_cache):
    cache, main, v1 = hub_cache
    listed = {(m.repo_id, m.revision): m for m in hub.cached_models()}
    assert set(listed) == {("org/tiny", main.name), ("org/tiny", COMMIT_V1)}
    assert listed[("org/tiny", main.name)].spec == "org/tiny"
    assert listed[("org/tiny", COMMIT_V1)].spec == "org/tiny@v1"
    assert listed[("org/tiny", COMMIT_V1)].path == v1


def test_without_huggingface_hub_an_id_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ModelNotFoundError, match=r"org/x: no such file or folder.*arrow-quant-v2\[hub\]"):
        hub.resolve("org/x")
    assert hub.cached_models(tmp_path) == []
    assert hub.resolve(str(tmp_path)) == tmp_path  # paths never need it

"""Load: twenty quantizations asked for at once hold the job and memory bounds and all finish."""
import asyncio

from arrow_quant_v2 import AsyncArrowQuantV2, DiffusionQuantConfig, load_quantized
from arrow_quant_v2.aio import source_bytes
from arrow_quant_v2.validation import validate_store


async def test_twenty_jobs_at_once_hold_their_bounds_and_lose_nothing(make_model, tmp_path):
    model = make_model("medium")
    size = source_bytes(model)
    budget = int(size * 2.5)  # room for two models' weights at a time, not three
    q = AsyncArrowQuantV2(max_concurrent_jobs=3, max_bytes_in_flight=budget, progress_interval=0)
    seen = {"jobs": 0, "bytes": 0}

    def watch(event):
        stats = q.stats()
        seen["jobs"] = max(seen["jobs"], stats["jobs_running"])
        seen["bytes"] = max(seen["bytes"], stats["bytes_in_flight"])

    models = [(model, tmp_path / f"out-{i:02d}", DiffusionQuantConfig(bit_width=(2, 4, 8)[i % 3])) for i in range(20)]
    results = await q.quantize_multiple_models_async(models, on_event=lambda e: watch(e))
    assert len(results) == 20
    assert 1 <= seen["jobs"] <= 3 and seen["bytes"] <= budget, seen
    assert seen["bytes"] == 2 * size, "two jobs ran side by side, never a third beyond the budget"
    assert q.stats() == {"jobs_running": 0, "jobs_waiting": 0, "bytes_in_flight": 0, "bytes_waiting": 0}
    for (src, out, config), result in zip(models, results):
        assert result["quantized_path"] == str(out) and result["bit_width"] == config.bit_width
        assert validate_store(src, out)["passed"]
        assert load_quantized(out).manifest["config"]["bit_width"] == config.bit_width
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out-{i:02d}" for i in range(20)], "no partial left"

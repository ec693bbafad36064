"""The FastAPI and aiohttp snippets of the async API document, as written, serve real requests.

The app code inside ``fastapi_app()`` and ``aiohttp_app()`` is the document's code
unchanged; only the paths sent to it are ours.
"""
from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import pytest

RESULT_KEYS = {"quantized_path", "compression_ratio", "cosine_similarity", "model_size_mb", "modality",
               "bit_width", "quantization_time_s"}


def fastapi_app():
    # --- the document's FastAPI snippet ---
    from fastapi import FastAPI
    from arrow_quant_v2 import AsyncArrowQuantV2, DiffusionQuantConfig

    app = FastAPI()
    quantizer = AsyncArrowQuantV2()

    @app.post("/quantize")
    async def quantize_model(model_path: str, output_path: str):
        result = await quantizer.quantize_diffusion_model_async(
            model_path=model_path,
            output_path=output_path,
            config=DiffusionQuantConfig(bit_width=4)
        )
        return result
    # --- end of snippet ---
    return app


def aiohttp_app():
    # --- the document's aiohttp snippet ---
    from aiohttp import web
    from arrow_quant_v2 import AsyncArrowQuantV2

    quantizer = AsyncArrowQuantV2()

    async def handle_quantize(request):
        data = await request.json()
        result = await quantizer.quantize_diffusion_model_async(
            model_path=data['model_path'],
            output_path=data['output_path']
        )
        return web.json_response(result)

    app = web.Application()
    app.router.add_post('/quantize', handle_quantize)
    # --- end of snippet ---
    return app


def check_result(result: dict, output: Path, bits: int) -> None:
    assert RESULT_KEYS <= set(result)
    assert result["bit_width"] == bits and Path(result["quantized_path"]) == output
    assert result["compression_ratio"] > 1 and 0 < result["cosine_similarity"] <= 1
    assert (output / "manifest.json").is_file()
    # strict JSON: no NaN/Infinity anywhere, so any client can parse it
    json.dumps(result, allow_nan=False)
    assert all(not isinstance(v, float) or math.isfinite(v) for v in result.values())


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")  # not ours
def test_fastapi_testclient(make_model, tmp_path):
    from fastapi.testclient import TestClient

    model = make_model("small")
    with TestClient(fastapi_app()) as client:
        for i in range(2):  # the module-level quantizer serves request after request
            response = client.post("/quantize", params={"model_path": str(model), "output_path": str(tmp_path / f"o{i}")})
            assert response.status_code == 200, response.text
            check_result(response.json(), tmp_path / f"o{i}", 4)


async def test_fastapi_concurrent_requests_over_asgi(make_model, tmp_path):
    app = fastapi_app()
    models = [make_model("small"), make_model("tiny")]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        responses = await asyncio.gather(*(
            client.post("/quantize", params={"model_path": str(m), "output_path": str(tmp_path / f"c{i}")})
            for i, m in enumerate(models)))
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        check_result(response.json(), tmp_path / f"c{i}", 4)


async def test_aiohttp_server_on_loopback(make_model, tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    models = [make_model("small"), make_model("tiny")]
    async with TestClient(TestServer(aiohttp_app(), host="127.0.0.1")) as client:
        responses = await asyncio.gather(*(
            client.post("/quantize", json={"model_path": str(m), "output_path": str(tmp_path / f"a{i}")})
            for i, m in enumerate(models)))
        for i, response in enumerate(responses):
            assert response.status == 200, await response.text()
            check_result(await response.json(), tmp_path / f"a{i}", 4)  # default config: int4


async def test_the_event_loop_serves_other_requests_during_a_quantization(make_model, tmp_path):
    """A quick endpoint answers while a quantization request is in flight on the same loop."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    app = aiohttp_app()
    answered_while_busy = []

    async def ping(request):
        return web.json_response({"ok": True})

    app.router.add_get("/ping", ping)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        job = asyncio.create_task(client.post("/quantize", json={"model_path": str(make_model("large")),
                                                                 "output_path": str(tmp_path / "big")}))
        while not job.done():
            response = await client.get("/ping")
            assert (await response.json()) == {"ok": True}
            answered_while_busy.append(not job.done())
            await asyncio.sleep(0.01)
        assert (await job).status == 200
    assert sum(answered_while_busy) >= 2

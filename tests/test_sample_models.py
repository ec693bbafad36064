"""Integration: both sample models (synthetic tiny Dream, real terrain U-Net) at int2/int4/int8, group 64."""
import numpy as np
import pytest

from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig, load_quantized
from arrow_quant_v2.encodings import get_encoding
from arrow_quant_v2.samples import sample_path
from arrow_quant_v2.source import open_model

THRESHOLD = {2: 0.90, 4: 0.99, 8: 0.999}


@pytest.fixture(scope="module", params=["tiny-dream", "terrain-unet"])
def sample(request):
    return request.param, sample_path(request.param)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sample_model_round_trip(sample, bits, tmp_path):
    name, model = sample
    q = ArrowQuantV2()
    result = q.quantize_diffusion_model(model, tmp_path / "q", config=DiffusionQuantConfig(bit_width=bits, group_size=64))
    report = q.validate_quality(model, tmp_path / "q")

    assert result["modality"] == {"tiny-dream": "text", "terrain-unet": "image"}[name]
    assert result["cosine_similarity"] >= THRESHOLD[bits]
    assert report["passed"] and report["cosine_similarity"] == pytest.approx(result["cosine_similarity"], abs=1e-6)

    store = load_quantized(tmp_path / "q")
    on_disk = sum(f.stat().st_size for f in store.files)
    assert result["model_size_mb"] == pytest.approx(on_disk / 2**20)
    assert result["compression_ratio"] == pytest.approx(open_model(model).total_bytes / on_disk)
    quantized = [e for e in store.tensors.values() if e.quantized]
    for e in quantized:  # every stored byte is counted, and matches the encoding's formula
        rows, cols = e.shape[0], int(np.prod(e.shape[1:]))
        assert e.nbytes == get_encoding(e.encoding, e.bits, e.group_size).nbytes(rows, cols), e.name
    at_width = [e for e in quantized if e.bits == bits]
    bpw = sum(e.nbytes for e in at_width) * 8 / sum(e.numel for e in at_width)
    assert bpw <= bits + 0.6, f"int{bits} tensors store {bpw:.3f} bits per weight"
    assert sum(e.numel for e in quantized if e.bits == bits) > 0.5 * sum(e.numel for e in quantized)

    # what validation measured is what a reload gives
    source = open_model(model)
    worst, cos = report["worst_layers"][0]
    x = source.read_float32(worst).astype(np.float64).ravel()
    y = store.dequantize(worst).astype(np.float64).ravel()
    assert np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)) == pytest.approx(cos, abs=1e-9)


def test_time_conditioning_is_protected_in_the_unet(tmp_path):
    model = sample_path("terrain-unet")
    ArrowQuantV2().quantize_diffusion_model(model, tmp_path / "q", config=DiffusionQuantConfig.from_profile("edge"))
    t = load_quantized(tmp_path / "q").tensors
    for name in ("network.time_embed.2.weight", "network.input_blocks.1.0.emb_layers.1.weight",
                 "network.label_emb.2.weight"):
        assert t[name].bits >= 4 and "time conditioning" in t[name].reason, (name, t[name].reason)

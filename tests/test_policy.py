"""One acceptance policy: the chain of candidates, the acceptance test and the reasons, asked by the
planner, the budget and the engine alike, so the budget's prediction is what the engine writes."""
from __future__ import annotations

import pytest

from arrow_quant_v2 import DiffusionQuantConfig, load_quantized, policy
from arrow_quant_v2.budget import size_range
from arrow_quant_v2.engine import plan_tensors, quantize_model
from arrow_quant_v2.source import open_model

from test_budget import mixed_model  # noqa: F401 - the module-scoped fixture


def test_the_chain_tries_the_alternate_then_each_wider_width_then_lossless():
    config = DiffusionQuantConfig(bit_width=2)
    tried, steps = policy.choose(config, 2, 4096), []
    while tried.encoding is not None:
        nxt, reason, wider = policy.fallback(config, tried, 0.5, 4096)
        assert f"{tried.encoding} cos 0.5000 < " in reason and ("fallback from int" in reason) == wider
        if not wider:  # the same width, with the alternate encoding at its own group
            assert (nxt.bits, nxt.encoding) == (tried.bits, policy.ALTERNATE_ENCODING)
        steps.append(nxt.bits)
        tried = nxt
    assert [b for i, b in enumerate(steps) if i == 0 or b != steps[i - 1]] == [*policy.FALLBACK_ORDER, 0]
    labels = [c.encoding for c in policy.at_width(config, 4, 4096)]
    assert labels == [policy.choose(config, 4, 4096).encoding, policy.ALTERNATE_ENCODING]
    gguf = DiffusionQuantConfig(bit_width=4, target_runtime="gguf")
    assert len(policy.at_width(gguf, 4, 4096)) == 1  # under gguf the width fixes the ggml type: no alternate


def test_a_sampled_cosine_must_clear_the_threshold_by_its_margin():
    config = DiffusionQuantConfig(bit_width=4, min_accuracy=0.99)
    assert policy.accepts(config, 4, 0.99) and not policy.accepts(config, 4, 0.9899)
    assert not policy.accepts(config, 4, 0.995, stderr=0.002)  # 0.995 < 0.99 + 3 * 0.002
    assert policy.accepts(config, 4, 0.997, stderr=0.002)


@pytest.mark.parametrize("min_accuracy", [None, 0.985])
def test_the_budgets_prediction_is_what_the_engine_writes(mixed_model, tmp_path, min_accuracy):  # noqa: F811
    """Every tensor of this model is small enough to be measured whole by the budget, so with one
    policy its chosen candidate, cosine and reason must be exactly what the engine stores: no
    fallback, no surprise. (With min_accuracy 0.985 some int2 and int4 defaults miss and the
    same-width alternate or a wider width is taken: the chain is exercised, not just the first try.)"""
    reach = size_range(mixed_model, DiffusionQuantConfig(min_accuracy=min_accuracy))
    target = reach["min_mb"] + 0.25 * (reach["max_mb"] - reach["min_mb"])
    config = DiffusionQuantConfig(target_model_size_mb=target, min_accuracy=min_accuracy)
    plans, budget = plan_tensors(open_model(mixed_model), config)
    result = quantize_model(mixed_model, tmp_path / "b", config)
    assert result["fallbacks"] == [] and result["budget"]["fallbacks"] == []
    store = load_quantized(tmp_path / "b")
    for name, plan in plans.items():
        entry, option = store.tensors[name], budget.tensors[name].option
        assert (entry.bits, entry.group_size, entry.reason) == (plan.bits, plan.group_size, plan.reason), name
        if not plan.lossless:
            assert entry.encoding == plan.encoding == option.encoding
            assert entry.cosine == pytest.approx(option.cosine, abs=1e-9), name
    if min_accuracy is not None:
        assert any(t.option.encoding == policy.ALTERNATE_ENCODING for t in budget.tensors.values())

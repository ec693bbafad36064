"""DiffusionQuantConfig: every invalid value raises ConfigurationError naming the field, the value
and what is allowed; profiles, to_dict/from_dict/JSON round trips and repr."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arrow_quant_v2 import ArrowQuantV2, ConfigurationError, DiffusionQuantConfig
from arrow_quant_v2.config import BIT_WIDTHS, GROUP_SIZES, PROFILE_DEFAULTS, PROFILES, field_specs
from arrow_quant_v2.engine import quantize_model

from badfiles import hash_tree, leftovers, make_model

C = DiffusionQuantConfig

BAD = [
    ("bit_width", 7, "2, 3, 4, 5, 6, 8"), ("bit_width", 16, "2, 3, 4, 5, 6, 8"), ("bit_width", 0, "2, 3, 4, 5, 6, 8"),
    ("bit_width", "4", "2, 3, 4, 5, 6, 8"), ("bit_width", 4.0, "2, 3, 4, 5, 6, 8"), ("bit_width", True, "2, 3, 4, 5, 6, 8"),
    ("bit_width", None, "2, 3, 4, 5, 6, 8"), ("target_runtime", "onnx", "None, 'gguf'"), ("target_runtime", "GGUF", "'gguf'"),
    ("group_size", 48, "None, 0, 8, 16, 32, 64, 128, 256"), ("group_size", -1, "0, 8, 16, 32"),
    ("group_size", 64.0, "0, 8, 16, 32"),
    ("sensitive_bits", 2, "4, 5, 6, 8"), ("modality", "video", "'text'"), ("modality", "TEXT", "'text'"),
    ("deployment_profile", "mobile", "'edge'"), ("symmetric", 1, "True or False"), ("fail_fast", "yes", "True or False"),
    ("enable_time_aware", None, "True or False"), ("protect_embeddings", 0, "True or False"),
    ("min_accuracy", 1.5, "[0.0, 1.0]"), ("min_accuracy", -0.1, "[0.0, 1.0]"), ("min_accuracy", math.nan, "[0.0, 1.0]"),
    ("min_accuracy", "0.9", "[0.0, 1.0]"), ("min_accuracy", True, "[0.0, 1.0]"),
    ("lossless_below", -1, "an integer in [0"), ("lossless_below", 1.5, "an integer"), ("lossless_below", 2**31, "an integer"),
    ("num_threads", -1, "[0, 256]"), ("num_threads", 257, "[0, 256]"), ("num_threads", 2.0, "an integer"),
    ("num_time_groups", 0, "[1, 1000]"), ("max_shard_mb", 0, "[1, "), ("max_shard_mb", 2**21, "[1, "),
    ("target_model_size_mb", 0, "[0.001, inf]"), ("target_model_size_mb", -5.0, "[0.001, inf]"),
    ("target_model_size_mb", math.nan, "a number"), ("encoding", "nope", "affine"), ("encoding", 5, "an encoding name"),
    ("sensitive_layers", [1], "glob patterns"), ("sensitive_layers", 5, "glob patterns"),
    ("bit_rules", {"*.attn.*": 7}, "(0, 2, 3, 4, 5, 6, 8)"), ("bit_rules", {"*.attn.*": 4.0}, "(0, 2, 3, 4, 5, 6, 8)"),
    ("bit_rules", {"*.attn.*": False}, "(0, 2, 3, 4, 5, 6, 8)"), ("bit_rules", {1: 4}, "glob pattern"),
    ("bit_rules", "abc", "glob pattern"), ("bit_rules", [1, 2], "glob pattern"),
]


@pytest.mark.parametrize("field,value,allowed", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_invalid_value_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ConfigurationError) as info:
        C(**{field: value})
    msg = str(info.value)
    assert field in msg and "allowed" in msg and allowed in msg, msg
    shown = repr(value) if not isinstance(value, dict) else repr(next(iter(value.values())))
    assert shown in msg or repr(tuple(value) if isinstance(value, list) else value) in msg, msg


@pytest.mark.parametrize("field,value,allowed", BAD[:6] + BAD[18:22], ids=lambda x: repr(x)[:20])
def test_invalid_values_also_refused_by_replace_from_dict_and_profiles(field, value, allowed):
    with pytest.raises(ConfigurationError, match=field):
        C().replace(**{field: value})
    with pytest.raises(ConfigurationError, match=field):
        C.from_dict({field: value})
    with pytest.raises(ConfigurationError, match=field):
        C.from_profile("local", **{field: value})


def test_config_errors_are_value_errors_and_raised_before_touching_anything(tmp_path):
    assert issubclass(ConfigurationError, ValueError)
    model = make_model(tmp_path / "model")
    before = hash_tree(tmp_path)
    with pytest.raises(ConfigurationError, match="config="):
        quantize_model(model, tmp_path / "out", {"bit_width": 4})
    with pytest.raises(ConfigurationError, match="config='cloud'"):
        quantize_model(model, tmp_path / "out", "cloud")
    with pytest.raises(ConfigurationError, match="mode"):
        ArrowQuantV2(mode="llm")
    assert hash_tree(tmp_path) == before and leftovers(tmp_path / "out") == []


def test_unknown_fields_and_non_dicts_are_refused():
    with pytest.raises(ConfigurationError, match=r"bitwidth.*allowed.*bit_width"):
        C.from_dict({"bitwidth": 4})
    with pytest.raises(ConfigurationError, match="allowed"):
        C.from_dict(None)
    with pytest.raises(ConfigurationError, match="deployment_profile='mobile'.*edge, local, cloud"):
        C.from_profile("mobile")
    with pytest.raises(ConfigurationError):
        C.from_profile("EDGE")
    with pytest.raises(TypeError):
        C(bitwidth=4)  # a typo in a keyword is a TypeError, as for any Python call


def test_numpy_scalars_are_accepted_as_plain_numbers(tmp_path):
    c = C(bit_width=np.int64(2), group_size=np.int32(32), lossless_below=np.int64(100), min_accuracy=np.float32(0.5),
          bit_rules={"x*": np.int8(8)})
    assert type(c.bit_width) is int and type(c.group_size) is int and type(c.lossless_below) is int
    assert type(c.min_accuracy) is float and type(c.bit_rules["x*"]) is int
    json.dumps(c.to_dict())  # would fail on numpy scalars
    assert C.from_dict(json.loads(c.to_json())) == c


def test_valid_values_are_accepted():
    for b in BIT_WIDTHS:
        for g in GROUP_SIZES:
            assert C(bit_width=b, group_size=g).bit_width == b
    c = C(min_accuracy=1, target_model_size_mb=math.inf, sensitive_layers="*.attn.*", bit_rules={"*.norm*": 0},
          modality="audio", encoding="affine", num_threads=256, lossless_below=0)
    assert c.sensitive_layers == ("*.attn.*",) and c.bit_rules == {"*.norm*": 0}


# -- profiles, round trips, repr --------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles(profile):
    c = C.from_profile(profile)
    assert c.deployment_profile == profile
    for k, v in PROFILE_DEFAULTS[profile].items():
        assert getattr(c, k) == v
    assert c.bit_width == {"edge": 2, "local": 4, "cloud": 8}[profile]
    assert C.from_profile(profile, group_size=128).group_size == 128


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_with_target_runtime_gguf(profile):
    c = C.from_profile(profile, target_runtime="gguf")
    assert c.target_runtime == "gguf" and c.deployment_profile == profile
    assert c.bit_width == {"edge": 2, "local": 4, "cloud": 8}[profile]
    _round_trips(c)


def test_target_runtime_gguf_conflicts_name_the_fix():
    assert C(target_runtime="gguf", bit_width=4, encoding="iq4_nl").encoding == "iq4_nl"  # a ggml type: fine
    with pytest.raises(ConfigurationError, match="encoding='kquant_nl' is not allowed with target_runtime='gguf'"):
        C(target_runtime="gguf", encoding="kquant_nl")
    with pytest.raises(ConfigurationError, match="symmetric=True is not allowed with target_runtime='gguf'"):
        C(target_runtime="gguf", symmetric=True)
    with pytest.raises(ConfigurationError, match="bit_width=4 is not supported by encoding 'q8_0'"):
        C(bit_width=4, encoding="q8_0")
    spec = field_specs()["target_runtime"]
    assert spec["choices"] == (None, "gguf") and spec["default"] is None


def _round_trips(c: C) -> None:
    d = c.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(C)}
    assert C.from_dict(d) == c
    assert C.from_dict(json.loads(json.dumps(d))) == c
    assert C.from_dict(json.loads(c.to_json())) == c
    assert eval(repr(c), {"DiffusionQuantConfig": DiffusionQuantConfig, "inf": math.inf}) == c
    assert c.replace() == c


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_round_trips(profile):
    _round_trips(C.from_profile(profile))


def test_repr_shows_bit_width_and_what_differs_from_defaults():
    assert repr(C()) == "DiffusionQuantConfig(bit_width=4)"
    r = repr(C(bit_width=2, sensitive_layers=["a*"], bit_rules={"x*": 8}, min_accuracy=0.5))
    assert r == "DiffusionQuantConfig(bit_width=2, sensitive_layers=('a*',), bit_rules={'x*': 8}, min_accuracy=0.5)"
    assert "group_size" not in repr(C(group_size=None)) and "group_size=32" in repr(C(group_size=32))


def test_field_specs_are_the_single_source_of_bounds():
    specs = field_specs()
    assert set(specs) == {f.name for f in dataclasses.fields(C)}
    for name, spec in specs.items():
        assert spec["doc"], name
        default = spec["default"]
        assert getattr(C(), name) == (tuple(default) if name == "sensitive_layers" else default)
        if spec["choices"]:
            for choice in spec["choices"]:
                C(**{name: choice})  # every declared choice is accepted
        if spec["bounds"]:
            lo, hi = spec["bounds"]
            C(**{name: lo})  # the lower bound itself is allowed
            with pytest.raises(ConfigurationError, match=name):
                C(**{name: hi * 2 + 1 if math.isfinite(hi) else -1})


configs = st.builds(
    C,
    bit_width=st.sampled_from(BIT_WIDTHS), group_size=st.sampled_from(GROUP_SIZES),
    symmetric=st.booleans(), target_runtime=st.just(None), modality=st.sampled_from([None, "text", "code", "image", "audio"]),
    enable_time_aware=st.booleans(), sensitive_bits=st.sampled_from([4, 5, 6, 8]), protect_embeddings=st.booleans(),
    sensitive_layers=st.lists(st.text(max_size=8), max_size=3),
    bit_rules=st.dictionaries(st.text(max_size=8), st.sampled_from([0, 2, 3, 4, 5, 6, 8]), max_size=3),
    min_accuracy=st.one_of(st.none(), st.floats(0, 1)), fail_fast=st.booleans(),
    lossless_below=st.integers(0, 1 << 30), num_threads=st.integers(0, 256),
    target_model_size_mb=st.one_of(st.none(), st.floats(min_value=1e-3, max_value=1e9)),
    num_time_groups=st.integers(1, 1000), max_shard_mb=st.integers(1, 1 << 20),
    deployment_profile=st.sampled_from([None, *PROFILES]),
)


@settings(max_examples=100, deadline=None)
@given(configs)
def test_any_valid_config_round_trips(c):
    _round_trips(c)

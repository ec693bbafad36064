"""The CLI's conventions: distinct, documented exit codes; plain-text help for every command and
argument; --json on every command that prints results; -v / -q through logging."""
from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import pytest

from arrow_quant_v2 import cli
from arrow_quant_v2.cli import EXIT_MEANINGS, ExitCode, main

#: reStructuredText / Sphinx markup that must not reach --help.
MARKUP = re.compile(r"``|`|:class:|:func:|:meth:|:mod:")


def subparsers(parser: argparse.ArgumentParser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return action.choices


def test_exit_codes_are_distinct_and_all_documented():
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    assert set(EXIT_MEANINGS) == set(ExitCode)
    top = cli.build_parser().format_help()
    for code, meaning in EXIT_MEANINGS.items():
        assert f"{int(code):<4} {meaning}" in top


def test_help_is_plain_text_for_every_command_and_argument():
    parser = cli.build_parser()
    assert not MARKUP.search(parser.format_help())
    for name, sub in subparsers(parser).items():
        assert not MARKUP.search(sub.format_help()), name
        for action in sub._actions:  # noqa: SLF001
            assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.dest} has no help"


def test_commands_that_print_results_take_json_and_all_take_v_q():
    for name, sub in subparsers(cli.build_parser()).items():
        options = {o for a in sub._actions for o in a.option_strings}  # noqa: SLF001
        assert {"-v", "-q"} <= options, name
        assert ("--json" in options) == (name != "serve"), name


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize"])
    assert e.value.code == ExitCode.USAGE
    assert main(["quantize", "x", "y", "--min-accuracy", "2"]) == ExitCode.USAGE
    assert "min_accuracy" in capsys.readouterr().err


def test_missing_model_exits_3_naming_it(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "out"), "-q"]) == ExitCode.INPUT
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def quantized(make_model, tmp_path_factory):
    model = make_model(size="tiny")
    out = tmp_path_factory.mktemp("cli") / "store"
    assert main(["quantize", str(model), str(out), "--profile", "cloud", "-q"]) == ExitCode.OK
    return model, out


def test_existing_output_exits_4(quantized, capsys):
    model, out = quantized
    assert main(["quantize", str(model), str(out), "-q"]) == ExitCode.OUTPUT
    assert str(out) in capsys.readouterr().err


def test_validation_below_threshold_exits_1(quantized, capsys):
    model, out = quantized
    assert main(["validate", str(model), str(out)]) == ExitCode.OK
    assert "passed" in capsys.readouterr().out
    assert main(["validate", str(model), str(out), "--min-accuracy", "0.99999999"]) == ExitCode.VALIDATION_FAILED


def test_validate_json(quantized, capsys):
    model, out = quantized
    assert main(["validate", str(model), str(out), "--min-accuracy", "0.99999999", "--json"]) == ExitCode.VALIDATION_FAILED
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and report["per_layer"]


def test_cancelled_exits_130(make_model, tmp_path, monkeypatch, capsys):
    import arrow_quant_v2.engine as engine

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "quantize_model", interrupted)
    assert main(["quantize", str(make_model(size="tiny")), str(tmp_path / "o"), "-q"]) == ExitCode.CANCELLED
    assert "cancelled" in capsys.readouterr().err


def test_json_outputs_parse(quantized, tmp_path, capsys, monkeypatch):
    model, out = quantized
    monkeypatch.setenv("ARROW_QUANT_CACHE", str(tmp_path / "cache"))
    assert main(["samples", "--json"]) == ExitCode.OK
    listed = json.loads(capsys.readouterr().out)
    assert {s["name"] for s in listed} >= {"tiny-dream", "terrain-unet", "minilm"}
    assert all(s["built"] is False for s in listed)
    assert main(["inspect", str(out), "--json"]) == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["manifest"]["totals"]
    assert main(["inspect", str(model), "--json"]) == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["tensors"]
    assert main(["quantize", str(model), str(tmp_path / "s2"), "--json"]) == ExitCode.OK
    assert Path(json.loads(capsys.readouterr().out)["quantized_path"]).name == "s2"


def test_log_levels(quantized):
    model, _ = quantized
    root = logging.getLogger()
    before = root.level
    for flags, level in (([], logging.WARNING), (["-v"], logging.INFO), (["-vv"], logging.DEBUG),
                         (["-q"], logging.ERROR)):
        assert main(["inspect", str(model), "--json", *flags]) == ExitCode.OK
        assert root.level == level, flags
    root.setLevel(before)


def test_verbose_logs_stages_quiet_logs_none(make_model, tmp_path, caplog):
    model = make_model(size="tiny")
    root = logging.getLogger()
    before = root.level
    try:
        assert main(["quantize", str(model), str(tmp_path / "v"), "-v", "--json"]) == ExitCode.OK
        infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert any(m.startswith("quantizing ") for m in infos) and any(m.startswith("done:") for m in infos)
        assert not [r for r in caplog.records if r.levelno == logging.DEBUG]
        caplog.clear()
        assert main(["quantize", str(model), str(tmp_path / "q"), "-q"]) == ExitCode.OK
        assert not [r for r in caplog.records if r.levelno < logging.ERROR]
    finally:
        root.setLevel(before)

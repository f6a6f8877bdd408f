"""The ``kava`` command parses before it imports: help and config need no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports this checkout's kava."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def heavy_after(code: str) -> dict:
    """Run `code`, then report ``{"heavy": [heavy modules loaded], **what code put in OUT}``."""
    script = (
        f"import sys, json\nOUT = {{}}\n{code}\n"
        f"OUT['heavy'] = sorted(m for m in {HEAVY!r} if m in sys.modules)\nprint(json.dumps(OUT))"
    )
    proc = run_python(script)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_nothing_heavy():
    assert heavy_after("import kava.cli\nkava.cli.build_parser()")["heavy"] == []


def test_help_of_every_command_imports_nothing_heavy():
    code = """
import argparse, contextlib, io
import kava.cli

def commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from commands(sub, (*prefix, name))

OUT['help'] = {}
for argv in [(), *commands(kava.cli.build_parser())]:
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            kava.cli.main([*argv, '--help'])
        except SystemExit as e:
            OUT['help'][' '.join(argv)] = (e.code, text.getvalue())
"""
    out = heavy_after(code)
    assert out["heavy"] == []
    helps = out["help"]
    expected = {
        "",
        "train",
        "eval",
        "demo",
        "config",
        "data",
        "data export",
        "data validate",
        "data list",
        "sweep",
        "report",
        "env",
        "teacher",
        "teacher extract",
        "export",
        "lm-eval",
    }
    assert set(helps) == expected
    for argv, (rc, text) in helps.items():
        assert rc == 0 and text.startswith("usage: kava"), argv
    assert "--resume" in helps["train"][1] and "--checkpoint" in helps["eval"][1]


def test_config_help_and_validation_import_nothing_heavy():
    from kava.names import COMPRESSION_METHODS, KV_LOSSES

    code = """
import contextlib, io
import kava.cli
from kava.config import ConfigError, config_from_dict
text = io.StringIO()
with contextlib.redirect_stdout(text):
    OUT['rc'] = kava.cli.main(['config'])
OUT['help'] = text.getvalue()
try:
    config_from_dict({'loss': {'compression': 'bogus'}})
except ConfigError as e:
    OUT['error'] = str(e)
"""
    out = heavy_after(code)
    assert out["heavy"] == [] and out["rc"] == 0
    line = next(x for x in out["help"].splitlines() if x.startswith("loss.compression "))
    assert line.endswith(", ".join(COMPRESSION_METHODS))
    assert ", ".join(KV_LOSSES) in out["help"]
    assert "loss.compression" in out["error"] and ", ".join(COMPRESSION_METHODS) in out["error"]


def test_names_are_the_registries_names():
    from kava import losses, names
    from kava.distill import compression

    assert names.COMPRESSION_METHODS == compression.METHODS == ("none", *compression.SELECTORS)
    assert names.KV_LOSSES == losses.KV_LOSSES
    assert names.CODI_LOSSES == losses.CODI_LOSSES


def test_errors_stay_one_line_without_heavy_imports(tmp_path):
    code = f"""
import contextlib, io
import kava.cli
err = io.StringIO()
with contextlib.redirect_stderr(err):
    OUT['rc'] = kava.cli.main(['config', '--show', {str(tmp_path / "missing.yaml")!r}])
OUT['err'] = err.getvalue()
"""
    out = heavy_after(code)
    assert out["heavy"] == [] and out["rc"] == 2
    lines = out["err"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kava: error: ") and "missing.yaml" in lines[0]


def test_one_line_errors_are_looked_up_among_loaded_modules():
    import kava.cli as cli
    from kava.config import ConfigError
    from kava.data.schema import DataError
    from kava.data.sequences import SequenceError

    found = cli.one_line_errors()
    assert (
        any(issubclass(FileNotFoundError, c) for c in found)
        and ConfigError in found
        and DataError in found
        and SequenceError in found
    )
    assert cli.exit_code(ConfigError("x")) == 2 and cli.exit_code(DataError("x")) == 1
    assert not any(issubclass(ValueError, cls) for cls in found)  # a plain ValueError still shows its traceback


def test_an_unexpected_error_is_not_swallowed(monkeypatch):
    import kava.cli as cli

    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_config", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["config"])


def test_a_lora_run_prints_no_deprecation_warning_of_peft_and_transformers(tmp_path):
    """peft's call of transformers' deprecated ``is_gradient_checkpointing`` warned on every LoRA
    command (train, eval, export, ``kava.load``): noise about nothing the user did."""
    import warnings

    import yaml

    from conftest import tiny_config
    from kava.cli import main

    cfg = tmp_path / "lora.yaml"
    run = tmp_path / "run"
    cfg.write_text(
        yaml.safe_dump(tiny_config(model={"adapter": "lora"}, train={"max_steps": 1, "output_dir": str(run)}).to_dict())
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--config", str(cfg)]) == 0
        assert main(["eval", "--checkpoint", str(run), "--limit", "2", "--modes", "nocot"]) == 0
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]

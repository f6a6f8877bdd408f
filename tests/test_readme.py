"""The README's library example runs as written (only its run folder and its tensors are supplied);
the docs' shown output agrees with the command shown above it."""

import re
from pathlib import Path

import torch
import yaml

from conftest import tiny_config
from kava.training import train

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"


def _library_block() -> str:
    text = README.read_text()
    section = text.split("## The library", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's library section holds one python example"
    return blocks[0]


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    code = _library_block()
    assert '"runs/mine-kava"' in code and "configs/curriculum/kava.yaml" in code
    run = tmp_path / "runs" / "mine-kava"
    train(tiny_config(model={"adapter": "lora"}, train={"max_steps": 2, "output_dir": str(run)}))
    (tmp_path / "configs").symlink_to(README.parent / "configs")
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    scope = {
        "keys": torch.randn(2, 2, 40, 8, generator=g),
        "queries": torch.randn(2, 4, 5, 8, generator=g),
        "cot_mask": torch.ones(2, 40, dtype=torch.bool),
        "answer_mask": torch.ones(2, 5, dtype=torch.bool),
    }
    exec(compile(code, str(README), "exec"), scope)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2  # one line per question
    assert scope["idx"].shape == (2, 2, 24) and scope["valid"].all()
    assert (scope["idx"].diff(dim=-1) > 0).all()  # time order
    loss, metrics = scope["loss"], scope["metrics"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert {"ce_student", "ce_teacher", "codi", "kv"} <= set(metrics)


def test_the_lm_eval_example_shows_the_model_args_its_command_passes():
    """lm-eval echoes ``--model_args`` as the dict it parsed: the shown output must be that of the
    shown command (``pretrained=``, lm-eval's own name), and so must the result folder."""
    text = (DOCS / "evaluation.md").read_text()
    block = text.split("$ kava lm-eval ", 1)[1].split("```", 1)[0]
    (value,) = re.findall(r"--model_args pretrained=(\S+)", block)
    assert f"kava ({{'pretrained': '{value}'}})" in block
    assert f"ls lmeval/{value.replace('/', '__')}" in block


def test_the_tracked_runs_folder_listing_is_what_a_run_without_eval_at_end_writes(tmp_path):
    """docs/training.md lists the folder of a ``train.eval_at_end=false`` kava run: what the
    command writes (less the trackers' folders), with no end-of-run KV probe."""
    from kava.cli import main

    text = (DOCS / "training.md").read_text()
    assert "train.eval_at_end=false" in text.split("$ ls runs/tracked | tr", 1)[0].rsplit("$ kava train", 1)[1]
    shown = set(text.split("$ ls runs/tracked | tr '\\n' ' '\n", 1)[1].split("\n", 1)[0].split())
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(train={"max_steps": 2, "output_dir": str(tmp_path / "run")}).to_dict()))
    assert main(["train", "--config", str(cfg), "train.eval_at_end=false"]) == 0
    written = {p.name.replace("checkpoint-2", "checkpoint-40") for p in (tmp_path / "run").iterdir()} - {".kava.lock"}
    assert written == shown - {"logs", "wandb"}  # logs/ and wandb/ are the trackers'

"""Sweep files: expansion, resume logic, failure recording, SLURM (submitit) and PBS output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from kava.config import ConfigError, load_config
from kava.experiments.cluster import submit_slurm, write_pbs
from kava.experiments.sweep import SweepError, expand_sweep, format_value, plan, run_local, safe_name

REPO = Path(__file__).resolve().parents[1]


def fake_train(cfg, resume: bool = False) -> dict:
    """Stands in for kava.training.train: writes a finished status with the arguments it got."""
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "state": "finished",
        "step": cfg.train.max_steps,
        "max_steps": cfg.train.max_steps,
        "resume": resume,
        "seed": cfg.train.seed,
        "compression": cfg.loss.compression,
    }
    (out / "status.json").write_text(json.dumps(result))
    return result


def write_sweep(tmp_path: Path, body: dict, base: dict | None = None) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base or {"train": {"max_steps": 3, "batch_size": 2}}))
    sweep = {"base_config": "base.yaml", "output_dir": str(tmp_path / "runs"), **body}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.fixture
def grid_sweep(tmp_path: Path) -> Path:
    return write_sweep(
        tmp_path,
        {
            "seeds": [0, 1],
            "overrides": {"train.lr": 0.002, "loss.alpha_kv": 0.5},
            "runs": {"codi": {"loss.alpha_kv": 0}, "kava": {"loss": {"compression": "rkv"}}},
            "grid": {"loss.compression": ["rkv", "right_crop"], "latent.num_latents": [2, 4]},
        },
    )


def test_grid_runs_and_seeds_expand_to_the_cartesian_product(grid_sweep: Path, tmp_path: Path):
    specs = expand_sweep(grid_sweep, validate=True)
    assert len(specs) == 2 * 4 * 2
    names = sorted({s.name for s in specs})
    assert names[0] == "codi__compression-right_crop__num_latents-2"
    assert "kava__compression-rkv__num_latents-4" in names and len(names) == 8
    spec = next(s for s in specs if s.name == "codi__compression-rkv__num_latents-4" and s.seed == 1)
    assert spec.output_dir == tmp_path / "runs" / spec.name / "seed1"
    assert spec.overrides == (
        "train.lr=0.002",
        "loss.alpha_kv=0",
        "loss.compression=rkv",
        "latent.num_latents=4",
        "train.seed=1",
        f"train.output_dir={tmp_path / 'runs' / spec.name / 'seed1'}",
    )
    cfg = spec.config()
    assert (cfg.train.lr, cfg.loss.alpha_kv, cfg.loss.compression, cfg.latent.num_latents) == (0.002, 0.0, "rkv", 4)
    assert (cfg.train.seed, cfg.train.max_steps, cfg.train.output_dir) == (1, 3, str(spec.output_dir))
    kava = next(s for s in specs if s.name.startswith("kava__compression-right_crop"))
    assert kava.config().loss.alpha_kv == 0.5  # the sweep-wide override, where the run says nothing
    assert kava.config().loss.compression == "right_crop"  # the grid point wins over the run's value
    assert all(safe_name(s.name) == s.name for s in specs)


def test_names_are_stable_and_data_keys_go_after_an_at(tmp_path: Path):
    path = write_sweep(
        tmp_path,
        {
            "runs": {"rkv": {}, "odd name/1": {"train.lr": 0.01}},
            "grid": {"data.train": ["synthetic", "synthetic-nl"], "train.weight_decay": [0.0]},
        },
    )
    names = [s.name for s in expand_sweep(path)]
    assert names == [
        "rkv__weight_decay-0.0@train-synthetic",
        "rkv__weight_decay-0.0@train-synthetic-nl",
        "odd_name_1__weight_decay-0.0@train-synthetic",
        "odd_name_1__weight_decay-0.0@train-synthetic-nl",
    ]
    assert [s.name for s in expand_sweep(path)] == names
    assert [s.seed for s in expand_sweep(path)] == [0, 0, 0, 0]


def test_no_runs_and_no_grid_is_one_base_run(tmp_path: Path):
    specs = expand_sweep(write_sweep(tmp_path, {"seeds": [3]}))
    assert [(s.name, s.seed) for s in specs] == [("base", 3)]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"seeds": [0, 0]}, "duplicates"),
        ({"grid": {"train.lr": []}}, "non-empty list"),
        ({"typo": 1}, "unknown sweep key"),
        ({"runs": {"a": {"x": 1}, "a!": {"x": 2}}}, "collide"),
        ({"runs": {"a": {"train.lr": 1.0}}, "grid": {"x": [1, 2]}, "seeds": "zero"}, "seeds"),
    ],
)
def test_bad_sweep_files_are_refused(tmp_path: Path, body: dict, message: str):
    with pytest.raises(SweepError, match=message):
        expand_sweep(write_sweep(tmp_path, body))


def test_a_bad_config_key_fails_before_any_run(tmp_path: Path):
    path = write_sweep(tmp_path, {"runs": {"a": {"loss.compresion": "rkv"}}})
    with pytest.raises(ConfigError, match="sweep run a seed 0.*compresion"):
        expand_sweep(path, validate=True)


@pytest.mark.parametrize("value", ["yes", "1e-3", "a: b", "rkv", "", "x y", [1, 2], 3, 0.5, True, None])
def test_override_values_read_back_unchanged(value):
    from kava.config import parse_overrides

    assert parse_overrides([f"a={format_value(value)}"])["a"] == value


def test_the_ablation_suite_expands_to_valid_overrides():
    specs = expand_sweep(REPO / "configs" / "sweeps" / "ablations.yaml")
    names = {s.name for s in specs}
    assert {
        "codi",
        "mean_pool",
        "right_crop",
        "rkv",
        "shuffled",
        "attention",
        "redundancy",
        "random",
        "rkv_M8",
        "rkv_T1",
        "rkv_T3",
        "codi@nl",
        "rkv@nl",
    } == names
    assert len(specs) == 3 * len(names) and {s.seed for s in specs} == {0, 1, 2}
    for spec in specs:  # every key exists and every value is valid (on the defaults: the base may not exist yet)
        load_config(None, spec.overrides)
    codi = next(s for s in specs if s.name == "codi")
    assert load_config(None, codi.overrides).loss.alpha_kv == 0
    assert codi.base_config == REPO / "configs" / "curriculum" / "kava.yaml"
    if codi.base_config.is_file():
        assert codi.config().loss.alpha_kv == 0
        assert {s.name: s.config().latent.num_latents for s in specs if s.seed == 0}["rkv_M8"] == 8


# --- resume and failures -------------------------------------------------------------------


def _status(spec, state: str | None, text: str | None = None) -> None:
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    if text is not None:
        (spec.output_dir / "status.json").write_text(text)
    elif state is not None:
        (spec.output_dir / "status.json").write_text(json.dumps({"state": state, "step": 2, "max_steps": 3}))


@pytest.fixture
def six_runs(tmp_path: Path):
    path = write_sweep(tmp_path, {"runs": {n: {} for n in ("done", "failed", "stopped", "running", "new", "corrupt")}})
    specs = expand_sweep(path)
    for spec, state in zip(specs, ("finished", "failed", "interrupted", "running", None, None)):
        _status(spec, state)
    _status(specs[5], None, text="{not json")
    return specs


def test_plan_skips_finished_runs_and_resumes_the_rest(six_runs):
    assert [a for _, a in plan(six_runs)] == ["skip", "resume", "resume", "resume", "start", "start"]
    with pytest.raises(SweepError, match="already holds a run"):
        plan(six_runs, resume=False)


def test_run_local_skips_resumes_records_failures_and_goes_on(six_runs):
    calls = []

    def train_fn(cfg, resume=False):
        calls.append((Path(cfg.train.output_dir).parent.name, resume))
        if "stopped" in cfg.train.output_dir:
            raise RuntimeError("CUDA out of memory\nsecond line of the message")
        return fake_train(cfg, resume)

    summary = run_local(six_runs, train_fn=train_fn)
    assert calls == [("failed", True), ("stopped", True), ("running", True), ("new", True), ("corrupt", True)]
    assert summary.skipped == ["done/seed0"] and summary.failed == ["stopped/seed0"]
    assert summary.finished == ["failed/seed0", "running/seed0", "new/seed0", "corrupt/seed0"]
    assert summary.exit_code == 1
    status = json.loads((six_runs[2].output_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == "RuntimeError: CUDA out of memory"
    assert status["step"] == 2  # the progress known before the crash is kept
    # a second pass re-runs only the failed one
    again = run_local(six_runs, train_fn=fake_train)
    assert again.finished == ["stopped/seed0"] and again.exit_code == 0 and len(again.skipped) == 5


def test_an_interrupted_run_stops_the_sweep(tmp_path: Path):
    specs = expand_sweep(write_sweep(tmp_path, {"runs": {"a": {}, "b": {}}}))
    summary = run_local(specs, train_fn=lambda cfg, resume: {"state": "interrupted"})
    assert summary.interrupted == ["a/seed0"] and summary.finished == [] and summary.exit_code != 0


# --- SLURM through submitit -------------------------------------------------------------------


def test_submitit_debug_executor_runs_the_unfinished_array(grid_sweep: Path):
    pytest.importorskip("submitit")
    specs = expand_sweep(grid_sweep)[:3]
    _status(specs[0], "finished")
    jobs = submit_slurm(specs, partition="gpu", gpus_per_job=0, time_min=5, executor="debug", train_fn=fake_train)
    assert len(jobs) == 2
    results = [j.result() for j in jobs]
    assert [r["seed"] for r in results] == [specs[1].seed, specs[2].seed] and all(r["resume"] for r in results)
    assert submit_slurm(specs, executor="debug", train_fn=fake_train) == []  # everything finished now


def test_the_job_is_checkpointable_and_requeues_with_resume():
    submitit = pytest.importorskip("submitit")
    from kava.experiments.cluster import SweepJob

    job = SweepJob(fake_train)
    assert isinstance(job, submitit.helpers.Checkpointable)
    delayed = job.checkpoint("SPEC", False)
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.args == ("SPEC", True) and delayed.function.train_fn is fake_train


def test_a_failing_job_marks_its_run_failed_and_raises(tmp_path: Path):
    from kava.experiments.cluster import SweepJob  # called directly: submitit's debug executor opens pdb on errors

    specs = expand_sweep(write_sweep(tmp_path, {}))

    def boom(cfg, resume=False):
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        SweepJob(boom)(specs[0])
    assert json.loads((specs[0].output_dir / "status.json").read_text())["error"] == "ValueError: bad batch"
    _status(specs[0], "finished")
    assert SweepJob(boom)(specs[0])["state"] == "finished"  # a finished run is not trained again


def test_submitit_local_executor_pickles_the_job(tmp_path: Path):
    pytest.importorskip("submitit")
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job process cannot import this test file
    specs = expand_sweep(write_sweep(tmp_path, {"seeds": [7]}))
    jobs = submit_slurm(
        specs, gpus_per_job=0, cpus=1, time_min=2, executor="local", train_fn=fake_train, log_dir=tmp_path / "logs"
    )
    assert jobs[0].result()["seed"] == 7
    assert json.loads((specs[0].output_dir / "status.json").read_text())["state"] == "finished"


# --- PBS --------------------------------------------------------------------------------------


def test_pbs_script_is_one_array_over_the_unfinished_runs(grid_sweep: Path, tmp_path: Path):
    specs = expand_sweep(grid_sweep)[:4]
    _status(specs[1], "finished")
    script = write_pbs(specs, tmp_path / "pbs", queue="gpuq", gpus=2, walltime=90, setup="source .venv/bin/activate")
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n")
    assert "#PBS -J 0-2\n" in text and "#PBS -q gpuq\n" in text and "#PBS -l walltime=01:30:00\n" in text
    assert "#PBS -l select=1:ncpus=8:mem=64gb:ngpus=2\n" in text and "source .venv/bin/activate" in text
    assert 'exec kava train --config "${CONFIGS[${PBS_ARRAY_INDEX:-0}]}" --resume' in text
    todo = [specs[0], specs[2], specs[3]]
    for i, spec in enumerate(todo):
        config = spec.output_dir.resolve() / "config.yaml"
        assert f"#   {i}: {spec.name}/seed{spec.seed}" in text and str(config) in text
        cfg = load_config(config)
        assert cfg.train.output_dir == str(spec.output_dir) and cfg.train.seed == spec.seed
    assert not (specs[1].output_dir / "config.yaml").exists()
    one = write_pbs(specs[:1], tmp_path / "pbs1", gpus=0, walltime="00:10:00").read_text()
    assert "#PBS -J" not in one and "ngpus" not in one
    with pytest.raises(SweepError, match="walltime"):
        write_pbs(specs[:1], tmp_path / "pbs2", walltime="ten hours")


# --- the command ------------------------------------------------------------------------------


def test_cli_dry_run_lists_runs_and_every_flag_has_help(grid_sweep: Path, capsys):
    import argparse

    from kava.cli import build_parser, main

    assert main(["sweep", str(grid_sweep), "--dry-run", "--only", "codi*"]) == 0
    out = capsys.readouterr().out
    assert "8 run(s)" in out and "codi__compression-rkv__num_latents-2" in out and "kava__" not in out
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["sweep"]._actions:
        assert action.help, action.dest
    assert main(["sweep", str(grid_sweep), "--only", "nothing*"]) == 2


def test_cli_runs_locally_and_reports_failures(tmp_path: Path, monkeypatch, capsys):
    import kava.experiments.sweep

    path = write_sweep(tmp_path, {"runs": {"a": {}, "b": {"train.lr": 0.5}}})

    def train_fn(cfg, resume=False):
        if cfg.train.lr == 0.5:
            raise RuntimeError("diverged")
        return fake_train(cfg, resume)

    monkeypatch.setattr(kava.experiments.sweep, "_default_train", lambda: train_fn)
    from kava.cli import main

    assert main(["sweep", str(path)]) == 1
    assert "1 finished" in capsys.readouterr().out


def test_the_teachers_experiment_expands_to_valid_teacher_lists():
    specs = expand_sweep(REPO / "configs" / "sweeps" / "teachers.yaml")
    assert {s.name for s in specs} == {"self", "frozen_self", "large", "fused", "fused_fixed", "fused_entropy"} and len(
        specs
    ) == 18
    by_name = {s.name: load_config(None, s.overrides) for s in specs if s.seed == 0}
    assert by_name["self"].teachers.models == []
    fused = by_name["fused"]
    assert [t.name_or_path for t in fused.teachers.models] == ["runs/curriculum/cot-large", "runs/curriculum/cot-qwen"]
    assert fused.teachers.fusion == "router" and fused.loss.rope == "pre"


def test_a_run_may_have_its_own_seeds_and_extra_overrides_come_last(tmp_path: Path):
    path = write_sweep(
        tmp_path, {"seeds": [0, 1, 2], "runs": {"a": {"train.lr": 0.1}, "b": {"train.lr": 0.2, "seeds": [5]}}}
    )
    specs = expand_sweep(path, extra=["train.lr=0.5", "train.max_steps=1"], output_dir=tmp_path / "smoke")
    assert [(s.name, s.seed) for s in specs] == [("a", 0), ("a", 1), ("a", 2), ("b", 5)]
    cfg = specs[-1].config()
    assert cfg.train.lr == 0.5 and cfg.train.max_steps == 1 and cfg.train.seed == 5
    assert specs[-1].output_dir == tmp_path / "smoke" / "b" / "seed5" and "seeds" not in specs[-1].params
    with pytest.raises(SweepError, match="runs.b: 'seeds' has duplicates"):
        expand_sweep(write_sweep(tmp_path, {"runs": {"b": {"seeds": [1, 1]}}}))
    with pytest.raises(SweepError, match="expected KEY=VALUE"):
        expand_sweep(path, extra=["train.lr"])


def test_the_testbed_ablation_sweep_resolves_with_the_seeds_it_promises():
    specs = expand_sweep(REPO / "configs" / "sweeps" / "ablations-testbed.yaml", validate=True)
    seeds: dict[str, list[int]] = {}
    for s in specs:
        seeds.setdefault(s.name, []).append(s.seed)
    ten = ("rkv", "codi", "slot_mean", "counterfactual")
    five = ("mean_pool", "right_crop", "shuffled", "gaussian", "oracle")
    teachers = {"large", "fused", "frozen_self"}  # other teachers, equation traces only
    crossed = {f"{n}@{v}" for n in ("codi", "rkv") for v in ("nl_from_eq", "eq_from_nl")}  # traces x warm-up
    assert set(seeds) == {f"{n}{v}" for n in ten + five for v in ("", "@nl")} | teachers | crossed
    assert all(len(seeds[f"{n}{v}"]) >= 10 for n in ten for v in ("", "@nl"))
    assert all(len(seeds[n]) >= 5 for n in seeds)
    fused = next(s for s in specs if s.name == "fused").config()
    assert [t.name_or_path for t in fused.teachers.models] == ["runs/tiny/cot-large", "runs/tiny/cot-qwen"]
    assert fused.teachers.fusion == "router" and fused.loss.rope == "pre"
    assert {s.config().train.max_steps for s in specs[:3]} == {300}  # students compared while they still learn
    nl = next(s for s in specs if s.name == "rkv@nl").config()
    assert nl.data.train == nl.data.eval == "synthetic-products-nl" and nl.model.init_from == "runs/tiny-nl/teacher"
    assert next(s for s in specs if s.name == "counterfactual").config().loss.compression == "counterfactual"
    cross = next(s for s in specs if s.name == "codi@nl_from_eq").config()
    assert cross.data.train == "synthetic-products-nl" and cross.model.init_from == "runs/tiny/teacher"
    cross = next(s for s in specs if s.name == "rkv@eq_from_nl").config()
    assert cross.data.train == "synthetic-products" and cross.model.init_from == "runs/tiny-nl/teacher"


def test_the_replication_sweep_uses_fresh_seeds_and_the_main_sweeps_recipe():
    import dataclasses

    main = {(s.name, s.seed): s for s in expand_sweep(REPO / "configs" / "sweeps" / "ablations-testbed.yaml")}
    rep = expand_sweep(REPO / "configs" / "sweeps" / "ablations-testbed-replication.yaml", validate=True)
    assert {s.name for s in rep} == {"rkv", "codi", "counterfactual", "slot_mean"}
    assert {s.seed for s in rep} == set(range(10, 20))
    assert not {s.seed for s in rep} & {
        seed for (name, seed) in main if name in ("rkv", "codi", "counterfactual", "slot_mean")
    }
    for s in rep:
        a = dataclasses.asdict(main[(s.name, 0)].config())
        b = dataclasses.asdict(s.config())
        for cfg in (a, b):
            cfg["train"].pop("seed"), cfg["train"].pop("output_dir")
        assert a == b, s.name  # the same recipe, budget and warm-up; only the seed and folder differ


def test_cli_seeds_and_by_seed_pick_and_order_the_runs(tmp_path: Path, capsys):
    from kava.cli import main
    from kava.cli.sweep import parse_seeds

    assert parse_seeds("0,3,5-7") == {0, 3, 5, 6, 7}
    path = write_sweep(tmp_path, {"seeds": [0, 1, 2, 3], "runs": {"a": {}, "b": {"seeds": [0, 1]}}})
    assert main(["sweep", str(path), "--dry-run", "--seeds", "1-2", "--by-seed"]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if "seed" in ln]
    # seed 1 of every run before seed 2; b has no seed 2
    assert [(ln[0], ln[2]) for ln in lines] == [("a", "1"), ("b", "1"), ("a", "2")]
    assert main(["sweep", str(path), "--dry-run"]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if "seed" in ln]
    assert [ln[0] for ln in lines] == ["a"] * 4 + ["b"] * 2  # file order without --by-seed
    assert main(["sweep", str(path), "--dry-run", "--seeds", "7"]) == 2
    assert main(["sweep", str(path), "--dry-run", "--seeds", "3-1"]) == 2
    assert main(["sweep", str(path), "--dry-run", "--seeds", "x"]) == 2
    assert "--seeds 'x'" in capsys.readouterr().err


def test_the_confirmatory_sweep_is_the_pre_registered_design():
    """configs/sweeps/confirmatory.yaml (docs/preregistration.md): six arms, 22 fresh seeds, 500 steps,
    the arms of a trace style identical but for their KV targets."""
    import dataclasses

    runs = expand_sweep(REPO / "configs" / "sweeps" / "confirmatory.yaml", validate=True)
    arms = {"codi", "rkv", "codi@nl", "rkv@nl", "slot_mean@nl", "counterfactual@nl"}
    assert {s.name for s in runs} == arms and len(runs) == 6 * 22
    seeds = {s.seed for s in runs}
    assert seeds == set(range(1000, 1022))
    for other in (REPO / "configs" / "sweeps").glob("*.yaml"):
        if other.name != "confirmatory.yaml":
            assert not seeds & {s.seed for s in expand_sweep(other)}, other.name  # seeds no other sweep uses
    by = {(s.name, s.seed): dataclasses.asdict(s.config()) for s in runs}
    for name in arms:
        cfg = by[(name, 1000)]
        assert (
            cfg["train"]["max_steps"] == 500 and cfg["train"]["eval_every"] == 100 and cfg["train"]["batch_size"] == 64
        )
        assert cfg["data"]["eval_split"] == "test" and cfg["data"]["synthetic_test_size"] == 700
        assert cfg["loss"]["layer_std"] and cfg["latent"]["num_latents"] == 6
    for style, members in (("", ("codi", "rkv")), ("@nl", ("codi@nl", "rkv@nl", "slot_mean@nl", "counterfactual@nl"))):
        ref = by[(members[0], 1003)]
        for name in members[1:]:
            cfg = by[(name, 1003)]
            for section in ("model", "latent", "train", "data", "curriculum"):
                a, b = dict(ref[section]), dict(cfg[section])
                if section == "train":
                    a.pop("output_dir"), b.pop("output_dir")
                assert a == b, (name, section)
            diff = {k for k in ref["loss"] if ref["loss"][k] != cfg["loss"][k]}
            assert diff <= {"alpha_kv", "compression"}, (name, diff)  # only the KV targets differ
        assert by[(members[0], 1003)]["data"]["train"] == ("synthetic-classes-nl" if style else "synthetic-classes")

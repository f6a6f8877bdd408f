"""The demo's plumbing, in its quick mode (accuracies mean nothing at this length), and its recipes."""

import json

from kava.config import load_config
from kava.experiments.demo import CONFIG_DIR, run_demo


def test_quick_demo_writes_summary_table_and_plot(tmp_path):
    summary = run_demo(tmp_path, quick=True, threads=1, seed=3)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert set(on_disk["methods"]) == {"cot", "no_cot", "codi", "kava", "teacher"}
    assert on_disk["seed"] == 3
    for m in on_disk["methods"].values():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["forward_passes"] >= 1
        assert m["recipe"]["train"]["seed"] == 3
        assert set(m["by_products"]) <= {"1", "2"} and m["by_products"]
    methods = on_disk["methods"]
    # Jacobi latents: T + 1 passes plus the answer; CoT needs one per generated token.
    assert methods["kava"]["forward_passes"] < methods["cot"]["forward_passes"]
    # The arms are what their names say.
    assert methods["kava"]["recipe"]["loss"]["alpha_kv"] > 0 and methods["codi"]["recipe"]["loss"]["alpha_kv"] == 0
    assert methods["teacher"]["recipe"]["train"]["mode"] == "teacher"
    table = (tmp_path / "results.md").read_text()
    assert "KaVa (CODI + R-KV KV loss)" in table and "no-CoT" in table and "2 products" in table
    assert (tmp_path / "accuracy_vs_passes.png").stat().st_size > 1000


def test_demo_recipes_are_the_papers():
    """configs/tiny: Jacobi latents (T = 3), CODI and teacher CE on, drop-last-step, no curriculum,
    no per-latent CE; KaVa adds the R-KV KV loss, CODI has none."""
    for arm, alpha_kv in (("kava", 1.0), ("codi", 0.0)):
        cfg = load_config(str(CONFIG_DIR / f"{arm}.yaml"))
        assert (cfg.latent.scheme, cfg.latent.iterations) == ("jacobi", 3)
        assert cfg.loss.alpha_codi > 0 and cfg.loss.teacher_ce > 0 and cfg.loss.drop_last_step
        assert cfg.loss.latent_ce == 0 and not cfg.curriculum.enabled
        assert cfg.loss.alpha_kv == alpha_kv and cfg.loss.compression == "rkv"
        assert cfg.data.train == cfg.data.eval == "synthetic-products"


def test_demo_runs_one_after_the_other_when_the_cores_do_not_hold_two_runs(tmp_path, monkeypatch):
    import kava.experiments.demo as demo

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    assert (demo.default_jobs(1), demo.default_jobs(2), demo.default_jobs(4)) == (2, 1, 1)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 16)
    assert demo.default_jobs(2) == 2
    summary = run_demo(tmp_path, quick=True, threads=1, seed=3, jobs=1)
    assert summary["processes"] == 1
    # The same seeded runs, side by side or not: the same numbers as the two-process quick demo.
    two = run_demo(tmp_path / "two", quick=True, threads=1, seed=3, jobs=2)
    for key in summary["methods"]:
        assert summary["methods"][key]["accuracy"] == two["methods"][key]["accuracy"]

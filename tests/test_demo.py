"""The demo's plumbing, in its quick mode (accuracies mean nothing at this length)."""

import json

from kava.experiments.demo import run_demo


def test_quick_demo_writes_summary_table_and_plot(tmp_path):
    summary = run_demo(tmp_path, quick=True, threads=2)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert set(on_disk["methods"]) == {"cot", "no_cot", "codi", "kava"}
    for m in on_disk["methods"].values():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["forward_passes"] >= 1
    # Latent students need T+1-style passes plus the answer; CoT needs one per generated token.
    assert on_disk["methods"]["kava"]["forward_passes"] < on_disk["methods"]["cot"]["forward_passes"]
    table = (tmp_path / "results.md").read_text()
    assert "KaVa (R-KV)" in table and "no-CoT" in table
    assert (tmp_path / "accuracy_vs_passes.png").stat().st_size > 1000

import json

from distmaml.study import run_inner_steps_study
from conftest import REPO


def test_inner_steps_study_writes_table_json_and_plot(tmp_path):
    rows = run_inner_steps_study(REPO / "configs/sine_debug.yaml", tmp_path, steps=[1, 3],
                                 modes=["second_order", "first_order"], iterations=30,
                                 overrides=["eval.tasks=20", "train.log_every=10"])
    assert [(r["mode"], r["inner_steps"]) for r in rows] == [
        ("second_order", 1), ("second_order", 3), ("first_order", 1), ("first_order", 3)]
    for row in rows:
        assert 0 < row["query_mse"] < 10 and row["support_mse"] > 0 and row["peak_memory_mb"] > 0
    # Each run evaluated after its own K steps, and second order used activation checkpointing.
    summary = json.loads((tmp_path / "second_order_k3/summary.json").read_text())
    assert summary["eval"]["steps"][-1]["step"] == 3
    config = (tmp_path / "second_order_k3/config.yaml").read_text()
    assert "checkpoint: auto" in config
    assert json.loads((tmp_path / "study.json").read_text()) == rows
    table = (tmp_path / "study.md").read_text().splitlines()
    assert table[0] == "30 meta-iterations per run." and len(table) == 2 + 2 + 4
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"

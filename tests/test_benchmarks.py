"""Every benchmark runs end to end with tiny settings and writes valid JSON; the README's generated
tables are what the committed results say."""

import json

import pytest

from benchmarks import common, distributed, memory, peers, report, speed
from conftest import REPO


def strict(path):
    def refuse(token):
        raise AssertionError(f"{path} is not strict JSON: {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_speed_times_training_s_meta_iteration_for_rules_and_builds_episodes(tmp_path):
    out = tmp_path / "speed.json"
    speed.main(["--only", "rules", "episodes", "--quick", "--windows", "1", "--seconds", "0.05", "--warmup", "1",
                "--out", str(out)])
    result = strict(out)
    assert result["machine"]["torch"] and result["machine"]["threads"] == 1
    rules = [row for row in result["rows"] if row["group"] == "rules"]
    assert [row["rule"] for row in rules] == ["sgd", "meta_sgd", "lslr", "momentum", "adam"]
    assert all(row["ms_per_iteration"] > 0 and row["settings"] for row in rules)
    sources = [row["source"] for row in result["rows"] if row["group"] == "episodes"]
    assert len(sources) == 2 and all(row["images_per_s"] > 0 for row in result["rows"] if row["group"] == "episodes")


def test_memory_measures_a_fresh_process_per_case_beside_the_estimate(tmp_path):
    out = tmp_path / "memory.json"
    memory.main(["--tiny", "--out", str(out)])
    rows = strict(out)["rows"]
    assert [row["setting"] for row in rows] == ["second order", "second order, checkpoint=auto"]
    for row in rows:
        assert row["measured_mib"] > 0 and row["estimate_mib"] > 0 and 0.2 < row["estimate_over_measured"] < 5


@pytest.mark.slow
def test_distributed_splits_a_step_into_compute_and_all_reduce(tmp_path):
    out = tmp_path / "distributed.json"
    distributed.main(["--worlds", "2", "--iterations", "3", "--warmup", "1", "--meta-batch", "6", "--inner-steps", "1",
                      "--out", str(out)])
    result = strict(out)
    (row,) = result["rows"]
    assert row["world"] == 2 and row["tasks_per_rank"] == 3 and 0 < row["all_reduce_ms"] < row["step_ms"]
    sizes = {entry["model"]: entry for entry in result["all_reduce_bytes"]}
    assert sizes["sine MLP 1-40-40-1"]["parameters"] == 1761
    assert sizes["sine MLP, Meta-SGD (learned step sizes)"]["parameters"] == 2 * 1761


def test_peers_check_equality_before_timing_and_report_absent_peers(tmp_path):
    out = tmp_path / "peers.json"
    peers.main(["--steps", "1", "--kinds", "sine", "--windows", "1", "--seconds", "0.01", "--out", str(out)])
    result = strict(out)
    assert set(result["libraries"]) == {"learn2learn", "higher", "torchopt"}
    for row in result["rows"]:
        assert row["status"] in ("equal", "absent"), row  # no peer computes something else
        if row["status"] == "equal":
            assert row["relative_error"] <= 1e-10 and row["ms_per_iteration"] > 0
    assert any(row["library"] == "distmaml" and row["rule"] == "adam" for row in result["rows"])


def test_the_readme_tables_are_what_the_committed_results_say():
    assert report.main(["--check"]) == 0


def test_report_renders_every_table_it_has_results_for(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    common.write({"benchmark": "distributed", "command": "python -m benchmarks.distributed",
                  "machine": {"cpu": "test cpu", "cores": 2, "torch": "2.x", "threads": 1}, "meta_batch": 50,
                  "inner_steps": 5, "rows": [{"world": 2, "tasks_per_rank": 25, "compute_ms": 10.0, "wait_ms": 0.5,
                                              "all_reduce_ms": 0.25, "step_ms": 11.0, "all_reduce_share": 0.25 / 11}],
                  "all_reduce_bytes": [{"model": "m", "parameters": 10, "bytes": 56}]}, tmp_path / "distributed_cpu.json")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table: distributed-cpu -->\nold\n<!-- /table -->\n"
                      "<!-- table: peers-cpu -->\nkept\n<!-- /table -->\n")
    assert report.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| 2 | 25 | 10.00 | 0.50 | 0.250 | 11.00 | 2.3 % |" in text and "old" not in text
    assert "kept" in text  # no results for it: left as it was
    assert "`python -m benchmarks.distributed` — test cpu, 2 cores, torch 2.x, 1 CPU thread(s)" in text
    assert report.main(["--readme", str(readme), "--check"]) == 0

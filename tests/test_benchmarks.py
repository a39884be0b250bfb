"""Every benchmark runs end to end with tiny settings and writes valid JSON; the README's generated
tables are what the committed results say."""

import json
import sys

import pytest
import torch

from benchmarks import common, distributed, hyper_methods, memory, peers, peers_hyper, report, speed
from conftest import ESTIMATE_BOUND


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


def test_memory_measures_a_fresh_process_per_case_beside_the_estimate(tmp_path, monkeypatch):
    # Cases of about 20-30 MiB: the resident set of a fresh process varies by a few hundred KiB from run
    # to run, which the --tiny cases (under 2 MiB) cannot resolve to ESTIMATE_BOUND; these can.
    sized = ["model.hidden=[128, 128]", "task.support=100", "task.query=100", "train.meta_batch=20", "inner.steps=5"]
    cases = [dict(group="sine", model="MLP 1-128-128-1", base=str(memory.SINE), setting=name, inner_steps=5,
                  overrides=[*sized, *memory.MODES[name]]) for name in ("second order", "second order, checkpoint=auto")]
    monkeypatch.setattr(memory, "cases", lambda quick, tiny=False: cases)
    out = tmp_path / "memory.json"
    memory.main(["--out", str(out)])
    rows = strict(out)["rows"]
    assert [row["setting"] for row in rows] == ["second order", "second order, checkpoint=auto"]
    for row in rows:
        assert row["measured_mib"] > 10 and abs(row["estimate_over_measured"] - 1) < ESTIMATE_BOUND, row
    assert rows[1]["measured_mib"] < 0.8 * rows[0]["measured_mib"]  # recomputation measurably saves memory


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


PEERS = ["learn2learn", "higher", "torchopt"]


@pytest.fixture(scope="module")
def peers_result(tmp_path_factory):
    """The peers benchmark at K = 1 and 2 on the sine MLP (and higher's Adam at K = 5): equality first, then
    a short timing. A peer that is installed but cannot be imported fails here, with its error."""
    out = tmp_path_factory.mktemp("peers") / "peers.json"
    peers.main(["--steps", "1", "2", "--kinds", "sine", "--windows", "1", "--seconds", "0.01", "--out", str(out)])
    return strict(out)


@pytest.mark.parametrize("library", PEERS)
def test_a_peer_s_meta_gradient_equals_distmaml_s_before_it_is_timed(peers_result, library):
    rows = [row for row in peers_result["rows"] if row["library"] == library]
    if rows[0]["status"] == peers.NOT_INSTALLED:  # pip install -e ".[peers]"; learn2learn: .ci/run
        pytest.skip(f"{library}: {peers_result['libraries'][library]}")
    expected = {(order, k, "sgd") for order in ("first", "second") for k in (1, 2)}
    if library == "higher":
        expected.add(("second", 5, "adam"))
    assert {(row["order"], row["inner_steps"], row["rule"]) for row in rows} == expected
    for row in rows:
        assert row["status"] == "equal" and row["relative_error"] <= peers.TOLERANCE, row
        assert row["ms_per_iteration"] > 0 and row["distmaml_speedup"] > 0, row


def test_peers_name_betty_with_the_reason_it_is_not_compared(peers_result):
    assert set(peers_result["libraries"]) == set(PEERS)
    assert not any(row["library"] == "betty" for row in peers_result["rows"])
    why = peers_result["not_compared"]["betty"]
    if why.startswith("not installed"):  # .ci/run installs it
        pytest.skip(why)
    assert why.startswith("Betty 0.2.1: its unrolled problems fail to start (IterativeProblem: KeyError: 'params'; "
                          "HigherIterativeProblem: ValueError: Monkey-patching monkey-patched modules"), why


def test_a_peer_that_is_not_installed_is_skipped_and_one_whose_import_breaks_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchopt", None)  # as if not installed
    broken = tmp_path / "site"
    (broken / "higher").mkdir(parents=True)  # installed, but its import fails on a dependency it lacks
    (broken / "higher/__init__.py").write_text("import a_dependency_that_is_not_here\n")
    monkeypatch.delitem(sys.modules, "higher", raising=False)
    monkeypatch.syspath_prepend(str(broken))
    found = peers.peers()
    assert found["torchopt"].status == peers.NOT_INSTALLED and found["torchopt"].fn is None
    assert found["higher"] == (None, peers.IMPORT_FAILED, "import failed (ModuleNotFoundError: No module named "
                                                          "'a_dependency_that_is_not_here')")
    (broken / "higher/__init__.py").write_text("raise RuntimeError('compiled against another torch')\n")
    assert peers.peers()["higher"].how == "import failed (RuntimeError: compiled against another torch)"
    # The benchmark reports the broken peer in its rows and exits with an error; the absent one is a row.
    out = tmp_path / "peers.json"
    with pytest.raises(SystemExit, match=r"^python -m benchmarks.peers: error: higher: import failed \(RuntimeError"):
        peers.main(["--steps", "1", "--kinds", "sine", "--windows", "1", "--seconds", "0.01", "--out", str(out)])
    statuses = {row["library"]: row["status"] for row in strict(out)["rows"] if row["rule"] == "sgd"}
    assert statuses["higher"] == peers.IMPORT_FAILED and statuses["torchopt"] == peers.NOT_INSTALLED


WRITTEN_HERE = [peers.PLAIN_LOOP, peers.HAND_BATCHED]


@pytest.mark.parametrize("implementation", WRITTEN_HERE)
def test_the_meta_gradients_written_for_the_benchmark_equal_distmaml_s_on_the_sine_mlp(peers_result, implementation):
    rows = [row for row in peers_result["rows"] if row["library"] == implementation]
    assert {(row["order"], row["inner_steps"], row["rule"]) for row in rows} == {
        (order, k, "sgd") for order in ("first", "second") for k in (1, 2)}
    for row in rows:
        assert row["status"] == "equal" and row["relative_error"] <= peers.TOLERANCE, row
        assert row["ms_per_iteration"] > 0 and row["loaded"] == peers_result["written_here"][implementation], row


def test_distmaml_s_meta_gradient_rows_compare_it_with_the_fastest_loop_and_the_hand_batched_one(peers_result):
    for mine in (row for row in peers_result["rows"] if row["library"] == "distmaml"):
        same = [row for row in peers_result["rows"] if "ms_per_iteration" in row and row["library"] != "distmaml"
                and all(row[key] == mine[key] for key in ("kind", "inner_steps", "order", "rule"))]
        # The loops to beat are the others' (libraries, the plain loop), not distmaml's own per-task loop.
        loops = [row["ms_per_iteration"] for row in same if row["library"] not in (peers.HAND_BATCHED, "distmaml-loop")]
        own_loop = [row["ms_per_iteration"] for row in same if row["library"] == "distmaml-loop"]
        hand = [row["ms_per_iteration"] for row in same if row["library"] == peers.HAND_BATCHED]
        if loops:  # the Adam rows have none where higher is not installed
            assert mine["speedup_over_fastest_loop"] == pytest.approx(min(loops) / mine["ms_per_iteration"]), mine
            assert mine["auto_speedup_over_fastest_loop"] == pytest.approx(
                min(loops) / min(mine["ms_per_iteration"], *own_loop)), mine
        if mine["rule"] == "sgd":
            assert mine["speed_vs_hand_batched"] == pytest.approx(hand[0] / mine["ms_per_iteration"]), mine
        else:  # differentiable Adam: higher alone
            assert not hand and "speed_vs_hand_batched" not in mine, mine


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_the_meta_gradients_written_for_the_benchmark_equal_distmaml_s_on_conv4(first_order):
    # 8 channels, 2 shots, 3 tasks: the hand-batched grouped convolutions keep each task's batch statistics
    small = ("model.channels=8", "train.meta_batch=3", "task.support=2", "task.query=2")
    rows = {row["library"]: row for row in peers.compare_and_time("conv4", 2, first_order, peers.written_here(), 1,
                                                                 0.0, more=small)}
    assert set(rows) == {"distmaml", "distmaml-loop", *WRITTEN_HERE}
    for name in ("distmaml-loop", *WRITTEN_HERE):
        assert rows[name]["status"] == "equal" and rows[name]["relative_error"] <= peers.TOLERANCE, rows[name]
        assert rows[name]["ms_per_iteration"] > 0, rows[name]
    assert rows["distmaml"]["speedup_over_fastest_loop"] > 0 and rows["distmaml"]["speed_vs_hand_batched"] > 0


# The four hypergradient cases at T = 3 on two initialisations, MNIST-1D cut to 200 training sequences.
HYPER_SMALL = {"learning_rate": ("task.args.train=200", "model.hidden=[16]"),
               "weight_decay": ("task.args.train=200", "model.hidden=[16]"), "distill": (), "hyperclean": ()}


@pytest.fixture(scope="module")
def peers_hyper_rows():
    return {(row["case"], row["library"]): row for case, more in HYPER_SMALL.items()
            for row in peers_hyper.compare_and_time(case, 1, 0.0, steps=3, tasks=2, more=more)}


@pytest.mark.parametrize("library", ["torchopt", "higher", "betty"])
def test_a_peer_s_hypergradient_equals_distmaml_s_before_it_is_timed(peers_hyper_rows, library):
    rows = {case: row for (case, name), row in peers_hyper_rows.items() if name == library}
    if any(row["status"].startswith("not installed") for row in rows.values()):  # pip install -e ".[peers]"
        pytest.skip(f"{library} is not installed")
    # higher has no implicit differentiation; Betty's unrolled problems do not start (benchmarks/peers_betty.py)
    compared = {"torchopt": set(HYPER_SMALL), "higher": {"learning_rate", "distill"},
                "betty": {"weight_decay", "hyperclean"}}[library]
    assert set(rows) == compared | ({"learning_rate", "distill"} if library == "betty" else set())
    for case in compared:
        row = rows[case]
        assert row["status"] == "equal" and row["relative_error"] <= peers_hyper.TOLERANCE, row
        assert row["ms_per_hypergradient"] > 0, row
        mine = peers_hyper_rows[case, "distmaml-neumann" if row.get("solve") == "neumann" else "distmaml"]
        assert mine["speedup_over_fastest_peer"] > 0, mine
    if library == "betty":
        for case in ("learning_rate", "distill"):
            assert rows[case]["status"] == "fails" and rows[case]["error"].startswith(
                "Betty 0.2.1 fails: ValueError: Monkey-patching"), rows[case]
        for case in ("weight_decay", "hyperclean"):  # its "cg" reuses the old residual: not a CG solve
            cg = peers_hyper_rows[case, "betty-cg"]
            assert cg["status"] == "DIFFERS" and cg["relative_error"] > 0.1 and "ms_per_hypergradient" not in cg, cg


@pytest.mark.parametrize("implementation", WRITTEN_HERE)
def test_the_hypergradients_written_for_the_benchmark_equal_distmaml_s_in_every_case(peers_hyper_rows,
                                                                                      implementation):
    for case in HYPER_SMALL:
        row = peers_hyper_rows[case, implementation]
        assert row["status"] == "equal" and row["relative_error"] <= peers_hyper.TOLERANCE, row
        assert row["ms_per_hypergradient"] > 0 and row.get("solve", "cg") == "cg", row  # the implicit ones: ridge-1 CG


def test_distmaml_s_hypergradient_rows_compare_it_with_libraries_loops_and_the_hand_batched_one(peers_hyper_rows):
    for case in HYPER_SMALL:
        mine = peers_hyper_rows[case, "distmaml"]
        timed = {name: row["ms_per_hypergradient"] for (where, name), row in peers_hyper_rows.items()
                 if where == case and not name.startswith("distmaml") and row.get("solve") == mine.get("solve")
                 and "ms_per_hypergradient" in row}
        libraries = [ms for name, ms in timed.items() if name not in WRITTEN_HERE]
        loops = [ms for name, ms in timed.items() if name != peers.HAND_BATCHED]
        ms = mine["ms_per_hypergradient"]
        assert mine["speedup_over_fastest_loop"] == pytest.approx(min(loops) / ms), mine
        assert mine["speed_vs_hand_batched"] == pytest.approx(timed[peers.HAND_BATCHED] / ms), mine
        if libraries:  # the peers' speedup is over the libraries alone
            assert mine["speedup_over_fastest_peer"] == pytest.approx(min(libraries) / ms), mine


def test_an_error_of_ours_inside_a_betty_engine_is_raised_as_ours_not_blamed_on_betty():
    pytest.importorskip("betty")
    from benchmarks import peers_betty

    config, learner, tasks = peers_hyper.setup("hyperclean", "float64", 2, tasks=1)

    class Broken:  # the problem's inner loss has a bug
        def __getattr__(self, name):
            return getattr(learner.problem, name)

        def inner_loss(self, *args):
            raise ValueError("a bug in our inner loss")

    task, params, names = next(peers_hyper._runs(learner, tasks))
    with pytest.raises(ValueError, match="a bug in our inner loss"):
        peers_betty.hypergradient(Broken(), learner.theta, task, dict(zip(names, params)), 2, "implicit", lr=0.1,
                                  type="neumann", neumann_iterations=2, neumann_alpha=0.01)


def test_implicit_hypergradients_equal_the_unrolled_one_only_once_the_training_run_has_converged(tmp_path):
    # Logistic regression is convex: 300 steps reach its minimum, where the implicit function theorem
    # holds; after 5 steps it does not, and the benchmark must show the difference.
    for steps, agree in ((300, True), (5, False)):
        out = tmp_path / f"methods_{steps}.json"
        hyper_methods.main(["logistic", f"inner.steps={steps}", "--quick", "--out", str(out)])
        rows = {row["method"]: row for row in strict(out)["rows"]}
        assert rows["second_order"]["cosine_to_unrolled"] == pytest.approx(1.0)
        for method in ("implicit", "neumann"):
            close = (rows[method]["cosine_to_unrolled"] > 0.999
                     and abs(rows[method]["norm_ratio_to_unrolled"] - 1) < 0.01)
            assert close == agree, (steps, rows[method])


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


def test_search_cost_draws_its_figure_and_table_from_a_result(tmp_path, monkeypatch):
    from benchmarks import report_bilevel, search_cost

    def point(x, accuracy, **key):
        return {**key, "inner_steps": x, "cpu_seconds": x / 1000, "test_accuracy": {"mean": accuracy, "std": 0.01}}

    result = {"command": "python -m benchmarks.search_cost", "machine": common.machine(torch.device("cpu")),
              "schedule": {"seeds": [0, 1, 2],
                           "learned": [point(4000 * k + 1000, 0.5 + 0.01 * k, outer_steps=k) for k in (5, 10)],
                           "grid": [point(1000 * n, 0.6, candidates=n) for n in (2, 4)],
                           "random": [point(1000 * n, 0.62, candidates=n) for n in (1, 2)]},
              "hyperclean": {"digits_hyperclean": {
                  "protocol": "360 clean validation examples", "seeds": [0, 1, 2],
                  "learned": [point(400 * k + 100, 0.9, outer_steps=k) for k in (25, 50)],
                  "baselines": {"oracle": point(70000, 0.97)}}}}
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    common.write(result, tmp_path / "search_cost.json")
    table = report_bilevel.search_cost()
    assert "| learned 5-block schedule, after 10 outer steps | 41,000 | 41 | 60.0 ± 1.0 |" in table
    assert "| oracle (tuned, the whole search) | 70,000 | 70 | 97.0 ± 1.0 |" in table
    drawn = search_cost.figure(result, tmp_path / "cost.png")
    assert drawn.read_bytes().startswith(b"\x89PNG")


def test_one_online_step_equals_torchopts_learning_to_reweight_and_bettys_darts():
    """benchmarks.peers_online's equality rows: TorchOpt's L2R example and a plain loop give distmaml's
    step; Betty's darts gives distmaml's finite-difference hypergradient where their centres coincide,
    and not at the config's rate (Betty differentiates after the real step)."""
    for package in ("mnist1d", "torchopt", "betty"):  # the data and peers extras
        pytest.importorskip(package)
    from benchmarks import peers_online

    rows = {(row["library"], row.get("where")): row for row in peers_online.compare(2)}
    for library in ("torchopt", "plain-loop"):
        row = rows[library, None]
        assert row["equal"] and row["rel_error"] <= peers_online.TOLERANCE, row
    same, config_rate = [row for (library, _), row in rows.items() if library == "betty"]
    assert same["equal"] and same["rel_error"] <= peers_online.TOLERANCE, same
    assert not config_rate["equal"], config_rate


def test_distmaml_s_es_estimate_equals_torchopts_zero_order_given_the_same_perturbations():
    """benchmarks.peers_es's equality: TorchOpt's antithetic zero-order gradient of a plain-PyTorch
    5-step sine adaptation, handed distmaml's draws, is distmaml's `es` estimate (float64)."""
    pytest.importorskip("torchopt")
    from benchmarks import peers_es

    assert peers_es.check_equal(pairs=4) <= peers_es.TOLERANCE

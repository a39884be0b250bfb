"""The baseline rule (benchmarks.baselines) is code: its stacked-weights training equals a plain
PyTorch loop, its search reports an edge instead of passing it as tuned, it refuses a search that
cannot run, and every stored baseline was chosen strictly inside its range or at a natural bound."""

import json
import math

import pytest
import torch
from torch import nn

from benchmarks import baselines, common
from benchmarks.baselines import Space, SearchError, Split, search, train_candidates


def _mlp(seed: int, activation=nn.ReLU, width: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), activation(), nn.Linear(width, 3)).double()


def _data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine"])
@pytest.mark.parametrize("activation", [nn.ReLU, nn.ELU])
def test_stacked_training_equals_torch_sgd_one_candidate_at_a_time(schedule, activation):
    """Every (setting, initialisation) candidate's curve equals torch.optim.SGD with weight_decay on one
    nn.Module, at the rates the schedule gives, on the same mini-batches (float64)."""
    inits = [_mlp(seed, activation) for seed in (0, 1)]
    data, held = _data(0, 64), _data(1, 40)
    space = Space(rates=(0.05, 0.3), decays=(0.0, 0.01), budget=12, checks=3, schedule=schedule)
    found = train_candidates(inits, data, {"held": held}, space, batch_size=16, seed=7)
    for s, setting in enumerate(space.settings()):
        for i, init in enumerate(inits):
            net = _mlp((0, 1)[i], activation)
            assert all(torch.equal(a, b) for a, b in zip(net.parameters(), init.parameters()))
            optimizer = torch.optim.SGD(net.parameters(), lr=setting["rate"], weight_decay=setting["decay"])
            generator = torch.Generator().manual_seed(7)
            accuracies = []
            for step in range(space.budget):
                index = torch.randint(0, 64, (16,), generator=generator)
                n = setting["length"]
                shape = {"constant": 1.0, "step": 1.0 if step < 0.8 * n else 0.2,
                         "cosine": 0.5 * (1 + math.cos(math.pi * step / n))}[schedule]
                for group in optimizer.param_groups:
                    group["lr"] = setting["rate"] * shape if step < n else 0.0
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(data[0][index]), data[1][index]).backward()
                optimizer.step()
                if step + 1 in space.check_steps:
                    with torch.no_grad():
                        accuracies.append((net(held[0]).argmax(-1) == held[1]).double().mean().item())
            mine = found["held_accuracy"][:, s, i].tolist()
            assert mine == pytest.approx(accuracies, abs=1e-12), (setting, i)


def test_a_best_setting_at_the_edge_of_its_grid_is_reported_as_an_edge():
    """Rates far too small for the budget: the largest is best, and the search says it sits at the edge;
    the same problem given rates around its best reports no edge."""
    data, validation, test = _data(2, 120), _data(3, 80), _data(4, 80)

    def inits():
        return [_mlp(0, width=16)]

    low = search(inits(), Split(data), validation, test, Space(rates=(1e-4, 3e-4, 1e-3), decays=(0.0,),
                                                                         budget=30, checks=3), 0, seed=0)
    assert low["rate"] == 1e-3 and low["edges"] == ["rate 0.001 at the high end of its grid"]
    assert low["natural_bounds"][0] == "decay 0"
    wide = search(inits(), Split(data), validation, test, Space(rates=(1e-4, 0.3, 100.0), decays=(0.0,),
                                                                          budget=30, checks=3), 0, seed=0)
    assert wide["rate"] == 0.3 and not [e for e in wide["edges"] if e.startswith("rate")]


def test_k_fold_selection_never_looks_at_the_validation_split_it_trains_on():
    """A baseline that trains on the validation split chooses by cross-validation inside it: two
    different "validation" splits give the same choice and test accuracy, and the cost counts every
    fold's training plus the final one on all of the split."""
    data, test = _data(5, 90), _data(6, 60)
    noise = (data[0][:30], torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(0)))

    def inits():
        return [_mlp(1)]

    space = Space(rates=(0.01, 0.3, 10.0), decays=(0.0, 0.01), budget=20, checks=4)
    empty = (data[0][:0], data[1][:0])
    first = search(inits(), Split(empty, data), noise, test, space, 0, seed=0, folds=3)
    second = search(inits(), Split(empty, data), _data(7, 30), test, space, 0, seed=0, folds=3)
    assert {k: first[k] for k in ("rate", "decay", "steps", "test_accuracy", "validation_accuracy")} == \
        {k: second[k] for k in ("rate", "decay", "steps", "test_accuracy", "validation_accuracy")}
    assert first["search"]["folds"] == 3 and "3-fold" in first["selected_by"]
    # candidates frozen once they diverge (the rate 10) stop counting steps
    assert first["steps"] < first["search"]["inner_steps"] <= 3 * len(space.settings()) * 20 + first["steps"]


@pytest.mark.parametrize("space, says", [
    (dict(rates=()), "rates is empty"), (dict(decays=()), "decays is empty"), (dict(budget=0), "budget = 0"),
    (dict(rates=(0.1, -1.0)), "finite and > 0"), (dict(schedule="linear"), "schedule = 'linear'"),
    (dict(checks=0), "checks = 0")])
def test_a_search_that_cannot_run_is_refused_in_one_line(space, says):
    with pytest.raises(SearchError, match=says) as caught:
        Space(**space)
    assert "\n" not in str(caught.value)


def test_the_command_line_refuses_an_empty_grid_or_no_budget_in_one_line(capsys):
    for argv, says in ((["logistic", "--rates"], "rates is empty"), (["logistic", "--decays"], "decays is empty"),
                       (["logistic", "--steps-factor", "0"], "budget = 0 steps")):
        with pytest.raises(SystemExit) as caught:
            baselines.main(argv)
        assert says in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(SystemExit) as caught:
        baselines.main(["no_such_case"])
    assert caught.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_a_case_end_to_end_writes_each_baselines_choice_and_cost(tmp_path):
    """The logistic-regression case (20 features, 100 training examples), one seed, a small grid."""
    (result,) = baselines.main(["logistic", "--seeds", "0", "--steps-factor", "1", "--rates", "0.1", "1", "10",
                                "--decays", "0", "0.01", "--out", str(tmp_path)])
    stored = json.loads((tmp_path / "baselines_logistic.json").read_text())
    assert stored["rows"][0]["baselines"].keys() == {"no decay", "one tuned decay"}
    assert stored["command"].endswith("--rates 0.1 1.0 10.0 --decays 0.0 0.01 --steps-factor 1")
    for name, found in result["rows"][0]["baselines"].items():
        assert found["space"]["budget"] == 1000 and found["space"]["rates"] == [0.1, 1.0, 10.0]
        assert found["search"]["inner_steps"] > 0 and 0.5 < found["test_accuracy"] <= 1
    assert result["rows"][0]["baselines"]["no decay"]["space"]["decays"] == [0.0]


STORED = sorted(common.RESULTS.glob("baselines_*.json"))


@pytest.mark.skipif(not STORED, reason="no stored baseline results")
@pytest.mark.parametrize("path", STORED, ids=lambda path: path.stem)
def test_every_stored_baseline_was_tuned_inside_its_range(path):
    """The rule as the stored results applied it: each baseline's chosen rate, decay and steps lie
    strictly inside their search range, except at a natural bound, which the result names."""
    result = json.loads(path.read_text())
    assert len(result["rows"]) >= 3, "results over 3 seeds"
    for row in result["rows"]:
        for name, found in row["baselines"].items():
            where = f"{path.name}, seed {row['seed']}, {name}"
            assert found["edges"] == [], f"{where}: chosen at the edge of its range: {found['edges']}"
            space = found["space"]
            rates, decays = space["rates"], space["decays"]
            assert len(rates) == 1 or rates[0] < found["rate"] < rates[-1], where
            assert found["decay"] in decays and (found["decay"] == 0 or len(decays) == 1
                                                 or found["decay"] < decays[-1]), where
            if found["decay"] == 0:
                assert "decay 0" in found["natural_bounds"], where
            assert 0 < found["steps"] <= space["budget"], where
            if found["steps"] == space["budget"]:
                assert any("budget" in bound or "longest" in bound for bound in found["natural_bounds"]), where
            assert found["search"]["inner_steps"] > 0 and found["search"]["cpu_seconds"] > 0, where
            assert 0 < found["test_accuracy"] <= 1, where


def test_choosing_by_loss_takes_the_lowest_validation_loss_and_by_accuracy_breaks_ties_on_it():
    space = Space(rates=(0.1, 1.0), decays=(0.0,), budget=2, checks=2)
    accuracy = torch.tensor([[[0.8], [0.8]], [[0.8], [0.7]]])  # [checks, settings, inits]
    loss = torch.tensor([[[0.5], [0.4]], [[0.3], [0.6]]])
    assert baselines.choose(space, accuracy, loss) == (1, 0)  # equal accuracy: the lower loss
    assert baselines.choose(space, accuracy, loss, by="loss") == (1, 0)
    accuracy[0, 1, 0] = 0.9
    assert baselines.choose(space, accuracy, loss) == (0, 1)
    assert baselines.choose(space, accuracy, loss, by="loss") == (1, 0)

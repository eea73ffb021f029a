"""The recall grid end to end on a tiny grid: every planned run is trained, evaluated and written
once; a second call resumes (does nothing); the report shows every model at its best learning
rate and keeps the hand-written prose around its table."""

import json

import pytest

from evals import recall
from evals.recall_report import END, START, best_by_model, write_report

TINY_GRID = ["--quick", "--jobs", "1", "--mqar-steps", "8", "--needle-steps", "4"]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    report = out / "recall.md"
    report.write_text(f"# Recall\n\nProse before.\n\n{START}\nold table\n{END}\n\nProse after.\n")
    recall.main([*TINY_GRID, "--out", str(out / "runs"), "--report", str(report)])
    return out, report


def test_every_run_is_recorded_once_with_its_measurements(grid_run):
    out, _ = grid_run
    runs = [json.loads(line) for line in (out / "runs" / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in runs) == sorted(
        f"{task}/{model}/lr=0.003/seed=0" for task in ("mqar", "needle")
        for model in ("gla-none", "gla-grm", "transformer"))
    for r in runs:
        assert set(r["accuracy"]) == {"128", "256"} and all(0 <= a <= 1 for a in r["accuracy"].values())
        assert r["parameters"] > 0 and r["train_seconds"] >= 0 and r["bytes_per_token"] >= 0
        assert 1 <= len(r["loss_curve"]) <= 10 and all(loss > 0 for loss in r["loss_curve"])
    by_model = {r["model"]: r for r in runs if r["task"] == "mqar"}
    assert by_model["gla-none"]["bytes_per_token"] == 0 < by_model["gla-grm"]["bytes_per_token"]
    assert 0 < by_model["transformer"]["fixed_state_bytes"] < by_model["transformer"]["bytes_per_token"] * 64
    assert all(len(r["by_depth"]) == 4 for r in runs if r["task"] == "needle")


def test_a_second_call_resumes_without_rerunning(grid_run, capsys):
    out, report = grid_run
    before = (out / "runs" / "runs.jsonl").read_text()
    recall.main([*TINY_GRID, "--out", str(out / "runs"), "--report", ""])
    assert "0 runs to do" in capsys.readouterr().out
    assert (out / "runs" / "runs.jsonl").read_text() == before


def test_report_rewrites_only_its_block(grid_run):
    _, report = grid_run
    text = report.read_text()
    assert text.startswith("# Recall\n\nProse before.") and text.rstrip().endswith("Prose after.")
    assert "old table" not in text and text.count(START) == text.count(END) == 1
    for model in ("gla-none", "gla-grm", "transformer"):
        assert f"| {model} |" in text
    assert (report.parent / "recall.png").stat().st_size > 1000


def test_best_learning_rate_is_chosen_on_mean_accuracy_over_seeds():
    def run(lr, seed, accs):
        return {"task": "mqar", "model": "gla-grm", "lr": lr, "seed": seed, "accuracy": accs, "parameters": 1,
                "train_seconds": 1.0, "fixed_state_bytes": 0, "bytes_per_token": 0}
    runs = [run(1e-3, 0, {"256": 0.9, "512": 0.1}), run(1e-3, 1, {"256": 0.7, "512": 0.1}),
            run(3e-3, 0, {"256": 0.5, "512": 0.5}), run(3e-3, 1, {"256": 0.5, "512": 0.5})]
    best = best_by_model(runs, "mqar")["gla-grm"]
    assert best["lr"] == 3e-3 and best["seeds"] == 2 and best["accuracy"] == {"256": 0.5, "512": 0.5}
    only_first = best_by_model(runs[:2], "mqar")["gla-grm"]
    assert only_first["accuracy"]["256"] == pytest.approx(0.8) and only_first["spread"]["256"] == pytest.approx(0.2)


def test_sweep_table_shows_every_learning_rate_and_gaps():
    from evals.recall_report import sweep_table

    def run(model, lr, accs):
        return {"task": "mqar", "model": model, "lr": lr, "accuracy": accs}
    runs = [run("gla-grm", 1e-3, {"256": 0.9, "512": 0.5}), run("gla-grm", 3e-3, {"256": 0.2, "512": 0.0}),
            run("gla-none", 3e-3, {"256": 1.0, "512": 0.8})]
    text = sweep_table(runs, "mqar")
    assert "| model | lr 0.001 | lr 0.003 |" in text
    assert "| gla-none | - | 0.900 |" in text and "| gla-grm | 0.700 | 0.100 |" in text
    assert sweep_table(runs[1:], "mqar") == ""


@pytest.mark.parametrize("argv,message", [(["--tasks", "mqar,bogus"], "--tasks"), (["--jobs", "0"], "--jobs"),
                                          (["--lrs", "fast"], "--lrs"), (["--needle-lrs", "1e-3,x"], "--needle-lrs"),
                                          (["--lrs", "0"], "positive"), (["--models", "gla-bogus"], "--models"),
                                          (["--models", ","], "--models"), (["--seeds", "0"], "seed"),
                                          (["--first-seed", "-1"], "--first-seed")])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recall.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_report_without_a_file_creates_one(tmp_path, grid_run):
    out, _ = grid_run
    target = tmp_path / "new.md"
    write_report(out / "runs" / "runs.jsonl", recall.GridConfig(**recall.QUICK), target)
    assert target.read_text().startswith("# Recall evaluation") and START in target.read_text()


def test_mqar_sweeps_its_learning_rates_and_the_needle_runs_at_its_own():
    grid = recall.GridConfig(lrs=(1e-3, 3e-3), needle_lrs=(2e-3,), seeds=(0, 1))
    runs = recall.plan(grid, ("mqar", "needle"))
    models = len(grid.model_names)
    keys = [key for r in runs for key in r.keys]
    assert len(keys) == len(set(keys)) == models * 2 * 2 + models * 1 * 2
    assert {r.lr for r in runs if r.task == "mqar"} == {1e-3, 3e-3}
    assert {r.lr for r in runs if r.task == "needle"} == {2e-3}


def test_soup_is_scored_on_grms_training_unless_grm_is_not_in_the_grid():
    grid = recall.GridConfig()
    runs = recall.plan(grid, ("mqar",))
    assert [r.twins for r in runs if r.model.endswith("-grm")] == [("delta-soup",), ("gla-soup",)]
    assert not any(r.model.endswith("-soup") for r in runs)
    alone = recall.plan(grid, ("mqar",), models=("gla-soup", "gla-none"))
    assert sorted((r.model, r.twins) for r in alone) == [("gla-none", ()), ("gla-soup", ())]
    named = recall.plan(grid, ("mqar",), models=("gla-grm",))  # its twin comes free
    assert [(r.model, r.twins) for r in named] == [("gla-grm", ("gla-soup",))]


def test_runs_start_longest_first():
    runs = recall.plan(recall.GridConfig(), ("mqar", "needle"))
    costs = [recall._expected_cost(r) for r in runs]
    assert costs == sorted(costs, reverse=True)
    assert runs[0].task == "mqar" and runs[0].model.startswith("delta-")


def test_a_twin_gets_its_own_record_from_the_same_training():
    grid = recall.GridConfig(**{**recall.QUICK, "aggregations": ("grm", "soup"), "mqar_steps": 6})
    run = recall.Run("mqar", "gla-grm", 3e-3, 0, grid, twins=("gla-soup",))
    grm, soup = recall.execute(run)
    assert (grm["key"], soup["key"]) == ("mqar/gla-grm/lr=0.003/seed=0", "mqar/gla-soup/lr=0.003/seed=0")
    assert soup["trained_as"] == "gla-grm" and "trained_as" not in grm
    assert soup["loss_curve"] == grm["loss_curve"] and soup["parameters"] == grm["parameters"]
    assert soup["accuracy"] == grm["accuracy"]  # MQAR scores the training path: bit-identical
    from evals.recall_report import best_by_model, table
    text = table(best_by_model([grm, soup], "mqar"))
    assert f"| {grm['train_seconds']:.0f} |" in text and "| gla-grm's |" in text


def test_loss_curve_is_the_mean_over_equal_spans():
    assert recall._loss_curve([4.0] * 5 + [2.0] * 5, points=2) == [4.0, 2.0]
    assert recall._loss_curve([3.0, 1.0], points=10) == [3.0, 1.0]


def test_models_option_runs_only_the_named_models(tmp_path):
    recall.main([*TINY_GRID, "--tasks", "mqar", "--models", "gla-grm", "--out", str(tmp_path), "--report", ""])
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["key"] for r in runs] == ["mqar/gla-grm/lr=0.003/seed=0"]


def test_first_seed_option_runs_the_seeds_from_there(tmp_path):
    recall.main([*TINY_GRID, "--tasks", "mqar", "--models", "gla-none", "--seeds", "2", "--first-seed", "3",
                 "--mqar-steps", "2", "--out", str(tmp_path), "--report", ""])
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in runs) == ["mqar/gla-none/lr=0.003/seed=3", "mqar/gla-none/lr=0.003/seed=4"]


def test_needle_mixture_weights_must_match_the_lengths():
    with pytest.raises(ValueError, match="needle_mixture_weights"):
        recall.GridConfig(needle_mixture_weights=(1, 1))
    assert len(recall.GridConfig().needle_mixture_weights) == 5

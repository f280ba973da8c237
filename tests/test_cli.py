import json

import numpy as np
import pandas as pd
import pytest
from _toy import toy_adata

import cellflow as cf
from cellflow._demo import best_available_method, run_demo
from cellflow.cli import build_parser, main


def test_demo_mean_shift_beats_identity_on_held_out_combinations(tmp_path):
    # few training steps keep this test short; the full demo is `cellflow demo`
    per_condition, summary = run_demo(tmp_path, verbose=False, steps=100)
    combos = summary.loc["held-out combinations"]
    patient = summary.loc[[i for i in summary.index if i.startswith("unseen patient")][0]]
    assert combos["mean_shift"] < 0.6 * combos["identity"]
    assert patient["mean_shift"] < 0.6 * patient["identity"]
    best = best_available_method()
    # the fitted method is reported beside the baselines and the noise floor, which nothing beats by much
    for row in (combos, patient):
        assert row[best] < row["identity"]
        assert row["noise_floor"] <= 1.2 * min(row[m] for m in ("identity", "mean_shift", best))
    # what a perfect prediction from the members scores: only held-out combinations have it
    assert combos["additive_oracle"] < combos["mean_shift"]
    assert np.isnan(patient["additive_oracle"])
    for name in ("results.csv", "summary.csv", "demo.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert set(per_condition["task"]) == set(summary.index)


def test_cli_demo_runs(tmp_path, capsys):
    # the learned method's part of the demo is the test above; here the command line's
    assert main(["demo", "--out", str(tmp_path / "d"), "--no-plot", "--methods", "identity", "mean_shift"]) == 0
    out = capsys.readouterr().out
    assert "held-out combinations" in out and "noise_floor" in out and "flow_matching" not in out
    assert main(["demo", "--out", str(tmp_path / "e"), "--methods", "mean_shfit"]) == 2
    assert "'mean_shfit' is not a method" in capsys.readouterr().err


def test_cli_train_predict_evaluate(tmp_path, capsys):
    adata = toy_adata()
    data = tmp_path / "toy.h5ad"
    adata.write_h5ad(data)
    model_dir = tmp_path / "model"
    assert main(["train", str(data), "--out", str(model_dir), "--rep", "X", "--dose-key", "dose",
                 "--covariate-key", "patient", "--method", "gaussian_ot", "--option", "shrinkage=0.1", "--quiet"]) == 0
    pred = tmp_path / "pred.h5ad"
    assert main(["predict", str(model_dir), str(data), "--source-control", "--perturbation", "A",
                 "--perturbation", "B", "--dose", "1.0", "--out", str(pred)]) == 0
    predicted = cf.datasets.read(pred)
    assert predicted.n_obs == 2 * (adata.obs.condition == "control").sum()
    table_path = tmp_path / "eval.csv"
    truth = tmp_path / "truth.h5ad"
    adata.write_h5ad(truth)
    # the prediction is of doses 1 only, which is how it is grouped: the other groups are not scored against it
    assert main(["evaluate", str(pred), str(truth), "--rep", "X", "--metric", "energy_distance", "--out", str(table_path)]) == 2
    err = capsys.readouterr().err
    assert "groups [('A', '10.0'), ('A+B', '1+1'), ('B', '10.0'), ('control', '0')] of truth" in err and "--only-predicted" in err
    assert main(["evaluate", str(pred), str(truth), "--rep", "X", "--metric", "energy_distance", "--out", str(table_path),
                 "--only-predicted"]) == 0
    assert "left out, not predicted: [('A', '10.0'), ('A+B', '1+1'), ('B', '10.0'), ('control', '0')]" in capsys.readouterr().err
    table = pd.read_csv(table_path)
    assert list(table["condition"]) == ["A", "B"] and list(table["dose"]) == [1.0, 1.0]
    assert np.isfinite(table["energy_distance"]).all()
    assert main(["evaluate", str(pred), str(truth), "--rep", "X", "--metric", "energy_distance", "mmd", "--out",
                 str(table_path), "--only-predicted", "--floors"]) == 0
    floors = pd.read_csv(table_path)
    assert list(floors.columns[-4:]) == ["energy_distance", "energy_distance_floor", "mmd", "mmd_floor"]
    assert (0 < floors["energy_distance_floor"]).all() and (floors["energy_distance_floor"] < floors["energy_distance"]).all()


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    data = tmp_path / "toy.h5ad"
    toy_adata().write_h5ad(data)
    assert main(["train", str(data), "--out", str(tmp_path / "m"), "--rep", "nope"]) == 2
    assert "rep='nope'" in capsys.readouterr().err
    # a model option missing at predict time is named as the flag of the command that sets it
    model_dir = tmp_path / "m"
    assert main(["train", str(data), "--out", str(model_dir), "--rep", "X", "--method", "mean_shift", "--quiet"]) == 0
    assert main(["predict", str(model_dir), str(data), "--source-control", "--perturbation", "A", "--dose", "1.0",
                 "--out", str(tmp_path / "p.h5ad")]) == 2
    err = capsys.readouterr().err
    assert "--dose-key=<obs column of doses> to `cellflow train`" in err and "ResponseModel" not in err


def test_cli_train_with_an_embedding_table_predicts_an_unseen_perturbation(tmp_path):
    adata = toy_adata()
    data = tmp_path / "toy.h5ad"
    adata.write_h5ad(data)
    # C was never measured; its vector is closest to A's
    pd.DataFrame({"drug": ["A", "B", "C"], "e0": [1.0, 0.0, 0.9], "e1": [0.0, 1.0, 0.1]}).to_csv(tmp_path / "emb.csv", index=False)
    model_dir = tmp_path / "model"
    assert main(["train", str(data), "--out", str(model_dir), "--rep", "X", "--dose-key", "dose", "--covariate-key", "patient",
                 "--method", "mean_shift", "--perturbation-embeddings", str(tmp_path / "emb.csv"), "--quiet"]) == 0
    out = tmp_path / "pred.h5ad"
    assert main(["predict", str(model_dir), str(data), "--source-control", "--perturbation", "C", "--dose", "1.0",
                 "--covariate", "patient=P1", "--out", str(out)]) == 0
    source = adata[adata.obs.condition == "control"]
    np.testing.assert_allclose((cf.datasets.read(out).X - source.X).mean(0), [1.0, 0.0, 0.0], atol=1e-5)  # A's shift in P1


def _single_drug_table(tmp_path):
    """The toy data without its combination as a csv whose dose, donor id and plate columns are all numeric."""
    adata = toy_adata()
    adata = adata[adata.obs.condition != "A+B"]
    table = pd.DataFrame(adata.X, columns=["x0", "x1", "x2"])
    table["condition"] = adata.obs.condition.to_numpy()
    table["dose"] = adata.obs.dose.astype(float).to_numpy()
    table["patient"] = adata.obs.patient.map({"P1": 101, "P2": 102, "P3": 103}).astype(int).to_numpy()
    table["plate"] = np.arange(len(table)) % 2
    path = tmp_path / "cells.csv"
    table.to_csv(path, index=False)
    return adata, path


def test_cli_train_keeps_numeric_key_columns_and_obs_columns_as_metadata(tmp_path):
    adata, path = _single_drug_table(tmp_path)
    model_dir = tmp_path / "model"
    # dose and patient are numeric, so a table reader makes them features; naming them as keys keeps them as obs
    assert main(["train", str(path), "--out", str(model_dir), "--rep", "X", "--dose-key", "dose", "--covariate-key", "patient",
                 "--obs-column", "plate", "--method", "mean_shift", "--quiet"]) == 0
    spec = cf.ResponseModel.load(model_dir).spec_
    assert spec.n_features == 3 and spec.feature_names == ("x0", "x1", "x2")
    assert set(spec.covariate_values["patient"]) == {"101", "102", "103"}
    out = tmp_path / "pred.h5ad"
    assert main(["predict", str(model_dir), str(path), "--source-control", "--obs-column", "plate", "--perturbation", "A",
                 "--dose", "1.0", "--out", str(out)]) == 0
    pred = cf.datasets.read(out)
    source = adata[adata.obs.condition == "control"]
    assert pred.n_vars == 3 and pred.n_obs == source.n_obs
    p1 = (pred.obs.patient == 101).to_numpy()
    np.testing.assert_allclose((pred.X[p1] - source.X[p1]).mean(0), [1.0, 0.0, 0.0], atol=1e-5)  # A's shift in P1


def test_cli_train_defaults_and_help(tmp_path, capsys):
    assert build_parser().parse_args(["train", "data.h5ad", "--out", "m"]).method == "flow_matching"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: flow_matching)", "(default: X_pca)", "(default: condition)", "(default: control)",
                    "--steps STEPS training steps of learned methods (default: the method's own)", "--seed SEED seed of"):
        assert default in text
    # every positional argument of every command says what it is
    commands = next(a for a in build_parser()._actions if a.choices and "train" in a.choices).choices
    bare = [(name, a.dest) for name, sub in commands.items() for a in sub._actions if not a.option_strings and not a.help]
    assert bare == []


def test_cli_evaluate_groups_by_the_columns_the_prediction_was_made_for(tmp_path, capsys):
    adata = toy_adata()
    adata.obs = adata.obs.rename(columns={"condition": "drug"})
    data = tmp_path / "toy.h5ad"
    adata.write_h5ad(data)
    model_dir, pred = tmp_path / "model", tmp_path / "pred.h5ad"
    assert main(["train", str(data), "--out", str(model_dir), "--rep", "X", "--perturbation-key", "drug",
                 "--method", "mean_shift", "--quiet"]) == 0
    assert main(["predict", str(model_dir), str(data), "--source-control", "--perturbation", "A", "--perturbation", "B",
                 "--out", str(pred)]) == 0
    truth = tmp_path / "truth.h5ad"
    adata[adata.obs.drug.isin(["A", "B"])].copy().write_h5ad(truth)
    capsys.readouterr()
    assert main(["evaluate", str(pred), str(truth), "--metric", "energy_distance"]) == 0  # no --groupby drug needed
    printed = capsys.readouterr().out
    assert "drug" in printed and " A " in printed and " B " in printed
    # the library's argument names are written as this command's flags
    assert main(["train", str(data), "--out", str(tmp_path / "m2"), "--rep", "X", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--perturbation-key='condition' is not a column" in err and "perturbation_key=" not in err


def test_cli_refuses_unwritable_outputs_before_working(tmp_path, capsys):
    data = tmp_path / "toy.h5ad"
    toy_adata().write_h5ad(data)
    model_dir = tmp_path / "m1"
    train = ["train", str(data), "--out", str(model_dir), "--rep", "X", "--method", "mean_shift", "--quiet"]
    assert main(train) == 0
    capsys.readouterr()
    assert main(train) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "overwrite=True" not in err
    assert main([*train, "--overwrite"]) == 0
    (tmp_path / "a_file").write_text("")
    assert main(["train", str(data), "--out", str(tmp_path / "a_file" / "m"), "--rep", "X", "--method", "mean_shift"]) == 2
    assert "not a writable folder" in capsys.readouterr().err
    missing = tmp_path / "nonexistent" / "p.h5ad"
    assert main(["predict", str(model_dir), str(data), "--perturbation", "A", "--out", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err and not missing.parent.exists()
    assert main(["bench", str(data), "--hold-out-conditions", "A+B", "--out", str(missing.with_suffix(".csv"))]) == 2
    assert "does not exist" in capsys.readouterr().err
    results = tmp_path / "results"
    results.mkdir()
    (results / "notes.txt").write_text("keep")
    assert main(["train", str(data), "--out", str(results), "--overwrite", "--rep", "X", "--method", "mean_shift"]) == 2
    assert "is not a saved cellflow model" in capsys.readouterr().err and (results / "notes.txt").read_text() == "keep"


def _bench(capsys, argv, quiet=True):
    assert main(["bench", *argv, *(["--quiet"] if quiet else [])]) == 0
    captured = capsys.readouterr()
    if not quiet:
        assert "fitted identity (seed 0)" in captured.err  # progress goes to stderr, the JSON alone to stdout
    return json.loads(captured.out)


def test_cli_bench_compares_baselines_over_seeds_and_writes_a_row_per_group(tmp_path, capsys):
    data = tmp_path / "toy.h5ad"
    toy_adata().write_h5ad(data)
    out = tmp_path / "bench.csv"
    report = _bench(capsys, [str(data), "--methods", "identity", "mean_shift", "--seeds", "0", "1", "--rep", "X",
                             "--dose-key", "dose", "--covariate-key", "patient", "--hold-out-doses", "10", "--out", str(out)])
    assert report["split"]["kind"] == "doses" and report["split"]["held_out_conditions"] == ["A", "B"]
    results = report["results"]
    assert list(results) == ["identity", "mean_shift"]
    assert set(results["identity"]) == {"energy_distance", "mmd", "energy_distance/mean_shift", "gap_closed", "fit_seconds"}
    assert results["mean_shift"]["energy_distance/mean_shift"] == 1.0 and results["mean_shift"]["gap_closed"] == 0.0
    assert results["identity"]["energy_distance"] > results["mean_shift"]["energy_distance"]
    assert results["identity"]["gap_closed"] < 0
    floor = report["noise_floor"]
    assert set(floor) == {"energy_distance", "mmd"} and 0 < floor["energy_distance"] < results["mean_shift"]["energy_distance"]
    table = pd.read_csv(out)
    assert table["energy_distance_floor"].mean() == pytest.approx(floor["energy_distance"], abs=1e-4)
    # A and B at dose 10 for P1 and P2: four groups, each from its own patient's controls
    assert len(table) == 2 * 2 * 4 and set(table["patient"]) == {"P1", "P2"} and (table["n_control"] == 40).all()
    means = table.groupby("method")["energy_distance"].mean()
    assert means["identity"] == pytest.approx(results["identity"]["energy_distance"], abs=1e-4)


def test_cli_bench_learned_method_on_a_table_with_random_combinations(tmp_path, capsys):
    adata = toy_adata()
    table = pd.DataFrame(adata.X, columns=["x0", "x1", "x2"]).assign(**{k: adata.obs[k].to_numpy() for k in adata.obs})
    table.to_csv(tmp_path / "toy.csv", index=False)
    # width goes to flow_matching only (mean_shift has no such option)
    report = _bench(capsys, [str(tmp_path / "toy.csv"), "--methods", "mean_shift", "flow_matching", "--rep", "X",
                             "--dose-key", "dose", "--covariate-key", "patient", "--hold-out-combinations", "--steps", "20",
                             "--option", "width=16", "--option", "depth=1", "--metric", "energy_distance"])
    assert report["split"]["held_out_conditions"] == ["A+B"] and report["split"]["n_groups"] == 1
    assert np.isfinite(report["results"]["flow_matching"]["energy_distance/mean_shift"])


def test_cli_bench_without_a_file_uses_the_demo_split(capsys):
    report = _bench(capsys, ["--methods", "identity", "mean_shift", "--metric", "energy_distance"], quiet=False)
    assert report["data"] == "synthetic" and report["split"]["kind"] == "demo"
    assert report["results"]["identity"]["energy_distance/mean_shift"] > 1.5


def test_cli_bench_reports_bad_requests(tmp_path, capsys):
    data = tmp_path / "toy.h5ad"
    toy_adata().write_h5ad(data)
    assert main(["bench", str(data), "--rep", "X"]) == 2
    assert "--hold-out-conditions, --hold-out-combinations" in capsys.readouterr().err
    assert main(["bench", str(data), "--rep", "X", "--hold-out-doses", "10"]) == 2
    assert "needs --dose-key" in capsys.readouterr().err
    assert main(["bench", str(data), "--methods", "mean_shift", "--option", "widht=3", "--hold-out-conditions", "A+B"]) == 2
    assert "'widht'" in capsys.readouterr().err
    assert main(["bench", str(data), "--methods", "nope", "--hold-out-conditions", "A+B"]) == 2
    err = capsys.readouterr().err
    assert "'mean_shift'" in err and "--methods 'nope' is not a method" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(data), "--hold-out-conditions", "A", "--hold-out-doses", "10"])
    assert exit_info.value.code == 2


def test_options_are_listed_with_defaults_and_meaning(capsys):
    table = cf.methods.options_table("flow_matching")
    assert list(table.columns) == ["default", "description"]
    assert table.loc["epsilon", "default"] == 0.01 and "Sinkhorn" in table.loc["epsilon", "description"]
    # what ResponseModel validates against: the listed defaults are accepted as given, and are all it resolves
    defaults = table["default"].to_dict()
    assert cf.methods.get_method("flow_matching").validate_options(defaults) == defaults
    assert cf.methods.options_table("identity").empty
    with pytest.raises(cf.CellflowKeyError, match="valid choices"):
        cf.methods.options_table("flow_matchin")

    assert main(["options", "schrodinger_bridge"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(cf.methods.options_table("schrodinger_bridge"))
    assert lines[0].split()[:2] == ["sigma", "1.0"]
    assert main(["options", "identity"]) == 0
    assert "takes no options" in capsys.readouterr().out
    assert main(["options", "flow_matchin"]) == 2
    assert "'flow_matchin' is not a method; valid choices" in capsys.readouterr().err

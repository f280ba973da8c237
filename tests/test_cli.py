import numpy as np
import pandas as pd
from _toy import toy_adata

import cellflow as cf
from cellflow._demo import best_available_method, run_demo
from cellflow.cli import main


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
    assert main(["demo", "--out", str(tmp_path / "d"), "--no-plot", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "held-out combinations" in out and "noise_floor" in out


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
    adata[adata.obs.condition.isin(["A", "B"])].copy().write_h5ad(truth)
    assert main(["evaluate", str(pred), str(truth), "--rep", "X", "--metric", "energy_distance", "--out", str(table_path)]) == 0
    table = pd.read_csv(table_path)
    assert list(table["condition"]) == ["A", "B"] and np.isfinite(table["energy_distance"]).all()


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    data = tmp_path / "toy.h5ad"
    toy_adata().write_h5ad(data)
    assert main(["train", str(data), "--out", str(tmp_path / "m"), "--rep", "nope"]) == 2
    assert "rep='nope'" in capsys.readouterr().err


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

import anndata as ad
import numpy as np
import pytest
from _toy import SHIFTS, toy_adata

import cellflow as cf
from cellflow.solvers import gaussian


def random_spd(rng, d, floor):
    m = rng.normal(size=(d, d))
    return m @ m.T / d + floor * np.eye(d)


def l2_uvp(pred, true, target_cov):
    return 100.0 * np.mean(np.sum((pred - true) ** 2, axis=1)) / np.trace(target_cov)


def test_gaussian_ot_recovers_closed_form_map_d10():
    rng = np.random.default_rng(0)
    d, n = 10, 5000
    A, B = random_spd(rng, d, 0.5), random_spd(rng, d, 0.3)
    a, b = rng.normal(size=d), rng.normal(size=d) + 2.0
    x = rng.multivariate_normal(a, A, n)
    y = rng.multivariate_normal(b, B, n)
    adata = ad.AnnData(X=np.vstack([x, y]).astype(np.float32), obs={"condition": ["control"] * n + ["drug"] * n})
    model = cf.ResponseModel(adata, rep="X", method="gaussian_ot").fit()
    pred = model.predict(adata[:n], "drug").X
    exact = b + (x - a) @ gaussian.monge_map_matrix(A, B)
    uvp = l2_uvp(pred, exact, B)
    assert uvp < 1.0, uvp
    # the mean shift is a much worse map: the oracle test can fail
    shift = cf.ResponseModel(adata, rep="X", method="mean_shift").fit().predict(adata[:n], "drug").X
    assert l2_uvp(shift, exact, B) > 5 * uvp


def test_monge_map_pushes_covariance_and_w2():
    rng = np.random.default_rng(1)
    d = 5
    A, B = random_spd(rng, d, 0.2), random_spd(rng, d, 0.2)
    M = gaussian.monge_map_matrix(A, B)
    np.testing.assert_allclose(M @ A @ M, B, atol=1e-8)
    np.testing.assert_allclose(M, M.T, atol=1e-10)
    assert np.all(np.linalg.eigvalsh(M) > 0)
    # commuting case: W2^2 = |a-b|^2 + |sqrt(A) - sqrt(B)|_F^2
    Ad, Bd = np.diag([1.0, 2.0, 3.0]), np.diag([4.0, 1.0, 0.5])
    expected = 1.0 + np.sum((np.sqrt(np.diag(Ad)) - np.sqrt(np.diag(Bd))) ** 2)
    assert gaussian.w2_squared(np.zeros(3), Ad, np.array([1.0, 0, 0]), Bd) == pytest.approx(expected, rel=1e-10)


def test_entropic_closed_form_matches_ott_sinkhorn():
    from ott.geometry import pointcloud
    from ott.solvers import linear

    rng = np.random.default_rng(2)
    d, n, sigma = 2, 2000, 0.7
    A, B = random_spd(rng, d, 0.5), random_spd(rng, d, 0.5)
    x = rng.multivariate_normal(np.zeros(d), A, n)
    y = rng.multivariate_normal(np.ones(d), B, n)
    x, y = x.astype(np.float32), y.astype(np.float32)
    out = linear.solve(pointcloud.PointCloud(x, y, epsilon=2 * sigma**2))
    plan = np.asarray(out.matrix)
    cross = (x - x.mean(0)).T @ plan @ (y - y.mean(0))
    C = gaussian.entropic_cross_covariance(A, B, sigma)
    assert np.linalg.norm(cross - C) / np.linalg.norm(C) < 0.1
    assert float(out.reg_ot_cost) == pytest.approx(gaussian.entropic_ot_cost(np.zeros(d), A, np.ones(d), B, sigma), rel=0.05)


def test_gaussian_bridge_consistency():
    rng = np.random.default_rng(3)
    d, sigma = 3, 0.8
    bridge = gaussian.gaussian_bridge(np.zeros(d), random_spd(rng, d, 0.3), np.ones(d), random_spd(rng, d, 0.3), sigma)
    for t, expected in ((0.0, bridge.cov0), (1.0, bridge.cov1)):
        np.testing.assert_allclose(bridge.marginal(t)[1], expected, atol=1e-10)
    # d/dt Sigma_t = S_t + S_t^T + sigma^2 I, with the drift's linear part S_t^T Sigma_t^{-1}
    t, h = 0.4, 1e-5
    _, cov = bridge.marginal(t)
    derivative = (bridge.marginal(t + h)[1] - bridge.marginal(t - h)[1]) / (2 * h)
    linear = bridge.drift(t, np.eye(d) + bridge.marginal(t)[0]) - bridge.drift(t, bridge.marginal(t)[0][None])
    lyapunov = linear.T @ cov + cov @ linear + sigma**2 * np.eye(d)
    np.testing.assert_allclose(lyapunov, derivative, atol=1e-5)


def test_shrunk_covariance_matches_ledoit_wolf_reference():
    from sklearn.covariance import ledoit_wolf

    x = np.random.default_rng(4).normal(size=(30, 50))
    np.testing.assert_allclose(gaussian.shrunk_covariance(x), ledoit_wolf(x)[0], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(gaussian.shrunk_covariance(x, 0.0), np.cov(x.T, bias=True), atol=1e-12)


@pytest.fixture(scope="module")
def toy():
    return toy_adata()


def fit_toy(toy, method="mean_shift", data=None, **kwargs):
    return cf.ResponseModel(
        toy if data is None else data, rep="X", dose_key="dose", covariate_keys=("patient",), method=method, **kwargs
    ).fit()


def source_of(adata, patient):
    return adata[(adata.obs.condition == "control") & (adata.obs.patient == patient)]


def test_mean_shift_rules(toy):
    model = fit_toy(toy)

    def shift(perturbation, dose, patient):
        source = source_of(toy, patient)
        return (model.predict(source, perturbation, dose=dose).X - source.X).mean(0)

    np.testing.assert_allclose(shift("A", 1.0, "P1"), SHIFTS[("A", "P1")], atol=1e-5)
    np.testing.assert_allclose(shift("A", 10.0, "P2"), 2 * SHIFTS[("A", "P2")], atol=1e-5)
    np.testing.assert_allclose(shift("A", 5.0, "P2"), 2 * SHIFTS[("A", "P2")], atol=1e-5)  # nearest log-dose
    # observed combination used as a whole (including its interaction)
    np.testing.assert_allclose(shift("A+B", "1+1", "P1"), SHIFTS[("A", "P1")] + SHIFTS[("B", "P1")] + [0, 0, 1], atol=1e-5)
    # unseen patient: average over patients where observed
    np.testing.assert_allclose(shift("B", 1.0, "P3"), (SHIFTS[("B", "P1")] + SHIFTS[("B", "P2")]) / 2, atol=1e-5)


def test_mean_shift_unseen_combination_adds_members(toy):
    train = toy[toy.obs.condition != "A+B"]
    model = fit_toy(toy, data=train)
    source = source_of(toy, "P2")
    pred = model.predict(source, "B+A", dose="10+1")  # B at 10, A at 1
    np.testing.assert_allclose((pred.X - source.X).mean(0), SHIFTS[("A", "P2")] + 2 * SHIFTS[("B", "P2")], atol=1e-5)
    # doses are written as the training data wrote them ("1.0", "10.0"), aligned with the sorted members
    assert set(pred.obs["condition"]) == {"A+B"} and set(pred.obs["dose"]) == {"1.0+10.0"}
    with_combination = fit_toy(toy)  # its "1+1" is not in Python's float spelling
    assert set(with_combination.predict(source, "B+A", dose="10+1").obs["dose"]) == {"1+10"}


def test_gaussian_ot_combination_adds_displacements(toy):
    model = fit_toy(toy, "gaussian_ot", data=toy[toy.obs.condition != "A+B"])
    source = source_of(toy, "P1").X
    both = model.predict(source, "A+B", dose="1+1", covariates={"patient": "P1"}).X - source
    a = model.predict(source, "A", dose=1.0, covariates={"patient": "P1"}).X - source
    b = model.predict(source, "B", dose=1.0, covariates={"patient": "P1"}).X - source
    np.testing.assert_allclose(both, a + b, atol=1e-4)


def test_identity_returns_source(toy):
    model = fit_toy(toy, "identity")
    source = source_of(toy, "P1")
    np.testing.assert_array_equal(model.predict(source, "A", dose=1.0).X, source.X)


def test_mean_shift_member_never_seen_alone():
    adata = toy_adata()
    adata.obs["condition"] = adata.obs["condition"].astype(str).replace({"B": "B+C"})
    adata.obs["dose"] = np.where(adata.obs["condition"] == "B+C", "1+1", adata.obs["dose"].astype(str))
    model = fit_toy(adata, data=adata)
    with pytest.raises(cf.CellflowKeyError, match=r"'C' \(in 'A\+C'\) was never observed alone"):
        model.predict(source_of(adata, "P1"), "A+C", dose="1+1")


def test_baselines_predict_an_unseen_perturbation_from_its_nearest_embeddings(toy):
    # C is never measured; its embedding points at A (cosine 0.99), D ties with A and B (same vector)
    embeddings = {"A": [1.0, 0.0], "B": [0.0, 1.0], "C": [0.9, 0.1], "D": [2.0, 2.0]}
    train = toy[toy.obs.condition != "A+B"]
    model = fit_toy(toy, data=train, perturbation_embeddings=embeddings)
    source = source_of(toy, "P2")

    def shift(perturbation, dose):
        return (model.predict(source, perturbation, dose=dose).X - source.X).mean(0)

    assert cf.data.embedding_neighbours(cf.data.parse_condition("C", 1.0, control="control", dose_key="dose"), model.spec_.group_conditions, model.embeddings_) == {"C": ("A",)}
    np.testing.assert_allclose(shift("C", 1.0), SHIFTS[("A", "P2")], atol=1e-5)
    np.testing.assert_allclose(shift("C", 8.0), 2 * SHIFTS[("A", "P2")], atol=1e-5)  # the stand-in's nearest dose
    # D is as close to A as to B: both stand in, averaged
    np.testing.assert_allclose(shift("D", 1.0), (SHIFTS[("A", "P2")] + SHIFTS[("B", "P2")]) / 2, atol=1e-5)
    # in a combination, the unseen member's stand-ins are added to the seen member
    np.testing.assert_allclose(shift("B+C", "1+1"), SHIFTS[("B", "P2")] + SHIFTS[("A", "P2")], atol=1e-5)
    # without a vector there is still nothing to go on
    with pytest.raises(cf.CellflowKeyError, match="'E' was not seen in training and has no entry in perturbation_embeddings"):
        model.predict(source, "E", dose=1.0)


def test_one_hot_codes_never_stand_in_for_a_member_seen_only_in_combinations():
    adata = toy_adata()
    adata.obs["condition"] = adata.obs["condition"].astype(str).replace({"B": "B+C"})
    adata.obs["dose"] = np.where(adata.obs["condition"] == "B+C", "1+1", adata.obs["dose"].astype(str))
    model = fit_toy(adata, data=adata)
    assert cf.data.embedding_neighbours(cf.data.parse_condition("A+C", "1+1", control="control", dose_key="dose"), model.spec_.group_conditions, model.embeddings_) == {}
    with pytest.raises(cf.CellflowKeyError, match="give it a vector in perturbation_embeddings"):
        model.predict(source_of(adata, "P1"), "A+C", dose="1+1")

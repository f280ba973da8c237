"""Diffusion: samplers against an exact denoiser, learning a shift, determinism, save/load, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _toy import toy_adata
from flax import nnx

import cellflow as cf
from cellflow.solvers import diffusion as diff

SMALL = {"width": 32, "depth": 1, "token_dim": 8, "context_dim": 8, "conditions_per_step": 2, "chunk": 100, "warmup": 20, "n_steps": 16}


class ExactGaussianDenoiser(nnx.Module):
    """The optimal network output for data ~ N(mu, s^2 I), in the Denoiser's calling convention."""

    def __init__(self, mu, s, config):
        self.mu = nnx.Param(jnp.asarray(mu, jnp.float32))
        self.s = s
        self.config = config

    def encode(self, condition, source, key=None, covariate_dropout=0.0):
        return jnp.zeros(())

    def __call__(self, t, x_in, encoded, key=None, guidance=1.0):
        lo, hi = np.log(self.config.sigma_min), np.log(self.config.sigma_max)
        sigma = jnp.exp(lo + t * (hi - lo))[:, None]
        c_skip, c_out, c_in = diff.preconditioning(sigma, self.config.sigma_data)
        x = x_in / c_in
        mu = self.mu[...]
        optimal = mu + self.s**2 / (self.s**2 + sigma**2) * (x - mu)
        return (optimal - c_skip * x) / c_out


@pytest.mark.parametrize("sampler, n_steps, sigma_start", [("ode", 32, None), ("ode", 32, 1.5), ("sde", 64, None)])
def test_samplers_recover_the_distribution_of_an_exact_denoiser(sampler, n_steps, sigma_start):
    config = diff.DiffusionConfig(sigma_data=1.0)
    mu, s = np.array([2.0, -1.0, 0.5], np.float32), 0.6
    graphdef, params = nnx.split(ExactGaussianDenoiser(mu, s, config))
    rng = np.random.default_rng(0)
    source = jnp.asarray(mu + s * rng.normal(size=(3000, 3)), jnp.float32)
    y = np.asarray(diff.sample(graphdef, params, source, None, source, jax.random.key(1), config,
                               sampler=sampler, n_steps=n_steps, sigma_start=sigma_start))
    np.testing.assert_allclose(y.mean(0), mu, atol=0.05)
    np.testing.assert_allclose(y.std(0), s, rtol=0.08)


def test_schedule_and_preconditioning():
    config = diff.DiffusionConfig()
    sigma, dsigma = diff.sigma_schedule(jnp.array([0.0, 1.0]), 5.0, config)
    np.testing.assert_allclose(np.asarray(sigma), [5.0, config.sigma_min], rtol=1e-5)
    assert (np.asarray(dsigma) < 0).all()
    c_skip, c_out, c_in = diff.preconditioning(jnp.array(0.7), 1.0)
    # unit-variance data noised to sigma has variance 1 + sigma^2: c_in normalises it
    np.testing.assert_allclose(float(c_in) ** 2 * (1 + 0.7**2), 1.0, rtol=1e-6)
    # EDM: the training target of F, (y - c_skip x) / c_out, has unit variance
    np.testing.assert_allclose(((1 - float(c_skip)) ** 2 + float(c_skip) ** 2 * 0.49) / float(c_out) ** 2, 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(diff.noise_time(jnp.array(config.sigma_max), config)), 1.0, rtol=1e-6)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One fit on the toy data (doses, a combination, three patients), with validation and checkpoints."""
    adata = toy_adata(n=40)
    before = adata.X.copy()
    args = dict(
        rep="X", dose_key="dose", covariate_keys=("patient",), method="diffusion",
        **{**SMALL, "conditions_per_step": 4, "learning_rate": 3e-3}, validation_fraction=0.1, eval_every=1000, checkpoint_dir=str(tmp_path_factory.mktemp("checkpoints")),
        checkpoint_every=500,
    )
    model = cf.ResponseModel(adata, **args).fit(steps=1000, batch_size=64, progress=False)
    np.testing.assert_array_equal(adata.X, before)
    return adata, model, args


def cells(adata, condition, patient, dose=None):
    mask = (adata.obs.condition == condition) & (adata.obs.patient == patient)
    return adata[mask & (adata.obs.dose == dose) if dose is not None else mask]


@pytest.mark.parametrize("condition, dose, patient", [("A", "1.0", "P1"), ("B", "10.0", "P2")])
def test_learns_the_toy_responses(fitted, condition, dose, patient):
    adata, model, _ = fitted
    source, truth = cells(adata, "control", patient), cells(adata, condition, patient, dose).X
    pred = model.predict(source, condition, dose=float(dose), covariates={"patient": patient}, seed=1).X
    # measured: mean errors <= 0.55, spread within 13 %, energy distance 0.29 and 0.01 of the identity's
    np.testing.assert_allclose(pred.mean(0), truth.mean(0), atol=0.8)
    np.testing.assert_allclose(pred.std(0), truth.std(0), rtol=0.25)
    learned, identity = cf.metrics.energy_distance(pred, truth), cf.metrics.energy_distance(source.X, truth)
    assert learned < 0.45 * identity, (learned, identity)


def test_training_record_checkpoint_and_resume(fitted):
    adata, model, args = fitted
    history = model.history_
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert history["val_energy_distance"].notna().sum() == 1
    assert cf.train.latest_checkpoint(args["checkpoint_dir"]) == 1000
    resumed = cf.ResponseModel(adata, **args).fit(steps=1000, batch_size=64, progress=False, resume=True)
    source = cells(adata, "control", "P2")[:20]
    np.testing.assert_array_equal(
        resumed.predict(source, "A", dose=1.0, covariates={"patient": "P2"}).X,
        model.predict(source, "A", dose=1.0, covariates={"patient": "P2"}).X,
    )


def test_deterministic_seeded_and_save_load(fitted, tmp_path):
    adata, model, _ = fitted
    source = cells(adata, "control", "P3")
    before = source.X.copy()
    kwargs = {"dose": ["1+1", 10.0], "covariates": {"patient": "P3"}}
    first = model.predict(source, ["A+B", "B"], seed=3, **kwargs)
    assert first.shape == (2 * source.n_obs, 3) and np.isfinite(first.X).all()
    assert list(first.obs["condition"].unique()) == ["A+B", "B"]
    np.testing.assert_array_equal(first.X, model.predict(source, ["A+B", "B"], seed=3, **kwargs).X)
    assert not np.allclose(first.X, model.predict(source, ["A+B", "B"], seed=4, **kwargs).X)
    np.testing.assert_array_equal(source.X, before)
    model.save(tmp_path / "diffusion")
    loaded = cf.ResponseModel.load(tmp_path / "diffusion")
    np.testing.assert_array_equal(first.X, loaded.predict(source, ["A+B", "B"], seed=3, **kwargs).X)


def test_option_validation():
    adata = toy_adata(n=5)
    with pytest.raises(cf.CellflowValueError, match=r"sampler='heun'.*valid choices.*'ode'.*'sde'"):
        cf.ResponseModel(adata, rep="X", method="diffusion", sampler="heun")
    with pytest.raises(cf.CellflowValueError, match=r"start='data'.*valid choices.*'noise'.*'source'"):
        cf.ResponseModel(adata, rep="X", method="diffusion", start="data")
    with pytest.raises(cf.CellflowValueError, match=r"p_std=0.*> 0"):
        cf.ResponseModel(adata, rep="X", method="diffusion", p_std=0)
    with pytest.raises(cf.CellflowKeyError, match=r"option 'guidence'.*Did you mean 'guidance'"):
        cf.ResponseModel(adata, rep="X", method="diffusion", guidence=2.0)
    # sampling runs down to sigma_min, so it must start above it
    with pytest.raises(cf.CellflowValueError, match=r"start_sigma=0.001.*must be larger"):
        cf.ResponseModel(adata, rep="X", method="diffusion", start="source", start_sigma=0.001)
    with pytest.raises(cf.CellflowValueError, match=r"sigma_max=0.5.*sigma_min=1.0"):
        cf.ResponseModel(adata, rep="X", method="diffusion", sigma_max=0.5, sigma_min=1.0)
    cf.ResponseModel(adata, rep="X", method="diffusion", start="source", start_sigma=0.5)  # sigma_max is unused then


def test_the_sampler_grid_steps_exactly_as_diffrax_step_to():
    # _NoiseGrid only drops StepTo's run-time checks (host callbacks); the steps must be the same
    import diffrax

    times = -diff.sigma_schedule(jnp.linspace(0.0, 1.0, 9), 80.0, diff.DiffusionConfig())[0]
    term = diffrax.ODETerm(lambda t, y, args: -y / t + jnp.sin(t))

    def solve(controller):
        return diffrax.diffeqsolve(
            term, diffrax.Heun(), t0=times[0], t1=times[-1], dt0=None, y0=jnp.ones(3), stepsize_controller=controller,
            max_steps=8, saveat=diffrax.SaveAt(steps=True),
        ).ys

    np.testing.assert_array_equal(solve(diff._NoiseGrid(ts=times)), solve(diffrax.StepTo(ts=times)))

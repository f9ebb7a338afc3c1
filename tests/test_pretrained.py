"""score_sde checkpoints -> score functions: the file layout, shape checks, the spec string, the VP map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from scoresmooth_jax import denoise
from scoresmooth_jax.modelio import pretrained
from scoresmooth_jax.models import ncsnpp as M

PARITY_TOL = 1e-4  # as in test_ncsnpp.py


def score_sde_state(params_ema, target):
  """A training State as score_sde's flax.training.checkpoints writes it (Adam moments, rng and all)."""
  moments = jax.tree_util.tree_map(lambda p: {"grad_ema": np.zeros_like(p), "grad_sq_ema": np.zeros_like(p)},
                                   target)
  return {"step": 7, "optimizer": {"state": {"step": 7, "param_states": moments}, "target": target},
          "lr": np.float32(2e-4), "model_state": {}, "ema_rate": 0.999, "params_ema": params_ema,
          "rng": np.array([0, 42], np.uint32)}


def write(path, state):
  path.write_bytes(serialization.msgpack_serialize(state))
  return path


@pytest.fixture(scope="module")
def fixture(ncsnpp_fixture):
  return ncsnpp_fixture


@pytest.fixture(scope="module")
def small_preset(fixture):
  return pretrained.preset_from_config(fixture[4], sde="ve", centered=False, name="fixture_small")


@pytest.fixture(scope="module")
def checkpoint(fixture, tmp_path_factory):
  params = fixture[0]
  target = jax.tree_util.tree_map(lambda p: (p + 1.0).astype(np.float32), params)  # differs from the EMA
  return write(tmp_path_factory.mktemp("ckpt") / "checkpoint_3", score_sde_state(params, target))


def test_checkpoint_loads_and_reproduces_score_sde(fixture, small_preset, checkpoint, monkeypatch):
  params, x, sigma, out, _ = fixture
  monkeypatch.setitem(pretrained.PRESETS, "fixture_small", small_preset)
  score_fn, sigma_min, sigma_max = pretrained.load_score_sde_from_spec(f"score_sde:fixture_small:{checkpoint}")
  assert (sigma_min, sigma_max) == (0.01, 50.0) and score_fn.image_shape == (32, 32, 3)

  @jax.jit
  def run(fn, x, sigma):  # score_fn passed as a pytree argument, and through the one-step denoiser
    return fn(x, sigma), denoise.one_step(fn, x, sigma)

  score, denoised = run(score_fn, jnp.asarray(x), jnp.asarray(sigma))
  assert float(jnp.max(jnp.abs(score - out))) < PARITY_TOL
  np.testing.assert_allclose(denoised, x + sigma[:, None, None, None] ** 2 * score, atol=1e-6)
  # The raw (non-EMA) weights are optimizer/target.
  raw, _, _ = pretrained.load_score_sde(checkpoint, small_preset, use_ema=False)
  np.testing.assert_array_equal(raw.params["Conv_0"]["bias"], params["Conv_0"]["bias"] + 1.0)
  assert hash(score_fn) != hash(raw) and score_fn != raw  # identity semantics


def test_directory_resolves_to_newest_checkpoint(fixture, tmp_path):
  params = fixture[0]
  write(tmp_path / "checkpoint_3", {"params_ema": {"old": np.zeros(1)}})
  write(tmp_path / "checkpoint_12", score_sde_state(params, params))
  assert pretrained.resolve_checkpoint_file(tmp_path).name == "checkpoint_12"
  assert "Conv_0" in pretrained.read_checkpoint_params(tmp_path)


def test_shape_mismatch_names_first_bad_parameter(fixture, small_preset, tmp_path):
  params = jax.tree_util.tree_map(np.copy, fixture[0])
  params["ResnetBlockBigGANpp_3"]["Conv_1"]["kernel"] = np.zeros((3, 3, 32, 16), np.float32)
  params["ResnetBlockBigGANpp_9"]["Conv_1"]["kernel"] = np.zeros((3, 3, 32, 8), np.float32)
  path = write(tmp_path / "checkpoint_1", score_sde_state(params, params))
  with pytest.raises(pretrained.PretrainedError,
                     match=r"ResnetBlockBigGANpp_3/Conv_1/kernel has shape \(3, 3, 32, 16\) in the checkpoint "
                           r"but \(3, 3, 32, 32\) in the preset"):
    pretrained.load_score_sde(path, small_preset)
  # A checkpoint of a wider model against a published preset fails on its first parameter in path order.
  with pytest.raises(pretrained.PretrainedError, match=r"AttnBlockpp_0/GroupNorm_0/bias has shape \(32,\).*"
                                                       r"\(256,\)"):
    pretrained.load_score_sde(path, "cifar10_ncsnpp_continuous")


def test_missing_parameter_and_foreign_files(fixture, small_preset, tmp_path):
  params = jax.tree_util.tree_map(np.copy, fixture[0])
  del params["Dense_1"]
  path = write(tmp_path / "checkpoint_1", score_sde_state(params, params))
  with pytest.raises(pretrained.PretrainedError, match=r"Dense_1/bias \(shape \(64,\)\) is missing"):
    pretrained.load_score_sde(path, small_preset)
  junk = tmp_path / "junk"
  junk.write_bytes(b"\x00not msgpack at all")
  with pytest.raises(pretrained.PretrainedError, match="cannot read"):
    pretrained.load_score_sde(junk, small_preset)
  with pytest.raises(pretrained.PretrainedError, match="no 'params_ema'"):
    pretrained.load_score_sde(write(tmp_path / "other", {"params": {"a": np.zeros(2)}}), small_preset)
  with pytest.raises(pretrained.PretrainedError, match="does not exist"):
    pretrained.load_score_sde(tmp_path / "nope", small_preset)
  with pytest.raises(pretrained.PretrainedError, match="unknown score_sde preset"):
    pretrained.load_score_sde(path, "cifar10_nope")


def test_spec_parsing():
  assert pretrained.parse_score_sde_spec("score_sde:cifar10_ddpmpp_continuous:gs://b/c:d/checkpoint_8") == (
      "cifar10_ddpmpp_continuous", "gs://b/c:d/checkpoint_8")
  assert pretrained.is_score_sde_spec("score_sde:a:b") and not pretrained.is_score_sde_spec("/ckpt/score")
  for bad in ("score_sde:only_preset", "other:a:b", "score_sde::path"):
    with pytest.raises(ValueError, match="score_sde:<preset>:<path>"):
      pretrained.parse_score_sde_spec(bad)


# ---- VP -> our score: analytic Gaussian case --------------------------------------------------------------

B0, B1 = 0.1, 20.0


def abar(t):
  return jnp.exp(-(B0 * t + 0.5 * (B1 - B0) * t**2))


def test_vp_time_solves_the_matching_condition():
  sigma = jnp.asarray([1e-3, 0.01, 0.12, 0.25, 0.5, 1.0, 5.0, 50.0])
  t = pretrained.vp_time(sigma, B0, B1)
  a = np.exp(-(B0 * np.float64(t) + 0.5 * (B1 - B0) * np.float64(t) ** 2))  # float64: 1 - a cancels near t = 0
  np.testing.assert_allclose(np.sqrt((1 - a) / a), 2 * np.float64(sigma), rtol=2e-5)
  np.testing.assert_allclose(pretrained.vp_sigma(t, B0, B1), sigma, rtol=2e-5)
  preset = pretrained.PRESETS["cifar10_ddpmpp_continuous"]
  assert 4.9e-4 < preset.sde.sigma_min < 5.1e-4 and 76.0 < preset.sde.sigma_max < 76.2


@pytest.mark.parametrize("prediction", ["eps", "score"])
def test_vp_map_is_exact_on_gaussian_data(prediction):
  """z0 ~ N(mu, tau^2 I) on [-1, 1]: the ideal VP network is known in closed form, and so is the score of
  x0 = (z0 + 1) / 2 smoothed by N(0, sigma^2 I) on [0, 1]."""
  rng = np.random.default_rng(0)
  shape = (4, 8, 8, 3)
  mu = jnp.asarray(rng.uniform(-0.6, 0.6, shape[1:]), jnp.float32)
  tau = 0.3

  def ideal(x_t, t):
    a, var = jnp.sqrt(abar(t))[:, None, None, None], (1 - abar(t))[:, None, None, None]
    total = a**2 * tau**2 + var  # Var x_t
    if prediction == "eps":
      return jnp.sqrt(var) * (x_t - a * mu) / total  # E[eps | x_t]
    return -(x_t - a * mu) / total  # grad log p_t

  score_fn = jax.jit(pretrained.vp_to_score_fn(ideal, beta_min=B0, beta_max=B1, prediction=prediction))
  y = jnp.asarray(rng.uniform(0, 1, shape), jnp.float32)
  for sigma in (jnp.asarray([0.02, 0.25, 0.5, 1.0], jnp.float32), jnp.float32(0.12)):
    s = jnp.broadcast_to(sigma, (shape[0],))[:, None, None, None]
    analytic = -(y - (mu + 1) / 2) / (tau**2 / 4 + s**2)
    np.testing.assert_allclose(score_fn(y, sigma), analytic, rtol=1e-4, atol=1e-4 * float(jnp.abs(analytic).max()))


def test_vp_preset_wires_network_time_and_scaling():
  """A small DDPM++-style VP preset: score = -net((2y - 1) a_t, 999 t) / sigma."""
  model = M.NCSNpp(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), fir=False,
                   progressive_input="none", embedding_type="positional", scale_by_sigma=False, centered=True)
  preset = pretrained.Preset("tiny_vp", model, pretrained.VPSDE(), image_shape=(8, 8, 3))
  y = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (2, 8, 8, 3)), jnp.float32)
  sigma = jnp.asarray([0.3, 0.3])
  # Random weights of the right shapes (compiling model.init's RNG on CPU costs far more than the test).
  rng = np.random.default_rng(2)
  shapes = jax.eval_shape(model.init, jax.random.key(0), y, sigma)["params"]
  params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), jnp.float32), shapes)
  fn = pretrained.ScoreSdeScoreFn(preset, params)

  @jax.jit
  def run(fn, y, sigma):
    t = pretrained.vp_time(sigma)
    x_t = (2 * y - 1) / jnp.sqrt(1 + 4 * sigma**2)[:, None, None, None]
    expected = -model.apply({"params": fn.params}, x_t, 999.0 * t) / sigma[:, None, None, None]
    return fn(y, sigma), fn(y, sigma[0]), expected  # per-example and scalar sigma

  got, got_scalar, expected = run(fn, y, sigma)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_scalar, expected, rtol=1e-5, atol=1e-6)
  assert fn.sigma_max > 76 and fn.image_shape == (8, 8, 3)

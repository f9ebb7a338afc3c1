"""OpenAI diffusion checkpoints -> score functions: UNet parity with PyTorch, state-dict checks, schedules, VP map."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from scoresmooth_jax import denoise, resize
from scoresmooth_jax.modelio import openai_diffusion as od
from scoresmooth_jax.modelio.pretrained import PretrainedError
from scoresmooth_jax.modelio import score_models

PARITY_TOL = 1e-4  # the bound on max |JAX - PyTorch| of the raw network output

# name -> (diffusion the fixture network is paired with, image shape)
FIXTURES = {
    "openai_iddpm_small": (od.Diffusion("cosine", 4000, rescale_timesteps=True), (32, 32, 3)),
    "openai_adm_small": (od.Diffusion("linear", 1000, rescale_timesteps=False), (64, 64, 3)),
}


def fixture_preset(fixtures_dir, name):
  config = json.loads((fixtures_dir / f"{name}_config.json").read_text())
  diffusion, shape = FIXTURES[name]
  return od.preset_from_unet_kwargs(config["constructor"], diffusion, shape, name=name), config["params"]


@pytest.fixture(scope="module")
def torch_state(fixtures_dir):
  pytest.importorskip("torch", reason="reading .pt state dicts needs torch")
  return {name: od.read_state_dict(fixtures_dir / f"{name}.pt") for name in FIXTURES}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_unet_reproduces_pytorch(fixtures_dir, torch_state, name, monkeypatch):
  preset, num_params = fixture_preset(fixtures_dir, name)
  monkeypatch.setitem(od.PRESETS, name, preset)
  score_fn = score_models.load_score(f"openai:{name}:{fixtures_dir / (name + '.pt')}")
  assert isinstance(score_fn, od.OpenAIScoreFn) and score_fn.image_shape == preset.image_shape
  assert sum(p.size for p in jax.tree.leaves(score_fn.params)) == num_params
  io = np.load(fixtures_dir / f"{name}_io.npz")
  assert np.any(io["t"] != np.round(io["t"]))  # fractional timesteps are part of the check

  @jax.jit
  def network(fn, x, t):  # the score function travels as a pytree argument
    return fn.network(x, t)

  out = network(score_fn, jnp.asarray(io["x_nchw"]).transpose(0, 2, 3, 1), jnp.asarray(io["t"]))
  error = float(np.max(np.abs(np.asarray(out).transpose(0, 3, 1, 2) - io["out_nchw"])))
  print(f"{name}: max |JAX - PyTorch| = {error:.2e}")
  assert error < PARITY_TOL


def test_mismatched_state_dicts_name_the_first_bad_key(fixtures_dir, torch_state):
  import torch

  preset, _ = fixture_preset(fixtures_dir, "openai_adm_small")
  good = torch_state["openai_adm_small"]
  # Keys are checked in the state dict's own order, so "first" means the same in both.
  expected = [od.torch_key(k) for k in traverse_util.flatten_dict(od.expected_params(preset))]
  assert sorted(expected, key=od.torch_order) == list(good)
  bad = dict(good)
  bad["input_blocks.5.1.qkv.weight"] = torch.zeros(96, 64, 1)
  bad["output_blocks.2.0.in_layers.2.weight"] = torch.zeros(1, 1, 3, 3)
  with pytest.raises(PretrainedError, match=r"input_blocks\.5\.1\.qkv\.weight has shape \(96, 64, 1\) in the file "
                                            r"but \(192, 64, 1\) in the preset"):
    od.convert_state_dict(bad, preset)
  truncated = dict(list(good.items())[:100])
  with pytest.raises(PretrainedError, match=r"middle_block\.1\.norm\.weight \(shape \(64,\)\) is missing "
                                            r"\(the file looks truncated\)"):
    od.convert_state_dict(truncated, preset)
  conditional = dict(good, **{"label_emb.weight": torch.zeros(1000, 128)})
  with pytest.raises(PretrainedError, match=r"label_emb\.weight \(shape \(1000, 128\)\) is not in the preset"):
    od.convert_state_dict(conditional, preset)
  # A small model's file against the published preset fails on its first tensor, in the model's order.
  with pytest.raises(PretrainedError, match=r"256x256_diffusion_uncond.*time_embed\.0\.weight has shape \(128, 32\) "
                                            r"in the file but \(1024, 256\)"):
    od.convert_state_dict(good, "256x256_diffusion_uncond")


def test_unreadable_files_and_specs(fixtures_dir, tmp_path):
  pytest.importorskip("torch")
  cut = tmp_path / "cut.pt"
  cut.write_bytes((fixtures_dir / "openai_iddpm_small.pt").read_bytes()[:50_000])
  with pytest.raises(PretrainedError, match="truncated, corrupt"):
    od.load_openai(cut, "cifar10_uncond_50M_500K")
  with pytest.raises(PretrainedError, match="does not exist"):
    od.load_openai(tmp_path / "nope.pt", "cifar10_uncond_50M_500K")
  with pytest.raises(PretrainedError, match="unknown OpenAI diffusion preset"):
    od.load_openai(cut, "cifar100_nope")
  assert od.parse_openai_spec("openai:256x256_diffusion_uncond:gs://b/c:d.pt") == (
      "256x256_diffusion_uncond", "gs://b/c:d.pt")
  for bad in ("openai:only_preset", "score_sde:a:b", "openai::x.pt"):
    with pytest.raises(ValueError, match="openai:<preset>:<path>.*e.g. .openai:cifar10_uncond_50M_500K:"):
      od.parse_openai_spec(bad)


def test_full_presets_build_with_published_sizes():
  counts = {}
  for name, preset in od.PRESETS.items():
    counts[name] = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(od.expected_params(preset)))
    print(f"{name}: {counts[name]:,} parameters")
  # improved-diffusion calls its CIFAR-10 model "50M"; Carlini et al. quote 552M for the 256x256 ADM.
  assert counts == {"cifar10_uncond_50M_500K": 52_546_438, "256x256_diffusion_uncond": 552_814_086}


# ---- schedules and the sigma -> timestep map ----------------------------------------------------------------


def test_schedules_equal_upstream(fixtures_dir):
  ref = np.load(fixtures_dir / "openai_schedules.npz")
  np.testing.assert_allclose(od.alphas_cumprod("cosine", 4000), ref["cosine_4000_alphas_cumprod"], rtol=0, atol=1e-12)
  np.testing.assert_allclose(od.alphas_cumprod("linear", 1000), ref["linear_1000_alphas_cumprod"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(od.PRESETS))
def test_timestep_matches_the_noise_level(name):
  diffusion = od.PRESETS[name].diffusion
  level = np.exp(0.5 * diffusion.log_noise_ratio())  # sqrt((1 - abar) / abar) at the integer steps
  # At the integer steps' own levels the map returns those steps.
  for step in (0, 1, 250, diffusion.num_steps // 2, diffusion.num_steps - 1):
    assert od.fractional_timestep(diffusion, level[step] / 2) == pytest.approx(step, abs=1e-6)
  for sigma in (0.12, 0.25, 0.5, 1.0):
    t = od.fractional_timestep(diffusion, sigma)
    i = int(np.floor(t))
    assert level[i] <= 2 * sigma <= level[i + 1] and 0 < t - i < 1  # strictly between steps
    assert od.carlini_timestep(diffusion, sigma) == i + 1  # the integer rule rounds up to the next level
    abar = float(od.interpolated_alphas_cumprod(diffusion, jnp.float32(t)))
    assert abar == pytest.approx(1 / (1 + 4 * sigma**2), rel=2e-5)  # the interpolation inverts exactly
    traced = float(jax.jit(lambda s: od.fractional_timestep(diffusion, s))(jnp.float32(sigma)))
    assert traced == pytest.approx(t, abs=2e-3)


@pytest.mark.parametrize("name", sorted(od.PRESETS))
def test_vp_map_is_exact_on_gaussian_data(name):
  """z0 ~ N(mu, s^2 I) on [-1, 1]: the ideal eps-prediction at the model's (fractional, rescaled) timestep is known
  in closed form, and so is the score of x0 = (z0 + 1) / 2 smoothed by N(0, sigma^2 I) on [0, 1]."""
  diffusion = od.PRESETS[name].diffusion
  rng = np.random.default_rng(0)
  shape = (5, 4, 4, 3)
  mu = jnp.asarray(rng.uniform(-0.6, 0.6, shape[1:]), jnp.float32)
  s = 0.3
  scale = 1000.0 / diffusion.num_steps if diffusion.rescale_timesteps else 1.0

  def ideal_model(u, model_t):  # sees only what the network sees: the input and the timestep it is given
    abar = od.interpolated_alphas_cumprod(diffusion, model_t / scale)[:, None, None, None]
    eps = jnp.sqrt(1 - abar) * (u - jnp.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)  # E[eps | u]
    return jnp.concatenate([eps, jnp.full_like(eps, 7.0)], axis=-1)  # learned-variance channels are ignored

  score_fn = jax.jit(od.vp_eps_to_score_fn(ideal_model, diffusion))
  y = jnp.asarray(rng.uniform(0, 1, shape), jnp.float32)
  for sigma in (jnp.asarray([0.12, 0.25, 0.5, 1.0, 0.3141], jnp.float32), jnp.float32(0.2)):
    sig = jnp.broadcast_to(sigma, (shape[0],))[:, None, None, None]
    analytic = -(y - (mu + 1) / 2) / (s**2 / 4 + sig**2)
    np.testing.assert_allclose(score_fn(y, sigma), analytic, rtol=2e-4, atol=2e-4 * float(jnp.abs(analytic).max()))


def test_trained_range_and_denoiser_wiring():
  """A tiny network with random weights: one_step over the score function is y - sigma * eps(input, timestep)."""
  model = od.OpenAIUNet(model_channels=32, num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2))
  preset = od.OpenAIPreset("tiny", model, od.Diffusion("cosine", 4000, rescale_timesteps=True), (8, 8, 3))
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.normal(size=p.shape), jnp.float32), od.expected_params(preset))
  fn = od.OpenAIScoreFn(preset, params)
  assert fn.sigma_min == pytest.approx(1.5705e-3, rel=1e-4)  # half the level of the cosine schedule's first step
  with pytest.raises(ValueError, match="outside the score model's trained range"):
    denoise.check_trained_range(fn, 1e-4, "noise sigma")
  y = jnp.asarray(rng.uniform(0, 1, (2, 8, 8, 3)), jnp.float32)
  sigma = 0.25

  @jax.jit
  def run(fn, y):
    t = od.fractional_timestep(preset.diffusion, jnp.full((2,), sigma)) * (1000 / 4000)
    eps = fn.network((2 * y - 1) / np.sqrt(1 + 4 * sigma**2), t)[..., :3]
    return denoise.one_step(fn, y, sigma), y - sigma * eps  # Tweedie: subtract the predicted noise

  got, expected = run(fn, y)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_classifier_input_fits_after_the_denoiser():
  images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3) / 384.0
  crop = resize.fit_images(images, (6, 6, 3), "center_crop")
  np.testing.assert_array_equal(crop, images[:, 1:7, 1:7])
  resized = resize.fit_images(images, (4, 4, 3), "resize")
  assert resized.shape == (2, 4, 4, 3) and float(resized.min()) >= 0 and float(resized.max()) <= 1
  assert resize.fit_images(images, (8, 8, 3), "resize") is images


# ---- large weights enter the sampling program as arguments -------------------------------------------------


def test_large_weights_are_program_arguments(monkeypatch):
  from scoresmooth_jax import noise, smoothing
  from scoresmooth_jax.runtime import sharding

  w = jnp.asarray(np.random.default_rng(0).normal(size=(4 * 4 * 3, 10)), jnp.float32)
  # Closes over its weights, as any closure may, and mixes the batch with values made inside (as a denoiser's
  # sigma arrays are), which the lifted program must accept too.
  clf = lambda z: (z * jnp.full(z.shape, 2.0)).reshape(z.shape[0], -1) @ w - jnp.arange(10.0)  # noqa: E731
  x, nz, key = jnp.full((4, 4, 3), 0.5), noise.Gaussian(0.5), jax.random.key(0)
  counts = {mode: smoothing.sample_counts(clf, x, nz, 100, key, num_classes=10, batch_size=8, weights=mode)
            for mode in ("constants", "arguments")}
  np.testing.assert_array_equal(counts["constants"], counts["arguments"])
  assert counts["arguments"].sum() == 100

  def lifted():
    run = smoothing._counter(clf, nz, (4, 4, 3), np.dtype("float32"), 10, 8, sharding.data_mesh(), "auto")
    return run.args[0]  # what the compiled program receives besides (x, key, num)

  assert lifted() == ()  # 1.9 KB on CPU: compiled in as constants, the faster way for small weights
  monkeypatch.setattr(smoothing, "CONSTANT_WEIGHTS_MAX_BYTES", 1024)
  smoothing._counter.cache_clear()
  consts = lifted()
  assert len(consts) == 1 and consts[0].shape == w.shape and consts[0].sharding.is_fully_replicated
  with pytest.raises(ValueError, match="weights='copy'"):
    smoothing.sample_counts(clf, x, nz, 10, key, num_classes=10, batch_size=8, weights="copy")

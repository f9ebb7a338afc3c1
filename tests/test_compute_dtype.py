"""bfloat16 score networks: every family computes in bfloat16 when asked (every convolution and matrix product),
keeps float32 parameters and returns a float32 score within a stated tolerance of float32, also when loaded so.
(The certification job's denoiser.compute_dtype: tests/test_certify_job.py.)"""

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from benchmarks.networks import random_variables
from scoresmooth_jax import denoise
from scoresmooth_jax.modelio import compute_dtype, export, openai_diffusion, pretrained
from scoresmooth_jax.models import ncsnpp, openai_unet, score_unet

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %), and the error grows through the layers. The
# tolerances, relative L2 distance of the bfloat16 result from the float32 one, about twice what was measured: the
# trained cifar10-cpu's score 2 % (measured 0.4 %) and its one-step denoised batch 1 % (0.24 %); the random-weight
# networks, whose scores are less smooth than a trained one's, 8 % (measured up to 3.8 %) and 3 % (up to 1.3 %).
TRAINED_RTOL = (0.02, 0.01)
RANDOM_RTOL = (0.08, 0.03)


def _matmul_operand_types(fn, *args) -> collections.Counter:
  """(primitive, operand dtypes) of every convolution and dot in ``fn``'s jaxpr, sub-jaxprs included."""
  counts = collections.Counter()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
        counts[(eqn.primitive.name, ",".join(str(v.aval.dtype) for v in eqn.invars[:2]))] += 1
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          if isinstance(sub, jex_core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jex_core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return counts


def _relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check_family(score32, score16, shape, sigma=0.3, rtol=RANDOM_RTOL):
  """The bfloat16 score function against the float32 one on a noisy batch (module docstring)."""
  rng = np.random.default_rng(0)
  y = jnp.asarray(rng.uniform(size=(3, *shape)) + sigma * rng.standard_normal((3, *shape)), jnp.float32)
  types = _matmul_operand_types(lambda z: score16(z, sigma), y)
  assert types and all(t == "bfloat16,bfloat16" for _, t in types), types  # no layer left in float32
  assert all(t == "float32,float32" for _, t in _matmul_operand_types(lambda z: score32(z, sigma), y))
  s32, s16 = score32(y, sigma), score16(y, sigma)
  assert s16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(s16)))
  assert 0 < _relative(s16, s32) < rtol[0]
  assert _relative(denoise.one_step(score16, y, sigma), denoise.one_step(score32, y, sigma)) < rtol[1]


@pytest.mark.parametrize("kwargs", [
    dict(channels=8, channel_mults=(1, 2), attention_resolutions=(4,), max_groups=4),
    dict(channels=8, channel_mults=(1, 2), attention_resolutions=(4,), max_groups=4, sigma_data=0.25),
])
def test_score_unet_in_bfloat16(kwargs):
  module = score_unet.ScoreUNet(**kwargs)
  params = random_variables(module, jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)))["params"]
  fn = export.ScoreFunction(module, jax.tree.map(jnp.asarray, params), 0.01, 1.0, (8, 8, 3))
  bf16 = compute_dtype.with_compute_dtype(fn, "bfloat16")
  assert bf16.module.dtype == jnp.bfloat16 and bf16.params is fn.params
  _check_family(fn, bf16, (8, 8, 3))


@pytest.mark.parametrize("kwargs", [
    dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)),  # NCSN++ VE: FIR, residual input pyramid
    dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), progressive="output_skip",
         progressive_input="input_skip", progressive_combine="cat"),
    dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resblock_type="ddpm", fir=False,
         progressive_input="none", embedding_type="positional", scale_by_sigma=False, centered=True),  # DDPM++ VP
])
def test_ncsnpp_in_bfloat16(kwargs):
  model = ncsnpp.NCSNpp(**kwargs)
  preset = pretrained.Preset("toy", model, pretrained.VESDE() if model.scale_by_sigma else pretrained.VPSDE(),
                             (8, 8, 3))
  params = random_variables(model, jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)))["params"]
  params = jax.tree.map(lambda p: jnp.asarray(p * (0.5 if p.ndim >= 2 else 1.0)), params)
  fn = pretrained.ScoreSdeScoreFn(preset, params)
  bf16 = compute_dtype.with_compute_dtype(fn, jnp.bfloat16)
  assert bf16.preset.model.dtype == jnp.bfloat16 and fn.preset.model.dtype == jnp.float32
  _check_family(fn, bf16, (8, 8, 3))


@pytest.mark.parametrize("kwargs", [
    dict(model_channels=32, num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2),
    dict(model_channels=32, num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16,
         resblock_updown=True, use_new_attention_order=True),
])
def test_openai_unet_in_bfloat16(kwargs):
  model = openai_unet.OpenAIUNet(**kwargs)
  preset = openai_diffusion.OpenAIPreset("toy", model, openai_diffusion.Diffusion("cosine", 4000, True), (8, 8, 3))
  params = random_variables(model, jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)))["params"]
  fn = openai_diffusion.OpenAIScoreFn(preset, jax.tree.map(jnp.asarray, params))
  _check_family(fn, compute_dtype.with_compute_dtype(fn, "bfloat16"), (8, 8, 3))


@pytest.mark.slow
def test_the_shipped_model_in_bfloat16():
  fn32 = export.load_score_fn("cifar10-cpu")
  fn16 = compute_dtype.with_compute_dtype(fn32, "bfloat16")
  assert fn16.module.dtype == jnp.bfloat16 and fn32.module.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(fn16.params))  # parameters stay float32
  _check_family(fn32, fn16, (32, 32, 3), sigma=0.25, rtol=TRAINED_RTOL)


@pytest.mark.slow
def test_the_published_iddpm_fixture_loads_in_bfloat16(fixtures_dir):
  pytest.importorskip("torch", reason="reading a PyTorch state dict needs PyTorch (pip install torch==2.13.0)")
  config = json.loads((fixtures_dir / "openai_iddpm_small_config.json").read_text())
  preset = openai_diffusion.preset_from_unet_kwargs(config["constructor"],
                                                    openai_diffusion.Diffusion("cosine", 4000, True), (32, 32, 3))
  fn32, _, _ = openai_diffusion.load_openai(fixtures_dir / "openai_iddpm_small.pt", preset)
  fn16, low, high = openai_diffusion.load_openai(fixtures_dir / "openai_iddpm_small.pt", preset,
                                                 compute_dtype="bfloat16")
  assert fn16.preset.model.dtype == jnp.bfloat16 and (low, high) == (fn32.sigma_min, fn32.sigma_max)
  _check_family(fn32, fn16, (32, 32, 3), sigma=0.25)


def test_compute_dtype_names_and_bad_values():
  assert [compute_dtype.canonical(v) for v in (None, "float32", jnp.float32, "bfloat16", jnp.bfloat16)] == [
      "float32", "float32", "float32", "bfloat16", "bfloat16"]
  with pytest.raises(ValueError, match=r"compute_dtype='float16': choose one of \['bfloat16', 'float32'\]"):
    compute_dtype.canonical("float16")
  with pytest.raises(TypeError, match="takes a ScoreFunction"):
    compute_dtype.with_compute_dtype(lambda x, s: x, "bfloat16")
  fn = export.load_score_fn("cifar10-cpu")
  assert compute_dtype.with_compute_dtype(fn, "float32") is fn  # nothing to rebuild

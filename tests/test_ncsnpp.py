"""NCSN++: parity with score_sde's own output on real fixture weights, parameter-tree compatibility, FIR layers."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax import lax

from scoresmooth_jax.modelio import pretrained
from scoresmooth_jax.models import get_constructor
from scoresmooth_jax.models import ncsnpp as M
from scoresmooth_jax.models import ncsnpp_layers as L

PARITY_TOL = 1e-4  # max abs error; the fixture's scores are O(0.1), so this is ~1e-3 relative at worst


def shapes(tree):
  return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def fixture(ncsnpp_fixture):
  return ncsnpp_fixture


@pytest.fixture(scope="module")
def small_model(fixture):
  # The fixture is score_sde's VE continuous config: data.centered=False.
  return pretrained.preset_from_config(fixture[4], sde="ve", centered=False).model


def test_registry_builds_ncsnpp():
  assert get_constructor("ncsnpp") is M.NCSNpp


def test_init_tree_has_score_sde_names_and_shapes(fixture, small_model):
  params, x, sigma, _, _ = fixture
  init = jax.eval_shape(small_model.init, jax.random.key(0), x, sigma)["params"]
  assert shapes(init) == shapes(params)


def test_reproduces_score_sde_output(fixture, small_model):
  params, x, sigma, out, _ = fixture
  got = jax.jit(small_model.apply)({"params": params}, jnp.asarray(x), jnp.asarray(sigma))
  err = float(jnp.max(jnp.abs(got - out)))
  assert err < PARITY_TOL, f"max abs error {err:.3g} vs score_sde's output"


def test_published_presets_trees():
  """Structure of the full CIFAR-10 trees: which modules each published architecture must (not) have."""
  x, c = jnp.zeros((1, 32, 32, 3)), jnp.ones((1,))
  ve = shapes(jax.eval_shape(pretrained.PRESETS["cifar10_ncsnpp_continuous"].model.init, jax.random.key(0), x,
                             c)["params"])
  vp = shapes(jax.eval_shape(pretrained.PRESETS["cifar10_ddpmpp_continuous"].model.init, jax.random.key(0), x,
                             c)["params"])
  # 4 levels x 4 blocks + 3 down + 2 middle + 4 x 5 up-path blocks + 3 up = 44 residual blocks in both.
  for tree in (ve, vp):
    blocks = {k.split("/")[0] for k in tree if k.startswith("ResnetBlockBigGANpp_")}
    assert len(blocks) == 44
    # Attention at 16x16: after each of the 4 encoder blocks, in the middle, once at the end of the decoder level.
    assert {k.split("/")[0] for k in tree if k.startswith("AttnBlockpp_")} == {f"AttnBlockpp_{i}" for i in range(6)}
    assert tree["Conv_0/kernel"] == (3, 3, 3, 128) and tree["Dense_0/kernel"][1] == 512
  assert ve["GaussianFourierProjection_0/W"] == (128,) and ve["Dense_0/kernel"] == (256, 512)
  assert ve["Downsample_2/Conv2d_0/weight"] == (3, 3, 256, 256)
  assert not any(k.startswith(("GaussianFourierProjection", "Downsample")) for k in vp)
  assert vp["Dense_0/kernel"] == (128, 512)


def test_fir_conv_up_down_match_their_definitions():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 2)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 3)), jnp.float32)
  k = (1, 3, 3, 1)
  dn = L._DN

  def conv(a):
    return lax.conv_general_dilated(a, w, (1, 1), "SAME", dimension_numbers=dn)

  up = L.Conv2d(3, 3, up=True, resample_kernel=k, use_bias=False).apply({"params": {"weight": w}}, x)
  down = L.Conv2d(3, 3, down=True, resample_kernel=k, use_bias=False).apply({"params": {"weight": w}}, x)
  assert up.shape == (2, 16, 16, 3) and down.shape == (2, 4, 4, 3)
  # Away from the borders the fused ops are "FIR-resample, then conv" / "conv, then FIR-resample".
  np.testing.assert_allclose(up[:, 3:-3, 3:-3], conv(L.upsample_2d(x, k))[:, 3:-3, 3:-3], atol=1e-5)
  np.testing.assert_allclose(down[:, 1:-1, 1:-1], L.downsample_2d(conv(x), k)[:, 1:-1, 1:-1], atol=1e-5)
  # Borders: StyleGAN2's definition of the fused upsampling, a stride-2 transposed conv then the FIR filter.
  transposed = lax.conv_transpose(x, jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)), (2, 2), "VALID",
                                  transpose_kernel=True, dimension_numbers=dn)
  np.testing.assert_allclose(up, L.upfirdn_2d(transposed, L._fir_kernel_2d(k, 4.0), pad=(1, 1)), atol=1e-5)
  # The FIR filters keep constants (gain 1) away from the zero-padded borders.
  ones = jnp.ones((1, 8, 8, 1))
  np.testing.assert_allclose(L.upsample_2d(ones, k)[0, 2:-2, 2:-2], 1.0, atol=1e-6)
  np.testing.assert_allclose(L.downsample_2d(ones, k)[0, 1:-1, 1:-1], 1.0, atol=1e-6)


def test_rejects_unsupported_settings():
  with pytest.raises(ValueError, match="discrete-sigma"):
    M.NCSNpp(embedding_type="positional", scale_by_sigma=True)
  with pytest.raises(ValueError, match="progressive='skip'"):
    M.NCSNpp(progressive="skip")

"""Resizing as PyTorch's interpolate does it (``scoresmooth_jax.resize``) and the job's classifier.resize_* keys.

``resize_io.npz`` (../shared/fixtures, README "ViT / BEiT") holds PyTorch's outputs for random images enlarged
32 -> 96 and shrunk 64 -> 32 with mode bicubic / bilinear and antialias on / off: every method must reproduce
the one it names.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresmooth_jax import resize
from scoresmooth_jax.certification import certify_job
from scoresmooth_jax.runtime.configs_util import load_config

TOL = 1e-5  # float32 rounding of two matrix products on values of order 1

# our method -> the fixture's (mode, antialias) suffix
TORCH_NAMES = {"bicubic_antialias": "bicubic_aa1", "bilinear_antialias": "bilinear_aa1", "bicubic": "bicubic_aa0",
               "bilinear": "bilinear_aa0"}


@pytest.fixture(scope="module")
def torch_io(fixtures_dir):
  with np.load(fixtures_dir / "resize_io.npz", allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _nhwc(nchw):
  return jnp.asarray(nchw).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("method", resize.METHODS)
def test_methods_reproduce_pytorch_interpolate(torch_io, method):
  suffix = TORCH_NAMES[method]
  up = np.asarray(resize.resize(_nhwc(torch_io["x32_nchw"]), (96, 96), method)).transpose(0, 3, 1, 2)
  down = np.asarray(resize.resize(_nhwc(torch_io["y64_nchw"]), (32, 32), method)).transpose(0, 3, 1, 2)
  errors = (float(np.abs(up - torch_io[f"up96_{suffix}"]).max()),
            float(np.abs(down - torch_io[f"down32_{suffix}"]).max()))
  print(f"{method}: max |JAX - PyTorch| up {errors[0]:.1e}, down {errors[1]:.1e}")
  assert max(errors) < TOL
  # The references tell the methods apart (bilinear with and without antialias differ only when shrinking).
  for other_suffix in set(TORCH_NAMES.values()) - {suffix}:
    assert max(float(np.abs(up - torch_io[f"up96_{other_suffix}"]).max()),
               float(np.abs(down - torch_io[f"down32_{other_suffix}"]).max())) > 1e-3


def test_default_method_is_the_resize_jobs_used_before(torch_io):
  """bicubic_antialias is what fit_images computed with jax.image.resize, so earlier workdirs keep their function."""
  y = _nhwc(torch_io["y64_nchw"])
  for size in ((32, 32), (96, 80)):
    before = jax.image.resize(y, (2, *size, 3), method="bicubic", antialias=True)
    np.testing.assert_allclose(resize.resize(y, size, "bicubic_antialias"), before, atol=TOL)


@pytest.mark.parametrize("method", resize.METHODS)
def test_weights_keep_constants_and_equal_size_is_identity(method):
  for size_in, size_out in ((7, 3), (3, 7), (32, 224), (256, 512), (64, 32)):
    w = resize.weights(size_in, size_out, method)
    assert w.shape == (size_out, size_in)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)  # a constant image stays that constant
  x = jnp.linspace(0.0, 1.0, 2 * 5 * 6 * 3).reshape(2, 5, 6, 3)
  assert resize.resize(x, (5, 6), method) is x
  np.testing.assert_array_equal(resize.weights(9, 9, method), np.eye(9))


def test_bilinear_enlargement_is_exact_on_a_ramp():
  """Linear interpolation reproduces a linear function between the outermost pixel centres."""
  x = jnp.arange(8, dtype=jnp.float32).reshape(1, 8, 1, 1) * jnp.ones((1, 1, 4, 1))
  out = np.asarray(resize.resize(x, (32, 4), "bilinear"))[0, :, 0, 0]
  centres = (np.arange(32) + 0.5) * 8 / 32 - 0.5
  inside = (centres >= 0) & (centres <= 7)
  np.testing.assert_allclose(out[inside], centres[inside], atol=1e-6)


def test_bad_arguments_fail_clearly():
  with pytest.raises(ValueError, match=r"resize method 'nearest': choose one of"):
    resize.weights(4, 8, "nearest")
  with pytest.raises(ValueError, match=r"NHWC"):
    resize.resize(jnp.zeros((4, 4, 3)), (8, 8))


# ---- the certification job's keys ---------------------------------------------------------------------------


def _spec(**overrides):
  return certify_job.JobSpec.from_config(load_config("configs/certify_digits.py", "tiny", **overrides))


def test_resize_keys_enter_settings_only_when_they_change_the_function():
  base = _spec().settings()
  assert "resize_method" not in base and "resize_clip" not in base
  # Not resizing: the keys change nothing, so they never block a resume.
  assert _spec(classifier__resize_method="bilinear").settings() == base
  default_resize = _spec(classifier__input="resize").settings()
  assert "resize_method" not in default_resize and "resize_clip" not in default_resize  # earlier workdirs resume
  other = _spec(classifier__input="resize", classifier__resize_method="bicubic", classifier__resize_clip=False)
  assert other.settings()["resize_method"] == "bicubic" and other.settings()["resize_clip"] is False
  with pytest.raises(ValueError, match=r"classifier.resize_method='area': choose one of"):
    certify_job.validate(_spec(classifier__resize_method="area"))


def test_fit_images_resizes_by_method_and_clips_on_request():
  images = jnp.zeros((1, 8, 8, 3)).at[:, 3:5, 3:5].set(1.0)  # a bright square: cubic kernels overshoot around it
  unclipped = certify_job.fit_images(images, (16, 16, 3), "resize", "bicubic", clip=False)
  np.testing.assert_array_equal(unclipped, resize.resize(images, (16, 16), "bicubic"))
  assert float(unclipped.min()) < 0.0 and float(unclipped.max()) > 1.0
  clipped = certify_job.fit_images(images, (16, 16, 3), "resize", "bicubic")
  np.testing.assert_array_equal(clipped, jnp.clip(unclipped, 0.0, 1.0))

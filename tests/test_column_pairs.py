"""Convolutions over column pairs (``models.column_pairs``) and the CIFAR ResNet that runs its first stage on them.

The paired convolution must be the zero-padded 3x3 convolution (checked against ``lax.conv_general_dilated`` in
both directions, for unequal channel counts and odd heights); the paired ResNet must have the same parameters and
the same logits as the unpaired one, and the real ResNet-20 must keep PyTorch's accuracy on CIFAR-10 when folding
chooses pairs on CPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresmooth_jax import bench
from scoresmooth_jax.modelio import classifier, convert
from scoresmooth_jax.bench import stages
from scoresmooth_jax.models import column_pairs, resnet

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _reference_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DIMENSIONS,
                                      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("height, width, in_channels, out_channels", [(6, 8, 16, 16), (5, 2, 3, 7), (7, 10, 4, 2)])
def test_paired_convolution_is_the_zero_padded_convolution_both_ways(height, width, in_channels, out_channels):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, height, width, in_channels)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(3, 3, in_channels, out_channels)).astype(np.float32))
  want = np.asarray(_reference_conv(x, kernel))
  to_offset = column_pairs.paired_kernel(kernel, column_pairs.TO_OFFSET)
  assert to_offset.shape == (3, 2, 2 * in_channels, 2 * out_channels)
  np.testing.assert_array_equal(to_offset, column_pairs.paired_kernel(kernel, column_pairs.TO_ALIGNED))
  same = column_pairs.paired_kernel(kernel, column_pairs.SAME)
  assert same.shape == (3, 3, 2 * in_channels, 2 * out_channels)
  # Closed form: block (tap, p, q) is the kernel's column 2 tap + p - q (- 1 within one pairing), else zeros.
  for paired, shift in ((to_offset, 0), (same, 1)):
    blocks = np.asarray(paired).reshape(3, -1, 2, in_channels, 2, out_channels)
    for tap in range(blocks.shape[1]):
      for p in range(2):
        for q in range(2):
          column = 2 * tap + p - q - shift
          want_block = np.asarray(kernel[:, column]) if 0 <= column <= 2 else np.zeros_like(blocks[:, tap, p, :, q])
          np.testing.assert_array_equal(blocks[:, tap, p, :, q], want_block)
  # Aligned -> offset: slot j holds columns (2j - 1, 2j), so columns -1 .. W; the outer two are padding.
  offset = column_pairs.paired_conv(column_pairs.pair_columns(x), to_offset, column_pairs.TO_OFFSET)
  assert offset.shape == (3, height, width // 2 + 1, 2 * out_channels)
  by_column = np.asarray(offset).reshape(3, height, width + 2, out_channels)
  np.testing.assert_allclose(by_column[:, :, 1:-1], want, rtol=1e-5, atol=1e-4)
  # Offset -> aligned, from the offset pairing of x (zeros in its outside columns).
  offset_x = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0))).reshape(3, height, width // 2 + 1, 2 * in_channels)
  aligned = column_pairs.paired_conv(offset_x, to_offset, column_pairs.TO_ALIGNED)
  np.testing.assert_allclose(np.asarray(column_pairs.unpair_columns(aligned)), want, rtol=1e-5, atol=1e-4)
  # Within the aligned pairing (the stem's case).
  kept = column_pairs.paired_conv(column_pairs.pair_columns(x), same, column_pairs.SAME)
  np.testing.assert_allclose(np.asarray(column_pairs.unpair_columns(kept)), want, rtol=1e-5, atol=1e-4)


def test_pairing_is_a_reshape_and_rejects_odd_widths():
  x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  paired = column_pairs.pair_columns(x)
  np.testing.assert_array_equal(np.asarray(paired[0, 0, 1]), np.concatenate([x[0, 0, 2], x[0, 0, 3]]))
  np.testing.assert_array_equal(np.asarray(column_pairs.unpair_columns(paired)), np.asarray(x))
  with pytest.raises(ValueError, match="even number of columns; got an image 3 columns wide"):
    column_pairs.pair_columns(x[:, :, :3])
  with pytest.raises(ValueError, match="3x3 kernel"):
    column_pairs.paired_kernel(jnp.zeros((1, 1, 2, 2)), column_pairs.SAME)
  with pytest.raises(ValueError, match="to='left'.*choose 'offset', 'aligned' or 'same'"):
    column_pairs.paired_kernel(jnp.zeros((3, 3, 2, 2)), "left")


def test_outside_columns_mask_zeroes_columns_minus_one_and_w():
  mask = np.asarray(column_pairs.outside_columns_mask(3, 2, jnp.float32)).reshape(3, 2, 2)
  want = np.ones((3, 2, 2), np.float32)
  want[0, 0] = want[-1, 1] = 0  # column -1 (first slot, first half) and column W (last slot, second half)
  np.testing.assert_array_equal(mask, want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_offset_relu_of_sum_is_the_masked_relu(dtype):
  rng = np.random.default_rng(0)
  u = rng.normal(size=(2, 3, 4, 6))
  bias = rng.normal(size=(6,))
  u[0, 0, :, :] = -bias  # sums of exactly zero
  u, bias = jnp.asarray(u, dtype), jnp.asarray(bias, dtype)
  got = np.asarray(column_pairs.offset_relu_of_sum(u, bias), np.float32)
  want = np.asarray(jax.nn.relu(u + bias) * column_pairs.outside_columns_mask(4, 3, dtype), np.float32)
  np.testing.assert_array_equal(got, want)
  by_column = got.reshape(2, 3, 8, 3)
  assert not by_column[:, :, 0].any() and not by_column[:, :, -1].any() and by_column[:, :, 1:-1].any()


@pytest.mark.parametrize("channels, backend, expected", [
    (16, "cpu", True), (9, "cpu", True), (8, "cpu", False), (17, "cpu", False), (32, "cpu", False),
    (16, "gpu", False), (16, "tpu", False)])
def test_pairs_are_chosen_only_where_they_lift_a_stage_onto_ynnpack(channels, backend, expected):
  assert column_pairs.pays_off(channels, backend) is expected


@pytest.mark.parametrize("shape, shortcut, width", [((32, 32, 3), "A", 16), ((12, 10, 1), "B", 6),
                                                     ((8, 9, 3), "B", 16)], ids=["cifar_A", "narrow_B", "odd_width"])
def test_paired_resnet_has_the_same_parameters_and_logits(shape, shortcut, width):
  module = resnet.CifarResNet(depth=8, shortcut=shortcut, width=width, fold_bn=True)
  paired = module.clone(column_pairs=True)
  x = jnp.zeros((1, *shape))
  variables = module.init(jax.random.key(0), x)
  assert (jax.tree.map(lambda a: a.shape, paired.init(jax.random.key(0), x))
          == jax.tree.map(lambda a: a.shape, variables))  # the folded network's parameters, unchanged
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda a: jnp.asarray(a + rng.normal(0, 0.1, a.shape).astype(np.float32)), variables)
  images = jnp.asarray(rng.uniform(size=(4, *shape)).astype(np.float32))
  want = np.asarray(jax.jit(module.apply)(variables, images))
  got = np.asarray(jax.jit(paired.apply)(variables, images))
  assert np.ptp(want) > 0.1
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  if shape[1] % 2:  # odd width: the first stage runs unpaired, so the program is the same one
    np.testing.assert_array_equal(got, want)


def test_column_pairs_need_the_folded_inference_network():
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match="column_pairs=True\\) needs fold_bn=True"):
    resnet.CifarResNet(depth=8, column_pairs=True).init(jax.random.key(0), x)
  block = resnet.CifarBasicBlock(4, stride=2, shortcut="A", fold_bn=True, column_pairs=True)
  with pytest.raises(ValueError, match="stride 1 and 4 channels in and out; got fold_bn=True, train=False, stride=2"):
    block.init(jax.random.key(0), jnp.zeros((1, 8, 4, 8)))


def _random_classifier(width, shape=(8, 8, 3)):
  module = resnet.CifarResNet(depth=8, shortcut="B", width=width)
  variables = bench.random_variables(module, jnp.zeros((1, *shape)), seed=0)
  return classifier.Classifier(module=module, variables=jax.tree.map(jnp.asarray, variables), mean=(0.5,) * 3,
                               std=(0.25,) * 3, num_classes=10, image_shape=shape)


def test_folding_with_xla_convolutions_chooses_pairs_on_cpu_for_narrow_cifar_resnets():
  clf = _random_classifier(width=16)
  on_cpu, on_gpu = clf.folded(backend="cpu", conv_impl="xla"), clf.folded(backend="gpu")
  assert on_cpu.module.column_pairs and on_cpu.batchnorm_folded
  assert not on_gpu.module.column_pairs and on_gpu.batchnorm_folded and on_gpu.module.conv_impl == "xla"
  assert not _random_classifier(width=32).folded(backend="cpu", conv_impl="xla").module.column_pairs
  # oneDNN convolutions take 16 channels at full speed: no pairs with them.
  assert not clf.folded(backend="cpu", conv_impl="onednn").module.column_pairs
  # The default backend of these tests is CPU; the compute dtype survives, and keeps the pairs.
  bf16 = dataclasses.replace(clf.folded(conv_impl="xla"), compute_dtype=jnp.bfloat16)
  assert bf16.module.column_pairs and bf16.module.dtype == jnp.bfloat16
  images = jnp.asarray(np.random.default_rng(3).uniform(size=(8, 8, 8, 3)).astype(np.float32))
  want = np.asarray(jax.jit(on_gpu)(images))
  np.testing.assert_allclose(np.asarray(jax.jit(on_cpu)(images)), want, rtol=0, atol=1e-5 * np.abs(want).max())
  # The benchmark's parts run the first stage as the network does, and compose to it.
  _, composed = stages.run_parts(stages.jax_parts(on_cpu), images)
  assert stages.check_composition(composed, on_cpu, images, atol=1e-5 * np.abs(want).max()) >= 0


def test_real_resnet20_keeps_its_accuracy_when_folded_onto_column_pairs(fixtures_dir):
  pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0): it reads the fixture")
  with np.load(fixtures_dir / "cifar10_test_first1017.npz", allow_pickle=False) as data:
    images, labels = data["images"].astype(np.float32) / 255.0, data["labels"]
  reference = np.load(fixtures_dir / "resnet20_logits_first1017.npy", allow_pickle=False)
  clf = convert.convert_torch_checkpoint(fixtures_dir / "resnet20-12fca82f.th").to_classifier().folded("cpu", conv_impl="xla")
  assert clf.module.column_pairs and clf.batchnorm_folded
  logits = np.asarray(jax.jit(clf)(images))
  assert int((logits.argmax(-1) == labels).sum()) == 932  # PyTorch's count on these images
  assert float(np.abs(logits - reference).max()) < 1e-3

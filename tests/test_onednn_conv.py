"""The oneDNN convolution (``models.onednn_conv``), the folded ResNets built on it, and its FLOP count.

These run on the x86-64 machines CI uses, where jaxlib 0.10's XLA:CPU holds the oneDNN kernel: there
``available`` must say yes (a jaxlib that lost it fails here, not silently slower). On other CPUs they skip.
"""

import dataclasses
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import benchmarks
from benchmarks import library_flops, measure, precision
from scoresmooth_jax.modelio import classifier, convert
from scoresmooth_jax.models import onednn_conv, resnet

X86 = platform.machine().lower() in ("x86_64", "amd64")
needs_x86 = pytest.mark.skipif(not X86, reason="XLA:CPU's oneDNN kernel is built only into x86-64 jaxlibs")


def _bf16_cpu() -> bool:
  return "avx512_bf16" in onednn_conv._cpu_flags()  # pylint: disable=protected-access


@needs_x86
def test_available_where_the_kernel_is_and_only_there():
  assert onednn_conv.available(jnp.float32, "cpu")
  assert onednn_conv.available(jnp.bfloat16, "cpu") == _bf16_cpu()
  assert not onednn_conv.available(jnp.float16, "cpu")
  assert not onednn_conv.available(jnp.float32, "gpu") and not onednn_conv.available(jnp.float32, "tpu")


def _inputs(dtype, size, channels, kernel_size, features, stride, with_residual, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(3, size, size, channels)), dtype)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, channels, features)) / kernel_size, dtype)
  bias = jnp.asarray(rng.normal(size=features), jnp.float32)
  out = onednn_conv._output_shape(x.shape, kernel.shape, stride)  # pylint: disable=protected-access
  residual = jnp.asarray(rng.normal(size=out), dtype) if with_residual else None
  return x, kernel, bias, residual


@needs_x86
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("size,channels,kernel_size,features,stride,with_residual,relu", [
    (8, 16, 3, 16, 1, True, True),    # a basic block's second convolution
    (9, 16, 3, 32, 2, False, True),   # a strided first convolution, odd size
    (8, 16, 1, 32, 2, False, False),  # the 1x1 shortcut
    (11, 3, 7, 8, 2, False, True),    # ResNet-50's stem, 3 input channels
    (6, 3, 3, 16, 1, False, False),
])
def test_fused_conv_computes_the_reference(dtype, size, channels, kernel_size, features, stride, with_residual, relu):
  if dtype == "bfloat16" and not _bf16_cpu():
    pytest.skip("this CPU has no AVX512-BF16; oneDNN runs bfloat16 convolutions only with it")
  x, kernel, bias, residual = _inputs(dtype, size, channels, kernel_size, features, stride, with_residual)
  run = jax.jit(onednn_conv.fused_conv, static_argnums=(3, 5))
  got = np.asarray(run(x, kernel, bias, stride, residual, relu), np.float32)
  want = np.asarray(jax.jit(onednn_conv.reference_fused_conv, static_argnums=(3, 5))(
      x, kernel, bias, stride, residual, relu), np.float32)
  assert got.dtype == np.float32 and got.shape == want.shape
  if relu:
    assert (got >= 0).all() and (got == 0).any()
  # float32: summation order only. bfloat16: both round a float32 sum once, so they differ by at most one step.
  tolerance = 2.0**-7 * np.abs(want) + 1e-6 if dtype == "bfloat16" else 1e-5 * (1 + np.abs(want))
  assert np.all(np.abs(got - want) <= tolerance)


def test_reference_pads_like_pytorch():
  """reference_fused_conv against a direct float64 sum: padding k // 2 on every side, stride from the first pixel."""
  x, kernel, bias, residual = _inputs("float32", 5, 2, 3, 4, 2, True, seed=1)
  got = np.asarray(onednn_conv.reference_fused_conv(x, kernel, bias, 2, residual, relu=True))
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros(got.shape)
  for i in range(3):
    for j in range(3):
      want += np.einsum("bhwc,co->bhwo", xp[:, i:i + 5:2, j:j + 5:2, :], np.asarray(kernel, np.float64)[i, j])
  want = np.maximum(want + np.asarray(bias) + np.asarray(residual), 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_x86
def test_gradients_and_vmap_follow_the_reference():
  x, kernel, bias, residual = _inputs("float32", 6, 4, 3, 4, 1, True, seed=2)

  def loss(conv):
    return lambda *args: jnp.sum(jnp.sin(conv(*args[:3], 1, args[3], True)))

  got = jax.grad(loss(onednn_conv.fused_conv), argnums=(0, 1, 2, 3))(x, kernel, bias, residual)
  want = jax.grad(loss(onednn_conv.reference_fused_conv), argnums=(0, 1, 2, 3))(x, kernel, bias, residual)
  for g, w in zip(got, want):
    assert float(jnp.abs(w).max()) > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
  stacked = jnp.stack([x, 2 * x])
  batched = jax.vmap(lambda images: onednn_conv.fused_conv(images, kernel, bias, 1, None, True))(stacked)
  for k in range(2):
    np.testing.assert_allclose(np.asarray(batched[k]),
                               np.asarray(onednn_conv.fused_conv(stacked[k], kernel, bias, 1, None, True)),
                               rtol=1e-6, atol=1e-6)


@needs_x86
@pytest.mark.parametrize("args,match", [
    (dict(kernel_shape=(2, 2, 4, 4)), "square HWIO kernel of odd size"),
    (dict(kernel_dtype=jnp.bfloat16), "one dtype"),
    (dict(dtype=jnp.float16, kernel_dtype=jnp.float16), "not available for float16"),
])
def test_bad_inputs_name_the_fix(args, match):
  x = jnp.ones((1, 4, 4, 4), args.get("dtype", jnp.float32))
  kernel = jnp.ones(args.get("kernel_shape", (3, 3, 4, 4)), args.get("kernel_dtype", jnp.float32))
  with pytest.raises(ValueError, match=match):
    onednn_conv.fused_conv(x, kernel, jnp.zeros(4), 1)


def _classifier(module, shape, seed=0):
  variables = benchmarks.random_variables(module, jnp.zeros((1, *shape)), seed=seed)  # random BatchNorm statistics
  return classifier.Classifier(module=module, variables=jax.tree.map(jnp.asarray, variables), mean=(0.5,) * 3,
                               std=(0.25,) * 3, num_classes=module.num_classes, image_shape=shape)


@needs_x86
@pytest.mark.parametrize("module,shape", [
    (resnet.CifarResNet(depth=8, shortcut="A"), (8, 8, 3)),
    (resnet.CifarResNet(depth=8, shortcut="B", width=8), (9, 9, 3)),
    (resnet.ResNet(stage_sizes=(1, 1, 1, 1), num_classes=7), (32, 32, 3)),
])
def test_folded_resnets_on_onednn_compute_the_network(module, shape):
  clf = _classifier(module, shape)
  onednn, xla = clf.folded("cpu", conv_impl="onednn"), clf.folded("cpu", conv_impl="xla")
  assert onednn.module.conv_impl == "onednn" and xla.module.conv_impl == "xla"
  assert (jax.tree.map(lambda a: a.shape, onednn.variables) == jax.tree.map(lambda a: a.shape, xla.variables))
  images = jnp.asarray(np.random.default_rng(4).uniform(size=(6, *shape)), jnp.float32)
  want = np.asarray(jax.jit(clf)(images))
  np.testing.assert_allclose(np.asarray(jax.jit(onednn)(images)), want, rtol=0, atol=1e-5 * np.abs(want).max())
  hlo = jax.jit(onednn).lower(images).compile().as_text()
  convolutions = precision.compute_types(hlo)["convolution"]
  assert convolutions and set(convolutions) == {"f32"}  # every convolution is a oneDNN call, none left to XLA
  assert "convolution(" not in hlo


@needs_x86
def test_folding_chooses_onednn_on_cpu_where_available():
  clf = _classifier(resnet.CifarResNet(depth=8), (8, 8, 3))
  assert clf.folded("cpu").module.conv_impl == "onednn"
  assert clf.folded("gpu").module.conv_impl == "xla"
  with pytest.raises(ValueError, match="conv_impl='fast'"):
    clf.folded("cpu", conv_impl="fast")
  images = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match="folded inference network"):
    resnet.CifarResNet(depth=8, conv_impl="onednn").init(jax.random.key(0), images)
  with pytest.raises(ValueError, match="choose one of"):
    resnet.ResNet(stage_sizes=(1, 1, 1, 1), fold_bn=True, conv_impl="cudnn").init(jax.random.key(0), images)


def test_a_folded_network_changed_to_a_dtype_onednn_cannot_run_falls_back_to_xla(monkeypatch):
  clf = _classifier(resnet.CifarResNet(depth=8), (8, 8, 3)).folded("cpu", conv_impl="onednn")
  monkeypatch.setattr(onednn_conv, "available", lambda dtype, backend=None: jnp.dtype(dtype) == jnp.float32)
  bf16 = dataclasses.replace(clf, compute_dtype=jnp.bfloat16)  # e.g. a CPU without AVX512-BF16
  assert bf16.module.conv_impl == "xla" and bf16.module.dtype == jnp.bfloat16
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
  np.testing.assert_allclose(bf16(x), clf(x), atol=0.1)  # the same network, in bfloat16
  monkeypatch.setattr(onednn_conv, "available", lambda dtype, backend=None: True)
  assert dataclasses.replace(clf, compute_dtype=jnp.bfloat16).module.conv_impl == "onednn"


@needs_x86
def test_real_resnet20_on_onednn_keeps_its_accuracy_in_float32_and_bfloat16(fixtures_dir):
  pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0): it reads the fixture")
  with np.load(fixtures_dir / "cifar10_test_first1017.npz", allow_pickle=False) as data:
    images, labels = data["images"].astype(np.float32) / 255.0, data["labels"]
  reference = np.load(fixtures_dir / "resnet20_logits_first1017.npy", allow_pickle=False)
  clf = convert.convert_torch_checkpoint(fixtures_dir / "resnet20-12fca82f.th").to_classifier()
  folded = clf.folded("cpu")
  assert folded.module.conv_impl == "onednn"
  logits = np.asarray(jax.jit(folded)(images))
  assert int((logits.argmax(-1) == labels).sum()) == 932  # PyTorch's count on these images
  assert float(np.abs(logits - reference).max()) < 1e-3
  if _bf16_cpu():
    bf16 = dataclasses.replace(clf, compute_dtype=jnp.bfloat16).folded("cpu")
    assert bf16.module.conv_impl == "onednn" and bf16.module.dtype == jnp.bfloat16
    hlo = jax.jit(bf16).lower(images[:8]).compile().as_text()
    assert set(precision.compute_types(hlo)["convolution"]) == {"bf16"}  # bfloat16 really multiplies in bfloat16
    agreement = float((np.asarray(jax.jit(bf16)(images)).argmax(-1) == logits.argmax(-1)).mean())
    assert agreement >= 0.99, agreement


@needs_x86
@pytest.mark.parametrize("stride,with_residual", [(1, False), (2, False), (2, True)])
def test_library_flops_count_convolutions_as_xla_does(stride, with_residual):
  x, kernel, bias, residual = _inputs("float32", 9, 4, 3, 8, stride, with_residual)

  def compiled(conv):
    return jax.jit(lambda images: conv(images, kernel, bias, stride, residual, True)).lower(x).compile()

  onednn, xla = compiled(onednn_conv.fused_conv), compiled(onednn_conv.reference_fused_conv)
  assert library_flops.onednn_convolution_flops(xla.as_text()) == 0
  # XLA's own count for the convolution (padding taps excluded) plus the fused elementwise ops; XLA fuses the
  # residual add differently, so that one may differ by one op per output element.
  outputs = 3 * ((9 + 2 - 3) // stride + 1) ** 2 * 8
  flops = measure.compiled_flops
  assert abs(flops(onednn) - flops(xla)) <= (outputs if with_residual else 0)
  assert flops(onednn) > 2 * outputs * 4 * 4  # at least 4 taps of 4 channels each


def test_library_flops_refuses_a_call_it_cannot_read():
  line = ('  ROOT %conv.1 = f32[1,4,4,8]{3,2,1,0} custom-call(%x, %w), custom_call_target="__onednn$convolution", '
          'operand_layout_constraints={f32[1,4,4,4]{3,2,1,0}, f32[3,3,4,8]{3,2,1,0}}, backend_config={"other":{}}')
  with pytest.raises(ValueError, match="%conv.1"):
    library_flops.onednn_convolution_flops(line)
  assert library_flops.onednn_convolution_flops(line.replace("__onednn$convolution", "__onednn$matmul")) == 0

"""ResNet classifiers (Flax Linen) that compute the same function as the PyTorch models public checkpoints use.

* ``CifarResNet``: He et al.'s CIFAR ResNet of depth 6n+2 (8, 20, 32, 44, 56, 110, ...): a 3x3 stem, three
  stages of n BasicBlocks at widths w, 2w, 4w (w = 16), global average pooling and a linear head. Shortcut
  "A" is parameter-free (stride-2 subsampling plus zero channel padding, as in akamaster/pytorch_resnet_cifar10);
  shortcut "B" is a strided 1x1 convolution plus BatchNorm (as in Cohen et al.'s ``cifar_resnet110``).
* ``ResNet`` / ``ResNet50``: the ImageNet ResNet in torchvision's layout (v1.5: the stride of a Bottleneck sits
  on its 3x3 convolution), so a torchvision state dict converts name by name.

Promises:
  * ``module.apply(variables, x, train=False)`` takes NHWC images that are ALREADY normalised (the classifier
    wrapper, ``scoresmooth_jax.modelio.classifier``, normalises) and returns logits [B, num_classes] in ``dtype``.
    Input channels are inferred from ``x``.
  * Padding, strides and BatchNorm (eps 1e-5, running averages updated with PyTorch's momentum 0.1, i.e. Flax
    momentum 0.9) match PyTorch exactly, so converted weights give the same logits up to float rounding.
    Padding is explicit: Flax's "SAME" pads stride-2 convolutions asymmetrically, PyTorch symmetrically.
  * Submodule names mirror PyTorch's (``conv1``, ``bn1``, ``layer2_0``, ``downsample_conv``, ``fc``), which is
    what ``scoresmooth_jax.modelio.convert`` maps onto.
  * ``train=True`` uses batch statistics and updates ``batch_stats`` (``mutable=["batch_stats"]``);
    certification always runs with ``train=False``.
  * ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
  * ``fold_bn=True`` builds the inference-only variant in which every convolution that BatchNorm follows has a
    bias and no BatchNorm runs; ``fold_batchnorm(variables)`` turns the ordinary model's variables into that
    variant's parameters (same names for the kernels, ``bias`` added, ``bn*`` and ``batch_stats`` gone), so
    ``model(fold_bn=True).apply(fold_batchnorm(v), x)`` equals ``model.apply(v, x, train=False)`` up to float
    rounding, with a bias add in place of BatchNorm's scale and shift on every activation.
  * The folded network has one seam, ``FoldedConv.impl`` (``conv_impl`` of the models): "xla" computes each
    convolution with ``lax.conv_general_dilated`` and its bias, residual add and ReLU as XLA ops (every backend);
    "onednn" (folded networks, CPU) computes all of it as one call of XLA:CPU's oneDNN kernel (``onednn_conv``).
    Same parameters, the same logits up to float summation order; ``Classifier.folded()`` chooses "onednn" where
    ``onednn_conv.available``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scoresmooth_jax.models import onednn_conv

# PyTorch's BatchNorm2d defaults: running = (1 - 0.1) * running + 0.1 * batch, and eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

CIFAR_SHORTCUTS = ("A", "B")
# How a folded network computes its convolutions: lax.conv_general_dilated (XLA's choice of kernel, every backend),
# or XLA:CPU's oneDNN kernel with the bias, residual add and ReLU fused (models.onednn_conv; CPU only).
CONV_IMPLS = ("xla", "onednn")
# He (Kaiming) normal, untruncated, as PyTorch's kaiming_normal_ that the reference CIFAR ResNets train with.
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                      name=name)


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
  # PyTorch pads k // 2 on every side; Flax "SAME" would pad (0, 1) for stride 2 on even sizes.
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, dtype=dtype, kernel_init=_KERNEL_INIT, name=name)


def _bn_name(conv_name: str) -> str:
  """The BatchNorm that follows a convolution: conv1 -> bn1, downsample_conv -> downsample_bn."""
  return conv_name.replace("conv", "bn")


def _folded_conv(x, features: int, kernel: int, stride: int, dtype: Any, name: str, impl: str, relu: bool,
                 residual=None):
  """[relu](convolution ``name`` + its folded bias [+ ``residual``]), computed by ``impl`` (``FoldedConv``)."""
  return FoldedConv(features, kernel, stride, dtype, relu, impl, name=name)(x, residual)


def _conv_bn(x, features: int, kernel: int, stride: int, dtype: Any, name: str, train: bool, fold_bn: bool,
             impl: str = "xla"):
  """Convolution ``name`` followed by its BatchNorm, or (``fold_bn``) one convolution with a bias instead."""
  if fold_bn:
    return _folded_conv(x, features, kernel, stride, dtype, name, impl, relu=False)
  return _batch_norm(train, dtype, _bn_name(name))(_conv(features, kernel, stride, dtype, name)(x))


def _conv_bn_relu(x, features: int, kernel: int, stride: int, dtype: Any, name: str, train: bool, fold_bn: bool,
                  impl: str = "xla"):
  """relu(``_conv_bn``(...)); folded, one ``FoldedConv``."""
  if fold_bn:
    return _folded_conv(x, features, kernel, stride, dtype, name, impl, relu=True)
  return nn.relu(_conv_bn(x, features, kernel, stride, dtype, name, train, fold_bn=False))


def _conv_bn_add_relu(x, shortcut, features: int, kernel: int, stride: int, dtype: Any, name: str, train: bool,
                      fold_bn: bool, impl: str = "xla"):
  """A residual block's last convolution and output: relu(``_conv_bn``(x) + shortcut); folded, one ``FoldedConv``."""
  if fold_bn:
    return _folded_conv(x, features, kernel, stride, dtype, name, impl, relu=True, residual=shortcut)
  y = _conv_bn(x, features, kernel, stride, dtype, name, train, fold_bn=False)
  return nn.relu(y + shortcut.astype(y.dtype))


def _check_conv_impl(conv_impl: str, fold_bn: bool, model: str) -> None:
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"{model}(conv_impl={conv_impl!r}): choose one of {CONV_IMPLS}.")
  if conv_impl == "onednn" and not fold_bn:
    raise ValueError(f"{model}(conv_impl='onednn') is for the BatchNorm-folded inference network (fold_bn=True); "
                     f"got fold_bn={fold_bn}. Classifier.folded() chooses it where it is available.")


def _check_fold(fold_bn: bool, train: bool, model: str) -> None:
  if fold_bn and train:
    raise ValueError(f"{model}(fold_bn=True) is an inference-only network (BatchNorm is folded into the "
                     "convolutions, so there are no batch statistics to train); train the model with "
                     "fold_bn=False and fold its variables afterwards with fold_batchnorm.")


def fold_batchnorm(variables: Mapping) -> dict:
  """Folds every inference-mode BatchNorm into the convolution before it.

  With s = scale / sqrt(var + eps): conv(x, W) * s + (bias - mean * s) = conv(x, W * s) + b, so each kernel is
  scaled per output channel and gets the bias b. Computed in float64 on the host and stored as float32.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of a ResNet built with ``fold_bn=False``.

  Returns:
    ``{"params": ...}`` for the same ResNet built with ``fold_bn=True``.
  """
  if "params" not in variables or "batch_stats" not in variables:
    raise ValueError(f"fold_batchnorm needs {{'params', 'batch_stats'}} of a ResNet with BatchNorm; got the "
                     f"collections {sorted(variables)} (already folded?).")

  def fold(params: Mapping, stats: Mapping, where: str) -> dict:
    out = {}
    for name, sub in params.items():
      if not isinstance(sub, Mapping):
        continue
      if "kernel" in sub and _bn_name(name) != name and _bn_name(name) in params:
        bn, bn_stats = params[_bn_name(name)], stats[_bn_name(name)]
        scale = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(bn_stats["var"], np.float64) + BN_EPSILON)
        kernel = np.asarray(sub["kernel"], np.float64) * scale  # HWIO: output channels on the last axis
        bias = np.asarray(bn["bias"], np.float64) - np.asarray(bn_stats["mean"], np.float64) * scale
        out[name] = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
      elif name.startswith("bn") or name.endswith("_bn"):
        if name.replace("bn", "conv") not in params:  # a BatchNorm with no convolution before it
          raise ValueError(f"fold_batchnorm: {where}{name} follows no convolution; this is not a ResNet.")
      elif "kernel" in sub:  # the linear head
        out[name] = {k: np.asarray(v, np.float32) for k, v in sub.items()}
      else:
        out[name] = fold(sub, stats.get(name, {}), f"{where}{name}/")
    return out

  host = jax.device_get(variables)
  return {"params": fold(host["params"], host["batch_stats"], "")}


class FoldedConv(nn.Module):
  """A convolution with BatchNorm folded into it and what follows it in a ResNet: [relu](conv(x) + bias
  [+ residual]). The parameters are ``nn.Conv``'s (kernel [k, k, C, O] and bias [O]: the same names, shapes and
  init; PyTorch's padding k // 2) whichever ``impl`` computes it:

  * "xla": ``lax.conv_general_dilated``, then the bias add, residual add and ReLU as XLA ops; every backend.
  * "onednn": one call of XLA:CPU's oneDNN kernel with all of it fused (``onednn_conv.fused_conv``, whose bias
    stays float32); CPU only, where ``onednn_conv.available``.
  """

  features: int
  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32
  relu: bool = False
  impl: str = "xla"

  @nn.compact
  def __call__(self, x, residual=None):
    size, pad = self.kernel_size, self.kernel_size // 2
    kernel = self.param("kernel", _KERNEL_INIT, (size, size, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    if self.impl == "onednn":
      x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
      residual = None if residual is None else residual.astype(x.dtype)
      return onednn_conv.fused_conv(x, kernel, bias, self.stride, residual, self.relu)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), ((pad, pad), (pad, pad)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    if residual is not None:
      y = y + residual.astype(y.dtype)
    return nn.relu(y) if self.relu else y


class CifarBasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection; the first convolution carries the stride."""

  features: int
  stride: int
  shortcut: str
  dtype: Any = jnp.float32
  fold_bn: bool = False
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool = False):
    in_features = x.shape[-1]
    kwargs = dict(dtype=self.dtype, train=train, fold_bn=self.fold_bn, impl=self.conv_impl)
    y = _conv_bn_relu(x, self.features, 3, self.stride, name="conv1", **kwargs)
    if self.stride != 1 or in_features != self.features:
      if self.shortcut == "A":
        # Option A: keep every `stride`-th pixel (from the first, like x[:, :, ::2, ::2] in NCHW) and zero-pad
        # the new channels, half before and half after, as the public option-A checkpoints were trained.
        x = x[:, ::self.stride, ::self.stride, :]
        extra = self.features - in_features
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
      else:
        x = _conv_bn(x, self.features, 1, self.stride, name="downsample_conv", **kwargs)
    return _conv_bn_add_relu(y, x, self.features, 3, 1, name="conv2", **kwargs)


def cifar_stem(x, width: int, dtype: Any, train: bool = False, fold_bn: bool = True, impl: str = "xla"):
  """The CIFAR ResNet's first convolution (``conv1``, then ``bn1`` unless folded) and its ReLU."""
  return _conv_bn_relu(x, width, 3, 1, dtype, "conv1", train, fold_bn, impl)


class CifarResNet(nn.Module):
  """He et al.'s CIFAR ResNet of depth 6n+2 (n BasicBlocks per stage, three stages).

  Attributes:
    depth: 6n + 2 with n >= 1: 8, 20, 32, 44, 56, 110, ...
    num_classes: size of the logit vector.
    shortcut: "A" (parameter-free, akamaster checkpoints) or "B" (1x1 conv + BN, Cohen et al. checkpoints).
    width: channels of the first stage; the stages have width, 2 * width and 4 * width channels.
    dtype: compute dtype (float32 or bfloat16); parameters are float32.
    fold_bn: the inference-only variant with BatchNorm folded into the convolutions (``fold_batchnorm``).
    conv_impl: with ``fold_bn``, how the convolutions run (``CONV_IMPLS``, ``FoldedConv``): "xla", or "onednn"
      for XLA:CPU's oneDNN kernel with the bias, residual add and ReLU fused (``onednn_conv``; CPU only).
  """

  depth: int = 20
  num_classes: int = 10
  shortcut: str = "A"
  width: int = 16
  dtype: Any = jnp.float32
  fold_bn: bool = False
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool = False):
    # Checked here, naming the bad value, rather than failing later inside a shape error.
    if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f"CifarResNet(depth={self.depth!r}): depth must be 6n + 2 with n >= 1, e.g. 8, 20, 32, "
                       "44, 56 or 110.")
    if self.shortcut not in CIFAR_SHORTCUTS:
      raise ValueError(f"CifarResNet(shortcut={self.shortcut!r}): choose 'A' (parameter-free, akamaster "
                       "checkpoints) or 'B' (1x1 conv + BatchNorm, Cohen et al. checkpoints).")
    if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
      raise ValueError(f"CifarResNet(width={self.width!r}): width must be a positive integer (16 in He et al.).")
    if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(f"CifarResNet(num_classes={self.num_classes!r}) must be a positive integer.")
    _check_fold(self.fold_bn, train, "CifarResNet")
    _check_conv_impl(self.conv_impl, self.fold_bn, "CifarResNet")
    blocks = (self.depth - 2) // 6
    y = cifar_stem(x, self.width, self.dtype, train, self.fold_bn, self.conv_impl)
    for stage in range(3):
      for block in range(blocks):
        stride = 2 if (stage > 0 and block == 0) else 1
        y = CifarBasicBlock(self.width * 2**stage, stride, self.shortcut, self.dtype, self.fold_bn,
                            conv_impl=self.conv_impl, name=f"layer{stage + 1}_{block}")(y, train=train)
    y = jnp.mean(y, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(y)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5): 1x1 reduce, strided 3x3, 1x1 expand (x4), projection where shapes change."""

  features: int
  stride: int
  dtype: Any = jnp.float32
  fold_bn: bool = False
  conv_impl: str = "xla"

  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    out_features = self.features * self.expansion
    kwargs = dict(dtype=self.dtype, train=train, fold_bn=self.fold_bn, impl=self.conv_impl)
    y = _conv_bn_relu(x, self.features, 1, 1, name="conv1", **kwargs)
    y = _conv_bn_relu(y, self.features, 3, self.stride, name="conv2", **kwargs)
    if self.stride != 1 or x.shape[-1] != out_features:
      x = _conv_bn(x, out_features, 1, self.stride, name="downsample_conv", **kwargs)
    return _conv_bn_add_relu(y, x, out_features, 1, 1, name="conv3", **kwargs)


class ResNet(nn.Module):
  """ImageNet ResNet with Bottleneck blocks in torchvision's layout (``ResNet50`` = stage sizes 3, 4, 6, 3).

  Attributes:
    stage_sizes: Bottleneck blocks per stage; the stages have 64, 128, 256, 512 (x4 out) channels.
    num_classes: size of the logit vector (1000 for ImageNet).
    dtype: compute dtype (float32 or bfloat16); parameters are float32.
    fold_bn: the inference-only variant with BatchNorm folded into the convolutions (``fold_batchnorm``).
    conv_impl: with ``fold_bn``, "xla" or "onednn", as in ``CifarResNet``.
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  num_classes: int = 1000
  dtype: Any = jnp.float32
  fold_bn: bool = False
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool = False):
    if len(self.stage_sizes) != 4 or any(not isinstance(n, int) or n < 1 for n in self.stage_sizes):
      raise ValueError(f"ResNet(stage_sizes={self.stage_sizes!r}): give four positive block counts, e.g. "
                       "(3, 4, 6, 3) for ResNet-50.")
    _check_fold(self.fold_bn, train, "ResNet")
    _check_conv_impl(self.conv_impl, self.fold_bn, "ResNet")
    y = _conv_bn_relu(x, 64, 7, 2, self.dtype, "conv1", train, self.fold_bn, self.conv_impl)
    # PyTorch's MaxPool2d(3, 2, padding=1) pads with -inf, as reduce_window's max does here.
    y = nn.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        stride = 2 if (stage > 0 and block == 0) else 1
        y = Bottleneck(64 * 2**stage, stride, self.dtype, self.fold_bn, self.conv_impl,
                       name=f"layer{stage + 1}_{block}")(y, train=train)
    y = jnp.mean(y, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(y)


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))

ResNet8 = functools.partial(CifarResNet, depth=8)
ResNet20 = functools.partial(CifarResNet, depth=20)
ResNet32 = functools.partial(CifarResNet, depth=32)
ResNet44 = functools.partial(CifarResNet, depth=44)
ResNet56 = functools.partial(CifarResNet, depth=56)
ResNet110 = functools.partial(CifarResNet, depth=110)

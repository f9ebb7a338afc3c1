"""ResNet classifiers (Flax Linen) that compute the same function as the PyTorch models public checkpoints use.

* ``CifarResNet``: He et al.'s CIFAR ResNet of depth 6n+2 (8, 20, 32, 44, 56, 110, ...): a 3x3 stem, three
  stages of n BasicBlocks at widths w, 2w, 4w (w = 16), global average pooling and a linear head. Shortcut
  "A" is parameter-free (stride-2 subsampling plus zero channel padding, as in akamaster/pytorch_resnet_cifar10);
  shortcut "B" is a strided 1x1 convolution plus BatchNorm (as in Cohen et al.'s ``cifar_resnet110``).
* ``ResNet`` / ``ResNet50``: the ImageNet ResNet in torchvision's layout (v1.5: the stride of a Bottleneck sits
  on its 3x3 convolution), so a torchvision state dict converts name by name.

Promises:
  * ``module.apply(variables, x, train=False)`` takes NHWC images that are ALREADY normalised (the classifier
    wrapper, ``scoresmooth_jax.classifier``, normalises) and returns logits [B, num_classes] in ``dtype``.
    Input channels are inferred from ``x``.
  * Padding, strides and BatchNorm (eps 1e-5, running averages updated with PyTorch's momentum 0.1, i.e. Flax
    momentum 0.9) match PyTorch exactly, so converted weights give the same logits up to float rounding.
    Padding is explicit: Flax's "SAME" pads stride-2 convolutions asymmetrically, PyTorch symmetrically.
  * Submodule names mirror PyTorch's (``conv1``, ``bn1``, ``layer2_0``, ``downsample_conv``, ``fc``), which is
    what ``scoresmooth_jax.convert`` maps onto.
  * ``train=True`` uses batch statistics and updates ``batch_stats`` (``mutable=["batch_stats"]``);
    certification always runs with ``train=False``.
  * ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# PyTorch's BatchNorm2d defaults: running = (1 - 0.1) * running + 0.1 * batch, and eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

CIFAR_SHORTCUTS = ("A", "B")
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


class CifarBasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection; the first convolution carries the stride."""

  features: int
  stride: int
  shortcut: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    in_features = x.shape[-1]
    y = _conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
    y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
    y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
    y = _batch_norm(train, self.dtype, "bn2")(y)
    if self.stride != 1 or in_features != self.features:
      if self.shortcut == "A":
        # Option A: keep every `stride`-th pixel (from the first, like x[:, :, ::2, ::2] in NCHW) and zero-pad
        # the new channels, half before and half after, as the public option-A checkpoints were trained.
        x = x[:, ::self.stride, ::self.stride, :]
        extra = self.features - in_features
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
      else:
        x = _conv(self.features, 1, self.stride, self.dtype, "downsample_conv")(x)
        x = _batch_norm(train, self.dtype, "downsample_bn")(x)
    return nn.relu(y + x.astype(y.dtype))


class CifarResNet(nn.Module):
  """He et al.'s CIFAR ResNet of depth 6n+2 (n BasicBlocks per stage, three stages).

  Attributes:
    depth: 6n + 2 with n >= 1: 8, 20, 32, 44, 56, 110, ...
    num_classes: size of the logit vector.
    shortcut: "A" (parameter-free, akamaster checkpoints) or "B" (1x1 conv + BN, Cohen et al. checkpoints).
    width: channels of the first stage; the stages have width, 2 * width and 4 * width channels.
    dtype: compute dtype (float32 or bfloat16); parameters are float32.
  """

  depth: int = 20
  num_classes: int = 10
  shortcut: str = "A"
  width: int = 16
  dtype: Any = jnp.float32

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
    blocks = (self.depth - 2) // 6
    y = _conv(self.width, 3, 1, self.dtype, "conv1")(x)
    y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
    for stage in range(3):
      for block in range(blocks):
        stride = 2 if (stage > 0 and block == 0) else 1
        y = CifarBasicBlock(self.width * 2**stage, stride, self.shortcut, self.dtype,
                            name=f"layer{stage + 1}_{block}")(y, train=train)
    y = jnp.mean(y, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(y)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5): 1x1 reduce, strided 3x3, 1x1 expand (x4), projection where shapes change."""

  features: int
  stride: int
  dtype: Any = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    out_features = self.features * self.expansion
    y = _conv(self.features, 1, 1, self.dtype, "conv1")(x)
    y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
    y = _conv(self.features, 3, self.stride, self.dtype, "conv2")(y)
    y = nn.relu(_batch_norm(train, self.dtype, "bn2")(y))
    y = _conv(out_features, 1, 1, self.dtype, "conv3")(y)
    y = _batch_norm(train, self.dtype, "bn3")(y)
    if self.stride != 1 or x.shape[-1] != out_features:
      x = _conv(out_features, 1, self.stride, self.dtype, "downsample_conv")(x)
      x = _batch_norm(train, self.dtype, "downsample_bn")(x)
    return nn.relu(y + x.astype(y.dtype))


class ResNet(nn.Module):
  """ImageNet ResNet with Bottleneck blocks in torchvision's layout (``ResNet50`` = stage sizes 3, 4, 6, 3).

  Attributes:
    stage_sizes: Bottleneck blocks per stage; the stages have 64, 128, 256, 512 (x4 out) channels.
    num_classes: size of the logit vector (1000 for ImageNet).
    dtype: compute dtype (float32 or bfloat16); parameters are float32.
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  num_classes: int = 1000
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if len(self.stage_sizes) != 4 or any(not isinstance(n, int) or n < 1 for n in self.stage_sizes):
      raise ValueError(f"ResNet(stage_sizes={self.stage_sizes!r}): give four positive block counts, e.g. "
                       "(3, 4, 6, 3) for ResNet-50.")
    y = nn.Conv(64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False, dtype=self.dtype,
                kernel_init=_KERNEL_INIT, name="conv1")(x)
    y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
    # PyTorch's MaxPool2d(3, 2, padding=1) pads with -inf, as reduce_window's max does here.
    y = nn.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        stride = 2 if (stage > 0 and block == 0) else 1
        y = Bottleneck(64 * 2**stage, stride, self.dtype, name=f"layer{stage + 1}_{block}")(y, train=train)
    y = jnp.mean(y, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(y)


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))

ResNet8 = functools.partial(CifarResNet, depth=8)
ResNet20 = functools.partial(CifarResNet, depth=20)
ResNet32 = functools.partial(CifarResNet, depth=32)
ResNet44 = functools.partial(CifarResNet, depth=44)
ResNet56 = functools.partial(CifarResNet, depth=56)
ResNet110 = functools.partial(CifarResNet, depth=110)

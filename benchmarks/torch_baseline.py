"""A PyTorch eager baseline of the Monte-Carlo loop, run the way Cohen et al.'s reference code runs it.

It exists to be timed beside ``smoothing.sample_counts`` (``benchmarks``): same network, same
weights, same number of draws, so the JAX / PyTorch ratio says what the JAX pipeline buys over the tool people use.

Promises:
  * ``torch`` is imported only inside functions: importing this module never needs it, and a missing torch fails
    with the command that installs it.
  * ``build_cifar_resnet`` is He et al.'s CIFAR ResNet with option-B shortcuts (1x1 convolution + BatchNorm) in
    Cohen et al.'s layout (NCHW, float32, ``conv1 / bn1 / layer{1,2,3}.{i} / fc``), behind a layer that
    normalises images in [0, 1]. ``load_flax_variables`` copies the variables of
    ``scoresmooth_jax.models.resnet.CifarResNet(shortcut="B")`` into it, so both compute the same function.
  * ``sample_counts`` is the straightforward loop: per batch, repeat the image, draw fresh Gaussian noise with
    ``torch.randn_like``, run the model in eval mode under ``torch.no_grad()``, take the argmax, and add the label
    histogram (``np.bincount``) into numpy counts on the host. ``seed`` fixes the draws without disturbing the
    caller's global torch RNG (``torch.random.fork_rng``). Counts sum to exactly ``num``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from scoresmooth_jax.modelio import convert

TORCH_INSTALL_HINT = ("the PyTorch baseline needs PyTorch: install it with `pip install torch==2.13.0` (the CPU "
                      "build is enough).")


def import_torch():
  """``torch``, or an ImportError that says how to install it."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise ImportError(TORCH_INSTALL_HINT) from err
  return torch


def configure_threads(num_threads: int) -> dict:
  """Sets PyTorch's intra-op threads (the ones its convolutions use) and reports the thread settings."""
  torch = import_torch()
  torch.set_num_threads(int(num_threads))
  return {"torch_intra_op_threads": torch.get_num_threads(),
          "torch_inter_op_threads": torch.get_num_interop_threads(),
          "torch_mkldnn": bool(torch.backends.mkldnn.is_available())}


@functools.cache
def _modules():
  """The nn.Module classes, defined on first use so that torch is imported only when needed."""
  torch = import_torch()
  nn, F = torch.nn, torch.nn.functional

  class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = None
      if stride != 1 or in_planes != planes:
        self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      shortcut = x if self.downsample is None else self.downsample(x)
      return F.relu(out + shortcut)

  class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, width: int, in_channels: int):
      super().__init__()
      blocks = (depth - 2) // 6
      self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      in_planes = width
      for stage in range(3):
        planes = width * 2**stage
        layers = []
        for block in range(blocks):
          layers.append(BasicBlock(in_planes, planes, 2 if stage > 0 and block == 0 else 1))
          in_planes = planes
        setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
      self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.layer3(self.layer2(self.layer1(out)))
      return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

  class Normalized(nn.Module):
    """Cohen et al.'s NormalizeLayer in front of the network: (x - mean) / std per channel, NCHW."""

    def __init__(self, model, mean, std):
      super().__init__()
      self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
      self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))
      self.model = model

    def forward(self, x):
      return self.model((x - self.mean) / self.std)

  return CifarResNet, Normalized


def build_cifar_resnet(depth: int, num_classes: int, mean, std, width: int = 16, in_channels: int = 3):
  """A CIFAR ResNet of depth 6n + 2 with option-B shortcuts, behind a normalisation layer, in eval mode."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f"depth={depth!r} must be 6n + 2 with n >= 1 (e.g. 20 or 110).")
  if len(mean) != in_channels or len(std) != in_channels:
    raise ValueError(f"mean={mean!r} and std={std!r} need {in_channels} values, one per input channel.")
  resnet, normalized = _modules()
  return normalized(resnet(depth, num_classes, width, in_channels), mean, std).eval()


def _torch_key(path: tuple[str, ...]) -> str:
  """Flax variable path (collection, modules..., leaf) -> this module's state-dict key (the model sits under
  ``model.`` behind the normalisation layer; the rest is the converter's mapping, read backwards)."""
  return "model." + convert.torch_name(path)


def load_flax_variables(model, variables) -> None:
  """Copies ``{"params", "batch_stats"}`` of a Flax ``CifarResNet(shortcut="B")`` into ``model`` (in place), a
  ``build_cifar_resnet`` model.

  Conv kernels HWIO -> OIHW, dense (in, out) -> (out, in). Every tensor of the model must be covered (BatchNorm
  step counters aside) and every Flax variable used, or this fails listing the keys.
  """
  import jax  # pylint: disable=import-outside-toplevel

  torch = import_torch()
  state = {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(variables)):
    array = np.asarray(leaf, np.float32)
    if array.ndim == 4:
      array = array.transpose(3, 2, 0, 1)
    elif array.ndim == 2:
      array = array.T
    state[_torch_key(tuple(str(k.key) for k in key_path))] = torch.from_numpy(np.array(array, copy=True, order="C"))
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.endswith("num_batches_tracked") and k not in ("mean", "std")]
  if missing or unexpected:
    raise ValueError(f"the Flax variables do not fit the PyTorch ResNet: missing {missing}, unexpected "
                     f"{unexpected}. Pass the variables of CifarResNet(shortcut='B') of the same depth and width.")


def sample_counts(model, image, sigma: float, num: int, batch_size: int, num_classes: int,
                  seed: int = 0) -> np.ndarray:
  """Class counts of ``model`` on ``num`` Gaussian-noisy copies of ``image``, Cohen et al.'s way.

  Args:
    model: a PyTorch classifier on NCHW images in [0, 1] (e.g. ``build_cifar_resnet``), in eval mode.
    image: one image, HWC (as the JAX side takes it) float in [0, 1].
    sigma: the noise's standard deviation in [0, 1] pixel units.
    num: number of noisy copies.
    batch_size: copies per forward pass.
    num_classes: length of the count vector.
    seed: fixes the noise draws.

  Returns:
    int64 numpy counts [num_classes] that sum to ``num``.
  """
  torch = import_torch()
  x = torch.from_numpy(np.ascontiguousarray(np.asarray(image, np.float32).transpose(2, 0, 1)))
  counts = np.zeros(num_classes, np.int64)
  remaining = int(num)
  with torch.random.fork_rng(devices=[]), torch.no_grad():
    torch.manual_seed(seed)
    for _ in range(math.ceil(num / batch_size)):
      this_batch = min(batch_size, remaining)
      remaining -= this_batch
      batch = x.repeat((this_batch, 1, 1, 1))
      noise = torch.randn_like(batch) * sigma
      predictions = model(batch + noise).argmax(1)
      counts += np.bincount(predictions.numpy(), minlength=num_classes)
  return counts


def logits(model, images) -> np.ndarray:
  """float32 logits of NHWC images in [0, 1] (numpy), for parity checks against the JAX classifier."""
  torch = import_torch()
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2)))
    return model(x).numpy()

"""ResNets: the Flax models compute what PyTorch references (written here, random weights) compute.

Each parity test builds a small PyTorch model in the layout of the public checkpoints (akamaster option-A CIFAR
ResNet, Cohen et al.'s option-B CIFAR ResNet, torchvision's ResNet-50), randomises every weight and BatchNorm
running statistic, saves it in that format, converts it with ``scoresmooth_jax.modelio.convert`` and compares logits on
images in [0, 1] through the whole classifier (normalisation included).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresmooth_jax.modelio import convert
from scoresmooth_jax.models import get_model
from scoresmooth_jax.models import resnet

TORCH_REASON = "PyTorch is not installed (pip install torch==2.13.0): PyTorch parity tests need it"


def _num_params(module, shape):
  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("features, size, stride", [(5, 3, 1), (4, 3, 2), (6, 1, 2), (3, 7, 2)])
def test_folded_conv_on_xla_is_nn_conv_then_the_residual_and_relu(features, size, stride):
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
  pad = size // 2
  reference = nn.Conv(features, (size, size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                      use_bias=True, kernel_init=resnet._KERNEL_INIT)  # what folded ResNets were built with before
  folded = resnet.FoldedConv(features, size, stride)
  variables = folded.init(jax.random.key(1), x)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, reference.init(jax.random.key(1), x))
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(reference.init(jax.random.key(1), x))):
    np.testing.assert_array_equal(got, want)  # the same initialisation, so checkpoints and seeds carry over
  variables = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape), variables)
  conv = reference.apply(variables, x)
  np.testing.assert_allclose(folded.apply(variables, x), conv, rtol=1e-6, atol=1e-6)
  residual = jax.random.normal(jax.random.key(3), conv.shape)
  fused = resnet.FoldedConv(features, size, stride, relu=True).apply(variables, x, residual)
  np.testing.assert_allclose(fused, jax.nn.relu(conv + residual), rtol=1e-6, atol=1e-6)


def test_parameter_counts_match_the_published_models():
  # akamaster's table: ResNet-20 0.27M, ResNet-110 1.7M (exactly 269,722 and 1,727,962 for option A);
  # torchvision's ResNet-50: 25,557,032.
  assert _num_params(get_model("cifar_resnet", depth=20), (1, 32, 32, 3)) == 269_722
  assert _num_params(resnet.ResNet110(), (1, 32, 32, 3)) == 1_727_962
  assert _num_params(get_model("resnet50", num_classes=1000), (1, 224, 224, 3)) == 25_557_032


def test_tiny_digits_resnet_shapes_and_dtypes():
  module = get_model("cifar_resnet", depth=8, num_classes=10, shortcut="A", dtype=jnp.bfloat16)
  x = jnp.zeros((2, 8, 8, 1))
  # eval_shape, not init: compiling the random initialisers costs seconds on CPU and proves nothing here.
  abstract = jax.eval_shape(module.init, jax.random.key(0), x)
  assert set(abstract) == {"params", "batch_stats"}
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract["params"]))
  assert abstract["params"]["conv1"]["kernel"].shape == (3, 3, 1, 16)
  variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.1, s.dtype), abstract)
  logits = jax.jit(module.apply)(variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, match", [
    (dict(depth=21), r"depth=21.*6n \+ 2"),
    (dict(depth=20, shortcut="C"), r"shortcut='C'.*'A'.*'B'"),
    (dict(depth=20, width=0), r"width=0"),
])
def test_invalid_cifar_config_names_the_value(kwargs, match):
  module = get_model("cifar_resnet", **kwargs)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# ------------------------------------------------------------------------------------------------------------
# PyTorch references (own code, in the layouts the public checkpoints use).
# ------------------------------------------------------------------------------------------------------------


@functools.cache
def _torch_reference():
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  nn, F = torch.nn, torch.nn.functional

  class CifarBlock(nn.Module):
    def __init__(self, cin, planes, stride, option):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.project = stride != 1 or cin != planes
      self.option, self.planes = option, planes
      if self.project and option == "B":
        self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
      out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
      if not self.project:
        short = x
      elif self.option == "A":  # akamaster: subsample, then planes // 4 zero channels on each side
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.planes // 4, self.planes // 4))
      else:
        short = self.downsample(x)
      return F.relu(out + short)

  class CifarNet(nn.Module):
    def __init__(self, depth, num_classes, option, in_channels=3, head="linear"):
      super().__init__()
      n = (depth - 2) // 6
      self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(16)
      cin = 16
      for stage, planes in enumerate((16, 32, 64)):
        blocks = []
        for b in range(n):
          blocks.append(CifarBlock(cin, planes, 2 if stage and not b else 1, option))
          cin = planes
        setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
      self.head_name = head
      setattr(self, head, nn.Linear(64, num_classes))

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.layer3(self.layer2(self.layer1(out)))
      return getattr(self, self.head_name)(F.adaptive_avg_pool2d(out, 1).flatten(1))

  class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # v1.5: stride on the 3x3
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(4 * width)
      self.downsample = None
      if stride != 1 or cin != 4 * width:
        self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride, bias=False),
                                        nn.BatchNorm2d(4 * width))

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = F.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      return F.relu(out + (x if self.downsample is None else self.downsample(x)))

  class ResNet50(nn.Module):
    def __init__(self, num_classes):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      cin = 64
      for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        layers = []
        for b in range(blocks):
          layers.append(Bottleneck(cin, width, 2 if stage and not b else 1))
          cin = 4 * width
        setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
      self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
      out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
      out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
      return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))

  return torch, CifarNet, ResNet50


def _randomise(model, seed):
  """Random weights and, importantly, random BatchNorm running statistics (the defaults 0 / 1 hide bugs)."""
  torch = _torch_reference()[0]
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5 + 0.75)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 0.5 + 0.75)
      elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * np.sqrt(1.0 / fan_in))
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
  return model.eval()


def _torch_logits(model, images, mean, std):
  torch = _torch_reference()[0]
  x = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def _assert_close(got, want, tol=1e-4):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max())
  assert err < tol * scale, f"max abs logit error {err} (logit scale {scale})"
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("depth, shape, fmt, prefix", [
    (8, (32, 32, 3), "akamaster", "module."),      # option A, as akamaster saves it
    (8, (8, 8, 1), "akamaster", ""),               # option A on the 8x8 grey digits: 8 -> 4 -> 2 pixels
    (14, (32, 32, 3), "cohen", "1.module."),       # option B inside Sequential(NormalizeLayer, DataParallel)
])
def test_cifar_resnet_matches_torch(tmp_path, depth, shape, fmt, prefix):
  torch, CifarNet, _ = _torch_reference()
  option = "B" if fmt == "cohen" else "A"
  model = _randomise(CifarNet(depth, 10, option, in_channels=shape[-1],
                              head="fc" if fmt == "cohen" else "linear"), seed=depth)
  state = {prefix + k: v for k, v in model.state_dict().items()}
  path = tmp_path / "model.pt"
  if fmt == "cohen":
    torch.save({"arch": f"cifar_resnet{depth}", "state_dict": state}, path)
    extra = {}
  else:
    torch.save({"state_dict": state, "best_prec1": 50.0}, path)
    extra = {"image_shape": shape, "mean": (0.5,), "std": (0.25,)} if shape[-1] == 1 else {}
  converted = convert.convert_torch_checkpoint(path, **extra)
  assert converted.model_kwargs == {"depth": depth, "num_classes": 10, "shortcut": option, "width": 16}
  images = np.random.default_rng(0).uniform(size=(4, *shape)).astype(np.float32)
  clf = converted.to_classifier()
  _assert_close(jax.jit(clf)(images), _torch_logits(model, images, converted.mean, converted.std))


def test_resnet50_torchvision_layout_matches_torch(tmp_path):
  torch, _, ResNet50 = _torch_reference()
  model = _randomise(ResNet50(num_classes=10), seed=50)
  torch.save(model.state_dict(), tmp_path / "resnet50.pth")  # a bare torchvision-style state dict
  converted = convert.convert_torch_checkpoint(tmp_path / "resnet50.pth", image_shape=(64, 64, 3))
  assert converted.module_name == "resnet50" and converted.metadata["source_format"] == "torchvision"
  assert converted.mean == convert.IMAGENET_MEAN and converted.std == convert.IMAGENET_STD
  images = np.random.default_rng(1).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  _assert_close(jax.jit(converted.to_classifier())(images),
                _torch_logits(model, images, converted.mean, converted.std))


def test_train_mode_batchnorm_matches_torch_momentum(tmp_path):
  """Train mode normalises with batch statistics and moves running means by PyTorch's momentum 0.1."""
  torch, CifarNet, _ = _torch_reference()
  model = _randomise(CifarNet(8, 10, "A"), seed=3)
  torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pt")
  converted = convert.convert_torch_checkpoint(tmp_path / "m.pt", mean=(0, 0, 0), std=(1, 1, 1))
  module = get_model(converted.module_name, **converted.model_kwargs)
  x = np.random.default_rng(2).normal(size=(8, 32, 32, 3)).astype(np.float32)
  logits, updates = module.apply(converted.variables, x, train=True, mutable=["batch_stats"])
  model.train()
  with torch.no_grad():
    want = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  _assert_close(logits, want)
  # Running means follow the same update; running variances differ by design (PyTorch stores the unbiased
  # batch variance, Flax the biased one), which matters only for training, never for inference.
  np.testing.assert_allclose(updates["batch_stats"]["layer2_0"]["bn1"]["mean"],
                             model.layer2[0].bn1.running_mean.numpy(), atol=1e-5)

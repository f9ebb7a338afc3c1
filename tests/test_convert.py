"""PyTorch checkpoint conversion, the classifier wrapper and its export, on the real ResNet-20 fixture.

The fixture (akamaster's pretrained CIFAR-10 ResNet-20) must convert to a classifier that gets exactly the
932 / 1017 that PyTorch gets on the first 1017 CIFAR-10 test images, with logits within 1e-3. Bad checkpoints
must fail with messages that say what is wrong.
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresmooth_jax.modelio import checkpoint
from scoresmooth_jax.modelio import classifier
from scoresmooth_jax.modelio import convert
from scoresmooth_jax.models import get_model

TORCH_REASON = "PyTorch is not installed (pip install torch==2.13.0): checkpoint conversion tests need it"
ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPECTED_CORRECT = 932


def _torch():
  return pytest.importorskip("torch", reason=TORCH_REASON)


@pytest.fixture(scope="module")
def checkpoint_path(fixtures_dir):
  _torch()
  return fixtures_dir / "resnet20-12fca82f.th"


@pytest.fixture(scope="module")
def fixture_state(checkpoint_path):
  return _torch().load(checkpoint_path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def converted(checkpoint_path):
  return convert.convert_torch_checkpoint(checkpoint_path)


@pytest.fixture(scope="module")
def cifar(fixtures_dir):
  with np.load(fixtures_dir / "cifar10_test_first1017.npz", allow_pickle=False) as data:
    images, labels = data["images"], data["labels"]
  reference = np.load(fixtures_dir / "resnet20_logits_first1017.npy", allow_pickle=False)
  return images.astype(np.float32) / 255.0, labels, reference


@pytest.fixture(scope="module")
def logits(converted, cifar):
  """The converted model's float32 logits on all 1017 images, from one jitted batched pass."""
  return np.asarray(jax.jit(converted.to_classifier())(cifar[0]))


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory):
  return converted.export(tmp_path_factory.mktemp("export") / "resnet20")


def _save(obj, path):
  _torch().save(obj, path)
  return path


def test_fixture_converts_to_the_same_function(converted, cifar, logits):
  images, labels, reference = cifar
  assert converted.module_name == "cifar_resnet"
  assert converted.model_kwargs == {"depth": 20, "num_classes": 10, "shortcut": "A", "width": 16}
  assert converted.mean == convert.IMAGENET_MEAN and converted.std == convert.IMAGENET_STD
  assert converted.image_shape == (32, 32, 3) and converted.metadata["source_format"] == "akamaster"
  assert int((logits.argmax(-1) == labels).sum()) == EXPECTED_CORRECT
  assert float(np.abs(logits - reference).max()) < 1e-3


def test_accuracy_helper_masks_the_partial_batch(converted, cifar, logits):
  images, labels, _ = cifar
  # 200 images in batches of 64 (rounded to the 8 devices): the last batch is padded and must be masked.
  want = int((logits[:200].argmax(-1) == labels[:200]).sum())
  assert classifier.accuracy(converted.to_classifier(), images[:200], labels[:200], batch_size=64) == want
  assert classifier.format_accuracy(EXPECTED_CORRECT, 1017) == "932 / 1017 = 91.64 %"


def test_export_load_round_trip_is_exact(converted, exported, cifar):
  clf = classifier.load_classifier(exported)
  assert clf.module == get_model("cifar_resnet", **converted.model_kwargs)
  assert (clf.mean, clf.std, clf.num_classes, clf.image_shape) == (
      converted.mean, converted.std, converted.num_classes, converted.image_shape)
  assert clf.metadata["source_best_prec1"] == pytest.approx(91.78, abs=1e-3)
  flat_want = jax.tree_util.tree_leaves_with_path(converted.variables)
  flat_got = dict(jax.tree_util.tree_leaves_with_path(clf.variables))
  assert len(flat_got) == len(flat_want)
  for key, want in flat_want:
    np.testing.assert_array_equal(np.asarray(flat_got[key]), want, err_msg=jax.tree_util.keystr(key))
  x = cifar[0][:16]
  np.testing.assert_array_equal(np.asarray(jax.jit(clf)(x)), np.asarray(jax.jit(converted.to_classifier())(x)))


def test_bfloat16_compute_agrees_with_float32(exported, cifar, logits):
  clf = classifier.load_classifier(exported, compute_dtype="bfloat16")
  assert clf.compute_dtype == jnp.bfloat16
  out = jax.jit(clf)(cifar[0][:256])
  assert out.dtype == jnp.float32
  agreement = float((np.asarray(out).argmax(-1) == logits[:256].argmax(-1)).mean())
  assert agreement >= 0.97, agreement
  assert float(np.abs(np.asarray(out) - logits[:256]).max()) < 0.5


def test_classifier_is_hashable_by_identity_and_checks_its_input(converted):
  clf = converted.to_classifier()
  assert hash(clf) == hash(clf) and clf != converted.to_classifier()
  with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(2, 28, 28, 3\)"):
    clf(jnp.zeros((2, 28, 28, 3)))
  with pytest.raises(ValueError, match=r"uint8.*x / 255"):
    clf(jnp.zeros((2, 32, 32, 3), jnp.uint8))


def test_export_rejects_inconsistent_metadata(converted, tmp_path):
  args = (converted.module_name, converted.model_kwargs, converted.variables)
  with pytest.raises(ValueError, match=r"3 values.*1 channels"):
    classifier.export_classifier(tmp_path / "a", *args, converted.mean, converted.std, 10, (32, 32, 1))
  with pytest.raises(ValueError, match=r"num_classes=100 disagrees"):
    classifier.export_classifier(tmp_path / "b", *args, converted.mean, converted.std, 100, (32, 32, 3))
  with pytest.raises(ValueError, match=r"unknown model 'vgg'"):
    classifier.export_classifier(tmp_path / "c", "vgg", {}, {}, (0.5,), (0.5,), 10, (8, 8, 1))
  # Variables of another depth under a depth-20 description: loading must refuse, listing the differences.
  small = convert.ConvertedClassifier(**{**converted.__dict__, "model_kwargs": {**converted.model_kwargs,
                                                                                "depth": 8}})
  bad = small.export(tmp_path / "d")
  with pytest.raises(checkpoint.CheckpointError, match=r"unexpected \[.*layer1_1"):
    classifier.load_classifier(bad)


def test_script_converts_and_evaluates(checkpoint_path, cifar, logits, tmp_path):
  images, labels, _ = cifar
  npz = tmp_path / "eval.npz"
  np.savez(npz, images=np.round(images[:48] * 255).astype(np.uint8), labels=labels[:48])
  want = int((logits[:48].argmax(-1) == labels[:48]).sum())
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, str(ROOT / "scripts" / "convert_torch_classifier.py"), f"--checkpoint={checkpoint_path}",
       f"--output={tmp_path / 'out'}", f"--eval_npz={npz}", "--eval_batch_size=48"],
      capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"{want} / 48 = {100 * want / 48:.2f} %" in result.stdout
  assert classifier.load_classifier(tmp_path / "out").num_classes == 10


# ------------------------------------------------------------------------------------------------------------
# Formats and failures.
# ------------------------------------------------------------------------------------------------------------


def test_wrong_depth_fails_clearly(checkpoint_path, fixture_state, tmp_path):
  with pytest.raises(convert.ConversionError, match=r"depth=32 asks for a depth-32.*holds depth 20"):
    convert.convert_torch_checkpoint(checkpoint_path, depth=32)
  cohen = _save({"arch": "cifar_resnet110", "state_dict": fixture_state["state_dict"]}, tmp_path / "c.pth")
  with pytest.raises(convert.ConversionError, match=r"arch='cifar_resnet110'.*depth-110.*holds depth 20"):
    convert.convert_torch_checkpoint(cohen)


def test_wrong_shortcut_option_fails_clearly(checkpoint_path, fixture_state, tmp_path):
  with pytest.raises(convert.ConversionError, match=r"shortcut='B' expects option-B.*option-A"):
    convert.convert_torch_checkpoint(checkpoint_path, shortcut="B")
  # Cohen et al.'s CIFAR ResNets have option-B shortcuts; an option-A state dict under his format is wrong.
  cohen = _save({"arch": "cifar_resnet20", "state_dict": fixture_state["state_dict"]}, tmp_path / "c.pth")
  with pytest.raises(convert.ConversionError, match=r"Cohen.*expects option-B.*parameter-free option-A"):
    convert.convert_torch_checkpoint(cohen)


def test_missing_unexpected_and_misshaped_keys_are_listed_together(fixture_state, tmp_path):
  torch = _torch()
  state = dict(fixture_state["state_dict"])
  del state["module.layer3.2.conv2.weight"], state["module.linear.bias"]
  state["module.extra.weight"] = torch.zeros(3)
  state["module.layer1.0.bn1.weight"] = torch.zeros(17)
  path = _save({"state_dict": state, "best_prec1": 0.0}, tmp_path / "bad.th")
  with pytest.raises(convert.ConversionError) as err:
    convert.convert_torch_checkpoint(path)
  message = str(err.value)
  assert re.search(r"2 missing: layer3\.2\.conv2\.weight, linear\.bias", message), message
  assert re.search(r"1 unexpected: extra\.weight", message), message
  assert re.search(r"1 mis-shaped: layer1\.0\.bn1\.weight: checkpoint \(17,\), model needs \(16,\)", message)


def test_truncated_file_fails_clearly(checkpoint_path, tmp_path):
  data = checkpoint_path.read_bytes()
  path = tmp_path / "half.th"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError, match=r"cannot read .*half\.th.*truncated, corrupt"):
    convert.convert_torch_checkpoint(path)
  with pytest.raises(convert.ConversionError, match=r"does not exist"):
    convert.convert_torch_checkpoint(tmp_path / "nothing.th")


def test_full_pickle_needs_the_trust_flag(fixture_state, converted, tmp_path):
  path = _save({**fixture_state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.th")
  with pytest.raises(convert.ConversionError,
                     match=r"(?s)argparse\.Namespace.*arbitrary code.*--trust_checkpoint"):
    convert.convert_torch_checkpoint(path)
  trusted = convert.convert_torch_checkpoint(path, trust_checkpoint=True)
  for got, want in zip(jax.tree.leaves(trusted.variables), jax.tree.leaves(converted.variables)):
    np.testing.assert_array_equal(got, want)


def test_format_detection_and_overrides(fixture_state, tmp_path):
  bare = _save(fixture_state["state_dict"], tmp_path / "bare.th")
  with pytest.raises(convert.ConversionError, match=r"bare state dict.*format='akamaster'"):
    convert.convert_torch_checkpoint(bare)
  out = convert.convert_torch_checkpoint(bare, format="cohen", shortcut="A", mean=(0.5,) * 3, std=(0.2,) * 3)
  assert out.mean == (0.5,) * 3 and out.std == (0.2,) * 3
  with pytest.raises(convert.ConversionError, match=r"format='keras'"):
    convert.convert_torch_checkpoint(bare, format="keras")
  with pytest.raises(convert.ConversionError, match=r"num_classes=100.*10 outputs"):
    convert.convert_torch_checkpoint(bare, format="akamaster", num_classes=100)


def _torch_state_from_flax(variables, head="fc", shortcut="downsample"):
  """Flax variables -> PyTorch-named tensors (written independently of convert.py's own mapping)."""
  torch = _torch()
  state = {}
  for path, value in jax.tree_util.tree_leaves_with_path(variables):
    collection, *modules, leaf = [k.key for k in path]
    names = []
    for m in modules:
      names += (m.split("_") if m.startswith("layer") else
                [shortcut, "0"] if m == "downsample_conv" else [shortcut, "1"] if m == "downsample_bn" else
                [head] if m == "fc" else [m])
    names.append({"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}[leaf])
    value = np.asarray(value)
    value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value
    state[".".join(names)] = torch.from_numpy(np.ascontiguousarray(value))
  return state


@pytest.mark.parametrize("prefix", ["1.module.", "module.1.", "1."])
def test_cohen_checkpoint_prefix_variants(prefix, tmp_path):
  torch = _torch()
  module = get_model("cifar_resnet", depth=8, num_classes=10, shortcut="B")
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), abstract)
  state = {prefix + k: v for k, v in _torch_state_from_flax(variables).items()}
  state[prefix + "bn1.num_batches_tracked"] = torch.tensor(7)  # ignored: no effect in inference
  path = _save({"arch": "cifar_resnet8", "state_dict": state}, tmp_path / "cohen.pth.tar")
  out = convert.convert_torch_checkpoint(path)
  assert out.model_kwargs == {"depth": 8, "num_classes": 10, "shortcut": "B", "width": 16}
  assert out.mean == convert.COHEN_CIFAR10_MEAN and out.std == convert.COHEN_CIFAR10_STD
  assert out.metadata["source_format"] == "cohen" and out.metadata["source_arch"] == "cifar_resnet8"
  assert jax.tree.structure(out.variables) == jax.tree.structure(variables)
  for got, want in zip(jax.tree.leaves(out.variables), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(got, want)


def test_cohen_resnet50_and_normalisation_buffers(tmp_path):
  torch = _torch()
  module = get_model("resnet50", num_classes=1000)
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract)
  state = {"module.1." + k: v for k, v in _torch_state_from_flax(variables).items()}
  # A normalisation layer that registered its statistics as buffers: they become the export's mean / std.
  state["module.0.means"] = torch.tensor([0.1, 0.2, 0.3])
  state["module.0.sds"] = torch.tensor([0.4, 0.5, 0.6])
  path = _save({"arch": "resnet50", "state_dict": state}, tmp_path / "cohen50.pth.tar")
  out = convert.convert_torch_checkpoint(path)
  assert (out.module_name, out.model_kwargs, out.image_shape) == ("resnet50", {"num_classes": 1000},
                                                                   (224, 224, 3))
  assert out.mean == pytest.approx((0.1, 0.2, 0.3)) and out.std == pytest.approx((0.4, 0.5, 0.6))


def test_missing_torch_names_the_install_command(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
  with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
    convert.convert_torch_checkpoint(tmp_path / "any.th")
  code = "import sys, scoresmooth_jax.modelio.convert; assert 'torch' not in sys.modules, 'convert imported torch'"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]

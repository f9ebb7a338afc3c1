"""ViT and BEiT classifiers from timm and Hugging Face: parity with upstream, presets, and refused state dicts.

The fixtures (../shared/fixtures, README "ViT / BEiT") are timm's VisionTransformer and Beit and Hugging Face's
ViTForImageClassification shrunk to 32 x 32 inputs with random weights, and the upstream float32 logits on four
images. Each must go through the conversion script into an export that ``load_classifier`` reads back as a
function within 1e-4 of those logits.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from scoresmooth_jax.modelio import classifier
from scoresmooth_jax.modelio import convert_hf_vit
from scoresmooth_jax.modelio import convert_vit
from scoresmooth_jax.modelio import vit_state_dict
from scoresmooth_jax.modelio.convert import ConversionError
from scoresmooth_jax.models import get_model, vit

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARITY_TOL = 1e-4  # the bound on max |JAX - upstream| of the logits
TORCH_REASON = "PyTorch is not installed (pip install torch==2.13.0): reading .pth state dicts needs it"

# fixture -> (--format, what --checkpoint points at, --arch, the Flax model it must become)
FIXTURES = {
    "timm_vit_small": ("timm", "timm_vit_small.pth", "timm_vit_small_config.json", "vit"),
    "timm_beit_small": ("timm", "timm_beit_small.pth", "timm_beit_small_config.json", "beit"),
    "hf_vit_small": ("hf", "hf_vit_small", None, "vit"),
}

# Hugging Face's ViT-B/16 (google/vit-base-patch16-224-in21k's config) with a 10-label head.
HF_VIT_B16 = {"model_type": "vit", "architectures": ["ViTForImageClassification"], "hidden_size": 768,
              "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "image_size": 224,
              "patch_size": 16, "num_channels": 3, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "qkv_bias": True}


def _needs_torch(fmt):
  if fmt == "timm":
    pytest.importorskip("torch", reason=TORCH_REASON)


def _io(fixtures_dir, name):
  return np.load(fixtures_dir / f"{name}_io.npz", allow_pickle=False)


def _run_script(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_torch_classifier.py"), *args],
                        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _parity_error(clf, io) -> float:
  return float(np.max(np.abs(np.asarray(jax.jit(clf)(io["x01_nhwc"])) - io["logits"])))


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_exports_reproduce_upstream_logits(fixtures_dir, tmp_path, name):
  """What the script does (convert_transformer, export, load_classifier), in this process."""
  fmt, checkpoint, arch, module_name = FIXTURES[name]
  _needs_torch(fmt)
  io = _io(fixtures_dir, name)
  converted = convert_vit.convert_transformer(fixtures_dir / checkpoint, fmt, arch=arch and fixtures_dir / arch,
                                              mean=io["mean"], std=io["std"])
  clf = classifier.load_classifier(converted.export(tmp_path / "export"))
  assert type(clf.module) is type(get_model(module_name, num_classes=10))
  assert clf.mean == tuple(map(float, io["mean"])) and clf.std == tuple(map(float, io["std"]))
  assert clf.image_shape == (32, 32, 3) and clf.num_classes == 10 and clf.metadata["source_format"] == fmt
  error = _parity_error(clf, io)
  print(f"{name}: max |JAX - upstream| = {error:.2e}")
  assert error < PARITY_TOL


def test_script_converts_timm_with_constructor_arguments(fixtures_dir, tmp_path):
  pytest.importorskip("torch", reason=TORCH_REASON)
  io = _io(fixtures_dir, "timm_beit_small")
  result = _run_script("--format=timm", f"--checkpoint={fixtures_dir / 'timm_beit_small.pth'}",
                       f"--arch={fixtures_dir / 'timm_beit_small_config.json'}", f"--output={tmp_path / 'export'}",
                       "--mean=" + ",".join(map(str, io["mean"])), "--std=" + ",".join(map(str, io["std"])))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "wrote beit" in result.stdout and "format timm" in result.stdout
  assert _parity_error(classifier.load_classifier(tmp_path / "export"), io) < PARITY_TOL


def test_bfloat16_compute_keeps_the_argmax(fixtures_dir):
  io = _io(fixtures_dir, "hf_vit_small")
  converted = convert_hf_vit.convert_hf_model(fixtures_dir / "hf_vit_small", mean=io["mean"], std=io["std"])
  f32, bf16 = converted.to_classifier(), converted.to_classifier("bfloat16")
  got = np.asarray(jax.jit(bf16)(io["x01_nhwc"]))
  assert got.dtype == np.float32 and float(np.max(np.abs(got - np.asarray(f32(io["x01_nhwc"]))))) < 0.1


def test_hf_image_processor_sets_the_default_normalisation(fixtures_dir, tmp_path):
  model_dir = tmp_path / "hf"
  shutil.copytree(fixtures_dir / "hf_vit_small", model_dir)
  assert convert_hf_vit.convert_hf_model(model_dir).mean == (0.5, 0.5, 0.5)  # ViTImageProcessor's default
  (model_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.5, 0.6],
                                                                   "image_std": [0.2, 0.3, 0.4]}))
  converted = convert_hf_vit.convert_hf_model(model_dir)
  assert converted.mean == (0.4, 0.5, 0.6) and converted.std == (0.2, 0.3, 0.4)
  assert convert_hf_vit.convert_hf_model(model_dir, mean=[0.1] * 3).mean == (0.1, 0.1, 0.1)


# ---- presets: built abstractly, counted ---------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [("vit_base_patch16_224", 86_567_656),
                                            ("beit_large_patch16_512", 305_674_728)])
def test_published_presets_have_their_parameter_counts(name, expected):
  arch = convert_vit.TIMM_PRESETS[name]
  module_name, kwargs = convert_vit.timm_module(arch, 1000)
  count = vit.num_params(get_model(module_name, **kwargs), (arch.img_size, arch.img_size, 3))
  print(f"{name}: {count:,} parameters")
  assert count == expected
  # The upstream state dict the converter expects holds exactly those numbers.
  assert sum(int(np.prod(s)) for e in convert_vit.timm_entries(arch, 1000) for _, s in e.sources) == expected


def test_hf_vit_b16_with_ten_labels_has_its_parameter_count():
  arch = convert_hf_vit.hf_arch_from_config(HF_VIT_B16)
  module_name, kwargs = convert_hf_vit.hf_module(arch, 10)
  count = vit.num_params(get_model(module_name, **kwargs), (224, 224, 3))
  print(f"HF ViT-B/16, 10 labels: {count:,} parameters")
  assert count == 85_806_346


@pytest.mark.parametrize("name", sorted(convert_vit.TIMM_PRESETS))
def test_every_preset_matches_its_flax_model(name):
  """The converter's table of upstream tensors maps onto exactly the Flax model's parameters."""
  arch = convert_vit.TIMM_PRESETS[name]
  module_name, kwargs = convert_vit.timm_module(arch, 7)
  entries = convert_vit.timm_entries(arch, 7)
  variables = {"params": {}}
  for entry in entries:
    node = variables["params"]
    for part in entry.flax_path[:-1]:
      node = node.setdefault(part, {})
    node[entry.flax_path[-1]] = entry.combine([np.zeros(s, np.float32) for _, s in entry.sources])
  vit_state_dict.check_against_module(variables, module_name, kwargs, (arch.img_size, arch.img_size, 3))


# ---- state dicts that do not fit ----------------------------------------------------------------------------


def test_unknown_arch_lists_the_presets(fixtures_dir):
  pytest.importorskip("torch", reason=TORCH_REASON)
  with pytest.raises(ConversionError, match=r"arch='vit_huge_patch14_224' is not a known.*beit_large_patch16_512"):
    convert_vit.convert_transformer(fixtures_dir / "timm_vit_small.pth", "timm", arch="vit_huge_patch14_224")
  with pytest.raises(ConversionError, match=r"format 'timm' needs the architecture's name"):
    convert_vit.convert_transformer(fixtures_dir / "timm_vit_small.pth", "timm")


def test_wrong_architecture_names_the_first_mismatch(fixtures_dir):
  pytest.importorskip("torch", reason=TORCH_REASON)
  pth = fixtures_dir / "timm_vit_small.pth"
  with pytest.raises(ConversionError, match=r"timm vit_tiny_patch16_224: cls_token has shape \(1, 1, 96\) in the "
                                            r"file but \(1, 1, 192\)"):
    convert_vit.convert_timm_checkpoint(pth, "vit_tiny_patch16_224")
  # A ViT state dict read as BEiT: the first BEiT tensor it lacks.
  with pytest.raises(ConversionError, match=r"blocks\.0\.gamma_1 \(shape \(96,\)\) is missing"):
    convert_vit.convert_timm_checkpoint(pth, fixtures_dir / "timm_beit_small_config.json")


def test_truncated_and_extended_state_dicts_fail_clearly(fixtures_dir, tmp_path):
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  arch = fixtures_dir / "timm_beit_small_config.json"
  state = torch.load(fixtures_dir / "timm_beit_small.pth", map_location="cpu", weights_only=True)
  short = dict(list(state.items())[:-5])  # saved before the last block finished
  torch.save(short, tmp_path / "short.pth")
  with pytest.raises(ConversionError, match=r"blocks\.2\.mlp\.fc2\.bias \(shape \(96,\)\) is missing \(the file "
                                            r"looks truncated\)"):
    convert_vit.convert_timm_checkpoint(tmp_path / "short.pth", arch)
  torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, tmp_path / "headless.pth")
  with pytest.raises(ConversionError, match=r"head\.weight \(shape \(\?, 96\)\) is missing"):
    convert_vit.convert_timm_checkpoint(tmp_path / "headless.pth", arch)
  torch.save({**state, "blocks.0.attn.k_bias": torch.zeros(96)}, tmp_path / "extra.pth")
  with pytest.raises(ConversionError, match=r"blocks\.0\.attn\.k_bias \(shape \(96,\)\) is not part of"):
    convert_vit.convert_timm_checkpoint(tmp_path / "extra.pth", arch)
  with pytest.raises(ConversionError, match=r"num_classes=1000 was asked.*'head\.weight' has 10 outputs"):
    convert_vit.convert_timm_checkpoint(fixtures_dir / "timm_beit_small.pth", arch, num_classes=1000)
  data = (fixtures_dir / "timm_beit_small.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
  with pytest.raises(ConversionError, match=r"truncated, corrupt"):
    convert_vit.convert_timm_checkpoint(tmp_path / "cut.pth", arch)


def test_old_timm_relative_position_index_buffers_are_checked(fixtures_dir, tmp_path):
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  arch = fixtures_dir / "timm_beit_small_config.json"
  state = torch.load(fixtures_dir / "timm_beit_small.pth", map_location="cpu", weights_only=True)
  index = torch.from_numpy(vit.relative_position_index(8, 8).astype(np.int64))
  torch.save({**state, **{f"blocks.{i}.attn.relative_position_index": index for i in range(3)}}, tmp_path / "a.pth")
  convert_vit.convert_timm_checkpoint(tmp_path / "a.pth", arch)
  torch.save({**state, "blocks.1.attn.relative_position_index": index.T.contiguous()}, tmp_path / "b.pth")
  with pytest.raises(ConversionError, match=r"blocks\.1\.attn\.relative_position_index differs"):
    convert_vit.convert_timm_checkpoint(tmp_path / "b.pth", arch)


def test_broken_hf_directories_fail_clearly(fixtures_dir, tmp_path):
  model_dir = tmp_path / "hf"
  shutil.copytree(fixtures_dir / "hf_vit_small", model_dir)
  weights = model_dir / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[:-1000])
  with pytest.raises(ConversionError, match=r"tensor vit\..* needs bytes \[\d+, \d+\) of \d+; the file is "
                                            r"truncated or corrupt"):
    convert_hf_vit.convert_hf_model(model_dir)
  weights.write_bytes(data[:100])
  with pytest.raises(ConversionError, match=r"the header claims \d+ bytes .* truncated"):
    convert_hf_vit.convert_hf_model(model_dir)
  weights.unlink()
  with pytest.raises(ConversionError, match=r"has no weights: expected model\.safetensors"):
    convert_hf_vit.convert_hf_model(model_dir)
  config = json.loads((fixtures_dir / "hf_vit_small" / "config.json").read_text())
  (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
  shutil.copy(fixtures_dir / "hf_vit_small" / "model.safetensors", weights)
  with pytest.raises(ConversionError, match=r"vit\.encoder\.layer\.3\.attention\.attention\.query\.weight "
                                            r"\(shape \(96, 96\)\) is missing"):
    convert_hf_vit.convert_hf_model(model_dir)
  (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "deit"}))
  with pytest.raises(ConversionError, match=r"model_type='deit'; only Hugging Face ViT"):
    convert_hf_vit.convert_hf_model(model_dir)


def test_safetensors_reader_widens_half_precision(tmp_path):
  values = np.array([[1.5, -2.25], [3.0, 0.125]], np.float32)
  blobs = {"f16": values.astype(np.float16).tobytes(), "bf16": (values.view(np.uint32) >> 16).astype("<u2").tobytes(),
           "f32": values.tobytes()}
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, dtype in (("f16", "F16"), ("bf16", "BF16"), ("f32", "F32")):
    header[name] = {"dtype": dtype, "shape": [2, 2], "data_offsets": [offset, offset + len(blobs[name])]}
    offset += len(blobs[name])
  text = json.dumps(header).encode()
  (tmp_path / "t.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs.values()))
  tensors = convert_hf_vit.read_safetensors(tmp_path / "t.safetensors")
  for name in blobs:
    np.testing.assert_array_equal(np.asarray(tensors[name], np.float32), values)

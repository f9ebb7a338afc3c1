r"""Converts a PyTorch classifier (ResNet, timm ViT / BEiT, Hugging Face ViT) into a scoresmooth_jax classifier export.

    python scripts/convert_torch_classifier.py \
      --checkpoint=/path/to/resnet20-12fca82f.th --output=/tmp/resnet20 \
      --eval_npz=/path/to/cifar10_test_first1017.npz
    # a timm state dict (torch.save(model.state_dict())); --arch: its timm name, or a JSON of constructor arguments
    python scripts/convert_torch_classifier.py --format=timm --arch=beit_large_patch16_512 \
      --checkpoint=models/beit_large_patch16_512.pth --output=workdirs/beit_large_patch16_512
    # a Hugging Face ViTForImageClassification directory (config.json + model.safetensors or pytorch_model.bin)
    python scripts/convert_torch_classifier.py --format=hf --checkpoint=models/vit-cifar10 \
      --output=workdirs/vit_b16_cifar10

ResNet formats, detection and checks: see ``scoresmooth_jax.modelio.convert``; ViT and BEiT:
``scoresmooth_jax.modelio.convert_vit`` (timm presets: ``convert_vit.TIMM_PRESETS``). The export is read back with
``scoresmooth_jax.modelio.classifier.load_classifier`` before the script reports success, and, with --eval_npz, its
top-1 accuracy is printed as "N / M = xx.xx %". Needs PyTorch (`pip install torch==2.13.0`).
"""

from __future__ import annotations

from absl import app
from absl import flags

from scoresmooth_jax.modelio import classifier
from scoresmooth_jax.modelio import convert
from scoresmooth_jax.modelio import convert_vit
from scoresmooth_jax.runtime import xla_cpu

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint file (torch.save) to convert, or a Hugging "
                                  "Face model directory (--format=hf).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the classifier export to (overwritten).")
_FORMAT = flags.DEFINE_enum("format", "auto", list(convert.FORMATS) + list(convert_vit.FORMATS),
                            "Checkpoint format; 'auto' detects akamaster, cohen and torchvision checkpoints; 'timm' "
                            "(needs --arch) and 'hf' are vision transformers.")
_ARCH = flags.DEFINE_string("arch", None, "--format=timm: the timm model name (e.g. vit_base_patch16_224, "
                            "beit_large_patch16_512) or a JSON file {\"timm_class\", \"kwargs\"} of its constructor "
                            "arguments.")
_MEAN = flags.DEFINE_list("mean", None, "Per-channel mean of [0, 1] images, e.g. 0.4914,0.4822,0.4465; "
                          "overrides the format's default.")
_STD = flags.DEFINE_list("std", None, "Per-channel std of [0, 1] images; overrides the format's default.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "Expected number of classes (checked against the head).")
_TRUST = flags.DEFINE_bool(
    "trust_checkpoint", False,
    "Allow full unpickling (torch.load weights_only=False) when the weights-only reader refuses the file. "
    "RISKY: unpickling can run arbitrary code embedded in the checkpoint; use only for files whose source you "
    "trust.")
_EVAL_NPZ = flags.DEFINE_string("eval_npz", None, ".npz with `images` (NHWC, uint8 or [0, 1] floats) and "
                                "`labels`; prints the converted model's top-1 accuracy on it.")
_EVAL_BATCH_SIZE = flags.DEFINE_integer("eval_batch_size", 256, "Images per evaluation batch.")


def _floats(name: str, values):
  if values is None:
    return None
  try:
    return [float(v) for v in values]
  except ValueError:
    raise app.UsageError(f"--{name}={','.join(values)} must be comma-separated numbers.") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --flags.")
  if not _CHECKPOINT.value or not _OUTPUT.value:
    raise app.UsageError("--checkpoint and --output are required.")
  xla_cpu.apply_recommended_cpu_flags()  # before the first computation starts JAX's backend
  common = dict(num_classes=_NUM_CLASSES.value, mean=_floats("mean", _MEAN.value), std=_floats("std", _STD.value),
                trust_checkpoint=_TRUST.value)
  try:
    if _FORMAT.value in convert_vit.FORMATS:
      converted = convert_vit.convert_transformer(_CHECKPOINT.value, _FORMAT.value, arch=_ARCH.value, **common)
    elif _ARCH.value is not None:
      raise convert.ConversionError(f"--arch is for --format=timm; --format={_FORMAT.value} reads the "
                                    "architecture from the checkpoint.")
    else:
      converted = convert.convert_torch_checkpoint(_CHECKPOINT.value, format=_FORMAT.value, **common)
  except (convert.ConversionError, ImportError) as err:
    # The message says what is wrong and what to do; a traceback would only bury it.
    raise SystemExit(f"convert_torch_classifier: {err}") from None
  path = converted.export(_OUTPUT.value)
  clf = classifier.load_classifier(path)  # proves the export is complete and loadable
  print(f"wrote {converted.module_name} {converted.model_kwargs} (mean {converted.mean}, std {converted.std}, "
        f"input {converted.image_shape}, format {converted.metadata['source_format']}) to {path}")
  if _EVAL_NPZ.value:
    images, labels = classifier.load_eval_npz(_EVAL_NPZ.value)
    correct = classifier.accuracy(clf, images, labels, _EVAL_BATCH_SIZE.value)
    print(f"accuracy on {_EVAL_NPZ.value}: {classifier.format_accuracy(correct, len(labels))}")


if __name__ == "__main__":
  app.run(main)

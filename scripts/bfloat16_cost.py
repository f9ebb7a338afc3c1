"""What a bfloat16 score network costs against float32: one-step PSNR and changed predictions
(benchmarks.bfloat16_cost).

Run (CPU, about 15 minutes on 2 cores for the shipped model, 1017 images, 4 draws per image at each sigma):
  python scripts/bfloat16_cost.py --score cifar10-cpu --images cifar10_test_first1017.npz \
      --classifier resnet20-12fca82f.th --out runs/bfloat16_cost.json
--images: an .npz with uint8 "images" [N, H, W, C] and "labels" [N]. --classifier: a classifier export directory
or a PyTorch CIFAR ResNet checkpoint (converted with modelio.convert, BatchNorm folded).
"""

import json
import os
import pathlib
import sys

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: benchmarks/ is not installed

from scoresmooth_jax.runtime import cli, xla_cpu

_SCORE = flags.DEFINE_string("score", "cifar10-cpu", "Score model: export dir, shipped name, score_sde:... or "
                             "openai:... (as the certification job's denoiser.score).")
_IMAGES = flags.DEFINE_string("images", None, "An .npz with uint8 images [N, H, W, C] and labels [N].")
_CLASSIFIER = flags.DEFINE_string("classifier", None, "Classifier export directory or PyTorch checkpoint (.th/.pt); "
                                  "without it only the PSNR is measured.")
_SIGMAS = flags.DEFINE_list("sigmas", ["0.12", "0.25", "0.5", "1.0"], "Gaussian noise levels.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 0, "Use the first this many images (0: all).")
_DRAWS = flags.DEFINE_integer("draws_per_image", 4, "Noisy draws per image and sigma for the prediction changes.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")


def _classifier(path):
  from scoresmooth_jax.modelio import classifier, convert  # pylint: disable=import-outside-toplevel

  if os.path.isfile(path):
    return convert.convert_torch_checkpoint(path).to_classifier().folded()
  return classifier.load_classifier(path, fold_batchnorm=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _IMAGES.value:
    raise app.UsageError("--images is required: an .npz with uint8 images [N, H, W, C] and labels [N].")
  xla_cpu.apply_recommended_cpu_flags()  # before the first computation starts JAX's backend
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from benchmarks import bfloat16_cost  # pylint: disable=import-outside-toplevel
  from scoresmooth_jax.modelio import score_models  # pylint: disable=import-outside-toplevel

  with np.load(_IMAGES.value, allow_pickle=False) as data:
    images, labels = data["images"].astype(np.float32) / 255.0, data["labels"]
  if _NUM_IMAGES.value:
    images, labels = images[:_NUM_IMAGES.value], labels[:_NUM_IMAGES.value]
  sigmas = [float(s) for s in _SIGMAS.value]
  score_fn = score_models.load_score(_SCORE.value)
  key = jax.random.key(_SEED.value)
  results = {"score": _SCORE.value, "images": len(images), "sigmas": sigmas, "seed": _SEED.value,
             "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}
  results["psnr_db"] = bfloat16_cost.psnr_cost(score_fn, images, sigmas, key)
  print("| sigma | one-step PSNR float32 (dB) | bfloat16 (dB) | difference (dB) |\n|---|---|---|---|")
  for sigma, row in results["psnr_db"].items():
    print(f"| {sigma:g} | {row['float32']:.3f} | {row['bfloat16']:.3f} | {row['difference_db']:+.3f} |", flush=True)
  if _CLASSIFIER.value:
    results["classifier"] = _CLASSIFIER.value
    results["draws_per_image"] = _DRAWS.value
    changes = bfloat16_cost.prediction_changes(score_fn, _classifier(_CLASSIFIER.value), images, labels, sigmas,
                                               _DRAWS.value, jax.random.fold_in(key, 1))
    results["prediction_changes"] = changes
    print("\n| sigma | draws | changed, bfloat16 denoiser | changed, both bfloat16 | accuracy float32 | "
          "bfloat16 denoiser | both bfloat16 |\n|---|---|---|---|---|---|---|")
    for sigma, row in changes.items():
      share, acc = row["changed_share"], row["accuracy"]
      print(f"| {sigma:g} | {row['draws']} | {share['bfloat16_denoiser']:.2%} ({row['changed']['bfloat16_denoiser']}) "
            f"| {share['bfloat16_both']:.2%} ({row['changed']['bfloat16_both']}) | {acc['float32']:.2%} | "
            f"{acc['bfloat16_denoiser']:.2%} | {acc['bfloat16_both']:.2%} |")
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1, default=str)
    print(f"\nJSON: {os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
  cli.run(main)

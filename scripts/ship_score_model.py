"""Ships a trained score model inside the package (or to --out_dir), with its model card.

  .venv/bin/python scripts/ship_score_model.py --workdir workdirs/cifar10_cpu/stage5 --name cifar10-cpu \
      --store_dtype=float16 --test_npz data/cifar10_test.npz \
      --command "python scripts/train_score.py --config configs/score_cifar10.py:cpu_stage5 --workdir ..." \
      --data "CIFAR-10 training split, 50,000 images as JPEG (29.90 dB against the originals)"

Reads ``<workdir>/export`` and ``<workdir>/metrics.jsonl``, measures the denoising PSNR table on the lossless
test images (noisy, one-step, annealed with the library defaults; ``evaluate.denoising_psnr``, key 0) and the
CI check (one-step PSNR on the first 64 test images at sigma 0.25, key 0, which tests/test_shipped.py
recomputes), then writes ``scoresmooth_jax/shipped/<name>.{npz,json,md}`` (``export.ship_score_model``), or the same
files to --out_dir. ``--store_dtype=auto --max_mib=16`` stores the parameters in the most precise of float32,
float16 and int8 (``modelio/quantize.py``) whose file fits 16 MiB; every figure of the card is measured on that
stored copy, loaded back from the file as users load it.
"""

import json
import pathlib

import jax
import numpy as np
from absl import flags
from flax import traverse_util

from scoresmooth_jax.datasets import data
from scoresmooth_jax.modelio import checkpoint, export, quantize
from scoresmooth_jax.runtime import cli, xla_cpu
from scoresmooth_jax.training import evaluate

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir (export/ and metrics.jsonl).")
_NAME = flags.DEFINE_string("name", None, "Short name users load the model by.")
_COMMAND = flags.DEFINE_string("command", "", "The training command, for the card.")
_DATA = flags.DEFINE_string("data", "", "What the model was trained on, for the card.")
_NOTES = flags.DEFINE_string("notes", "", "Anything else a user should know (e.g. the run's history), for the card.")
_TEST = flags.DEFINE_string("test_npz", None, "Held-out test images (.npz with images and labels) for the card's PSNR.")
_SIGMAS = flags.DEFINE_list("sigmas", ["0.12", "0.25", "0.5", "1.0"], "Noise levels of the PSNR table.")
_STORE_DTYPE = flags.DEFINE_enum("store_dtype", "float32", [*export.STORE_DTYPES, "auto"],
                                  "Parameter storage; float16 halves the file, int8 quarters it (the PSNR is measured "
                                  "on it); auto: the most precise that fits --max_mib.")
_MAX_MIB = flags.DEFINE_float("max_mib", 0.0, "Largest file allowed, in MiB (0: no limit); shipping fails above it.")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where to write <name>.{npz,json,md} (default: the package's "
                               "scoresmooth_jax/shipped).")
_TRAINED_ON = flags.DEFINE_string("trained_on", "", "The hardware it was trained on, for the card (default: this "
                                  "machine's devices; set it when shipping from another machine).")
_ANNEALED_IMAGES = flags.DEFINE_integer("annealed_images", 1017, "Test images of the annealed column (costly).")
flags.mark_flags_as_required(["workdir", "name", "test_npz"])

CHECK = dict(num_images=64, sigma=0.25, seed=0)


def _training_curve(metrics_file: pathlib.Path):
  """(eval records [(step, {sigma: one-step dB})], wall time in s, images per eval or None) from metrics.jsonl."""
  curve, seconds, last_step, examples = [], 0.0, None, None
  for line in metrics_file.read_text().splitlines():
    record = json.loads(line)
    if "steps_per_sec" in record:
      if last_step is not None and record["step"] > last_step and record["steps_per_sec"] > 0:
        seconds += (record["step"] - last_step) / record["steps_per_sec"]
      last_step = record["step"]
    elif "eval/psnr/denoised/0.25" in record:
      curve.append((record["step"], {k.rsplit("/", 1)[1]: round(v, 2) for k, v in record.items()
                                     if k.startswith("eval/psnr/denoised/")}))
      examples = record.get("eval/examples", examples)
  return curve, seconds, examples


def _local_hardware() -> str:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"{xla_cpu.xla_cpu_threads()} CPU cores"
  return f"{jax.device_count()} x {device.device_kind}"


STORAGE = {"float32": "float32", "float16": "float16",
           "int8": "int8 with one float32 scale per output channel (vectors in float32)"}


def _card_markdown(name: str, card: dict) -> str:
  table = card["psnr_db"]
  size = f" ({card['file_mib']:.2f} MiB)" if card.get("file_mib") else ""
  precision = f" in {card['train_compute_dtype']} mixed precision" if card.get("train_compute_dtype") else ""
  lines = [f"# `{name}`: model card", "", f"- Data: {card['data']}", f"- Command: `{card['command']}`",
           f"- Model: {card['model']} ({card['parameters']:,} parameters), EMA parameters"
           f" stored as {STORAGE[card.get('stored_dtype', 'float32')]}{size}, the copy the PSNR table below is"
           " measured on",
           f"- Training: {card['train_steps']} steps, {card['train_wall_time_min']:.0f} min of training steps on "
           f"{card['trained_on']}{precision}",
           f"- Noise range: sigma in [{card['sigma_min']:g}, {card['sigma_max']:g}]",
           *([f"- Notes: {card['notes']}"] if card.get("notes") else []),
           "", f"Denoising PSNR (dB, peak 1, no clipping) on {card['psnr_images']}: noisy, one-step (Tweedie), "
           "annealed (library defaults: 10 levels x 3 steps, to sigma 0.01)", "",
           "| sigma | noisy | one-step | annealed |", "|---|---|---|---|"]
  lines += [f"| {s} | {v['noisy']:.2f} | {v['one_step']:.2f} | {v.get('annealed', float('nan')):.2f} |"
            for s, v in table.items()]
  curve_images = f"{card['curve_images']} test images" if card.get("curve_images") else "the run's evaluation images"
  lines += ["", f"Training curve (one-step PSNR on {curve_images}, EMA parameters in float32):", "",
            "| step | " + " | ".join(f"sigma {s}" for s in card["training_curve"][0][1]) + " |",
            "|---|" + "---|" * len(card["training_curve"][0][1])]
  lines += [f"| {step} | " + " | ".join(f"{v:.2f}" for v in psnrs.values()) + " |"
            for step, psnrs in card["training_curve"]]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  xla_cpu.apply_recommended_cpu_flags()
  workdir = pathlib.Path(_WORKDIR.value)
  out_dir = pathlib.Path(_OUT_DIR.value) if _OUT_DIR.value else export.shipped_dir()
  max_bytes = int(_MAX_MIB.value * 2**20)
  store_dtype = _STORE_DTYPE.value
  if store_dtype == "auto":
    if not max_bytes:
      raise ValueError("--store_dtype=auto chooses by size: give --max_mib (e.g. 16).")
    variables, _ = checkpoint.load_model(workdir / "export", kind=export.KIND)
    store_dtype = quantize.smallest_fitting(traverse_util.flatten_dict(variables[export.EMA_PARAMS], sep="/"),
                                            max_bytes)
  # Ship first and measure the stored copy (float16 / int8 rounding included), then rewrite it with the full card.
  npz = export.ship_score_model(workdir / "export", _NAME.value, {}, out_dir=out_dir, store_dtype=store_dtype)
  if max_bytes and npz.stat().st_size > max_bytes:
    raise ValueError(f"{npz} is {npz.stat().st_size / 2**20:.2f} MiB as {store_dtype}, over --max_mib="
                         f"{_MAX_MIB.value:g}; store it in a smaller precision (--store_dtype=auto picks one).")
  score_fn = export.load_score_fn(str(npz))  # the stored copy, read back from its file as users load it
  source = data.get_source(f"npz:{_TEST.value}", "test")
  images = source.get_batch(np.arange(len(source)))[0]
  sigmas = [float(s) for s in _SIGMAS.value]
  everything = _ANNEALED_IMAGES.value >= len(images)  # one pass when the annealed column covers every image
  table = evaluate.denoising_psnr(score_fn, images, sigmas, jax.random.key(0), annealed=everything)
  if not everything:
    annealed = evaluate.denoising_psnr(score_fn, images[:_ANNEALED_IMAGES.value], sigmas, jax.random.key(0))
    for sigma in sigmas:
      table[sigma]["annealed"] = annealed[sigma]["annealed"]
  check = evaluate.denoising_psnr(score_fn, images[:CHECK["num_images"]], [CHECK["sigma"]],
                                  jax.random.key(CHECK["seed"]), annealed=False)[CHECK["sigma"]]
  curve, seconds, curve_images = _training_curve(workdir / "metrics.jsonl")
  meta = score_fn.metadata
  card = {
      "data": _DATA.value, "command": _COMMAND.value, "notes": _NOTES.value,
      "model": f"{meta['model']}({meta['model_kwargs']})", "stored_dtype": store_dtype,
      "file_mib": npz.stat().st_size / 2**20, "train_compute_dtype": meta.get("train_compute_dtype"),
      "parameters": int(sum(a.size for a in jax.tree.leaves(score_fn.params))),
      "train_steps": meta.get("train_steps"), "train_wall_time_min": seconds / 60.0,
      "trained_on": _TRAINED_ON.value or _local_hardware(),
      "sigma_min": score_fn.sigma_min, "sigma_max": score_fn.sigma_max,
      "psnr_images": f"the first {len(images)} CIFAR-10 test images (annealed column: the first "
                     f"{min(_ANNEALED_IMAGES.value, len(images))})",
      "psnr_db": {f"{s:g}": v for s, v in table.items()}, "training_curve": curve, "curve_images": curve_images,
      # lets scripts/cifar10_results.py reuse the table instead of measuring it again
      "psnr_setup": evaluate.psnr_setup(_TEST.value, len(images), sigmas, 0) if everything else None,
      "ci_check": {**CHECK, "one_step_psnr": check["one_step"]},
  }
  npz = export.ship_score_model(workdir / "export", _NAME.value, card, out_dir=out_dir, store_dtype=store_dtype)
  (npz.parent / f"{_NAME.value}.md").write_text(_card_markdown(_NAME.value, card))
  print(_card_markdown(_NAME.value, card))
  print(f"wrote {npz} ({npz.stat().st_size / 2**20:.2f} MiB) and its card")


if __name__ == "__main__":
  cli.run(main)

"""Real CIFAR-10 results of the shipped score model: PSNR table, Fig. 1-style grid, certification tables.

  python scripts/cifar10_results.py --fixtures_dir /path/to/fixtures --workdir workdirs/cifar10_results
      # about 3 h on 2 CPU cores; with --batch_size 1000 184 s on one H200 GPU, most of it compiling

On the lossless test images of ``--fixtures_dir`` (the first 1017 of the official CIFAR-10 test split):
  1. denoising PSNR (noisy, one-step, annealed with the library defaults) at each --psnr_sigmas, taken from the
     model card where shipping measured the same table (evaluate.card_psnr_table) ->
     psnr.md / psnr.json;
     and the one-step PSNR of the same images JPEG-encoded as the training data was (--jpeg_quality, 4:2:0):
     the training domain, which shows what the lossy training copies cost on lossless images ->
     psnr_jpeg.md / psnr_jpeg.json;
     and the one-step PSNR both pooled (the card's) and as denoising papers average it, per image ->
     psnr_per_image.md / psnr_per_image.json;
  2. a grid of clean, noisy, one-step and annealed levels at sigma 0.25 and 1.0 -> denoising.png;
  3. certification of the real pretrained ResNet-20 (converted from the PyTorch checkpoint with the package)
     with no denoiser and one-step at each --sigmas on the first --num_images images, and the annealed
     denoiser (--num_levels x --steps_per_level) under Gaussian, Laplace and uniform noise at
     --annealed_sigma on the first --annealed_images images -> certify/<run>/ (Cohen-format records);
  4. certified-accuracy tables (``report.table``, what scripts/analyze.py prints): table_l2.md for the
     Gaussian runs, table_l1.md for Laplace and uniform.
Every step resumes: re-running with the same --workdir reuses finished steps and certification records.
"""

import json
import pathlib
import time

import jax
import numpy as np
from absl import flags, logging

from scoresmooth_jax import noise
from scoresmooth_jax.certification import certify_job, figures, report
from scoresmooth_jax.datasets import data
from scoresmooth_jax.modelio import convert, export
from scoresmooth_jax.runtime import cli, xla_cpu
from scoresmooth_jax.runtime.configs_util import load_config
from scoresmooth_jax.training import evaluate

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/cifar10_results", "Where every output goes.")
_SCORE = flags.DEFINE_string("score", "cifar10-cpu", "Score model: shipped name or export directory.")
_FIXTURES = flags.DEFINE_string("fixtures_dir", None, "Folder with cifar10_test_first1017.npz "
                                "and resnet20-12fca82f.th.")
_PSNR_SIGMAS = flags.DEFINE_list("psnr_sigmas", ["0.12", "0.25", "0.5", "1.0"], "Noise levels of the PSNR table.")
_PSNR_IMAGES = flags.DEFINE_integer("psnr_images", 1017, "Test images of the PSNR table.")
_JPEG_QUALITY = flags.DEFINE_integer("jpeg_quality", 75, "JPEG quality of the training copies (Pillow's default, "
                                     "as the training copies were saved) for psnr_jpeg; 0 skips it.")
_SIGMAS = flags.DEFINE_list("sigmas", ["0.12", "0.25", "0.5"], "Noise levels certified without and with one-step.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 100, "First test images certified (no denoiser, one-step).")
_ANNEALED_SIGMA = flags.DEFINE_float("annealed_sigma", 0.25, "Noise level of the annealed runs.")
_ANNEALED_IMAGES = flags.DEFINE_integer("annealed_images", 20, "First test images certified with annealing.")
_LEVELS = flags.DEFINE_integer("num_levels", 5, "Annealing levels L of the certification runs (the quickstart's).")
_STEPS = flags.DEFINE_integer("steps_per_level", 2, "Annealing steps per level T of the certification runs.")
_N0 = flags.DEFINE_integer("n0", 100, "Selection draws per image.")
_N = flags.DEFINE_integer("n", 1000, "Estimation draws per image.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of each certificate.")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Draws per device per step.")
_L2_RADII = flags.DEFINE_list("l2_radii", ["0", "0.25", "0.5", "0.75"], "Columns of the l2 table.")
_L1_RADII = flags.DEFINE_list("l1_radii", ["0", "0.25", "0.5", "1.0"], "Columns of the l1 table.")

flags.mark_flag_as_required("fixtures_dir")

TEST_IMAGES = "cifar10_test_first1017.npz"
RESNET20 = "resnet20-12fca82f.th"


def _classifier(root: pathlib.Path, fixtures: pathlib.Path) -> str:
  path = root / "resnet20"
  if not (path / "metadata.json").exists():
    convert.convert_torch_checkpoint(fixtures / RESNET20).export(path)
  return str(path)


def _psnr_table(score_fn, images, root: pathlib.Path) -> tuple[dict, str]:
  out = root / "psnr.json"
  if out.exists():
    table = {float(k): v for k, v in json.loads(out.read_text()).items()}
  else:
    sigmas = [float(s) for s in _PSNR_SIGMAS.value]
    images = images[:_PSNR_IMAGES.value]
    setup = evaluate.psnr_setup(TEST_IMAGES, len(images), sigmas, 0)
    table = evaluate.card_psnr_table(score_fn.metadata, setup)  # shipping measured it already
    if table is None:
      table = evaluate.denoising_psnr(score_fn, images, sigmas, jax.random.key(0))
    out.write_text(json.dumps(table, indent=1))
  lines = ["| sigma | noisy | one-step | annealed (10 x 3) |", "|---|---|---|---|"]
  lines += [f"| {s:g} | {v['noisy']:.2f} | {v['one_step']:.2f} | {v['annealed']:.2f} |" for s, v in table.items()]
  markdown = "\n".join(lines) + "\n"
  (root / "psnr.md").write_text(markdown)
  return table, markdown


def _jpeg_psnr_table(score_fn, images, lossless: dict, root: pathlib.Path) -> str:
  """One-step PSNR on the JPEG versions of the PSNR images (clean = the JPEG), beside the lossless figures."""
  out = root / "psnr_jpeg.json"
  if out.exists():
    result = json.loads(out.read_text())
  else:
    images = images[:_PSNR_IMAGES.value]
    jpeg = evaluate.jpeg_roundtrip(images, _JPEG_QUALITY.value)
    gap = evaluate.psnr(float(np.mean(np.square(jpeg.astype(np.float64) - images))))
    sigmas = [float(s) for s in _PSNR_SIGMAS.value]  # same order and key as psnr.json: the same noise
    table = evaluate.denoising_psnr(score_fn, jpeg, sigmas, jax.random.key(0), annealed=False)
    result = {"quality": _JPEG_QUALITY.value, "images": len(images), "jpeg_vs_lossless_db": gap,
              "one_step_db": {f"{s:g}": table[s]["one_step"] for s in sigmas}}
    out.write_text(json.dumps(result, indent=1))
  lines = [f"JPEG quality {result['quality']} (4:2:0) against the lossless images: "
           f"{result['jpeg_vs_lossless_db']:.2f} dB over {result['images']} images.", "",
           "| sigma | noisy | one-step, lossless | one-step, JPEG |", "|---|---|---|---|"]
  lines += [f"| {s:g} | {v['noisy']:.2f} | {v['one_step']:.2f} | {result['one_step_db'][f'{s:g}']:.2f} |"
            for s, v in lossless.items()]
  markdown = "\n".join(lines) + "\n"
  (root / "psnr_jpeg.md").write_text(markdown)
  return markdown


def _per_image_psnr_table(score_fn, images, root: pathlib.Path) -> str:
  """One-step PSNR of the PSNR images, pooled over them (the card's figure) and averaged per image (papers')."""
  out = root / "psnr_per_image.json"
  if out.exists():
    result = json.loads(out.read_text())
  else:
    images = images[:_PSNR_IMAGES.value]
    sigmas = [float(s) for s in _PSNR_SIGMAS.value]  # same order and key as psnr.json: the same noise
    table = evaluate.denoising_psnr(score_fn, images, sigmas, jax.random.key(0), annealed=False, per_image=True)
    result = {"images": len(images), "db": {f"{s:g}": row for s, row in table.items()}}
    out.write_text(json.dumps(result, indent=1))
  lines = [f"One-step PSNR over {result['images']} images: of the pooled squared error (the tables above) and the "
           "mean of each image's PSNR (denoising papers' convention).", "",
           "| sigma | noisy | one-step, pooled | one-step, mean per image |", "|---|---|---|---|"]
  lines += [f"| {s} | {v['noisy']:.2f} | {v['one_step']:.2f} | {v['one_step/per_image']:.2f} |"
            for s, v in result["db"].items()]
  markdown = "\n".join(lines) + "\n"
  (root / "psnr_per_image.md").write_text(markdown)
  return markdown


def _certify(root, name, classifier, kind, noise_type, sigma, num_images):
  config = load_config("configs/certify_cifar10.py")
  with config.unlocked():
    config.dataset.name = f"npz:{pathlib.Path(_FIXTURES.value) / TEST_IMAGES}"
    config.dataset.skip, config.dataset.max = 1, num_images
    config.classifier.path = classifier
    config.denoiser.kind, config.denoiser.score = kind, _SCORE.value
    config.denoiser.num_levels, config.denoiser.steps_per_level = _LEVELS.value, _STEPS.value
    config.noise.type, config.noise.sigma = noise_type, sigma
    config.certify.n0, config.certify.n, config.certify.alpha = _N0.value, _N.value, _ALPHA.value
    config.certify.batch_size = _BATCH.value
  workdir = root / "certify" / name.replace(" ", "_").replace("=", "")
  print(f"--- certify: {name} ({num_images} images)", flush=True)
  return certify_job.run_certification(config, workdir)


def main(argv):
  del argv
  xla_cpu.apply_recommended_cpu_flags()  # before the first computation starts JAX's backend
  logging.set_verbosity(logging.WARNING)
  root, fixtures = pathlib.Path(_WORKDIR.value), pathlib.Path(_FIXTURES.value)
  root.mkdir(parents=True, exist_ok=True)
  start = time.time()
  score_fn = export.load_score_fn(_SCORE.value)
  source = data.get_source(f"npz:{fixtures / TEST_IMAGES}", "test")
  images = source.get_batch(np.arange(len(source)))[0]  # however many the file holds (1017 in the fixtures)
  table, psnr = _psnr_table(score_fn, images, root)
  print(f"denoising PSNR (dB) on {min(_PSNR_IMAGES.value, len(images))} test images:\n{psnr}", flush=True)
  if _JPEG_QUALITY.value:
    print(f"one-step PSNR (dB) in the training data's JPEG domain:\n"
          f"{_jpeg_psnr_table(score_fn, images, table, root)}", flush=True)
  print(f"one-step PSNR, pooled and per image:\n{_per_image_psnr_table(score_fn, images, root)}", flush=True)
  rows = figures.denoising_rows(score_fn, images[:3], [noise.Gaussian(0.25), noise.Gaussian(1.0)],
                                jax.random.key(0))
  figures.save_grid(rows, root / "denoising.png")
  evaluated = time.time()

  classifier = _classifier(root, fixtures)
  l2_runs, l1_runs = {}, {}
  for sigma in (float(s) for s in _SIGMAS.value):
    for label, kind in (("no denoiser", "none"), ("one-step", "one_step")):
      name = f"{label} sigma={sigma:g}"
      l2_runs[name] = _certify(root, name, classifier, kind, "gaussian", sigma, _NUM_IMAGES.value)
  sigma = _ANNEALED_SIGMA.value
  for noise_type in ("gaussian", "laplace", "uniform"):
    name = f"annealed {noise_type} sigma={sigma:g}"
    records = _certify(root, name, classifier, "annealed", noise_type, sigma, _ANNEALED_IMAGES.value)
    (l2_runs if noise_type == "gaussian" else l1_runs)[name] = records
  certified = time.time()

  for norm, runs, radii in (("l2", l2_runs, _L2_RADII.value), ("l1", l1_runs, _L1_RADII.value)):
    markdown, csv_text = report.table(runs, [float(r) for r in radii])
    (root / f"table_{norm}.md").write_text(markdown)
    (root / f"table_{norm}.csv").write_text(csv_text)
    print(f"\nCertified accuracy (%), {norm} radii, n0={_N0.value}, n={_N.value}, alpha={_ALPHA.value}:\n{markdown}")
  print(f"PSNR and figure {evaluated - start:.0f}s, certification {certified - evaluated:.0f}s, "
        f"total {time.time() - start:.0f}s; wrote {root}/{{psnr,psnr_jpeg,psnr_per_image,table_l2,table_l1}}.md, "
        f"{root / 'denoising.png'}")


if __name__ == "__main__":
  cli.run(main)

r"""The paper's Table 1 protocol on your classifiers and denoisers: certification at each sigma, best over sigma.

  python scripts/paper_table.py --workdir workdirs/paper_table \
      --dataset npz:/path/cifar10_test_first1017.npz --num_images 100 --images_at 0.12=50 \
      --row one-step=exports/resnet44@cifar10-cpu \
      --row white-box=exports/resnet20_gaussian_{sigma}

Each --row is NAME=CLASSIFIER (no denoiser) or NAME=CLASSIFIER@SCORE (one-step denoiser with that score model,
a shipped name or an export); ``{sigma}`` in CLASSIFIER picks a classifier per sigma (white-box smoothing trains
one per noise level). Every (row, sigma) is an ordinary certification job in <workdir>/<row>/sigma_<s>/ with
n0, N and alpha of the paper (100, 10,000, 0.001) and sequential certification told the table's radii, so each
image stops drawing once its column in the table is settled. The same command resumes where it stopped;
--report_only writes the tables from the records so far without certifying.

Writes <workdir>/table.md (best over sigma beside the published rows, then per row and sigma: certified
accuracy, largest certifiable radius, draws per image, hours), best.csv and curves.png.
"""

import pathlib
import time

from absl import flags, logging

from scoresmooth_jax.certification import certify_job, paper_table, report
from scoresmooth_jax.runtime import cli, xla_cpu

_WORKDIR = flags.DEFINE_string("workdir", None, "Where records and tables go; reused to resume.")
_ROWS = flags.DEFINE_multi_string("row", None, "NAME=CLASSIFIER or NAME=CLASSIFIER@SCORE (repeat for more rows).")
_DATASET = flags.DEFINE_string("dataset", "cifar10", "Test images: npz:/path.npz, folder:/path or a tfds name "
                               "(its test split).")
_SIGMAS = flags.DEFINE_list("sigmas", [f"{s:g}" for s in paper_table.PAPER_SIGMAS], "Noise levels, in the "
                            "order they are certified.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 100, "The first images of the dataset certified at each sigma.")
_IMAGES_AT = flags.DEFINE_list("images_at", [], "SIGMA=COUNT: fewer images at some sigmas, e.g. 0.12=50.")
_RADII = flags.DEFINE_list("radii", [f"{r:g}" for r in paper_table.PAPER_RADII], "The table's l2 radii.")
_N0 = flags.DEFINE_integer("n0", 100, "Selection draws per image.")
_N = flags.DEFINE_integer("n", 10_000, "Estimation draws per image at most (the paper's N).")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of each certificate.")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Draws per device per step (0: from XLA's memory estimate).")
_SEED = flags.DEFINE_integer("seed", 0, "Image i uses the key fold_in(key(seed), i) at every sigma.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Write the tables from the records so far; certify nothing.")
flags.mark_flags_as_required(["workdir", "row"])


def main(argv):
  del argv
  xla_cpu.apply_recommended_cpu_flags()  # before the first computation starts JAX's backend
  logging.set_verbosity(logging.WARNING)
  rows = [paper_table.parse_row(text) for text in _ROWS.value]
  caps = paper_table.parse_caps(_IMAGES_AT.value)
  sigmas = [float(s) for s in _SIGMAS.value]
  radii = [float(r) for r in _RADII.value]
  root = pathlib.Path(_WORKDIR.value)
  root.mkdir(parents=True, exist_ok=True)
  start = time.time()
  results = {row.name: {} for row in rows}
  for row in rows:
    for sigma in sigmas:
      workdir = paper_table.run_dir(root, row, sigma)
      num_images = min(_NUM_IMAGES.value, caps.get(sigma, _NUM_IMAGES.value))
      if _REPORT_ONLY.value:
        has_records = workdir.is_dir() and any(workdir.glob("certify*.jsonl"))
        records = report.load_records(workdir) if has_records else []
      else:
        print(f"--- {row.name}, sigma={sigma:g}: {num_images} images -> {workdir}", flush=True)
        config = paper_table.job_config(row, sigma, dataset=_DATASET.value, num_images=num_images, n0=_N0.value,
                                        n=_N.value, alpha=_ALPHA.value, batch_size=_BATCH.value, radii=radii,
                                        seed=_SEED.value)
        records = certify_job.run_certification(config, workdir)
      results[row.name][sigma] = [r for r in records if r["idx"] < num_images]
  text = paper_table.markdown(results, radii, n=_N.value, alpha=_ALPHA.value, n0=_N0.value)
  (root / "table.md").write_text(text)
  (root / "best.csv").write_text(paper_table.best_csv(results, radii))
  curves = paper_table.plot(results, root / "curves.png", max_radius=max(radii) + 0.1)
  print(f"\n{text}\nwall time of this command {time.time() - start:,.0f} s; wrote {root / 'table.md'}, "
        f"{root / 'best.csv'}, {curves}")


if __name__ == "__main__":
  cli.run(main)

"""Certified-accuracy table (Markdown + CSV) and curves (PNG) of one or more certification runs.

  python scripts/analyze.py --run one_step=workdirs/certify_onestep --run cohen=path/to/cohen.tsv \
      --radii 0,0.25,0.5,0.75,1 --out_dir workdirs/report
A run is NAME=PATH, PATH a certify workdir, one of our .jsonl files, or a Cohen-format TSV.
Inconsistent records are listed; with --strict they make the script fail.
"""

import pathlib
import sys

from absl import app, flags

from scoresmooth_jax.certification import report
from scoresmooth_jax.runtime import cli

_RUNS = flags.DEFINE_multi_string("run", None, "NAME=PATH of a run (repeat the flag for several runs).")
_RADII = flags.DEFINE_list("radii", ["0", "0.25", "0.5", "0.75", "1.0"], "Radii of the table's columns.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where table.md, table.csv and curves.png go (optional).")
_MAX_RADIUS = flags.DEFINE_float("max_radius", None, "Right end of the plot (default: largest radius).")
_STRICT = flags.DEFINE_bool("strict", False, "Fail when any run's records are inconsistent.")
flags.mark_flag_as_required("run")


def main(argv):
  del argv
  runs = {}
  for item in _RUNS.value:
    name, sep, path = item.partition("=")
    if not sep:
      raise app.UsageError(f"--run {item!r}: expected NAME=PATH.")
    runs[name] = report.load_records(path)
  bad = False
  for name, recs in runs.items():
    for problem in report.check(recs):
      bad = True
      print(f"WARNING {name}: {problem}", file=sys.stderr)
  radii = [float(r) for r in _RADII.value]
  markdown, csv_text = report.table(runs, radii)
  print(markdown)
  for name, recs in runs.items():
    draws = report.draws_summary(recs)
    if draws:
      print(f"{name}: {draws}")
  if _OUT_DIR.value:
    out = pathlib.Path(_OUT_DIR.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown)
    (out / "table.csv").write_text(csv_text)
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {report.plot(runs, out / 'curves.png', _MAX_RADIUS.value)}")
  if bad and _STRICT.value:
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)

"""Certified-accuracy tables and curves from certification records (ours or Cohen et al.'s TSVs).

Certified accuracy at radius r is the fraction of images whose smoothed prediction is correct with a
certified radius >= r (Cohen et al.'s definition; an ABSTAIN is never correct). Inputs:

* a workdir of ``scripts/certify.py``: every ``certify*.jsonl`` in it, merged (one file per process);
* a ``.jsonl`` file of ours;
* a Cohen-format TSV (``idx label predict radius correct time``, tab separated, with a header).

``check`` lists what makes records inconsistent: a ``correct`` that is not 0/1 or disagrees with
predict == label, duplicate indices, a radius > 0 on ABSTAIN, a negative or non-finite radius.
"""

from __future__ import annotations

import csv
import io
import json
import math
import pathlib
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

ABSTAIN = -1


def load_records(path) -> list[dict]:
  """Records from a workdir, a .jsonl file or a Cohen TSV (see the module docstring)."""
  path = pathlib.Path(path)
  if path.is_dir():
    files = sorted(path.glob("certify*.jsonl"))
    if not files:
      raise FileNotFoundError(f"{path} holds no certify*.jsonl records; is it the --workdir of "
                              "scripts/certify.py?")
    return [r for f in files for r in load_records(f)]
  if not path.is_file():
    raise FileNotFoundError(f"no records at {path}.")
  if path.suffix == ".jsonl":
    from scoresmooth_jax.certification import records as records_lib
    return records_lib.read_jsonl(path)[0]
  return _read_tsv(path)


def _read_tsv(path: pathlib.Path) -> list[dict]:
  with open(path, newline="") as f:
    reader = csv.DictReader(f, delimiter="\t")
    missing = {"idx", "label", "predict", "radius", "correct"} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"{path} is not a Cohen-format certification TSV: missing columns {sorted(missing)} "
                       f"(found {reader.fieldnames}).")
    out = []
    for row in reader:
      out.append(dict(idx=int(row["idx"]), label=int(row["label"]), predict=int(row["predict"]),
                      radius=float(row["radius"]), correct=_number(row["correct"])))
    return out


def _number(text: str):
  value = float(text)
  return int(value) if value.is_integer() else value


def check(records: Sequence[Mapping]) -> list[str]:
  """Problems that make a set of records inconsistent; empty when all is well."""
  problems = []
  counts = Counter(int(r["idx"]) for r in records)
  duplicates = sorted(i for i, c in counts.items() if c > 1)
  if duplicates:
    problems.append(f"duplicate indices {duplicates[:10]}{' ...' if len(duplicates) > 10 else ''}")
  for r in records:
    idx, correct, radius, predict = r["idx"], r["correct"], float(r["radius"]), int(r["predict"])
    if correct not in (0, 1):
      problems.append(f"idx {idx}: correct={correct!r} is not 0/1")
    elif correct != int(predict == int(r["label"])):
      problems.append(f"idx {idx}: correct={correct} but predict={predict}, label={r['label']}")
    if not math.isfinite(radius) or radius < 0:
      problems.append(f"idx {idx}: radius={radius} is not a finite non-negative number")
    elif predict == ABSTAIN and radius > 0:
      problems.append(f"idx {idx}: radius={radius} > 0 on ABSTAIN")
  return problems


def certified_accuracy(records: Sequence[Mapping], radii: Sequence[float]) -> np.ndarray:
  """Fraction of records with correct == 1 and radius >= r, for each r in ``radii`` (float64)."""
  if not records:
    return np.full(len(radii), np.nan)
  correct = np.asarray([r["correct"] == 1 for r in records])
  radius = np.asarray([float(r["radius"]) for r in records])
  return np.asarray([(correct & (radius >= r)).mean() for r in radii], np.float64)


def _norm(records: Sequence[Mapping]) -> str:
  norms = {r.get("norm", "?") for r in records}
  return norms.pop() if len(norms) == 1 else "mixed"


def table(runs: Mapping[str, Sequence[Mapping]], radii: Sequence[float]) -> tuple[str, str]:
  """(Markdown, CSV) tables: one row per run, certified accuracy (%) at each radius."""
  header = ["run", "norm", "images"] + [f"r={r:g}" for r in radii]
  rows = []
  for name, recs in runs.items():
    acc = certified_accuracy(recs, radii)
    rows.append([name, _norm(recs), str(len(recs))] + [f"{100 * a:.1f}" for a in acc])
  md = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
  md += ["| " + " | ".join(row) + " |" for row in rows]
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  return "\n".join(md) + "\n", buf.getvalue()


def plot(runs: Mapping[str, Sequence[Mapping]], path, max_radius: float | None = None,
         title: str = "") -> pathlib.Path:
  """Approximate certified-accuracy curves of several runs on one plot (PNG), like the paper's Fig. 2."""
  import matplotlib  # optional extra "plot": only the plotting path needs it
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  if max_radius is None:
    max_radius = max([float(r["radius"]) for recs in runs.values() for r in recs] + [0.1]) * 1.05
  grid = np.linspace(0.0, max_radius, 300)
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name, recs in runs.items():
    ax.plot(grid, certified_accuracy(recs, grid), label=f"{name} ({_norm(recs)})")
  ax.set_xlabel("radius")
  ax.set_ylabel("certified accuracy")
  ax.set_ylim(0.0, 1.0)
  ax.set_xlim(0.0, max_radius)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def draws_summary(records: Sequence[Mapping]) -> str | None:
  """Mean draws per image (n0 + n used) and their ratio to a fixed-n run's n0 + n_max; None without counts.

  Sequential certification (``certify.sequential``) records the estimation draws each image used as ``n`` and
  the budget as ``n_max``; a fixed-n run uses the budget on every image (ratio 1).
  """
  if not records or any("n" not in r for r in records):
    return None  # e.g. Cohen-format TSVs, which do not record draws
  used = np.asarray([r.get("n0", 0) + r["n"] for r in records], np.float64)
  fixed = np.asarray([r.get("n0", 0) + r.get("n_max", r["n"]) for r in records], np.float64)
  return (f"{used.mean():,.0f} draws per image (n0 + n), {100 * used.sum() / fixed.sum():.1f} % of fixed "
          f"n0 + n = {fixed.mean():,.0f}")


def summary_json(runs: Mapping[str, Sequence[Mapping]], radii: Sequence[float]) -> str:
  """The table as JSON, for scripts that compare runs."""
  return json.dumps({name: dict(norm=_norm(recs), images=len(recs),
                                certified_accuracy=dict(zip(map(str, radii),
                                                            certified_accuracy(recs, radii).tolist())))
                     for name, recs in runs.items()}, indent=1)

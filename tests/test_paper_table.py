"""The paper-protocol table: best over sigma from per-sigma records, the published rows, and the command end to end."""

import csv
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresmooth_jax import models
from scoresmooth_jax.certification import paper_table, report
from scoresmooth_jax.modelio import classifier, export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(radii_and_correct):
  """Hand-made certification records: (radius, correct) per image; radius None is an abstention."""
  out = []
  for idx, (radius, correct) in enumerate(radii_and_correct):
    predict = -1 if radius is None else (3 if correct else 4)
    out.append(dict(idx=idx, label=3, predict=predict, correct=int(predict == 3), radius=radius or 0.0,
                    n0=100, n=1000 + idx))
  return out


def test_best_over_sigma_takes_each_radius_from_its_own_winner():
  radii = [0.0, 0.25, 0.5, 0.75, 1.0]
  runs = {
      # small sigma: accurate, certifies little (4 of 4 correct at r = 0, none past 0.3)
      0.25: _records([(0.3, True), (0.3, True), (0.1, True), (0.2, True)]),
      # large sigma: less accurate, certifies far (2 of 4 past 0.75)
      0.5: _records([(0.9, True), (0.8, True), (None, False), (0.4, False)]),
      # a run with nothing correct never wins
      1.0: _records([(None, False)] * 4),
  }
  best = paper_table.best_over_sigma(runs, radii)
  np.testing.assert_allclose(best.accuracy, [1.0, 0.5, 0.5, 0.5, 0.0])
  # r = 0.25: 0.25 and 0.5 tie at 2 of 4, the smaller sigma is named; r = 0.5, 0.75: only sigma 0.5 certifies.
  assert best.sigma[:4] == (0.25, 0.25, 0.5, 0.5)
  for k, r in enumerate(radii):  # the definition, radius by radius
    assert best.accuracy[k] == max(report.certified_accuracy(recs, [r])[0] for recs in runs.values())


def test_best_over_sigma_compares_sigmas_over_their_own_images():
  # sigma 0.12 certified on half as many images, as the paper table command allows (--images_at)
  runs = {0.12: _records([(0.3, True), (0.0, False)]), 0.25: _records([(0.3, True)] + [(None, False)] * 3)}
  best = paper_table.best_over_sigma(runs, [0.25])
  assert best.accuracy[0] == 0.5 and best.sigma == (0.12,)
  assert np.isnan(paper_table.best_over_sigma({0.5: []}, [0.25]).accuracy[0])


def test_markdown_sets_our_rows_beside_every_published_row():
  runs = {"ours": {0.25: _records([(0.3, True), (0.6, True)]), 0.5: _records([(1.1, True), (None, False)])}}
  text = paper_table.markdown(runs, paper_table.PAPER_RADII, n=10_000, alpha=0.001, n0=100)
  assert "| ours (ours) | 100.0 | 100.0 | 50.0 | 50.0 | 50.0 | 0.0 | 0.0 |" in text
  for name, values in paper_table.PUBLISHED.items():
    assert f"| {name} |  | " + " | ".join(map(str, values)) + " |" in text
  assert paper_table.PUBLISHED["the paper (one-step score denoiser)"] == (60, 42, 28, 19, 11, 6)
  assert "within sampling" in text  # the table says it was certified sequentially


def test_largest_certifiable_radius_is_the_all_hits_bound():
  # every one of N = 10,000 draws a hit, at the last look's level alpha / K (K = 7 looks from 157 to 10,000)
  from scipy import stats
  from scoresmooth_jax import sequential

  the_plan = sequential.plan(10_000, 0.001)
  assert len(the_plan.looks) == 7
  p = (the_plan.alphas[-1]) ** (1 / 10_000)  # Clopper-Pearson lower bound with k = n
  assert paper_table.largest_certifiable(0.12, 10_000, 0.001) == pytest.approx(0.12 * stats.norm.ppf(p), rel=1e-6)
  assert 0.36 < paper_table.largest_certifiable(0.12, 10_000, 0.001) < 0.39  # so 0.12 competes only at r = 0.25


@pytest.mark.parametrize("text, match", [("no-classifier", "NAME=CLASSIFIER"), ("=path", "NAME=CLASSIFIER")])
def test_bad_rows_name_the_format(text, match):
  with pytest.raises(ValueError, match=match):
    paper_table.parse_row(text)


def test_rows_and_caps_parse():
  row = paper_table.parse_row("white box=exports/clf_{sigma}@cifar10-cpu")
  assert (row.name, row.classifier_at(0.25), row.score, row.folder) == (
      "white box", "exports/clf_0.25", "cifar10-cpu", "white_box")
  assert paper_table.parse_row("plain=exports/clf").score is None
  assert paper_table.parse_caps(["0.12=50"]) == {0.12: 50}
  with pytest.raises(ValueError, match="SIGMA=COUNT"):
    paper_table.parse_caps(["0.12=zero"])


def _exports(root):
  """Random-weight digits classifiers (one per sigma, as white-box rows have) and a score model."""
  shape, kwargs = (8, 8, 1), dict(depth=8, num_classes=10, shortcut="A")
  module = models.get_model("cifar_resnet", **kwargs)
  for seed, sigma in enumerate(("0.25", "0.5")):
    variables = module.init(jax.random.key(seed), jnp.zeros((1, *shape)))
    classifier.export_classifier(root / f"clf_{sigma}", "cifar_resnet", kwargs, variables, [0.5], [0.25], 10, shape)
  score_kwargs = dict(channels=4, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), max_groups=4)
  params = models.get_model("score_unet", **score_kwargs).init(jax.random.key(9), jnp.zeros((1, *shape)),
                                                               jnp.ones((1,)))["params"]
  export.export_score_model(root / "score", "score_unet", score_kwargs, params, params, shape, 0.01, 1.0)


def _run(root, *extra):
  cmd = [sys.executable, "scripts/paper_table.py", f"--workdir={root / 'table'}", "--dataset=digits",
         "--num_images=3", "--images_at=0.25=2", "--sigmas=0.25,0.5", "--n0=8", "--n=64", "--batch_size=16",
         f"--row=plain={root / 'clf_0.25'}", f"--row=white-box={root / 'clf_{sigma}'}",
         f"--row=one-step={root / 'clf_0.25'}@{root / 'score'}", *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_table_command_end_to_end_and_a_rerun_reuses_every_record(tmp_path):
  _exports(tmp_path)
  done = _run(tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  table = tmp_path / "table"
  runs = {}
  for name, folder in (("plain", "plain"), ("white-box", "white-box"), ("one-step", "one-step")):
    runs[name] = {s: report.load_records(table / folder / f"sigma_{s:g}") for s in (0.25, 0.5)}
    assert [len(runs[name][s]) for s in (0.25, 0.5)] == [2, 3]  # --images_at caps sigma 0.25
    for recs in runs[name].values():
      assert all(r["n"] <= 64 and r["n_max"] == 64 for r in recs)  # sequential, budget N
  # the per-sigma classifier of the white-box row: at sigma 0.25 it is the plain row's classifier, same key
  strip = lambda recs: [{k: v for k, v in r.items() if k not in ("time", "samples_per_s")} for r in recs]
  assert strip(runs["white-box"][0.25]) == strip(runs["plain"][0.25])
  with open(table / "best.csv") as f:
    best = {row["row"]: row for row in csv.DictReader(f)}
  radii = paper_table.PAPER_RADII
  for name, by_sigma in runs.items():
    expected = paper_table.best_over_sigma(by_sigma, radii).accuracy
    assert [float(best[f"{name} (ours)"][f"r={r:g}"]) for r in radii] == pytest.approx(100 * expected, abs=0.051)
  assert set(paper_table.PUBLISHED) <= set(best)
  text = (table / "table.md").read_text()
  assert "the paper (one-step score denoiser) |  | 60 | 42 | 28 | 19 | 11 | 6 |" in text
  assert (table / "curves.png").stat().st_size > 0

  before = {p: p.read_bytes() for p in table.rglob("certify*.jsonl")}
  again = _run(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "samples/s" not in again.stdout  # nothing was certified again
  assert {p: p.read_bytes() for p in table.rglob("certify*.jsonl")} == before
  assert (table / "table.md").read_text() == text


def test_a_missing_classifier_is_one_line_and_exit_status_2(tmp_path):
  done = subprocess.run([sys.executable, "scripts/paper_table.py", f"--workdir={tmp_path}", "--dataset=digits",
                         f"--row=plain={tmp_path / 'nowhere'}", "--sigmas=0.25"], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
  assert done.returncode == 2
  assert "Traceback" not in done.stderr and "nowhere" in done.stderr.strip().splitlines()[-1]

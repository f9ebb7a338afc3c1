"""scripts/cifar10_results.py end to end at toy size: the shipped model, the real ResNet-20, every output, resume.

The real run (1017 PSNR images, 100 certified images, n = 1,000) takes hours; here 4 PSNR images, 2 certified
images and a few dozen draws exercise the same code path: conversion of the PyTorch checkpoint, the PSNR table
(measured, since 4 images are not the card's setup), the grid, the five certification runs and both tables.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(workdir, fixtures_dir):
  cmd = [sys.executable, "scripts/cifar10_results.py", f"--workdir={workdir}", f"--fixtures_dir={fixtures_dir}",
         "--psnr_images=4", "--psnr_sigmas=0.25", "--sigmas=0.25", "--num_images=2", "--annealed_images=1",
         "--num_levels=1", "--steps_per_level=1", "--n0=8", "--n=16", "--batch_size=2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", PYTHONUNBUFFERED="1")
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result.stdout


def _table_rows(path):
  return {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:3]
          for line in path.read_text().splitlines()[2:]}


def test_toy_run_writes_every_table_and_a_rerun_reuses_them(tmp_path, fixtures_dir):
  pytest.importorskip("torch")  # the ResNet-20 comes from a PyTorch checkpoint
  workdir = tmp_path / "results"
  stdout = _run(workdir, fixtures_dir)

  psnr = json.loads((workdir / "psnr.json").read_text())["0.25"]
  assert 11.5 < psnr["noisy"] < 12.6  # sigma 0.25 on [0, 1]: 20 log10(1 / 0.25) = 12.04 dB
  assert psnr["one_step"] > psnr["noisy"] + 6  # the shipped model denoises (about +12 dB on the card)
  assert psnr["annealed"] > psnr["noisy"] + 6
  assert "| 0.25 |" in (workdir / "psnr.md").read_text()
  jpeg = json.loads((workdir / "psnr_jpeg.json").read_text())
  assert jpeg["quality"] == 75 and jpeg["images"] == 4
  assert 28 < jpeg["jpeg_vs_lossless_db"] < 32  # 29.8 dB on these 4 (29.9 on all 1017)
  assert jpeg["one_step_db"]["0.25"] > psnr["noisy"] + 6  # the same noise on the JPEG versions
  assert f"| 0.25 | {psnr['noisy']:.2f} | {psnr['one_step']:.2f} |" in (workdir / "psnr_jpeg.md").read_text()
  per_image = json.loads((workdir / "psnr_per_image.json").read_text())
  assert per_image["images"] == 4
  row = per_image["db"]["0.25"]
  assert abs(row["one_step"] - psnr["one_step"]) < 1e-4  # the same noise as psnr.json, pooled the same way
  assert row["one_step/per_image"] >= row["one_step"]  # Jensen
  assert f"| 0.25 | {psnr['noisy']:.2f} | {psnr['one_step']:.2f} | {row['one_step/per_image']:.2f} |" in (
      workdir / "psnr_per_image.md").read_text()

  with Image.open(workdir / "denoising.png") as grid:
    assert grid.format == "PNG" and min(grid.size) >= 3 * 32  # three images, at least 32 pixels each

  l2 = _table_rows(workdir / "table_l2.md")
  assert l2 == {"no denoiser sigma=0.25": ["l2", "2"], "one-step sigma=0.25": ["l2", "2"],
                "annealed gaussian sigma=0.25": ["l2", "1"]}
  l1 = _table_rows(workdir / "table_l1.md")
  assert l1 == {"annealed laplace sigma=0.25": ["l1", "1"], "annealed uniform sigma=0.25": ["l1", "1"]}
  assert "Certified accuracy (%), l2 radii" in stdout and "Certified accuracy (%), l1 radii" in stdout
  records = sorted(workdir.glob("certify/*/certify.jsonl"))
  assert len(records) == 5
  labels = np.load(fixtures_dir / "cifar10_test_first1017.npz")["labels"][:2]
  first = [json.loads(line) for line in records[0].read_text().splitlines()]
  assert [r["label"] for r in first] == labels[:len(first)].tolist()  # images in file order, true labels

  # A rerun reuses everything: records carry their wall time, so recomputed ones would differ byte for byte.
  before = {p: p.read_bytes() for p in [workdir / "psnr.json", workdir / "psnr_jpeg.json",
                                        workdir / "psnr_per_image.json", *records]}
  _run(workdir, fixtures_dir)
  assert {p: p.read_bytes() for p in before} == before

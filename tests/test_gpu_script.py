"""scripts/gpu_cifar10.sh end to end at toy size on CPU: probe, training, int8 shipping, deadline, resume.

The GPU run probes widths of :gpu for 15 s each, trains for minutes and certifies 100 images with N = 10,000; here
a one-level :gpu_tiny network, a second of probing, a few steps and two images with 32 draws run the same
commands, so the GPU run's plumbing is what CI checks.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from scoresmooth_jax import denoise, models
from scoresmooth_jax.certification import report
from scoresmooth_jax.datasets import data
from scoresmooth_jax.modelio import classifier, export
from scoresmooth_jax.training import evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
WIDTHS = (8, 4)


def _inputs(tmp_path):
  rng = np.random.default_rng(0)
  with tarfile.open(tmp_path / "train.tar.gz", "w:gz") as tar:
    for name in ("airplane", "truck"):
      for i in range(8):
        image = tmp_path / f"{name}{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
        tar.add(image, f"train/{name}/{i}.jpg")
  np.savez(tmp_path / "test.npz", images=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
           labels=np.arange(8) % 2)
  kwargs = {"depth": 8, "num_classes": 10, "shortcut": "A", "width": 4}
  module = models.get_model("cifar_resnet", **kwargs)
  variables = jax.jit(lambda key: module.init(key, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
  classifier.export_classifier(tmp_path / "clf", "cifar_resnet", kwargs, variables, (0.5,) * 3, (0.25,) * 3, 10,
                               (32, 32, 3))


def _run(tmp_path, *flags, out="out", sigmas="0.25,0.5"):
  cmd = ["bash", "scripts/gpu_cifar10.sh", "--data_tar", str(tmp_path / "train.tar.gz"),
         "--images", str(tmp_path / "test.npz"), "--classifier", str(tmp_path / "clf"), "--out", str(tmp_path / out),
         "--work", str(tmp_path / "work"), "--python", sys.executable, "--variant", "gpu_tiny",
         "--widths", ",".join(map(str, WIDTHS)), "--probe_seconds", "0.5", "--train_seconds", "3", "--min_steps", "2",
         "--annealed_images", "2", "--sigmas", sigmas, "--num_images", "2", "--n0", "8", "--n", "32",
         "--batch_size", "2", "--compare", str(tmp_path / "compare"),
         # one level, one block, no attention: the same commands, compiled in seconds
         "--config_flag=--config.model.kwargs.channel_mults=(1,)",
         "--config_flag=--config.model.kwargs.num_res_blocks=1",
         "--config_flag=--config.model.kwargs.attention_resolutions=()", "--ship_flag=--store_dtype=int8", *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", PYTHONUNBUFFERED="1")
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_toy_gpu_run_ships_an_int8_model_whose_card_is_the_stored_copys(tmp_path):
  _inputs(tmp_path)
  out, work = tmp_path / "out", tmp_path / "work"
  # A deadline already passed when certification starts: it stops at once, everything before it is kept.
  first = _run(tmp_path, "--deadline", "1")
  assert first.returncode == 124, first.stdout[-3000:] + first.stderr[-3000:]
  assert "paper_table.py stopped (exit 124" in first.stdout
  # Seven files, few enough for a machine that returns only a handful (results.tar.gz holds the rest); the
  # tables are of the records finished by the deadline: none here.
  assert sorted(p.name for p in out.iterdir()) == ["cifar10.json", "cifar10.md", "cifar10.npz", "probe.md",
                                                   "results.tar.gz", "run.log", "table.md"]
  with tarfile.open(out / "results.tar.gz") as tar:
    assert {"probe/probe.json", "probe/probe.md", "run/metrics.jsonl"} <= set(tar.getnames())
    probe = json.load(tar.extractfile("probe/probe.json"))

  # The probe: the widest width whose rate fills 90 % of the budget with >= min_steps; the run trained it.
  rates = {c["channels"]: c["steps_per_sec"] for c in probe["candidates"]}
  assert list(rates) == list(WIDTHS) and all(r > 0 for r in rates.values())
  budget = {w: int(rates[w] * 3 * 0.9) // 2 * 2 for w in WIDTHS}  # :gpu_tiny dispatches 2 steps at a time
  chosen = next(w for w in WIDTHS if budget[w] >= 2)
  assert (probe["chosen"]["channels"], probe["chosen"]["num_steps"]) == (chosen, budget[chosen])

  # The shipped model: int8, the chosen width, trained in bfloat16; its card measured on the stored copy.
  score_fn = export.load_score_fn(str(out / "cifar10.npz"))
  meta, card = score_fn.metadata, score_fn.metadata["model_card"]
  assert meta["stored_dtype"] == "int8" and meta["model_kwargs"]["channels"] == chosen
  assert meta["train_steps"] == budget[chosen] and meta["train_compute_dtype"] == "bfloat16"
  assert "Width chosen on 8 x cpu" in card["notes"]
  assert "int8 with one float32 scale" in (out / "cifar10.md").read_text()
  images = data.get_source(f"npz:{tmp_path / 'test.npz'}", "test").get_batch(np.arange(8))[0]
  sigmas = [0.12, 0.25, 0.5, 1.0]
  on_card = {s: card["psnr_db"][f"{s:g}"]["one_step"] for s in sigmas}
  again = evaluate.denoising_psnr(score_fn, images, sigmas, jax.random.key(0), annealed=False)
  # The same noise and network (to XLA flags' rounding, 1e-7 dB here) ...
  assert {s: v["one_step"] for s, v in again.items()} == pytest.approx(on_card, abs=1e-5)
  # ... which is not the full-precision one: int8 rounds the kernels (by how much PSNR shows depends on how far
  # the toy model trained, which the probe decides from the machine's speed, so the parameters are compared).
  full = export.load_score_fn(work / "run" / "export").params
  assert jax.tree.structure(full) == jax.tree.structure(score_fn.params)
  assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(score_fn.params))) > 0
  # ... and its one-step output is that of the file's int8 codes times their scales.
  with np.load(out / "cifar10.npz") as arrays:
    stored = {k: arrays[k] for k in arrays.files}
  by_hand = traverse_util.unflatten_dict({k: v.astype(np.float32) * stored[k + ":int8_scale"] if v.dtype == np.int8
                                          else v for k, v in stored.items() if not k.endswith(":int8_scale")}, sep="/")
  one_step = jax.jit(lambda p, y: denoise.one_step(lambda x, s: score_fn.module.apply({"params": p}, x, s), y,
                                                   jnp.full((y.shape[0],), 0.25)))
  np.testing.assert_array_equal(one_step(score_fn.params, images), one_step(by_hand, images))

  # Another machine resumes from the output folder alone (its --work is gone): certification only, one sigma ...
  shutil.copytree(work / "run" / "export", tmp_path / "compare")  # the second row: the unquantized network
  shipped = (out / "cifar10.npz").read_bytes()
  shutil.move(work, tmp_path / "work_first")
  second = _run(tmp_path, "--resume_from", str(out), out="out2", sigmas="0.25")
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  for step in ("probe:", "training ", "shipping "):
    assert f"s] {step}" not in second.stdout
  assert (tmp_path / "out2" / "cifar10.npz").read_bytes() == shipped
  rows = ("cifar10", "_".join(str(tmp_path / "compare").split("/")))
  records = lambda row, sigma: work / "table" / row / f"sigma_{sigma}" / "certify.jsonl"
  done = {row: records(row, "0.25").read_bytes() for row in rows}
  # ... and again from that run's output, with both sigmas: its records are reused, the second sigma's added.
  shutil.move(work, tmp_path / "work_second")
  third = _run(tmp_path, "--resume_from", str(tmp_path / "out2"), out="out3")
  assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
  for row in rows:
    assert records(row, "0.25").read_bytes() == done[row]
    for sigma in ("0.25", "0.5"):
      assert [r["idx"] for r in report.load_records(records(row, sigma).parent)] == [0, 1]
  table = (tmp_path / "out3" / "table.md").read_text()
  assert "| cifar10 (ours) |" in table and "the paper (one-step score denoiser)" in table and "| 0.5 | 2 |" in table
  assert len(list((tmp_path / "out3").iterdir())) == 7
  with tarfile.open(tmp_path / "out3" / "results.tar.gz") as tar:
    assert {"table/curves.png", "table/best.csv", "table/cifar10/sigma_0.5/certify.jsonl"} <= set(tar.getnames())

"""Rows for the full OpenAI diffusion presets (``scripts/benchmark.py --openai_presets``), random weights.

Each row is the one-step (Tweedie) denoiser over a full preset + a classifier, inside ``smoothing.sample_counts``
on the current backend, once with the denoiser's weights compiled into the program as constants ("constants",
how ``_counter`` treated every classifier before weights could be arguments) and once passed as arguments
("arguments", what ``weights="auto"`` now picks for them). The classifiers: the CIFAR ResNet-110 of the other rows
(BatchNorm folded) after cifar10_uncond_50M_500K; ResNet-50 (folded) after the 256 x 256 ADM, on the central
224 x 224 crop (``certify_job.fit_images``), as an ImageNet job would run it.

Every row runs in a fresh Python process (``run_row_in_subprocess``), one at a time, so that its peak RSS is its
own and no compiled program or weight copy of an earlier row counts. Reported:
  params         parameters of the diffusion model;
  gflops_per_image  XLA's cost analysis of the lowered (not compiled) denoiser + classifier forward on one batch,
                 divided by the batch size;
  compile_s      the first sample_counts call minus a steady one: tracing, lowering and compiling;
  call_s         a steady call (num = batch size: one batch per device);
  peak_rss_gib   the process's peak RSS (VmHWM), compilation included; rss_after_gib: RSS after the calls;
  weights_gib    the float32 weights themselves, for scale.
With $SCORESMOOTH_BENCH_RSS_CAP_GIB set, a row whose RSS passes that many GiB is stopped and reported as such, so
that measuring the constants variant of a 550M-parameter model cannot take the memory of everything else running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

MODES = ("constants", "arguments")
DEFAULT_BATCH = {"cifar10_uncond_50M_500K": 4, "256x256_diffusion_uncond": 1}


def _hwm_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return 0


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _watch_rss(cap_bytes: float, row: dict) -> None:
  """Ends the process (printing ``row`` with an error) if its RSS passes ``cap_bytes``: a row that would take the
  machine's memory from everything else is reported as too large instead."""
  import threading

  start = time.perf_counter()

  def watch():
    while True:
      if _rss_bytes() > cap_bytes:
        print(json.dumps(dict(row, error=f"RSS passed the {cap_bytes / 2**30:.0f} GiB cap after "
                                         f"{time.perf_counter() - start:.0f} s; stopped")), flush=True)
        os._exit(3)
      time.sleep(0.2)

  threading.Thread(target=watch, daemon=True).start()


def measure_row(preset_name: str, weights: str, batch_size: int, sigma: float = 0.25,
                rss_cap_gib: float | None = None) -> dict:
  """Builds and measures one row in this process (see the module docstring). ``rss_cap_gib`` (default
  $SCORESMOOTH_BENCH_RSS_CAP_GIB, else none) stops a row whose RSS passes it."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from scoresmooth_jax import denoise, noise, smoothing
  from scoresmooth_jax.certification import certify_job
  from scoresmooth_jax.modelio import openai_diffusion
  from benchmarks.config import BenchmarkConfig
  from benchmarks.networks import Networks, random_openai_params

  cap = rss_cap_gib if rss_cap_gib is not None else float(os.environ.get("SCORESMOOTH_BENCH_RSS_CAP_GIB", "inf"))
  if cap != float("inf"):
    _watch_rss(cap * 2**30, {"preset": preset_name, "weights": weights, "batch_size": batch_size})
  preset = openai_diffusion.get_preset(preset_name)
  score_fn = openai_diffusion.OpenAIScoreFn(preset, random_openai_params(preset))
  params = int(sum(p.size for p in jax.tree.leaves(score_fn.params)))
  nets = Networks(BenchmarkConfig(ncsnpp=False, calibrate=False), calibrate=False)
  if preset.image_shape == (32, 32, 3):
    clf = nets.classifier("f32_folded")
    fit = lambda z: z  # noqa: E731
  else:
    clf = nets.imagenet_classifier("f32_folded")
    fit = functools.partial(certify_job.fit_images, shape=tuple(clf.image_shape), how="center_crop")

  def base_classifier(y):
    return clf(fit(jnp.clip(denoise.one_step(score_fn, y, sigma), 0.0, 1.0)))

  per_device = batch_size * jax.device_count()
  example = jax.ShapeDtypeStruct((batch_size, *preset.image_shape), jnp.float32)
  # The score function goes in as an argument: lowered with its weights closed over, the 550M-parameter program
  # alone would hold them as constants (gigabytes) before any row is measured.
  forward = jax.jit(lambda fn, y: clf(fit(jnp.clip(denoise.one_step(fn, y, sigma), 0.0, 1.0))))
  cost = forward.lower(score_fn, example).cost_analysis() or {}
  flops = float(cost.get("flops", float("nan")))
  image = jnp.asarray(np.random.default_rng(0).uniform(size=preset.image_shape).astype(np.float32))
  nz = noise.Gaussian(sigma)

  def call(seed):
    return smoothing.sample_counts(base_classifier, image, nz, per_device, jax.random.key(seed),
                                   num_classes=int(clf.num_classes), batch_size=batch_size, weights=weights)

  start = time.perf_counter()
  call(0)
  first = time.perf_counter() - start
  start = time.perf_counter()
  call(1)
  steady = time.perf_counter() - start
  return {"preset": preset_name, "weights": weights, "batch_size": batch_size, "devices": jax.device_count(),
          "backend": jax.default_backend(), "params": params, "gflops_per_image": flops / batch_size / 1e9,
          "compile_s": first - steady, "call_s": steady, "peak_rss_gib": _hwm_bytes() / 2**30,
          "rss_after_gib": _rss_bytes() / 2**30, "weights_gib": params * 4 / 2**30}


def run_row_in_subprocess(preset_name: str, weights: str, batch_size: int, timeout: float = 3600.0) -> dict:
  """``measure_row`` in a fresh Python process; its JSON line, or {"error": ...}."""
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is beside scoresmooth_jax/
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
  code = ("import json, sys; from benchmarks import openai_rows; "
          "print(json.dumps(openai_rows.measure_row(sys.argv[1], sys.argv[2], int(sys.argv[3]))), flush=True)")
  try:
    done = subprocess.run([sys.executable, "-c", code, preset_name, weights, str(batch_size)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=repo_root)
  except subprocess.TimeoutExpired:
    return {"preset": preset_name, "weights": weights, "error": f"timed out after {timeout:.0f} s"}
  lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
  if lines:
    return json.loads(lines[-1])  # a measured row, or one stopped at the RSS cap
  if done.returncode != 0 or not lines:
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"preset": preset_name, "weights": weights, "error": f"exit {done.returncode}: {' | '.join(tail)}"}
  return json.loads(lines[-1])


def openai_rows(presets=tuple(DEFAULT_BATCH), modes=MODES, log=print) -> list[dict]:
  """Every (preset, mode) row, one subprocess each, one after the other."""
  rows = []
  for name in presets:
    for mode in modes:
      log(f"openai: {name}, weights as {mode}, batch {DEFAULT_BATCH.get(name, 1)} (fresh process)")
      rows.append(run_row_in_subprocess(name, mode, DEFAULT_BATCH.get(name, 1)))
      log(json.dumps(rows[-1]))
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| preset | weights | batch | params | GFLOP/image | compile s | call s | peak RSS GiB | RSS after GiB |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['preset']} | {r['weights']} | {r.get('batch_size', '')} | | | | | {r['error']} | |")
      continue
    lines.append(f"| {r['preset']} | {r['weights']} | {r['batch_size']} | {r['params'] / 1e6:.1f}M | "
                 f"{r['gflops_per_image']:.1f} | {r['compile_s']:.1f} | {r['call_s']:.2f} | {r['peak_rss_gib']:.2f} | "
                 f"{r['rss_after_gib']:.2f} |")
  return "\n".join(lines)

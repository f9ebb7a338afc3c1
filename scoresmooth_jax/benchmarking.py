"""Benchmarks of the certification pipeline on the current JAX backend: samples/s, achieved FLOP/s, peak memory.

``run_benchmark(config)`` measures, in one process and at one per-device batch size B unless a row says otherwise:
  a      the raw jitted classifier forward pass on a batch of noisy images (CIFAR ResNet-110, option-B shortcuts as
         in Cohen et al.; random weights), float32, float32 with BatchNorm folded, bfloat16 folded;
  b      the same classifiers inside ``smoothing.sample_counts`` (noise, forward, argmax, counts kept on device),
         with the ratio b / a (target >= 0.95);
  torch  the PyTorch eager loop of ``torch_baseline`` on the same weights, when torch imports, and JAX / PyTorch
         (targets: float32 >= 1.0, bfloat16 >= 1.2);
  c      one-step (Tweedie) denoiser (a ScoreUNet) + classifier, raw and inside sample_counts (>= 0.95), and the
         full score_sde NCSN++ preset ``cifar10_ncsnpp_continuous`` + ResNet-110 (random weights, small n);
  d      the annealed denoiser (L levels x T steps) + classifier inside sample_counts, against the cost of
         L * T score forwards + one classifier forward measured on their own (target <= 1.1);
  e      one score-training step (``train_state`` + ``losses``, as ``train.py`` builds it);
  mem    sample_counts of a small classifier at n = 1,000 and n = 100,000 (target: peak memory within 10 %);
  imagenet  (``imagenet=True``) ImageNet ResNet-50 rows a and b.
It also measures bfloat16's label agreement with float32 on the same noisy batches and picks a batch size with
``batching.auto_batch_size``.

How it measures, and why:
  * Time: every variant is compiled and run once first; then the variants compared with each other run
    interleaved (A, B, C, A, B, C, ...) ``repeats`` times, and each row reports the median with its spread
    (max - min) / median. The machine may be shared, and interleaving keeps ratios fair while speed drifts.
  * FLOPs: XLA's cost analysis of the compiled single-batch program (per device). XLA counts a loop's body once,
    so looping rows (sample_counts, annealed, PyTorch) take the FLOPs of their single-batch parts.
  * Peak memory: each configuration runs again in a fresh subprocess, so no earlier row's buffers or caches
    count. Accelerators: ``memory_stats()["peak_bytes_in_use"]``. CPU (where memory_stats is None): the peak RSS
    (VmHWM) of the measured call, after compilation and one warm-up call, with the high-water mark reset through
    ``/proc/self/clear_refs`` and glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so freed buffers leave
    the RSS; reported as growth over the RSS before the call, beside the whole process's peak. Without
    clear_refs it falls back to ``ru_maxrss`` (lifetime peak, compilation included) and says so.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from scoresmooth_jax import batching
from scoresmooth_jax import classifier as classifier_lib
from scoresmooth_jax import denoise, export, losses, noise, sharding, smoothing, train_state, torch_baseline
from scoresmooth_jax.models import resnet, score_unet

MIB = 2**20

# XLA:CPU in jax 0.10.2 runs convolutions through YNNPACK fusions by default; also letting YNNPACK take the
# elementwise ops (BatchNorm, ReLU, residual adds) fuses them into the convolution subgraphs. On the 2-core
# AVX-512 machines that measured +8 % (float32) and +17 % (float32, BatchNorm folded) ResNet-110 throughput at
# batch 64, the same logits to 1e-7, and less than half the temporary memory; bfloat16 stayed within 3 % (it was
# already that fast without the flag). Measured by alternating processes with and without it. Tried and not
# better: oneDNN (xla_cpu_use_onednn), XNNPACK fusions, Eigen convolutions (YNNPACK off), 512-bit vectors.
RECOMMENDED_CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=+eltwise"

# The issue's targets: (comparison, threshold).
TARGETS = {
    "sample_counts_vs_forward.classifier": (">=", 0.95),
    "sample_counts_vs_forward.one_step": (">=", 0.95),
    "annealed_vs_expected": ("<=", 1.10),
    "jax_float32_vs_torch": (">=", 1.0),
    "jax_bfloat16_vs_torch": (">=", 1.2),
    "bfloat16_label_agreement": (">=", 0.99),
    "peak_memory_large_n_vs_small_n": ("within", 0.10),
}


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """What to benchmark. ``BenchmarkConfig()`` is the default run; ``tiny_config()`` the seconds-long test run.

  Attributes:
    batch_size: per-device batch size B of rows a, b, c and the PyTorch loop.
    depth, width, num_classes, image_shape: the CIFAR ResNet (110, 16, 10, (32, 32, 3): Cohen et al.'s).
    sigma: Gaussian noise level of the samples (and of the one-step denoiser).
    batches_per_call: batches per timed call (sample_counts draws batches_per_call * B per device).
    repeats: interleaved repetitions per comparison.
    classifier_variants: which of "f32", "f32_folded", "bf16_folded" rows a and b (and the PyTorch comparison)
      run; the last two are always built (agreement, rows c and d use them).
    unet_channels, unet_mults: the ScoreUNet of rows c, d, e.
    levels, steps_per_level, annealed_batch_size: row d's L, T and per-device batch size.
    train_batch_size: row e's per-device batch size.
    torch: time the PyTorch loop (when torch imports); torch_batches: its batches per timed call.
    ncsnpp: run the NCSN++ row; ncsnpp_batch_size, ncsnpp_num: its batch size and draws.
    imagenet: also run the ImageNet ResNet-50 rows, at imagenet_batch_size.
    memory: measure peak memory in subprocesses; memory_rows: which rows (None: all that have a probe);
      memory_workers: probes run at once (they measure memory, not time, so running them side by side is fair).
    memory_check_num: the two n of the memory check; memory_check_batch: its batch size; memory_check_shape:
      the small classifier's (H, W, C).
    agreement_images, agreement_draws: noisy samples for bfloat16 label agreement (per image).
    auto_budget_mib: memory budget per device for the auto batch size row.
    calibrate: give the random ResNet data-dependent BatchNorm statistics (``calibrate_classifier``), which makes
      the bfloat16 label agreement meaningful; costs one more compilation.
    fixtures_dir: directory with resnet20-12fca82f.th and cifar10_test_first1017.npz; adds bfloat16 agreement of
      that trained ResNet-20 on real CIFAR-10 images (needs torch to read the checkpoint).
    seed: all randomness.
  """

  batch_size: int = 64
  depth: int = 110
  width: int = 16
  num_classes: int = 10
  image_shape: tuple[int, int, int] = (32, 32, 3)
  sigma: float = 0.25
  batches_per_call: int = 3
  repeats: int = 5
  classifier_variants: tuple[str, ...] = ("f32", "f32_folded", "bf16_folded")
  unet_channels: int = 32
  unet_mults: tuple[int, ...] = (1, 2)
  levels: int = denoise.DEFAULT_NUM_LEVELS
  steps_per_level: int = denoise.DEFAULT_STEPS_PER_LEVEL
  annealed_batch_size: int = 16
  train_batch_size: int = 64
  torch: bool = True
  torch_batches: int = 2
  ncsnpp: bool = True
  ncsnpp_batch_size: int = 4
  ncsnpp_num: int = 8
  imagenet: bool = False
  imagenet_batch_size: int = 8
  memory: bool = True
  memory_rows: tuple[str, ...] | None = None
  memory_workers: int = 2
  memory_check_num: tuple[int, int] = (1_000, 100_000)
  memory_check_batch: int = 250
  memory_check_shape: tuple[int, int, int] = (8, 8, 1)
  agreement_images: int = 4
  agreement_draws: int = 128
  auto_budget_mib: int = 256
  calibrate: bool = True
  fixtures_dir: str | None = None
  seed: int = 0

  def __post_init__(self):
    for name in ("batch_size", "batches_per_call", "repeats", "levels", "steps_per_level", "annealed_batch_size",
                 "train_batch_size", "torch_batches", "ncsnpp_batch_size", "ncsnpp_num", "imagenet_batch_size",
                 "memory_check_batch", "memory_workers", "agreement_images", "agreement_draws", "auto_budget_mib"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"BenchmarkConfig.{name}={value!r} must be a positive integer.")
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f"BenchmarkConfig.depth={self.depth!r} must be 6n + 2 (e.g. 110).")
    if self.ncsnpp and tuple(self.image_shape) != (32, 32, 3):
      raise ValueError(f"the NCSN++ row needs CIFAR-size images (32, 32, 3), not {self.image_shape}; set "
                       "ncsnpp=False.")
    unknown = sorted(set(self.classifier_variants) - {"f32", "f32_folded", "bf16_folded"})
    if unknown or not self.classifier_variants:
      raise ValueError(f"BenchmarkConfig.classifier_variants={self.classifier_variants!r}: choose among 'f32', "
                       "'f32_folded' and 'bf16_folded'.")
    object.__setattr__(self, "classifier_variants", tuple(self.classifier_variants))
    object.__setattr__(self, "image_shape", tuple(int(d) for d in self.image_shape))
    object.__setattr__(self, "unet_mults", tuple(int(m) for m in self.unet_mults))
    object.__setattr__(self, "memory_check_num", tuple(int(n) for n in self.memory_check_num))
    object.__setattr__(self, "memory_check_shape", tuple(int(d) for d in self.memory_check_shape))
    if self.memory_rows is not None:
      object.__setattr__(self, "memory_rows", tuple(self.memory_rows))


def tiny_config(**overrides) -> BenchmarkConfig:
  """A few-seconds configuration for tests: a depth-8, width-4 ResNet on 8x8x3 images, tiny n everywhere."""
  settings = dict(batch_size=16, depth=8, width=4, image_shape=(8, 8, 3), batches_per_call=2, repeats=2,
                  classifier_variants=("f32_folded", "bf16_folded"),
                  unet_channels=4, unet_mults=(1,), levels=2, steps_per_level=2, annealed_batch_size=8,
                  train_batch_size=8, torch_batches=2, ncsnpp=False, memory_rows=("mem.small", "mem.large"),
                  memory_check_num=(100, 2_000), memory_check_batch=25, memory_workers=2, agreement_images=2,
                  agreement_draws=16, auto_budget_mib=16, calibrate=False)
  settings.update(overrides)
  return BenchmarkConfig(**settings)


# ------------------------------------------------------------------------------------------------------------
# Measuring.
# ------------------------------------------------------------------------------------------------------------


def _block(out):
  return jax.block_until_ready(out) if any(isinstance(x, jax.Array) for x in jax.tree.leaves(out)) else out


def _cpu_busy_seconds() -> float | None:
  """Core-seconds all CPUs have spent busy since boot (/proc/stat), or None where there is no /proc/stat."""
  try:
    with open("/proc/stat") as f:
      ticks = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return None
  return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _own_cpu_seconds() -> float:
  times = os.times()
  return times.user + times.system + times.children_user + times.children_system


@dataclasses.dataclass
class Timing:
  """Interleaved timings: seconds per call, the last outputs, and how many cores other processes kept busy
  during each call (None where /proc/stat is missing): the contention each measurement saw."""

  seconds: dict
  outputs: dict
  others_cores: dict


UNCONTENDED_CORES = 0.25  # a call during which other processes used less than this counts as uncontended


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> Timing:
  """Runs each function once, then A, B, C, A, B, C, ... ``repeats`` times, timing every call."""
  outputs = {name: _block(fn()) for name, fn in fns.items()}
  seconds = {name: [] for name in fns}
  others = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      busy, own, start = _cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
      outputs[name] = _block(fn())
      wall = time.perf_counter() - start
      seconds[name].append(wall)
      if busy is not None:
        others[name].append(max(0.0, (_cpu_busy_seconds() - busy) - (_own_cpu_seconds() - own)) / wall)
  return Timing(seconds, outputs, {k: (v or None) for k, v in others.items()})


def _median(values) -> float:
  return float(np.median(np.asarray(values, np.float64)))


def _spread(values) -> float:
  values = np.asarray(values, np.float64)
  return float((values.max() - values.min()) / np.median(values))


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def _flops(compiled) -> float:
  return float(_cost(compiled).get("flops", float("nan")))


def _xla_bytes(compiled) -> int | None:
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)


def _current_rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # 5: reset the peak RSS (Linux >= 4.0)
    return True
  except OSError:
    return False


def measure_peak_memory(run: Callable[[], Any]) -> dict:
  """Peak memory of one call of ``run`` in this process (see the module docstring for the method)."""
  gc.collect()
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    before = stats.get("bytes_in_use", 0)
    _block(run())
    peak = device.memory_stats()["peak_bytes_in_use"]
    return {"method": "memory_stats peak_bytes_in_use", "growth_bytes": int(peak - before), "peak_bytes": int(peak)}
  if os.path.exists("/proc/self/statm") and _reset_hwm():
    before = _current_rss()
    _block(run())
    peak = _hwm()
    return {"method": "VmHWM after clear_refs reset (CPU RSS)", "growth_bytes": int(peak - before),
            "peak_bytes": int(peak)}
  scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
  _block(run())
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
  return {"method": "ru_maxrss (lifetime peak, compilation included)", "growth_bytes": int(peak - before),
          "peak_bytes": int(peak)}


def probe_memory_in_subprocess(config: BenchmarkConfig, case_id: str, timeout: float = 600.0) -> dict:
  """Runs ``case_id`` in a fresh Python process: build, compile, one warm-up call, then the measured call."""
  env = dict(os.environ)
  env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # fixed threshold: big buffers are mmapped and unmapped when freed
  package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
  code = "import sys; from scoresmooth_jax import benchmarking; benchmarking._probe_main(sys.argv[1], sys.argv[2])"
  try:
    done = subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(config)), case_id],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=package_root)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
  if done.returncode != 0 or not lines:
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
  return json.loads(lines[-1])


def _probe_main(config_json: str, case_id: str) -> None:
  """Entry point of the memory subprocess: prints one JSON line."""
  config = BenchmarkConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(config_json).items()})
  bench = Workbench(config, calibrate=False, measure_flops=False)
  case = bench.case(case_id)
  _block(case.warmup())
  result = measure_peak_memory(case.run)
  print(json.dumps({**result, "devices": jax.device_count()}), flush=True)


# ------------------------------------------------------------------------------------------------------------
# Models with random weights.
# ------------------------------------------------------------------------------------------------------------


def random_variables(module, *example_inputs, seed: int = 0) -> dict:
  """Random numpy variables for ``module``: He-normal kernels, small random biases, BatchNorm statistics near
  (0, 1). Built from ``eval_shape``, so no initialiser is compiled (that costs seconds for big models)."""
  abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs)
  rng = np.random.default_rng(seed)

  def leaf(path, value):
    name = jax.tree_util.keystr(path)
    shape = value.shape
    if name.endswith("['var']"):
      return rng.uniform(0.75, 1.25, shape).astype(np.float32)
    if name.endswith("['scale']"):
      return rng.uniform(0.75, 1.25, shape).astype(np.float32)
    if len(shape) >= 2:
      fan_in = int(np.prod(shape[:-1]))
      return (rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)
    return (0.05 * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def calibrate_classifier(clf: classifier_lib.Classifier, images) -> classifier_lib.Classifier:
  """A random-weight ResNet made well-conditioned, like a trained one: BatchNorm running statistics set to the
  batch statistics of ``images`` (data-dependent initialisation), and the head rescaled so the logits have zero
  mean per class and unit standard deviation over ``images``. Without this a random deep ResNet predicts one
  class for every input, and label agreement between precisions would be trivially 100 %."""
  momentum = resnet.BN_MOMENTUM
  variables = clf.variables
  normalised = (jnp.asarray(images) - jnp.asarray(clf.mean)) / jnp.asarray(clf.std)

  @jax.jit
  def batch_stats(variables, x):
    _, updates = clf.module.apply(variables, x, train=True, mutable=["batch_stats"])
    # running <- momentum * running + (1 - momentum) * batch, so this recovers the batch statistics exactly.
    return jax.tree.map(lambda new, old: (new - momentum * old) / (1.0 - momentum), updates["batch_stats"],
                        variables["batch_stats"])

  variables = {**variables, "batch_stats": batch_stats(variables, normalised)}
  logits = np.asarray(jax.jit(lambda v, x: clf.module.apply(v, x))(variables, normalised), np.float64)
  fc = dict(variables["params"]["fc"])
  scale = 1.0 / max(float(logits.std()), 1e-12)
  fc["kernel"] = jnp.asarray(np.asarray(fc["kernel"], np.float64) * scale, jnp.float32)
  fc["bias"] = jnp.asarray((np.asarray(fc["bias"], np.float64) - logits.mean(axis=0)) * scale, jnp.float32)
  variables = {**variables, "params": {**variables["params"], "fc": fc}}
  return dataclasses.replace(clf, variables=jax.tree.map(jnp.asarray, variables))


@dataclasses.dataclass
class Case:
  """One benchmarked configuration: ``run()`` is one timed call of ``samples`` samples (per device x devices)."""

  run: Callable[[], Any]
  warmup: Callable[[], Any]
  samples: int
  batch_size: int
  flops_per_sample: float
  flops_source: str
  xla_bytes: int | None = None
  compile_seconds: float | None = None


class Workbench:
  """Builds (once) the models, classifiers and cases of a config; ``case(case_id)`` is what rows time and what
  the memory subprocess rebuilds on its own."""

  def __init__(self, config: BenchmarkConfig, calibrate: bool = True, measure_flops: bool = True):
    self.config = config
    self.calibrate = calibrate
    self.measure_flops = measure_flops
    self.mesh = sharding.data_mesh()
    self.devices = self.mesh.size
    self.nz = noise.Gaussian(config.sigma)
    self._cache: dict = {}
    rng = np.random.default_rng(config.seed)
    self.image = jnp.asarray(rng.uniform(size=config.image_shape).astype(np.float32))

  def _cached(self, key, build):
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  # --- models ------------------------------------------------------------------------------------------
  def classifier(self, variant: str = "f32", depth: int | None = None) -> classifier_lib.Classifier:
    """The CIFAR ResNet as a Classifier: variant "f32", "f32_folded" or "bf16_folded"."""
    cfg = self.config
    depth = cfg.depth if depth is None else depth

    def base():
      module = resnet.CifarResNet(depth=depth, num_classes=cfg.num_classes, shortcut="B", width=cfg.width)
      variables = random_variables(module, jnp.zeros((1, *cfg.image_shape)), seed=cfg.seed)
      clf = classifier_lib.Classifier(module=module, variables=jax.tree.map(jnp.asarray, variables),
                                      mean=(0.5,) * cfg.image_shape[-1], std=(0.25,) * cfg.image_shape[-1],
                                      num_classes=cfg.num_classes, image_shape=cfg.image_shape)
      if self.calibrate:
        rng = np.random.default_rng(cfg.seed + 1)
        images = rng.uniform(size=(64, *cfg.image_shape)) + cfg.sigma * rng.standard_normal((64, *cfg.image_shape))
        clf = calibrate_classifier(clf, images.astype(np.float32))
      return clf

    if variant == "f32":
      return self._cached(("clf", depth, "f32"), base)
    if variant == "f32_folded":
      return self._cached(("clf", depth, variant), lambda: self.classifier("f32", depth).folded())
    if variant == "bf16_folded":
      return self._cached(("clf", depth, variant), lambda: dataclasses.replace(
          self.classifier("f32_folded", depth), compute_dtype=jnp.bfloat16))
    raise ValueError(f"unknown classifier variant {variant!r}: use 'f32', 'f32_folded' or 'bf16_folded'.")

  def imagenet_classifier(self, variant: str) -> classifier_lib.Classifier:
    def base():
      module = resnet.ResNet50(num_classes=1000)
      variables = random_variables(module, jnp.zeros((1, 224, 224, 3)), seed=self.config.seed)
      return classifier_lib.Classifier(module=module, variables=jax.tree.map(jnp.asarray, variables),
                                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=1000,
                                       image_shape=(224, 224, 3))

    if variant == "f32":
      return self._cached(("imagenet", "f32"), base)
    if variant == "f32_folded":
      return self._cached(("imagenet", variant), lambda: self.imagenet_classifier("f32").folded())
    if variant == "bf16_folded":
      return self._cached(("imagenet", variant), lambda: dataclasses.replace(
          self.imagenet_classifier("f32_folded"), compute_dtype=jnp.bfloat16))
    raise ValueError(f"unknown classifier variant {variant!r}.")

  def unet(self):
    cfg = self.config

    def build():
      module = score_unet.ScoreUNet(channels=cfg.unet_channels, channel_mults=cfg.unet_mults)
      params = random_variables(module, jnp.zeros((1, *cfg.image_shape)), jnp.ones((1,)), seed=cfg.seed)["params"]
      return module, jax.tree.map(jnp.asarray, params)

    return self._cached("unet", build)

  def score_fn(self) -> export.ScoreFunction:
    def build():
      module, params = self.unet()
      return export.ScoreFunction(module=module, params=params, sigma_min=0.01, sigma_max=1.0,
                                  image_shape=self.config.image_shape)

    return self._cached("score_fn", build)

  def one_step_classifier(self):
    """Tweedie denoiser + the folded float32 classifier, one object (sample_counts caches by identity)."""
    def build():
      score_fn, clf, sigma = self.score_fn(), self.classifier("f32_folded"), self.config.sigma
      return lambda y: clf(denoise.one_step(score_fn, y, sigma))

    return self._cached("one_step", build)

  def annealed_classifier(self):
    def build():
      score_fn, clf, nz, cfg = self.score_fn(), self.classifier("f32_folded"), self.nz, self.config
      sigmas = denoise.default_sigmas(nz, num_levels=cfg.levels)
      return lambda y: clf(denoise.annealed(score_fn, y, nz, sigmas, None, cfg.steps_per_level))

    return self._cached("annealed", build)

  def ncsnpp_score_fn(self):
    from scoresmooth_jax import pretrained  # pylint: disable=import-outside-toplevel

    def build():
      preset = pretrained.get_preset("cifar10_ncsnpp_continuous")
      h, w, c = preset.image_shape
      params = random_variables(preset.model, jnp.zeros((1, h, w, c)), jnp.ones((1,)),
                                seed=self.config.seed)["params"]
      # He-normal weights through ~100 layers give huge activations; scale kernels down, the speed is the same.
      params = jax.tree.map(lambda p: jnp.asarray(p * (0.3 if p.ndim >= 2 else 1.0)), params)
      return pretrained.ScoreSdeScoreFn(preset=preset, params=params)

    return self._cached("ncsnpp", build)

  def ncsnpp_one_step_classifier(self):
    def build():
      score_fn, clf, sigma = self.ncsnpp_score_fn(), self.classifier("f32_folded"), self.config.sigma
      return lambda y: clf(denoise.one_step(score_fn, y, sigma))

    return self._cached("ncsnpp_one_step", build)

  def memory_classifier(self) -> classifier_lib.Classifier:
    def build():
      cfg = self.config
      shape = cfg.memory_check_shape
      module = resnet.CifarResNet(depth=8, num_classes=cfg.num_classes, shortcut="B", width=8)
      variables = random_variables(module, jnp.zeros((1, *shape)), seed=cfg.seed)
      return classifier_lib.Classifier(module=module, variables=jax.tree.map(jnp.asarray, variables),
                                       mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1],
                                       num_classes=cfg.num_classes, image_shape=shape).folded()

    return self._cached("memory_clf", build)

  def noisy_batch(self, per_device: int, image=None) -> jax.Array:
    """A noisy batch of ``per_device`` images on every device, split over the "data" axis."""
    image = self.image if image is None else image
    eps = self.nz.sample(jax.random.key(self.config.seed + 7), (per_device * self.devices, *image.shape))
    return jax.device_put(image[None] + eps, sharding.batch_sharding(self.mesh))

  # --- cases ---------------------------------------------------------------------------------------------
  def _forward_case(self, fn, batch_size: int, calls: int, image=None) -> Case:
    x = self.noisy_batch(batch_size, image)
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(x).compile()
    seconds = time.perf_counter() - start

    def run():
      out = None
      for _ in range(calls):
        out = compiled(x)
      return out

    return Case(run=run, warmup=lambda: compiled(x), samples=calls * batch_size * self.devices,
                batch_size=batch_size, flops_per_sample=_flops(compiled) / batch_size,
                flops_source="XLA cost analysis", xla_bytes=_xla_bytes(compiled), compile_seconds=seconds)

  def _counts_case(self, fn, batch_size: int, num_per_device: int, flops_per_sample: float,
                   image=None, num_classes: int | None = None, source: str = "forward's XLA cost") -> Case:
    image = self.image if image is None else image
    num = num_per_device * self.devices
    key = jax.random.key(self.config.seed + 11)
    num_classes = num_classes or self.config.num_classes
    count = lambda n: smoothing.sample_counts(fn, image, self.nz, n, key, num_classes=num_classes,
                                              batch_size=batch_size, mesh=self.mesh)
    return Case(run=lambda: count(num), warmup=lambda: count(1), samples=num, batch_size=batch_size,
                flops_per_sample=flops_per_sample, flops_source=source)

  def _flops_of(self, case_id: str) -> float:
    """FLOPs per sample of another (single-batch) case; NaN in the memory subprocess, which needs none."""
    return self.case(case_id).flops_per_sample if self.measure_flops else float("nan")

  def case(self, case_id: str) -> Case:
    """The case named ``case_id`` (e.g. "a.f32_folded", "b.bf16_folded", "c.counts", "mem.large")."""
    return self._cached(("case", case_id), lambda: self._build_case(case_id))

  def _build_case(self, case_id: str) -> Case:
    cfg = self.config
    batch, calls = cfg.batch_size, cfg.batches_per_call
    section, _, variant = case_id.partition(".")
    if section == "a":
      return self._forward_case(self.classifier(variant), batch, calls)
    if section == "b":
      return self._counts_case(self.classifier(variant), batch, calls * batch, self._flops_of(f"a.{variant}"))
    if case_id == "torch.f32":
      return self._torch_case(xla_cpu_threads())
    if case_id == "torch.f32_1thread":
      return self._torch_case(1)
    if case_id == "c.raw":
      return self._forward_case(self.one_step_classifier(), batch, calls)
    if case_id == "c.counts":
      return self._counts_case(self.one_step_classifier(), batch, calls * batch, self._flops_of("c.raw"))
    if case_id == "c.ncsnpp_raw":
      return self._forward_case(self.ncsnpp_one_step_classifier(), cfg.ncsnpp_batch_size, 1)
    if case_id == "c.ncsnpp_counts":
      return self._counts_case(self.ncsnpp_one_step_classifier(), cfg.ncsnpp_batch_size, cfg.ncsnpp_num,
                               self._flops_of("c.ncsnpp_raw"))
    if case_id == "d.score":
      score_fn, sigma = self.score_fn(), cfg.sigma
      return self._forward_case(lambda y: score_fn(y, sigma), cfg.annealed_batch_size, calls)
    if case_id == "d.classifier":
      return self._forward_case(self.classifier("f32_folded"), cfg.annealed_batch_size, calls)
    if case_id in ("d.raw", "d.counts"):
      evaluations = cfg.levels * cfg.steps_per_level
      flops = evaluations * self._flops_of("d.score") + self._flops_of("d.classifier")
      if case_id == "d.raw":
        case = self._forward_case(self.annealed_classifier(), cfg.annealed_batch_size, 1)
        return dataclasses.replace(case, flops_per_sample=flops, flops_source="L*T score + classifier (XLA cost)")
      return self._counts_case(self.annealed_classifier(), cfg.annealed_batch_size, cfg.annealed_batch_size,
                               flops, source="L*T score + classifier (XLA cost)")
    if case_id == "e.train":
      return self._train_case()
    if case_id in ("mem.small", "mem.large"):
      clf = self.memory_classifier()
      num = cfg.memory_check_num[0 if case_id == "mem.small" else 1]
      shape = cfg.memory_check_shape
      image = jnp.asarray(np.random.default_rng(cfg.seed).uniform(size=shape).astype(np.float32))
      return self._counts_case(clf, cfg.memory_check_batch, max(1, num // self.devices), float("nan"), image=image)
    if section == "imagenet":
      kind, _, precision = variant.partition(".")
      image = jnp.asarray(np.random.default_rng(cfg.seed).uniform(size=(224, 224, 3)).astype(np.float32))
      clf = self.imagenet_classifier(precision)
      if kind == "a":
        return self._forward_case(clf, cfg.imagenet_batch_size, 1, image=image)
      return self._counts_case(clf, cfg.imagenet_batch_size, cfg.imagenet_batch_size,
                               self._flops_of(f"imagenet.a.{precision}"), image=image,
                               num_classes=1000)
    raise ValueError(f"unknown benchmark case {case_id!r}.")

  def torch_model(self):
    def build():
      cfg = self.config
      clf = self.classifier("f32")
      model = torch_baseline.build_cifar_resnet(cfg.depth, cfg.num_classes, clf.mean, clf.std, width=cfg.width,
                                                in_channels=cfg.image_shape[-1])
      torch_baseline.load_flax_variables(model, clf.variables)
      return model

    return self._cached("torch_model", build)

  def _torch_case(self, threads: int) -> Case:
    cfg = self.config
    model = self.torch_model()
    image = np.asarray(self.image)
    num = cfg.torch_batches * cfg.batch_size * self.devices  # the same draws the JAX rows make per call

    def count(n):
      torch_baseline.configure_threads(threads)  # per call: the 1- and 2-thread cases run interleaved
      return torch_baseline.sample_counts(model, image, cfg.sigma, n, cfg.batch_size * self.devices,
                                          cfg.num_classes, seed=cfg.seed)

    flops = self._flops_of("a.f32")
    return Case(run=lambda: count(num), warmup=lambda: count(cfg.batch_size), samples=num,
                batch_size=cfg.batch_size * self.devices, flops_per_sample=flops,
                flops_source="JAX forward's XLA cost (same network)")

  def _train_case(self) -> Case:
    cfg = self.config
    module, params = self.unet()
    sigmas = losses.SigmaDistribution(0.01, 1.0)

    def loss_fn(params, model_state, images, labels, key):  # as train.py builds the score task's loss
      del labels
      key, dropout_key = jax.random.split(key)
      apply = lambda p, x, s: module.apply({"params": p}, x, s, train=True, rngs={"dropout": dropout_key})
      loss, _ = losses.get_dsm_loss_fn(apply, sigmas)(params, images, key)
      return loss, (model_state, {})

    optim = train_state.OptimConfig(learning_rate=2e-4, warmup_steps=0, schedule="constant", grad_clip=1.0,
                                    weight_decay=0.0, ema_decay=0.999)
    optimizer = train_state.make_optimizer(optim, 1000)
    replicated = sharding.replicated(self.mesh)
    state = jax.jit(lambda p: train_state.create_state({"params": p}, optimizer), out_shardings=replicated)(params)
    step = train_state.jit_train_step(train_state.get_train_step_fn(loss_fn, optimizer, optim.ema_decay), self.mesh)
    batch = cfg.train_batch_size * self.devices
    rng = np.random.default_rng(cfg.seed)
    stacked = NamedSharding(self.mesh, P(None, sharding.DATA_AXIS))
    images = jax.device_put(rng.uniform(size=(1, batch, *cfg.image_shape)).astype(np.float32), stacked)
    labels = jax.device_put(np.zeros((1, batch), np.int32), stacked)
    key = jax.random.key(cfg.seed)
    start = time.perf_counter()
    compiled = step.lower(state, images, labels, key).compile()
    seconds = time.perf_counter() - start
    holder = {"state": state}

    def run():
      holder["state"], metrics = compiled(holder["state"], images, labels, key)
      return metrics["loss"]

    return Case(run=run, warmup=run, samples=batch, batch_size=cfg.train_batch_size,
                flops_per_sample=_flops(compiled) / cfg.train_batch_size, flops_source="XLA cost analysis",
                xla_bytes=_xla_bytes(compiled), compile_seconds=seconds)


# ------------------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------------------


def xla_cpu_threads() -> int:
  """Threads XLA:CPU computes with: its pool has one per CPU this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_features() -> dict:
  """Whether this CPU has native bfloat16 arithmetic (AVX-512 BF16 dot products, AMX tiles)."""
  flags: set[str] = set()
  model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags") and not flags:
          flags = set(line.split(":", 1)[1].split())
        elif line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  return {"model": model, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
          "amx_bf16": "amx_bf16" in flags}


def environment() -> dict:
  device = jax.devices()[0]
  info = {"backend": jax.default_backend(), "device_kind": device.device_kind, "devices": jax.device_count(),
          "jax": jax.__version__, "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "xla_cpu_threads": xla_cpu_threads() if device.platform == "cpu" else None, "cpu": cpu_features()}
  try:
    torch = torch_baseline.import_torch()
    info["torch"] = torch.__version__
  except ImportError:
    info["torch"] = None
  return info


def _row(row_id: str, description: str, case: Case | None, timing: Timing | None = None, name: str | None = None,
         **extra) -> dict:
  row = {"id": row_id, "description": description, "batch_size": None, "samples_per_call": None,
         "samples_per_s": None, "spread": None, "flops_per_sample": None, "flops_source": None,
         "achieved_flops_per_s": None, "compile_seconds": None, "xla_memory_bytes": None,
         "peak_memory_growth_bytes": None, "peak_memory_bytes": None, "memory_method": None, "ratio": None,
         "ratio_to": None, "best_samples_per_s": None, "contention_cores": None, "uncontended_samples_per_s": None,
         "uncontended_repeats": None, "note": ""}
  if case is not None and timing is not None:
    seconds, others = timing.seconds[name or row_id], timing.others_cores[name or row_id]
    rate = case.samples / _median(seconds)
    quiet = [t for t, o in zip(seconds, others or ()) if o < UNCONTENDED_CORES]
    row.update(contention_cores=None if others is None else _median(others), uncontended_repeats=len(quiet),
               uncontended_samples_per_s=case.samples / _median(quiet) if quiet else None)
    row.update(batch_size=case.batch_size, samples_per_call=case.samples, samples_per_s=rate,
               best_samples_per_s=case.samples / min(seconds),
               spread=_spread(seconds), flops_per_sample=case.flops_per_sample, flops_source=case.flops_source,
               achieved_flops_per_s=rate * case.flops_per_sample, compile_seconds=case.compile_seconds,
               xla_memory_bytes=case.xla_bytes)
  row.update(extra)
  return row


def _target(name: str, value, note: str = "") -> dict:
  op, threshold = TARGETS[name]
  if value is None or not np.isfinite(value):
    met = None
  elif op == ">=":
    met = bool(value >= threshold)
  elif op == "<=":
    met = bool(value <= threshold)
  else:
    met = bool(abs(value - 1.0) <= threshold)
  return {"value": value, "target": f"{op} {threshold}" if op != "within" else f"within {threshold:.0%} of 1",
          "met": met, "note": note}


def _labels_agreement(reference: Callable, other: Callable, images, nz: noise.Noise, draws: int, batch: int,
                      key: jax.Array) -> dict:
  """Fraction of identical top-1 labels of two classifiers on the same noisy copies of each image."""
  pair = jax.jit(lambda x: (jnp.argmax(reference(x), -1), jnp.argmax(other(x), -1)))
  same = total = 0
  majority = []
  for i, image in enumerate(images):
    labels = []
    for b in range(-(-draws // batch)):
      eps = nz.sample(jax.random.fold_in(jax.random.fold_in(key, i), b), (batch, *image.shape))
      a, o = pair(jnp.asarray(image)[None] + eps)
      a, o = np.asarray(a), np.asarray(o)
      same += int((a == o).sum())
      total += a.size
      labels.append(a)
    labels = np.concatenate(labels)
    majority.append(float(np.bincount(labels).max() / labels.size))
  return {"agreement": same / total, "samples": total, "mean_top_class_fraction": float(np.mean(majority))}


def _fixture_agreement(config: BenchmarkConfig, nz: noise.Noise, log) -> dict | None:
  """bfloat16 vs float32 label agreement of the trained ResNet-20 fixture on real CIFAR-10 test images."""
  if not config.fixtures_dir:
    return None
  from scoresmooth_jax import convert  # pylint: disable=import-outside-toplevel

  directory = os.path.expanduser(config.fixtures_dir)
  checkpoint = os.path.join(directory, "resnet20-12fca82f.th")
  data = os.path.join(directory, "cifar10_test_first1017.npz")
  if not (os.path.isfile(checkpoint) and os.path.isfile(data)):
    log(f"fixtures not found in {directory}: skipping the trained ResNet-20 agreement")
    return None
  try:
    clf = convert.convert_torch_checkpoint(checkpoint).to_classifier().folded()
  except ImportError as err:
    log(f"skipping the trained ResNet-20 agreement: {err}")
    return None
  with np.load(data, allow_pickle=False) as arrays:
    images = arrays["images"][:config.agreement_images * 4].astype(np.float32) / 255.0
  bf16 = dataclasses.replace(clf, compute_dtype=jnp.bfloat16)
  result = _labels_agreement(clf, bf16, images, nz, config.agreement_draws, min(config.agreement_draws, 128),
                             jax.random.key(config.seed + 5))
  return {"classifier": "akamaster ResNet-20 (trained), BN folded", "images": len(images), **result}


VARIANT_LABELS = {"f32": "float32", "f32_folded": "float32, BN folded", "bf16_folded": "bfloat16, BN folded"}


@dataclasses.dataclass
class _Results:
  """What the sections of a run add to."""

  bench: Workbench
  env: dict
  log: Callable[[str], None]
  rows: list = dataclasses.field(default_factory=list)
  targets: dict = dataclasses.field(default_factory=dict)
  notes: list = dataclasses.field(default_factory=list)
  extra: dict = dataclasses.field(default_factory=dict)

  def row(self, row_id: str) -> dict:
    return next(r for r in self.rows if r["id"] == row_id)

  def rate(self, case_id: str, timing: Timing, name: str | None = None) -> float:
    return self.bench.case(case_id).samples / _median(timing.seconds[name or case_id])


def _classifier_section(res: _Results) -> None:
  """Rows a and b: the classifier's forward pass against the same classifier inside sample_counts."""
  bench, cfg = res.bench, res.bench.config
  res.log("a/b: classifier forward vs sample_counts")
  variants = cfg.classifier_variants
  timing = interleaved({f"{s}.{v}": bench.case(f"{s}.{v}").run for v in variants for s in ("a", "b")},
                       cfg.repeats)
  depth = f"ResNet-{cfg.depth}"
  for v in variants:
    res.rows.append(_row(f"a.{v}", f"(a) {depth} forward, {VARIANT_LABELS[v]}", bench.case(f"a.{v}"), timing))
    ratio = res.rate(f"b.{v}", timing) / res.rate(f"a.{v}", timing)
    res.rows.append(_row(f"b.{v}", f"(b) {depth} in sample_counts, {VARIANT_LABELS[v]}", bench.case(f"b.{v}"),
                         timing, ratio=ratio, ratio_to=f"a.{v}"))
  res.targets["sample_counts_vs_forward.classifier"] = _target(
      "sample_counts_vs_forward.classifier", min(res.row(f"b.{v}")["ratio"] for v in variants),
      f"worst of {', '.join(variants)}")
  res.extra["counts"] = {v: timing.outputs[f"b.{v}"] for v in variants}  # same key for every variant


def _torch_section(res: _Results) -> None:
  """The PyTorch eager loop against sample_counts, same weights, same n, interleaved."""
  bench, cfg = res.bench, res.bench.config
  if not cfg.torch or res.env["torch"] is None:
    reason = "disabled" if not cfg.torch else "torch is not installed"
    res.notes.append(f"PyTorch baseline skipped: {reason}.")
    for name in ("jax_float32_vs_torch", "jax_bfloat16_vs_torch"):
      res.targets[name] = _target(name, None, reason)
    return
  res.log("torch: PyTorch eager loop vs sample_counts")
  threads = torch_baseline.configure_threads(xla_cpu_threads())
  res.env["threads"] = {"xla_cpu": xla_cpu_threads(), **threads}
  # PyTorch's OpenMP workers meet at a barrier after every operator: when another process takes one of the
  # cores, the 2-thread loop slows down many times over while 1 thread does not. Both run, and the targets
  # compare against the faster, so a shared machine cannot flatter JAX.
  torch_ids = ("torch.f32", "torch.f32_1thread")
  num = bench.case("torch.f32").samples
  fns = {t: bench.case(t).run for t in torch_ids}
  for v in cfg.classifier_variants:
    clf = bench.classifier(v)
    fns[f"jax.{v}"] = (lambda clf=clf: smoothing.sample_counts(
        clf, bench.image, bench.nz, num, jax.random.key(cfg.seed + 11), num_classes=cfg.num_classes,
        batch_size=cfg.batch_size, mesh=bench.mesh))
  timing = interleaved(fns, max(3, cfg.repeats - 1))
  for t, n in zip(torch_ids, (threads["torch_intra_op_threads"], 1)):
    res.rows.append(_row(t, f"PyTorch eager MC loop, ResNet-{cfg.depth}, float32 NCHW, {n} thread(s)",
                         bench.case(t), timing))
  jax_rows = {v: _row(f"jax_vs_torch.{v}", f"sample_counts {VARIANT_LABELS[v]} vs the faster PyTorch (same n)",
                      dataclasses.replace(bench.case(f"b.{v}"), samples=num), timing, f"jax.{v}")
              for v in cfg.classifier_variants}
  # Uncontended medians when every side had uncontended calls; otherwise the medians of all calls.
  quiet = all(r["uncontended_samples_per_s"] for r in [res.row(t) for t in torch_ids] + list(jax_rows.values()))
  key = "uncontended_samples_per_s" if quiet else "samples_per_s"
  best_torch = max(torch_ids, key=lambda t: res.row(t)[key])
  for v, row in jax_rows.items():
    row.update(ratio=row[key] / res.row(best_torch)[key], ratio_to=best_torch,
               ratio_of_best=row["best_samples_per_s"] / max(res.row(t)["best_samples_per_s"] for t in torch_ids))
    res.rows.append(row)
  which = "uncontended medians" if quiet else "medians (no uncontended calls on some side)"
  for name, v in (("jax_float32_vs_torch", "f32_folded"), ("jax_bfloat16_vs_torch", "bf16_folded")):
    if v not in jax_rows:
      res.targets[name] = _target(name, None, f"{v} not in classifier_variants")
      continue
    note = f"{VARIANT_LABELS[v]} vs {best_torch}, {which}; fastest calls: {jax_rows[v]['ratio_of_best']:.2f}"
    if v == "f32_folded" and "f32" in jax_rows:
      note += f"; unfolded float32: {jax_rows['f32']['ratio']:.2f}"
    res.targets[name] = _target(name, jax_rows[v]["ratio"], note)


def _agreement_section(res: _Results) -> None:
  """bfloat16 against float32 labels on the same noisy batches (and the same-key counts of rows b)."""
  bench, cfg = res.bench, res.bench.config
  res.log("bfloat16 label agreement")
  counts = res.extra["counts"]
  tv = lambda a, b: 0.5 * float(np.abs(a - b).sum()) / float(a.sum())
  agreement = {"same_key_counts_total_variation": tv(counts["f32_folded"], counts["bf16_folded"])
                                                  if {"f32_folded", "bf16_folded"} <= set(counts) else None}
  rng = np.random.default_rng(cfg.seed + 3)
  images = [np.asarray(bench.image)] + [rng.uniform(size=cfg.image_shape).astype(np.float32)
                                        for _ in range(cfg.agreement_images - 1)]
  batch = min(cfg.agreement_draws, cfg.batch_size)
  weights = "random weights with calibrated BatchNorm" if cfg.calibrate else "random weights (uncalibrated)"
  agreement["random_resnet"] = {
      "classifier": f"ResNet-{cfg.depth}, {weights}, BN folded", "images": len(images),
      **_labels_agreement(bench.classifier("f32_folded"), bench.classifier("bf16_folded"), images, bench.nz,
                          cfg.agreement_draws, batch, jax.random.key(cfg.seed))}
  agreement["folded_vs_unfolded"] = _labels_agreement(bench.classifier("f32"), bench.classifier("f32_folded"),
                                                      images[:1], bench.nz, cfg.agreement_draws, batch,
                                                      jax.random.key(cfg.seed))
  fixture = _fixture_agreement(cfg, bench.nz, res.log)
  if fixture is not None:
    agreement["trained_resnet20"] = fixture
  primary = agreement.get("trained_resnet20", agreement["random_resnet"])
  res.targets["bfloat16_label_agreement"] = _target(
      "bfloat16_label_agreement", primary["agreement"],
      f"{primary['classifier']}, {primary['samples']} noisy samples; random ResNet-{cfg.depth}: "
      f"{agreement['random_resnet']['agreement']:.4f}")
  res.extra["agreement"] = agreement


def _one_step_section(res: _Results) -> None:
  """Row c: one-step denoiser + classifier, raw against sample_counts; then the NCSN++ preset."""
  bench, cfg = res.bench, res.bench.config
  res.log("c: one-step denoiser + classifier")
  timing = interleaved({n: bench.case(n).run for n in ("c.raw", "c.counts")}, cfg.repeats)
  unet, depth = _unet_name(cfg), f"ResNet-{cfg.depth}"
  res.rows.append(_row("c.raw", f"(c) one-step {unet} + {depth}, forward", bench.case("c.raw"), timing))
  ratio = res.rate("c.counts", timing) / res.rate("c.raw", timing)
  res.rows.append(_row("c.counts", f"(c) one-step {unet} + {depth} in sample_counts", bench.case("c.counts"),
                       timing, ratio=ratio, ratio_to="c.raw"))
  res.targets["sample_counts_vs_forward.one_step"] = _target("sample_counts_vs_forward.one_step", ratio)
  if not cfg.ncsnpp:
    return
  res.log("c: NCSN++ (cifar10_ncsnpp_continuous, random weights) one-step + classifier")
  raw_id, counts_id = "c.ncsnpp_raw", "c.ncsnpp_counts"
  timing = interleaved({n: bench.case(n).run for n in (raw_id, counts_id)}, max(1, cfg.repeats // 2))
  params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(bench.ncsnpp_score_fn().params)))
  raw, counts = bench.case(raw_id), bench.case(counts_id)
  res.rows.append(_row(raw_id, f"(c) one-step NCSN++ ({params / 1e6:.1f}M params) + {depth}, forward", raw, timing))
  res.rows.append(_row(counts_id, f"(c) one-step NCSN++ + {depth} in sample_counts, n={counts.samples}", counts,
                       timing, ratio=res.rate(counts_id, timing) / res.rate(raw_id, timing), ratio_to=raw_id))
  res.extra["ncsnpp"] = {"preset": "cifar10_ncsnpp_continuous", "params": params,
                         "flops_per_image_denoiser_plus_classifier": raw.flops_per_sample,
                         "flops_per_image_classifier": bench.case("d.classifier").flops_per_sample,
                         "samples_per_s_sample_counts": res.rate(counts_id, timing)}


def _unet_name(cfg: BenchmarkConfig) -> str:
  return f"ScoreUNet(ch={cfg.unet_channels}, mults={cfg.unet_mults})"


def _annealed_section(res: _Results) -> None:
  """Row d: annealed denoiser + classifier against L * T score forwards + one classifier forward."""
  bench, cfg = res.bench, res.bench.config
  res.log(f"d: annealed denoiser (L={cfg.levels} x T={cfg.steps_per_level}) + classifier")
  names = ("d.counts", "d.raw", "d.score", "d.classifier")
  timing = interleaved({n: bench.case(n).run for n in names}, max(2, cfg.repeats - 2))
  # Seconds per sample per device, from the medians.
  per_sample = {n: _median(timing.seconds[n]) / (bench.case(n).samples / bench.devices) for n in names}
  evaluations = cfg.levels * cfg.steps_per_level
  expected = evaluations * per_sample["d.score"] + per_sample["d.classifier"]
  unet, depth, anneal = _unet_name(cfg), f"ResNet-{cfg.depth}", f"L={cfg.levels} x T={cfg.steps_per_level}"
  parts = f"{evaluations} x d.score + d.classifier"
  res.rows.append(_row("d.score", f"(d) one score forward ({unet})", bench.case("d.score"), timing))
  res.rows.append(_row("d.classifier", f"(d) one classifier forward ({depth}, folded)", bench.case("d.classifier"),
                       timing))
  res.rows.append(_row("d.raw", f"(d) annealed {anneal} + {depth}, forward", bench.case("d.raw"), timing,
                       ratio=per_sample["d.raw"] / expected, ratio_to=parts))
  ratio = per_sample["d.counts"] / expected
  res.rows.append(_row("d.counts", f"(d) annealed {anneal} + {depth} in sample_counts", bench.case("d.counts"),
                       timing, ratio=ratio, ratio_to=parts))
  res.targets["annealed_vs_expected"] = _target("annealed_vs_expected", ratio, "time ratio, lower is better")


def _train_section(res: _Results) -> None:
  bench, cfg = res.bench, res.bench.config
  res.log("e: score training step")
  timing = interleaved({"e.train": bench.case("e.train").run}, max(2, cfg.repeats - 2))
  res.rows.append(_row("e.train", f"(e) DSM training step, {_unet_name(cfg)}, Adam + EMA", bench.case("e.train"),
                       timing, note="samples = training images"))


def _imagenet_section(res: _Results) -> None:
  bench, cfg = res.bench, res.bench.config
  res.log("imagenet: ResNet-50")
  names = ["imagenet.a.f32", "imagenet.a.f32_folded", "imagenet.b.f32_folded", "imagenet.a.bf16_folded"]
  timing = interleaved({n: bench.case(n).run for n in names}, max(2, cfg.repeats - 2))
  for n in names:
    kind, precision = n.split(".")[1:]
    extra = {}
    if kind == "b":
      forward = f"imagenet.a.{precision}"
      extra = dict(ratio=res.rate(n, timing) / res.rate(forward, timing), ratio_to=forward)
    label = ("forward" if kind == "a" else "in sample_counts") + f", {VARIANT_LABELS[precision]}"
    res.rows.append(_row(n, f"ImageNet ResNet-50 {label}", bench.case(n), timing, **extra))


def _auto_batch_section(res: _Results) -> None:
  """The batch size ``batching`` picks for the folded float32 classifier within the configured budget."""
  bench, cfg = res.bench, res.bench.config
  res.log("auto batch size")
  choice = batching.choose_batch_size(bench.classifier("f32_folded"), cfg.image_shape, cfg.auto_budget_mib * MIB)
  res.extra["auto_batch_size"] = {
      **dataclasses.asdict(choice),
      "estimated_bytes_at_benchmark_batch": choice.fixed_bytes + choice.bytes_per_sample * cfg.batch_size}


def _memory_section(res: _Results) -> None:
  """Peak memory of each configuration in a fresh subprocess, and the n = small vs n = large check."""
  cfg = res.bench.config
  name = "peak_memory_large_n_vs_small_n"
  if not cfg.memory:
    res.targets[name] = _target(name, None, "memory=False")
    return
  probe_ids = [r["id"] for r in res.rows if r["id"].split(".")[0] in ("a", "b", "c", "d", "e", "torch", "imagenet")
               and r["id"] not in ("d.score", "d.classifier")]
  wanted = list(cfg.memory_rows) if cfg.memory_rows is not None else probe_ids + ["mem.small", "mem.large"]
  res.log(f"memory: {len(wanted)} configurations, each in a fresh subprocess ({cfg.memory_workers} at a time)")
  with concurrent.futures.ThreadPoolExecutor(cfg.memory_workers) as pool:
    probed = dict(zip(wanted, pool.map(lambda case_id: probe_memory_in_subprocess(cfg, case_id), wanted)))
  by_id = {r["id"]: r for r in res.rows}
  for case_id, result in probed.items():
    if case_id not in by_id:
      continue
    row = by_id[case_id]
    if "error" in result:
      row["note"] = (row["note"] + "; " if row["note"] else "") + f"memory probe failed: {result['error']}"
    else:
      row.update(peak_memory_growth_bytes=result["growth_bytes"], peak_memory_bytes=result["peak_bytes"],
                 memory_method=result["method"])
  checks = {k: probed[k] for k in ("mem.small", "mem.large") if k in probed}
  res.extra["memory_check"] = checks
  if len(checks) < 2 or any("error" in v for v in checks.values()):
    res.targets[name] = _target(name, None, f"not measured: {checks}")
    return
  small, large = checks["mem.small"], checks["mem.large"]
  for key, result, n in (("mem.small", small, cfg.memory_check_num[0]), ("mem.large", large, cfg.memory_check_num[1])):
    res.rows.append(_row(key, f"sample_counts, small ResNet-8 {cfg.memory_check_shape}, n={n:,}", None, None,
                         batch_size=cfg.memory_check_batch, samples_per_call=n,
                         peak_memory_growth_bytes=result["growth_bytes"], peak_memory_bytes=result["peak_bytes"],
                         memory_method=result["method"]))
  ratio = large["peak_bytes"] / small["peak_bytes"]
  growth = large["growth_bytes"] / max(small["growth_bytes"], 1)
  res.rows[-1].update(ratio=ratio, ratio_to="mem.small")
  res.targets[name] = _target(name, ratio, f"process peak RSS; growth during the call: "
                              f"{large['growth_bytes'] / MIB:.1f} MiB vs {small['growth_bytes'] / MIB:.1f} MiB "
                              f"(ratio {growth:.3f})")


def run_benchmark(config: BenchmarkConfig = BenchmarkConfig(), log: Callable[[str], None] = print) -> dict:
  """Runs every row of ``config`` (module docstring) and returns the results as a JSON-ready dict."""
  started = time.perf_counter()
  env = environment()
  res = _Results(bench=Workbench(config, calibrate=config.calibrate), env=env,
                 log=lambda line: log(f"[{time.perf_counter() - started:6.1f} s] {line}"))
  res.log(f"backend {env['backend']} ({env['device_kind']}) x{env['devices']}, jax {env['jax']}, "
          f"XLA_FLAGS={env['xla_flags']!r}")
  sections = [_classifier_section, _torch_section, _agreement_section, _one_step_section, _annealed_section,
              _train_section]
  if config.imagenet:
    sections.append(_imagenet_section)
  loads = []
  for section in sections + [_auto_batch_section, _memory_section]:
    loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    section(res)
  env["load_average_1min"] = loads
  cores = xla_cpu_threads()
  if env["backend"] == "cpu" and max(loads) > cores:
    res.notes.append(f"the machine was shared: 1-minute load average up to {max(loads):.1f} on {cores} cores. "
                     "Absolute rates are contended; ratios come from interleaved runs.")
  if env["backend"] == "cpu":
    cpu = env["cpu"]
    res.notes.append(f"CPU bfloat16 support: avx512_bf16={cpu['avx512_bf16']}, amx_bf16={cpu['amx_bf16']}.")
  return {"environment": env, "config": dataclasses.asdict(config), "rows": res.rows,
          "targets": {k: res.targets.get(k, _target(k, None, "not run")) for k in TARGETS},
          "agreement": res.extra.get("agreement"), "auto_batch_size": res.extra.get("auto_batch_size"),
          "ncsnpp": res.extra.get("ncsnpp"), "memory_check": res.extra.get("memory_check", {}),
          "notes": res.notes, "wall_seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------------------------
# Output.
# ------------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str, scale: float = 1.0, suffix: str = "") -> str:
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return "-"
  return f"{value / scale if scale != 1.0 else value:{spec}}{suffix}"


def markdown_table(results: dict) -> str:
  """The rows as a Markdown table, then the targets, agreement and auto batch size."""
  env = results["environment"]
  lines = [f"Backend: {env['backend']} ({env['device_kind']}) x{env['devices']}, jax {env['jax']}, "
           f"XLA_FLAGS={env['xla_flags']!r}, CPU: {env['cpu']['model']}"]
  if env.get("threads"):
    lines.append(f"Threads: {env['threads']}")
  lines += ["", "samples/s: median / fastest call (spread = (max - min) / median of the interleaved calls); "
                f"others: median cores other processes kept busy during the calls (< {UNCONTENDED_CORES} counts as "
                "uncontended). GFLOP/s from the median.",
            "", "| row | B/dev | samples/s median / best (spread) | others | GFLOP/sample | GFLOP/s | "
                "peak mem growth / process (MiB) | XLA est. (MiB) | ratio | vs |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    rate = ("-" if r["samples_per_s"] is None else
            f"{r['samples_per_s']:.1f} / {r['best_samples_per_s']:.1f} ({100 * r['spread']:.0f}%)")
    memory = ("-" if r["peak_memory_bytes"] is None
              else f"{r['peak_memory_growth_bytes'] / MIB:.1f} / {r['peak_memory_bytes'] / MIB:.0f}")
    lines.append(f"| {r['id']}: {r['description']} | {_fmt(r['batch_size'], 'd')} | {rate} | "
                 f"{_fmt(r['contention_cores'], '.2f')} | {_fmt(r['flops_per_sample'], '.3f', 1e9)} | "
                 f"{_fmt(r['achieved_flops_per_s'], '.1f', 1e9)} | "
                 f"{memory} | {_fmt(r['xla_memory_bytes'], '.1f', MIB)} | {_fmt(r['ratio'], '.3f')} | "
                 f"{r['ratio_to'] or ''} |")
  lines += ["", "| target | value | required | met | note |", "|---|---|---|---|---|"]
  for name, t in results["targets"].items():
    met = {True: "yes", False: "NO", None: "not measured"}[t["met"]]
    lines.append(f"| {name} | {_fmt(t['value'], '.4f')} | {t['target']} | {met} | {t['note']} |")
  agreement = results["agreement"]
  lines += ["", "bfloat16 vs float32 labels on the same noisy samples:"]
  for key in ("random_resnet", "trained_resnet20"):
    if key in agreement:
      a = agreement[key]
      lines.append(f"  {a['classifier']}: {100 * a['agreement']:.2f} % of {a['samples']} "
                   f"(mean top-class share {100 * a['mean_top_class_fraction']:.1f} %)")
  lines.append(f"  same-key sample_counts, total variation between the count vectors: "
               f"{_fmt(agreement['same_key_counts_total_variation'], '.4f')}; BN folded vs unfolded labels: "
               f"{100 * agreement['folded_vs_unfolded']['agreement']:.2f} %")
  auto = results["auto_batch_size"]
  lines.append(f"Auto batch size for a {auto['budget_bytes'] / MIB:.0f} MiB budget: {auto['batch_size']} "
               f"(XLA estimate {auto['estimated_bytes'] / MIB:.1f} MiB; line {auto['fixed_bytes'] / MIB:.1f} MiB + "
               f"{auto['bytes_per_sample'] / MIB:.3f} MiB/sample; at B={results['config']['batch_size']}: "
               f"{auto['estimated_bytes_at_benchmark_batch'] / MIB:.1f} MiB)")
  if results.get("ncsnpp"):
    n = results["ncsnpp"]
    lines.append(f"NCSN++ {n['preset']}: {n['params']:,} params, "
                 f"{n['flops_per_image_denoiser_plus_classifier'] / 1e9:.2f} GFLOP/image with the classifier "
                 f"({n['flops_per_image_classifier'] / 1e9:.3f} of them the classifier), "
                 f"{n['samples_per_s_sample_counts']:.2f} samples/s in sample_counts")
  lines += [f"Note: {note}" for note in results["notes"]]
  lines.append(f"Wall time: {results['wall_seconds']:.0f} s")
  return "\n".join(lines)


def write_json(results: dict, path) -> None:
  """Writes ``results`` as JSON (numpy scalars made plain)."""
  def plain(value):
    if isinstance(value, dict):
      return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
      return value.tolist()
    if isinstance(value, np.generic):
      return value.item()
    if isinstance(value, float) and not np.isfinite(value):
      return None
    return value

  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    json.dump(plain(results), f, indent=2)

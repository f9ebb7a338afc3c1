"""What a benchmark run measures: ``BenchmarkConfig`` (the default run) and ``tiny_config`` (the seconds-long test
run), with the issue's targets (``TARGETS``). See ``benchmarks`` for what each row measures and how.
"""

from __future__ import annotations

import dataclasses

from scoresmooth_jax import denoise

MIB = 2**20

# The targets: (comparison, threshold).
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
    torch_sweep_batch_sizes: more batch sizes at which the PyTorch loop and the folded JAX classifiers are timed
      against each other (besides batch_size), so that the float32 and bfloat16 targets compare each side at
      its best batch size. 400 is the certification job's CIFAR-10 default; Cohen et al.'s certify.py uses 1000.
    parts: time the float32 folded ResNet's parts (stem, layer1-3, head) on their own, in JAX and PyTorch.
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
  parts: bool = True
  torch_batches: int = 2
  torch_sweep_batch_sizes: tuple[int, ...] = (32, 128, 400)
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
    sweep = tuple(self.torch_sweep_batch_sizes)
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sweep):
      raise ValueError(f"BenchmarkConfig.torch_sweep_batch_sizes={self.torch_sweep_batch_sizes!r}: give positive "
                       "integer batch sizes, or () for none.")
    object.__setattr__(self, "torch_sweep_batch_sizes", tuple(sorted(set(sweep) - {self.batch_size})))
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
                  train_batch_size=8, torch_batches=2, torch_sweep_batch_sizes=(8,), ncsnpp=False,
                  memory_rows=("mem.small", "mem.large"),
                  memory_check_num=(100, 2_000), memory_check_batch=25, memory_workers=2, agreement_images=2,
                  agreement_draws=16, auto_budget_mib=16, calibrate=False)
  settings.update(overrides)
  return BenchmarkConfig(**settings)

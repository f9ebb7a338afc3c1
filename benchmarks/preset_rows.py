"""What the GPU benchmark preset measures: its rows, its settings, and the networks of each row at full and toy size.

The preset (``benchmarks.gpu_preset``) times certification as a user runs it on one accelerator: the certification
job's one-step base classifier inside ``smoothing.sample_counts`` at the batch size the job would choose, beside
the PyTorch peer (``benchmarks.torch_peer``: improved-diffusion's own UNet and a PyTorch ResNet-110, denoised and
classified in a loop as Carlini et al.'s DRM.py does). ``ROWS`` lists the rows in the order they run: the ones the
comparison needs first, so that a run cut short by its deadline still has them.

Promises:
  * ``PresetSettings.full()`` is the GPU preset (CIFAR-10 and ImageNet shapes, the published architectures with
    random weights); ``PresetSettings.toy_settings()`` runs every row with tiny networks and shapes on a CPU in
    seconds each, through the same code (batch choice, ``sample_counts``, the peer's loop; ``torch.compile`` with
    the "aot_eager" backend, which traces without generating code).
  * ``openai_preset(name, toy)``, ``classifier_spec(name, toy)``, ``SHIPPED_SCORE`` and ``toy_score_unet()`` give
    each row's networks; a row's images have the denoiser's shape (or the classifier's, without a denoiser).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from scoresmooth_jax.modelio import openai_diffusion

FRAMEWORKS = ("jax", "torch")
TORCH_VARIANTS = ("eager", "autocast", "compile", "compile_autocast")
SHIPPED_SCORE = "cifar10-cpu"


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """One row: a framework, a denoiser (None: the classifier alone), a classifier and a precision.

  ``pair`` names the networks (rows of one pair compare with each other: same FLOPs per draw). ``torch_variant``:
  how the peer runs (eager float32; autocast bfloat16; torch.compile; both). ``max_s``: the row's time limit on a
  GPU, subprocess start included (the deadline may leave it less).
  """

  name: str
  framework: str
  denoiser: str | None
  classifier: str
  precision: str
  pair: str
  torch_variant: str | None = None
  max_s: float = 120.0

  def __post_init__(self):
    if self.framework not in FRAMEWORKS:
      raise ValueError(f"RowSpec.framework={self.framework!r}: choose one of {FRAMEWORKS}.")
    if self.precision not in ("float32", "bfloat16"):
      raise ValueError(f"RowSpec.precision={self.precision!r}: choose float32 or bfloat16.")
    if (self.framework == "torch") != (self.torch_variant in TORCH_VARIANTS):
      raise ValueError(f"row {self.name}: a torch row needs torch_variant in {TORCH_VARIANTS}, a JAX row none.")


def _jax(denoiser, classifier, precision, pair, max_s):
  return RowSpec(f"jax.{denoiser or 'none'}.{classifier}.{precision}", "jax", denoiser, classifier, precision,
                 pair, max_s=max_s)


def _torch(variant, max_s):
  precision = "bfloat16" if "autocast" in variant else "float32"
  return RowSpec(f"torch.iddpm_cifar10.resnet110.{variant}", "torch", "iddpm_cifar10", "resnet110", precision,
                 "iddpm_cifar10+resnet110", torch_variant=variant, max_s=max_s)


# In the order they run (module docstring): the iDDPM comparison, then the small pipeline, then the expensive
# 256 x 256 ADM and the peer's torch.compile variants (minutes of compilation each).
ROWS: tuple[RowSpec, ...] = (
    _jax("iddpm_cifar10", "resnet110", "bfloat16", "iddpm_cifar10+resnet110", 180),
    _torch("eager", 60),
    _jax("iddpm_cifar10", "resnet110", "float32", "iddpm_cifar10+resnet110", 180),
    _torch("autocast", 60),
    _jax(SHIPPED_SCORE, "resnet20", "float32", f"{SHIPPED_SCORE}+resnet20", 60),
    _jax(SHIPPED_SCORE, "resnet20", "bfloat16", f"{SHIPPED_SCORE}+resnet20", 60),
    _jax(None, "resnet20", "float32", "resnet20", 45),
    _jax(None, "resnet20", "bfloat16", "resnet20", 45),
    _jax("adm256", "resnet50_224", "bfloat16", "adm256+resnet50_224", 240),
    _torch("compile_autocast", 180),
    _torch("compile", 180),
)


def row_names() -> list[str]:
  return [row.name for row in ROWS]


def select_rows(names=None) -> tuple[RowSpec, ...]:
  """``ROWS``, or those named (in ``ROWS``' order); an unknown name fails listing the known ones."""
  if not names:
    return ROWS
  unknown = sorted(set(names) - set(row_names()))
  if unknown:
    raise ValueError(f"unknown preset rows {unknown}: choose among {row_names()}.")
  return tuple(row for row in ROWS if row.name in set(names))


@dataclasses.dataclass(frozen=True)
class PresetSettings:
  """How the preset runs. ``full()``: one GPU, under 8 minutes; ``toy_settings()``: tiny networks on a CPU.

  Attributes:
    toy: tiny networks and shapes (``openai_preset`` etc.).
    sigma: Gaussian noise level of every row.
    n0, n: the draws per image that seconds per image are reported for (Cohen et al.'s 100 and 100,000).
    batch_size: per-device batch of the JAX rows; None chooses it as the job does with certify.batch_size = 0
      (``batching.choose_batch_size`` with max_batch_size and probe_sizes).
    torch_batch_size: the peer's batch (Carlini et al. certify at 1,000).
    target_s: seconds one timed call should take; repeats: timed calls per row (the median is reported).
    deadline_s: the whole run's limit: rows that would start after it are reported as skipped, and a row's time
      is cut to what is left, so the results are written before it.
    peers_dir: the folder that holds improved-diffusion's ``improved_diffusion`` package (MIT); None skips the
      PyTorch rows with that reason.
    torch_compile_backend: torch.compile's backend ("inductor" on a GPU; the toy's "aot_eager" generates no code).
    peak_tflops: the chip's dense bfloat16 peak, for a device ``accelerators.PEAKS`` does not know.
    row_time_scale: multiplies every row's ``max_s`` (the toy's rows get the same limits as the GPU's).
    seed: noise and random weights.
  """

  toy: bool = False
  sigma: float = 0.25
  n0: int = 100
  n: int = 100_000
  batch_size: int | None = None
  max_batch_size: int = 1024
  probe_sizes: tuple[int, int] = (8, 32)
  torch_batch_size: int = 1000
  target_s: float = 3.0
  repeats: int = 2
  deadline_s: float = 450.0
  peers_dir: str | None = None
  torch_compile_backend: str = "inductor"
  peak_tflops: float | None = None
  row_time_scale: float = 1.0
  seed: int = 0

  @classmethod
  def full(cls, **overrides) -> "PresetSettings":
    return cls(**overrides)

  @classmethod
  def toy_settings(cls, **overrides) -> "PresetSettings":
    settings = dict(toy=True, max_batch_size=8, probe_sizes=(2, 4), torch_batch_size=4, target_s=0.05,
                    deadline_s=600.0, torch_compile_backend="aot_eager")
    settings.update(overrides)
    return cls(**settings)

  def __post_init__(self):
    if self.batch_size is not None and self.batch_size < 1:
      raise ValueError(f"batch_size={self.batch_size!r} must be >= 1, or None for the job's choice.")
    for name in ("n0", "n", "max_batch_size", "torch_batch_size", "repeats"):
      if getattr(self, name) < 1:
        raise ValueError(f"PresetSettings.{name}={getattr(self, name)!r} must be >= 1.")
    if not (self.target_s > 0 and self.deadline_s > 0 and self.row_time_scale > 0):
      raise ValueError("PresetSettings: target_s, deadline_s and row_time_scale must be positive.")
    object.__setattr__(self, "probe_sizes", tuple(int(b) for b in self.probe_sizes))


# --- the networks of each row ----------------------------------------------------------------------------
_TOY_OPENAI = {
    # improved-diffusion's CIFAR-10 layout (scale-shift norm, attention by heads, conv resampling), tiny.
    "iddpm_cifar10": openai_diffusion.OpenAIPreset(
        "toy_iddpm", openai_diffusion.OpenAIUNet(model_channels=32, num_res_blocks=1, attention_resolutions=(2,),
                                                 channel_mult=(1, 2), out_channels=6, num_heads=2),
        openai_diffusion.Diffusion("cosine", 4000, rescale_timesteps=True), (8, 8, 3)),
    # guided-diffusion's 256 x 256 layout (heads of 64 channels -> 16 here, residual resampling), tiny.
    "adm256": openai_diffusion.OpenAIPreset(
        "toy_adm", openai_diffusion.OpenAIUNet(model_channels=32, num_res_blocks=1, attention_resolutions=(2,),
                                               channel_mult=(1, 2), out_channels=6, num_head_channels=16,
                                               resblock_updown=True),
        openai_diffusion.Diffusion("linear", 1000, rescale_timesteps=False), (16, 16, 3)),
}
_FULL_OPENAI = {"iddpm_cifar10": "cifar10_uncond_50M_500K", "adm256": "256x256_diffusion_uncond"}


def openai_preset(name: str, toy: bool) -> openai_diffusion.OpenAIPreset:
  """The OpenAI diffusion preset of a row's denoiser ("iddpm_cifar10" or "adm256")."""
  return _TOY_OPENAI[name] if toy else openai_diffusion.get_preset(_FULL_OPENAI[name])


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def classifier_spec(name: str, toy: bool) -> dict[str, Any]:
  """{"kind", "kwargs", "image_shape", "mean", "std", "num_classes"} of a row's classifier: "resnet110" (Cohen et
  al.'s, option-B shortcuts), "resnet20" (option A, as the published CIFAR-10 ResNet-20s) or "resnet50_224"."""
  if name == "resnet50_224":
    return dict(kind="resnet", kwargs=dict(stage_sizes=(1, 1, 1, 1) if toy else (3, 4, 6, 3), num_classes=1000),
                image_shape=(12, 12, 3) if toy else (224, 224, 3), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                num_classes=1000)
  depth, shortcut = {"resnet110": (110, "B"), "resnet20": (20, "A")}[name]
  kwargs = dict(depth=8 if toy else depth, shortcut=shortcut, width=4 if toy else 16, num_classes=10)
  return dict(kind="cifar_resnet", kwargs=kwargs, image_shape=(8, 8, 3) if toy else (32, 32, 3), mean=CIFAR_MEAN,
              std=CIFAR_STD, num_classes=10)


def toy_score_unet() -> dict[str, Any]:
  """The tiny score_unet that stands in for the shipped model in the toy preset (8 x 8 images)."""
  return dict(channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), max_groups=4)

"""The PyTorch peer of the GPU preset: denoised smoothing as Carlini et al. (2023) run it, on the same device.

Carlini et al.'s CIFAR-10 code (ethz-spylab/diffusion_denoised_smoothing, ``cifar10/DRM.py`` and ``core.py``)
certifies with improved-diffusion's own ``UNetModel`` and ``GaussianDiffusion``. Per batch of B draws it repeats the
image B times, maps it to [-1, 1], adds the smoothing noise with ``q_sample`` at the integer step t whose
sqrt((1 - abar_t) / abar_t) first reaches 2 sigma (``openai_diffusion.carlini_timestep``), denoises in one step with
``p_sample(..., clip_denoised=True)["pred_xstart"]``, classifies, takes the argmax and copies the labels to the
host to count them. Here the classifier is a PyTorch ResNet-110 (``torch_baseline.build_cifar_resnet``, Cohen et
al.'s, behind its normalisation layer, fed the denoised image mapped back to [0, 1]) instead of their ViT, so that
the peer runs the same networks as the JAX row it is compared with. Counting uses ``np.bincount`` where their
``_count_arr`` loops in Python over the labels (the same counts).

Variants (``RowSpec.torch_variant``): "eager" (as they run it: float32, PyTorch's default TF32 settings, recorded
in the row), "autocast" (``torch.autocast`` to bfloat16 around the base classifier), "compile" (``torch.compile``
of the UNet and the ResNet with ``settings.torch_compile_backend``) and "compile_autocast".

Promises:
  * The upstream code is imported from ``settings.peers_dir`` (the folder that holds the ``improved_diffusion``
    package, MIT), never copied into this project; a missing folder fails naming it.
  * ``torch`` is imported only inside functions. ``measure_torch_row`` returns the JAX rows' fields
    (``jax_rows``): draws_per_s, compile_s, s_per_image, peak_memory_gib, and flops_per_draw counted by
    ``torch.utils.flop_counter`` (convolutions and matrix products) on one eager float32 batch.
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import sys
import time

import numpy as np

from benchmarks import draw_rate, preset_rows, torch_baseline
from scoresmooth_jax.modelio import openai_diffusion


def import_improved_diffusion(peers_dir: str | None):
  """improved-diffusion's ``gaussian_diffusion`` and ``unet`` modules from ``peers_dir``."""
  if not peers_dir:
    raise FileNotFoundError("no peers_dir: pass the folder that holds openai/improved-diffusion's "
                            "improved_diffusion/ package (--peers_dir) to run the PyTorch peer.")
  path = os.path.abspath(os.path.expanduser(peers_dir))
  if not os.path.isfile(os.path.join(path, "improved_diffusion", "unet.py")):
    raise FileNotFoundError(f"peers_dir={peers_dir!r} holds no improved_diffusion/unet.py: pass the folder that "
                            "holds openai/improved-diffusion's improved_diffusion/ package (MIT).")
  if path not in sys.path:
    sys.path.insert(0, path)
  return (importlib.import_module("improved_diffusion.gaussian_diffusion"),
          importlib.import_module("improved_diffusion.unet"))


def build_peer(settings: preset_rows.PresetSettings, device):
  """(unet, diffusion, resnet, t, preset): improved-diffusion's networks for the preset's iDDPM, random weights."""
  gaussian_diffusion, unet = import_improved_diffusion(settings.peers_dir)
  preset = preset_rows.openai_preset("iddpm_cifar10", settings.toy)
  m = preset.model
  model = unet.UNetModel(in_channels=preset.image_shape[-1], model_channels=m.model_channels,
                         out_channels=m.out_channels, num_res_blocks=m.num_res_blocks,
                         attention_resolutions=tuple(m.attention_resolutions), dropout=0.3,
                         channel_mult=tuple(m.channel_mult), num_heads=m.num_heads,
                         num_heads_upsample=m.num_heads_upsample, use_scale_shift_norm=m.use_scale_shift_norm)
  learned = m.out_channels == 2 * preset.image_shape[-1]
  diffusion = gaussian_diffusion.GaussianDiffusion(
      betas=gaussian_diffusion.get_named_beta_schedule(preset.diffusion.schedule, preset.diffusion.num_steps),
      model_mean_type=gaussian_diffusion.ModelMeanType.EPSILON,
      model_var_type=(gaussian_diffusion.ModelVarType.LEARNED_RANGE if learned
                      else gaussian_diffusion.ModelVarType.FIXED_LARGE),
      loss_type=gaussian_diffusion.LossType.RESCALED_MSE, rescale_timesteps=preset.diffusion.rescale_timesteps)
  spec = preset_rows.classifier_spec("resnet110", settings.toy)
  resnet = torch_baseline.build_cifar_resnet(spec["kwargs"]["depth"], spec["num_classes"], spec["mean"],
                                             spec["std"], width=spec["kwargs"]["width"],
                                             in_channels=spec["image_shape"][-1])
  t = openai_diffusion.carlini_timestep(preset.diffusion, settings.sigma)
  return model.eval().to(device), diffusion, resnet.eval().to(device), t, preset


def make_base_classifier(model, diffusion, resnet, t: int, autocast: bool, device):
  """Carlini et al.'s DiffusionRobustModel.forward with the ResNet: a batch of clean images in [0, 1] (NCHW) ->
  logits of the noised (q_sample at t), one-step denoised images."""
  import torch  # pylint: disable=import-outside-toplevel

  def base(x):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
      x_in = x * 2 - 1
      t_batch = torch.tensor([t] * len(x_in), device=device)
      x_t = diffusion.q_sample(x_start=x_in, t=t_batch, noise=torch.randn_like(x_in))
      with torch.no_grad():
        denoised = diffusion.p_sample(model, x_t, t_batch, clip_denoised=True)["pred_xstart"]
        return resnet((denoised + 1) / 2)

  return base


def sample_counts(base, image, num: int, batch_size: int, num_classes: int) -> np.ndarray:
  """Carlini et al.'s ``Smooth._sample_noise``: the noise is drawn inside ``base`` (q_sample)."""
  import torch  # pylint: disable=import-outside-toplevel

  counts = np.zeros(num_classes, np.int64)
  with torch.no_grad():
    for _ in range(math.ceil(num / batch_size)):
      this_batch = min(batch_size, num)
      num -= this_batch
      predictions = base(image.repeat((this_batch, 1, 1, 1))).argmax(1)
      counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
  return counts


def _peak_memory(torch, device) -> dict:
  if device.type == "cuda":
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "memory_method": "torch.cuda.max_memory_allocated"}
  try:
    with open("/proc/self/status") as f:
      hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
  except (OSError, StopIteration):
    hwm = None
  return {"peak_memory_gib": None if hwm is None else hwm / 2**30, "memory_method": "process peak RSS (VmHWM)"}


def _flops_per_draw(torch, base, image, batch_size: int) -> float:
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel

  with FlopCounterMode(display=False) as counter, torch.no_grad():
    base(image.repeat((batch_size, 1, 1, 1)))
  return float(counter.get_total_flops()) / batch_size


def measure_torch_row(spec: preset_rows.RowSpec, settings: preset_rows.PresetSettings,
                      deadline: float = float("inf")) -> dict:
  """The peer's row (module docstring); ``deadline`` in ``time.monotonic()`` seconds."""
  torch = torch_baseline.import_torch()
  start = time.perf_counter()
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(settings.seed)
  model, diffusion, resnet, t, preset = build_peer(settings, device)
  image_np = np.random.default_rng(settings.seed).uniform(size=preset.image_shape).astype(np.float32)
  image = torch.from_numpy(image_np.transpose(2, 0, 1).copy()).to(device)
  batch = settings.torch_batch_size
  flops = _flops_per_draw(torch, make_base_classifier(model, diffusion, resnet, t, False, device), image,
                          min(batch, 8))
  if "compile" in spec.torch_variant:
    model = torch.compile(model, backend=settings.torch_compile_backend)
    resnet = torch.compile(resnet, backend=settings.torch_compile_backend)
  base = make_base_classifier(model, diffusion, resnet, t, "autocast" in spec.torch_variant, device)
  row = {"name": spec.name, "framework": "torch", "precision": spec.precision, "pair": spec.pair,
         "torch_variant": spec.torch_variant, "backend": device.type,
         "device_kind": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
         "devices": 1, "torch": torch.__version__, "cuda": torch.version.cuda, "timestep": t,
         "image_shape": list(preset.image_shape), "denoiser_params": int(sum(p.numel() for p in model.parameters())),
         "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
         "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
         "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
         "compile_backend": settings.torch_compile_backend if "compile" in spec.torch_variant else None,
         "batch_size": batch, "batch_source": "Carlini et al.'s batch", "torch_flops_per_draw": flops,
         "flops_per_draw": flops, "build_s": time.perf_counter() - start}
  count = lambda num: sample_counts(base, image, num, batch, 10)
  row.update(draw_rate.time_draws(count, batch, settings.target_s, settings.repeats, deadline))
  row["s_per_image"] = (settings.n0 + settings.n) / row["draws_per_s"]
  row.update(_peak_memory(torch, device))
  return row

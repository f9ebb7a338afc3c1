"""NCSN++ score network for CIFAR-10 (score_sde's ``configs/ve/cifar10_ncsnpp_continuous.py`` architecture).

Run (a TPU/GPU host; tfds downloads cifar10 on first use):
  python scripts/train_score.py --config configs/score_cifar10.py --workdir runs/score_cifar10
Tiny variant (CPU tests, mock or real cifar10; one level, no attention, so it compiles fast):
  python scripts/train_score.py --config configs/score_cifar10.py:tiny --workdir /tmp/score_cifar10_tiny
CPU variant (2 cores, about 1 hour at 1.5 steps/s; the first `cifar10-cpu` shipped with the package): a score U-Net
trained on the 50,000 CIFAR-10 training images as a JPEG folder, evaluated on the lossless fixture test images:
  mkdir -p data/cifar10 && tar xf ../shared/data/cifar10_train_jpeg.tar -C data/cifar10
  python scripts/train_score.py --config configs/score_cifar10.py:cpu --workdir workdirs/score_cifar10_cpu
(the same command resumes; point --config.data.name=folder:PATH / --config.data.eval_name at other copies).
`:cpu_wide` is the wider run tried after it (48 channels, focused sigma sampling, 3,500 steps; not shipped).
`:cpu_long` is that network at `:accel`'s learning rate, 2e-3, for 10,000 steps: about 3.6 h on 2 cores, run over
several sittings (the same command resumes; --config.data.name=folder:PATH as above); it shipped as `cifar10-cpu`
until `:cpu_attn_long` (below) replaced it.
`:cpu_long_more` trains that result further (a new run started with train.init_from from the :cpu_long run's
export, workdirs/score_cifar10_long/export): 10,000 more steps, learning rate 1e-3 after 500 warm-up steps, cosine:
  python scripts/train_score.py --config configs/score_cifar10.py:cpu_long_more --workdir workdirs/score_cifar10_more
`:cpu_deep` is `:cpu_long_more` for a deeper network: two residual blocks at the 32x32 and 16x16 levels
(num_res_blocks (2, 2, 1); 2.40M parameters, 1.08 GFLOP per image, 4.8 MB as float16) that starts exactly as
:cpu_long's result (its added blocks start as the identity, training/warm_start.py), over a 5,000-step cosine
(tried, not shipped: it gained nothing over the same restart of the undeepened network; docs/cifar10.md):
  python scripts/train_score.py --config configs/score_cifar10.py:cpu_deep --workdir workdirs/score_cifar10_deep
`:cpu_attn` is the same restart with self-attention at the 16x16 level instead (attention_resolutions (16,);
1.95M parameters, 0.85 GFLOP per image), its attention blocks starting as the identity (23.94 dB at sigma 0.25,
+0.03 over the same restart without attention; docs/cifar10.md):
  python scripts/train_score.py --config configs/score_cifar10.py:cpu_attn --workdir workdirs/score_cifar10_attn
`:cpu_attn_long` is the last of the restarts that made the shipped `cifar10-cpu` (2.06M parameters, 0.87 GFLOP per
image, 4.1 MB as float16): attention at 8x8 and 16x16, a 16,000-step cosine (about 5 h here) from the export of
:cpu_attn restarted twice, the second time with the 8x8 attention added (docs/cifar10.md, "Attention"):
  python scripts/train_score.py --config configs/score_cifar10.py:cpu_attn \
      --config.train.init_from=workdirs/score_cifar10_attn/export --workdir workdirs/score_cifar10_attn2
  python scripts/train_score.py --config configs/score_cifar10.py:cpu_attn \
      --config.train.init_from=workdirs/score_cifar10_attn2/export \
      --config.model.kwargs.attention_resolutions='(8,16)' --config.train.num_steps=3000 \
      --workdir workdirs/score_cifar10_attn816
  python scripts/train_score.py --config configs/score_cifar10.py:cpu_attn_long \
      --workdir workdirs/score_cifar10_attn_long
(--config.train.init_from=cifar10-cpu continues the shipped model itself.)
`:cpu_edm` is `:cpu_long` from scratch with EDM's preconditioning (model.kwargs.sigma_data=0.25, see
models/score_unet.py), so that its curve compares with `:cpu_long`'s step for step (docs/cifar10.md).
`:accel` is the same network for one GPU/TPU: batch 128, 30,000 steps (77 epochs), the training split decoded
once into memory (data.in_memory) so that decoding JPEGs does not starve the accelerator; 1.88M parameters,
3.8 MB when shipped as float16 (`scripts/ship_score_model.py --store_dtype=float16`);
`scripts/accel_cifar10.sh` trains, ships and certifies it in one command sized to a time budget. On one H200 it
trains at 180 steps/s (30,000 steps in 3 min) and ends at the shipped model's one-step PSNR (24.00 dB at sigma
0.25 as float16); docs/cifar10.md says how to run it.
`:gpu` is the larger network shipped as `cifar10`, for one H100/H200 in bfloat16 mixed precision (float32 master
weights, EMA and optimizer state; model.kwargs.dtype): 112 channels, multipliers (1, 2, 2), two residual blocks per
level, self-attention at 16x16 (16.1M parameters, 6.7 GFLOP per image; 15.5 MiB as int8), batch 128, 15,000 steps,
learning rate 1e-3 (half :accel's for a network over twice as wide), cosine, EMA 0.9995, `:accel`'s focused sigma
sampling. `scripts/gpu_cifar10.sh` picks the width (model.kwargs.channels) by timing the train step of several on
the GPU, trains the widest that reaches 15,000 steps in its time budget, ships and certifies it in one command;
docs/cifar10.md says how to run it. `:gpu_tiny` is that network 8 channels wide (GroupNorm in 4 groups) on toy batches.
Model size only:
  python scripts/train_score.py --config configs/score_cifar10.py --config.report_only --workdir /tmp/unused

The network is score_sde's NCSN++ (continuous VE: Gaussian Fourier features of log sigma, output divided by
sigma; 62.8M parameters), the network of score_sde's published checkpoints (`score_sde:` specs load those).
Optimisation follows score_sde (Adam 2e-4, 5000 warmup steps, clipping at 1, EMA 0.9999, batch 128). The
sigma range differs on purpose: smoothing denoises at sigma <= 1, so training covers [0.01, 1.5] (a margin above 1.0) rather
than score_sde's [0.01, 50], which spends the capacity where certification needs it.
"""

from scoresmooth_jax.training.train import base_config

# The restarts and the export each starts from (the workdirs of the commands above). The runs measured in
# docs/cifar10.md started from :cpu_long's EMA parameters as shipped then; `cifar10-cpu` has since become
# :cpu_attn_long's result, so these name the earlier runs' exports.
_RESTARTS = {"cpu_long_more": "workdirs/score_cifar10_long/export", "cpu_deep": "workdirs/score_cifar10_long/export",
             "cpu_attn": "workdirs/score_cifar10_long/export",
             "cpu_attn_long": "workdirs/score_cifar10_attn816/export"}
SMALL_VARIANTS = ("cpu", "cpu_wide", "cpu_long", "cpu_long_more", "cpu_deep", "cpu_attn", "cpu_attn_long", "cpu_edm",
                  "accel")
GPU_VARIANTS = ("gpu", "gpu_tiny")


def get_config(variant: str = ""):
  if variant not in ("", "tiny") + SMALL_VARIANTS + GPU_VARIANTS:
    raise ValueError(f"unknown variant {variant!r}: use '', 'tiny', "
                     + ", ".join(map(repr, SMALL_VARIANTS + GPU_VARIANTS)) + ".")
  if variant in SMALL_VARIANTS:
    return _small_config(variant)
  if variant in GPU_VARIANTS:
    return _gpu_config(variant)
  tiny = variant == "tiny"
  config = base_config("score", "cifar10", (32, 32, 3), random_flip=True)
  config.model.name = "ncsnpp"
  config.model.kwargs.update(dict(nf=8 if tiny else 128, ch_mult=(1,) if tiny else (1, 2, 2, 2),
                                  num_res_blocks=1 if tiny else 4, attn_resolutions=() if tiny else (16,),
                                  dropout=0.1, embedding_type="fourier", scale_by_sigma=True, centered=False))
  config.sigma.sigma_max = 1.5  # a margin above the largest certified sigma, 1.0
  config.optim.update(dict(learning_rate=2e-4, warmup_steps=2 if tiny else 5000, ema_decay=0.9 if tiny else 0.9999))
  config.train.update(dict(batch_size=16 if tiny else 128, num_steps=4 if tiny else 1_300_000,
                           steps_per_dispatch=1 if tiny else 10, log_every=2 if tiny else 1000,
                           eval_every=4 if tiny else 50_000, checkpoint_every=2 if tiny else 10_000,
                           keep_checkpoints=2 if tiny else 3))
  config.eval.update(dict(batch_size=16 if tiny else 256, num_examples=16 if tiny else 1024,
                          loss_buckets=1 if tiny else 4))
  config.lock()
  return config


def _small_config(variant: str):
  """The small score U-Net trained on the CIFAR-10 JPEG folder (module docstring): 2 CPU cores or one accelerator."""
  wide, accel = variant != "cpu", variant == "accel"  # every small variant but :cpu is the 48-channel network
  deep, edm = variant == "cpu_deep", variant == "cpu_edm"
  attention = {"cpu_attn": (16,), "cpu_attn_long": (8, 16)}.get(variant, ())  # self-attention at these sizes
  init_from = _RESTARTS.get(variant, "")  # the restarts start from an earlier run's export
  long = variant.startswith("cpu_long") or deep or bool(attention) or edm
  config = base_config("score", "folder:data/cifar10", (32, 32, 3), random_flip=True)
  config.data.eval_name = "npz:../shared/fixtures/cifar10_test_first1017.npz"
  config.data.in_memory = accel  # 150 MB decoded; on CPU, decoding on access hides behind the step
  config.model.name = "score_unet"
  # :cpu_deep: more depth where the pixels are, within the 5 MB float16 limit (the 8x8 level keeps one block)
  config.model.kwargs.update(dict(channels=48 if wide else 32, channel_mults=(1, 2, 2),
                                  num_res_blocks=(2, 2, 1) if deep else 1, attention_resolutions=attention,
                                  max_groups=8))
  if edm:  # :cpu_long's network and schedule with EDM's preconditioning (models/score_unet.py), from scratch
    config.model.kwargs.sigma_data = 0.25
  if wide:  # 2.2x the FLOPs of :cpu, half its sigmas in [0.1, 1] (docs/cifar10.md)
    config.sigma.update(dict(focus_min=0.1, focus_prob=0.5))
  if accel:  # 4x the CPU batch at 2x its learning rate (sqrt scaling), a longer warm-up, a slower EMA
    config.optim.update(dict(learning_rate=2e-3, warmup_steps=500, schedule="cosine", ema_decay=0.9995))
    config.train.update(dict(batch_size=128, num_steps=30_000, steps_per_dispatch=10, log_every=1000,
                             eval_every=5000, checkpoint_every=5000, keep_checkpoints=2))
  else:
    # 2e-3 led 1e-3 at every evaluation of a 3,500-step :cpu_wide run (docs/cifar10.md), so the long run uses it
    config.optim.update(dict(learning_rate=2e-3 if long else 1e-3, warmup_steps=100, schedule="cosine",
                             ema_decay=0.999))
    config.train.update(dict(batch_size=32, num_steps={"cpu": 5000, "cpu_wide": 3500, "cpu_long": 10_000,
                                                        "cpu_long_more": 10_000, "cpu_deep": 5000,
                                                        "cpu_attn": 5000, "cpu_attn_long": 16_000,
                                                        "cpu_edm": 10_000}[variant],
                             log_every=50, eval_every=1000 if long else 500, checkpoint_every=250,
                             keep_checkpoints=2))
  if init_from:  # a second cosine from an earlier result, at half its peak rate after a longer warm-up
    config.optim.update(dict(learning_rate=1e-3, warmup_steps=500))
    config.train.init_from = init_from
  # Every fixture test image where evaluations are rare; 512 on the short CPU runs, where each takes from training.
  config.eval.update(dict(batch_size=256, num_examples=1017 if accel or long else 512, loss_buckets=4))
  config.lock()
  return config


def _gpu_config(variant: str):
  """The larger score U-Net for one GPU in bfloat16 mixed precision, shipped as `cifar10` (module docstring)."""
  tiny = variant == "gpu_tiny"
  config = base_config("score", "folder:data/cifar10", (32, 32, 3), random_flip=True)
  config.data.eval_name = "npz:../shared/fixtures/cifar10_test_first1017.npz"
  config.data.in_memory = True  # as :accel: decoding JPEGs on access would starve the GPU
  config.model.name = "score_unet"
  config.model.kwargs.update(dict(channels=8 if tiny else 112, channel_mults=(1, 2, 2), num_res_blocks=2,
                                  attention_resolutions=(16,), max_groups=4 if tiny else 32, dtype="bfloat16"))
  config.sigma.update(dict(focus_min=0.1, focus_prob=0.5))  # half the sigmas in [0.1, 1], as :accel
  config.optim.update(dict(learning_rate=1e-3, warmup_steps=2 if tiny else 500, schedule="cosine",
                           ema_decay=0.9 if tiny else 0.9995))
  config.train.update(dict(batch_size=8 if tiny else 128, num_steps=4 if tiny else 15_000,
                           steps_per_dispatch=2 if tiny else 10, log_every=2 if tiny else 500,
                           eval_every=4 if tiny else 1500, checkpoint_every=4 if tiny else 5000, keep_checkpoints=1))
  config.eval.update(dict(batch_size=8 if tiny else 256, num_examples=8 if tiny else 1017, loss_buckets=4))
  config.lock()
  return config

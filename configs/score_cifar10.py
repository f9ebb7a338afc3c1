"""CIFAR-10 score networks: the recipes of the shipped models and score_sde's NCSN++.

Data: ``data/cifar10/train/<class>/*.jpg`` (any folder of that layout; ``--config.data.name=folder:PATH`` for
another place) and the evaluation images ``data/cifar10_test.npz`` (``images`` NHWC uint8, ``labels``; the
shipped models' numbers use the first 1017 official test images; ``--config.data.eval_name=npz:PATH``).
Every command below resumes where it stopped.

``cpu_stage1`` .. ``cpu_stage5``: the shipped ``cifar10-cpu`` (score U-Net, 48 channels, multipliers (1, 2, 2),
self-attention at 8x8 and 16x16; 2.06M parameters), trained in five runs on 2 CPU cores (about 14 h), each
starting from the EMA export of the one before in ``workdirs/cifar10_cpu/stage<k>`` (added attention blocks start
as the identity): 10,000 steps without attention, two 5,000-step cosines with attention at 16x16, 3,000 steps
with attention at 8x8 too, a last 16,000-step cosine:
  for k in 1 2 3 4 5; do
    python scripts/train_score.py --config configs/score_cifar10.py:cpu_stage$k --workdir workdirs/cifar10_cpu/stage$k
  done
(``--config.train.init_from=cifar10-cpu`` with ``:cpu_stage5`` continues the shipped model itself.)

``accel``: stage 1's network for one GPU/TPU: batch 128, 30,000 steps, the training split decoded once into
memory; ``scripts/accel_cifar10.sh`` trains, ships and certifies it in one command.

``gpu``: the network shipped as ``cifar10``, for one H100/H200 in bfloat16 mixed precision (float32 parameters,
EMA and optimizer state): 112 channels, two residual blocks per level, self-attention at 16x16
(16.1M parameters, 6.7 GFLOP per image), 15,000 steps; ``scripts/gpu_cifar10.sh`` picks the width by timing the
GPU, trains, ships and certifies it in one command. ``gpu_tiny``: that network 8 channels wide on toy batches.

``""``: score_sde's NCSN++ (continuous VE, 62.8M parameters; the network of score_sde's published checkpoints)
on tfds's cifar10, for a TPU/GPU host, with score_sde's optimisation but sigma in [0.01, 1.5] (smoothing
denoises at sigma <= 1); ``tiny``: one level, no attention (tests):
  python scripts/train_score.py --config configs/score_cifar10.py --workdir workdirs/score_cifar10
  python scripts/train_score.py --config configs/score_cifar10.py:tiny --workdir /tmp/score_cifar10_tiny
Model size only: add ``--config.report_only``.

Experiments tried and not shipped: configs/proj/cifar10_cpu/.
"""

from scoresmooth_jax.runtime import config_schema

CPU_STAGES = ("cpu_stage1", "cpu_stage2", "cpu_stage3", "cpu_stage4", "cpu_stage5")
VARIANTS = ("", "tiny", *CPU_STAGES, "accel", "gpu", "gpu_tiny")
CPU_WORKDIRS = "workdirs/cifar10_cpu"  # stage k starts from f"{CPU_WORKDIRS}/stage{k - 1}/export"
TRAIN_FOLDER = "folder:data/cifar10"
EVAL_NPZ = "npz:data/cifar10_test.npz"

# Per stage of cifar10-cpu: self-attention resolutions and steps of its cosine.
_STAGES = {1: ((), 10_000), 2: ((16,), 5000), 3: ((16,), 5000), 4: ((8, 16), 3000), 5: ((8, 16), 16_000)}


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}: use one of " + ", ".join(map(repr, VARIANTS)) + ".")
  if variant in CPU_STAGES:
    return _cpu_stage(int(variant[len("cpu_stage"):]))
  if variant == "accel":
    return _accel()
  if variant.startswith("gpu"):
    return _gpu(tiny=variant == "gpu_tiny")
  return _ncsnpp(tiny=variant == "tiny")


def _ncsnpp(tiny: bool):
  config = config_schema.training_config("score", "cifar10", (32, 32, 3), random_flip=True)
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


def _small_unet(attention=()):
  """The 48-channel score U-Net of cifar10-cpu and :accel on the JPEG folder, half its sigmas in [0.1, 1]."""
  config = config_schema.training_config("score", TRAIN_FOLDER, (32, 32, 3), random_flip=True)
  config.data.eval_name = EVAL_NPZ
  config.model.name = "score_unet"
  config.model.kwargs.update(dict(channels=48, channel_mults=(1, 2, 2), num_res_blocks=1,
                                  attention_resolutions=tuple(attention), max_groups=8))
  config.sigma.update(dict(focus_min=0.1, focus_prob=0.5))
  config.eval.update(dict(batch_size=256, num_examples=1017, loss_buckets=4))  # every image of the eval npz
  return config


def _cpu_stage(stage: int):
  attention, num_steps = _STAGES[stage]
  config = _small_unet(attention)
  # Stage 1 from scratch at peak 2e-3; each restart a new cosine at half that peak after a longer warm-up.
  config.optim.update(dict(learning_rate=2e-3 if stage == 1 else 1e-3, warmup_steps=100 if stage == 1 else 500,
                           schedule="cosine", ema_decay=0.999))
  config.train.update(dict(batch_size=32, num_steps=num_steps, log_every=50, eval_every=1000,
                           checkpoint_every=250, keep_checkpoints=2,
                           init_from="" if stage == 1 else f"{CPU_WORKDIRS}/stage{stage - 1}/export"))
  config.lock()
  return config


def _accel():
  config = _small_unet()
  config.data.in_memory = True  # 150 MB decoded: decoding JPEGs on access would starve the accelerator
  # 4x the CPU batch: a longer warm-up and a slower EMA than stage 1
  config.optim.update(dict(learning_rate=2e-3, warmup_steps=500, schedule="cosine", ema_decay=0.9995))
  config.train.update(dict(batch_size=128, num_steps=30_000, steps_per_dispatch=10, log_every=1000,
                           eval_every=5000, checkpoint_every=5000, keep_checkpoints=2))
  config.lock()
  return config


def _gpu(tiny: bool):
  config = config_schema.training_config("score", TRAIN_FOLDER, (32, 32, 3), random_flip=True)
  config.data.eval_name = EVAL_NPZ
  config.data.in_memory = True  # as :accel
  config.model.name = "score_unet"
  config.model.kwargs.update(dict(channels=8 if tiny else 112, channel_mults=(1, 2, 2), num_res_blocks=2,
                                  attention_resolutions=(16,), max_groups=4 if tiny else 32, dtype="bfloat16"))
  config.sigma.update(dict(focus_min=0.1, focus_prob=0.5))  # half the sigmas in [0.1, 1], as :accel
  # half :accel's learning rate for a network over twice as wide
  config.optim.update(dict(learning_rate=1e-3, warmup_steps=2 if tiny else 500, schedule="cosine",
                           ema_decay=0.9 if tiny else 0.9995))
  config.train.update(dict(batch_size=8 if tiny else 128, num_steps=4 if tiny else 15_000,
                           steps_per_dispatch=2 if tiny else 10, log_every=2 if tiny else 500,
                           eval_every=4 if tiny else 1500, checkpoint_every=4 if tiny else 5000, keep_checkpoints=1))
  config.eval.update(dict(batch_size=8 if tiny else 256, num_examples=8 if tiny else 1017, loss_buckets=4))
  config.lock()
  return config

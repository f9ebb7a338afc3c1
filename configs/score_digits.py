"""Score network for the embedded 8x8 digits, trained on a laptop CPU in a few minutes.

Run (2 CPU cores, about 3 minutes):
  python scripts/train_score.py --config configs/score_digits.py --workdir runs/score_digits
Tiny variant for tests (seconds):
  python scripts/train_score.py --config configs/score_digits.py:tiny --workdir /tmp/score_tiny
Model size only (parameters and FLOPs, no data, no training):
  python scripts/train_score.py --config configs/score_digits.py --config.report_only --workdir /tmp/unused

The U-Net is deliberately narrow (8 base channels, 8x8 -> 4x4 -> 2x2): certification runs the annealed
denoiser, about 10 score evaluations per noisy sample and 1e5-1e6 samples, on the same CPU, so the forward
pass must cost ~1.6 MFLOPs per image. sigma spans [0.01, 1.0]: 0.01 is below one 8-bit grey level's worth
of structure, 1.0 is the largest smoothing noise evaluated.
"""

from scoresmooth_jax.runtime import config_schema


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: use '' or 'tiny'.")
  tiny = variant == "tiny"
  # random_flip=False: a mirrored digit is not a digit
  config = config_schema.training_config("score", "digits", (8, 8, 1), random_flip=False)
  config.model.name = "score_unet"
  config.model.kwargs.update(dict(channels=4 if tiny else 8, channel_mults=(1, 2) if tiny else (1, 2, 4),
                                  num_res_blocks=1, attention_resolutions=(), max_groups=4))
  config.optim.update(dict(learning_rate=2e-3, warmup_steps=10 if tiny else 200, ema_decay=0.99 if tiny else 0.999))
  config.train.update(dict(batch_size=32 if tiny else 128, num_steps=40 if tiny else 3000,
                           log_every=20 if tiny else 250, eval_every=40 if tiny else 1000,
                           checkpoint_every=20 if tiny else 1000))
  config.eval.update(dict(batch_size=200, num_examples=400))  # the whole digits test split
  config.lock()
  return config

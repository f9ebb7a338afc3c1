"""Score U-Net for ImageNet at 224x224, the input size of torchvision's ResNet-50 that it denoises for.

Run (a TPU pod or multi-GPU host; imagenet2012 must be prepared for tfds, which needs a manual download):
  python scripts/train_score.py --config configs/score_imagenet.py --workdir gs://bucket/score_imagenet \
      --config.distributed
Tiny variant (CPU tests; images resized to 32x32):
  python scripts/train_score.py --config configs/score_imagenet.py:tiny --workdir /tmp/score_imagenet_tiny
Model size only:
  python scripts/train_score.py --config configs/score_imagenet.py --config.report_only --workdir /tmp/unused

Denoising must happen at the classifier's input resolution (the smoothing noise is added there), hence 224:
six levels 224 -> 7 with self-attention at 28 and 14, 90M parameters.
"""

from scoresmooth_jax.runtime import config_schema


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: use '' or 'tiny'.")
  tiny = variant == "tiny"
  size = 32 if tiny else 224
  config = config_schema.training_config("score", "imagenet2012", (size, size, 3), random_flip=True)
  config.data.eval_split = "validation"
  config.data.image_size = size  # shorter side resized to this, then a central crop
  config.model.name = "score_unet"
  config.model.kwargs.update(dict(channels=8 if tiny else 128, channel_mults=(1, 2) if tiny else (1, 1, 2, 2, 4, 4),
                                  num_res_blocks=1 if tiny else 2, attention_resolutions=(16,) if tiny else (28, 14),
                                  max_groups=32, dropout=0.0))
  config.sigma.sigma_max = 1.5  # a margin above the largest certified sigma, 1.0
  config.optim.update(dict(learning_rate=1e-4, warmup_steps=2 if tiny else 5000, ema_decay=0.9 if tiny else 0.9999))
  config.train.update(dict(batch_size=16 if tiny else 256, num_steps=4 if tiny else 500_000,
                           steps_per_dispatch=1 if tiny else 10, log_every=2 if tiny else 1000,
                           eval_every=4 if tiny else 50_000, checkpoint_every=2 if tiny else 10_000,
                           keep_checkpoints=2 if tiny else 3))
  config.eval.update(dict(batch_size=16 if tiny else 256, num_examples=16 if tiny else 1024,
                          loss_buckets=2 if tiny else 4))
  config.lock()
  return config

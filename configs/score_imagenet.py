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

import ml_collections


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: use '' or 'tiny'.")
  tiny = variant == "tiny"
  size = 32 if tiny else 224
  config = ml_collections.ConfigDict()
  config.task = "score"
  config.seed = 0
  config.distributed = False  # set True on multi-host runs: calls jax.distributed.initialize()
  config.report_only = False

  config.data = ml_collections.ConfigDict()
  config.data.name = "imagenet2012"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  config.data.image_size = size  # shorter side resized to this, then a central crop
  config.data.image_shape = (size, size, 3)
  config.data.random_flip = True

  config.model = ml_collections.ConfigDict()
  config.model.name = "score_unet"
  config.model.kwargs = ml_collections.ConfigDict()
  config.model.kwargs.channels = 8 if tiny else 128
  config.model.kwargs.channel_mults = (1, 2) if tiny else (1, 1, 2, 2, 4, 4)
  config.model.kwargs.num_res_blocks = 1 if tiny else 2
  config.model.kwargs.attention_resolutions = (16,) if tiny else (28, 14)
  config.model.kwargs.max_groups = 32
  config.model.kwargs.dropout = 0.0

  config.sigma = ml_collections.ConfigDict()
  config.sigma.sigma_min = 0.01
  config.sigma.sigma_max = 1.5  # a margin above the largest certified sigma, 1.0
  config.sigma.num_scales = 0

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 2 if tiny else 5000
  config.optim.schedule = "constant"
  config.optim.grad_clip = 1.0
  config.optim.weight_decay = 0.0
  config.optim.ema_decay = 0.9 if tiny else 0.9999

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16 if tiny else 256
  config.train.num_steps = 4 if tiny else 500_000
  config.train.steps_per_dispatch = 1 if tiny else 10
  config.train.log_every = 2 if tiny else 1000
  config.train.eval_every = 4 if tiny else 50_000
  config.train.checkpoint_every = 2 if tiny else 10_000
  config.train.keep_checkpoints = 2 if tiny else 3

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 16 if tiny else 256
  config.eval.num_examples = 16 if tiny else 1024
  config.eval.sigmas = (0.12, 0.25, 0.5, 1.0)
  config.eval.loss_buckets = 2 if tiny else 4

  config.lock()
  return config

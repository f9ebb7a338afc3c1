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

import ml_collections


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: use '' or 'tiny'.")
  tiny = variant == "tiny"
  config = ml_collections.ConfigDict()
  config.task = "score"
  config.seed = 0
  config.distributed = False
  config.report_only = False

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  config.data.image_size = ml_collections.config_dict.placeholder(int)
  config.data.image_shape = (8, 8, 1)
  config.data.random_flip = False  # a mirrored digit is not a digit

  config.model = ml_collections.ConfigDict()
  config.model.name = "score_unet"
  config.model.kwargs = ml_collections.ConfigDict()
  config.model.kwargs.channels = 4 if tiny else 8
  config.model.kwargs.channel_mults = (1, 2) if tiny else (1, 2, 4)
  config.model.kwargs.num_res_blocks = 1
  config.model.kwargs.attention_resolutions = ()
  config.model.kwargs.max_groups = 4

  config.sigma = ml_collections.ConfigDict()
  config.sigma.sigma_min = 0.01
  config.sigma.sigma_max = 1.0
  config.sigma.num_scales = 0  # continuous: log-uniform sigma

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 10 if tiny else 200
  config.optim.schedule = "constant"
  config.optim.grad_clip = 1.0
  config.optim.weight_decay = 0.0
  config.optim.ema_decay = 0.99 if tiny else 0.999

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 32 if tiny else 128
  config.train.num_steps = 40 if tiny else 3000
  config.train.steps_per_dispatch = 1  # XLA:CPU runs convs in loop bodies slowly (train_state.py)
  config.train.log_every = 20 if tiny else 250
  config.train.eval_every = 40 if tiny else 1000
  config.train.checkpoint_every = 20 if tiny else 1000
  config.train.keep_checkpoints = 2

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 200
  config.eval.num_examples = 400  # the whole digits test split
  config.eval.sigmas = (0.12, 0.25, 0.5, 1.0)
  config.eval.loss_buckets = 4

  config.lock()
  return config

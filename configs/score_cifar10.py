"""NCSN++ score network for CIFAR-10 (score_sde's ``configs/ve/cifar10_ncsnpp_continuous.py`` architecture).

Run (a TPU/GPU host; tfds downloads cifar10 on first use):
  python scripts/train_score.py --config configs/score_cifar10.py --workdir runs/score_cifar10
Tiny variant (CPU tests, mock or real cifar10; one level, no attention, so it compiles fast):
  python scripts/train_score.py --config configs/score_cifar10.py:tiny --workdir /tmp/score_cifar10_tiny
Model size only:
  python scripts/train_score.py --config configs/score_cifar10.py --config.report_only --workdir /tmp/unused

The network is score_sde's NCSN++ (continuous VE: Gaussian Fourier features of log sigma, output divided by
sigma; 62.8M parameters), so its parameters can also be warm-started from score_sde's published checkpoint.
Optimisation follows score_sde (Adam 2e-4, 5000 warmup steps, clipping at 1, EMA 0.9999, batch 128). The
sigma range differs on purpose: smoothing denoises at sigma <= 1, so training covers [0.01, 1.5] (a margin above 1.0) rather
than score_sde's [0.01, 50], which spends the capacity where certification needs it.
"""

import ml_collections


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: use '' or 'tiny'.")
  tiny = variant == "tiny"
  config = ml_collections.ConfigDict()
  config.task = "score"
  config.seed = 0
  config.distributed = False  # True on multi-host TPU/GPU: calls jax.distributed.initialize()
  config.report_only = False

  config.data = ml_collections.ConfigDict()
  config.data.name = "cifar10"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  config.data.image_size = ml_collections.config_dict.placeholder(int)
  config.data.image_shape = (32, 32, 3)
  config.data.random_flip = True

  config.model = ml_collections.ConfigDict()
  config.model.name = "ncsnpp"
  config.model.kwargs = ml_collections.ConfigDict()
  config.model.kwargs.nf = 8 if tiny else 128
  config.model.kwargs.ch_mult = (1,) if tiny else (1, 2, 2, 2)
  config.model.kwargs.num_res_blocks = 1 if tiny else 4
  config.model.kwargs.attn_resolutions = () if tiny else (16,)
  config.model.kwargs.dropout = 0.1
  config.model.kwargs.embedding_type = "fourier"
  config.model.kwargs.scale_by_sigma = True
  config.model.kwargs.centered = False

  config.sigma = ml_collections.ConfigDict()
  config.sigma.sigma_min = 0.01
  config.sigma.sigma_max = 1.5  # a margin above the largest certified sigma, 1.0
  config.sigma.num_scales = 0  # continuous: log-uniform sigma

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 2 if tiny else 5000
  config.optim.schedule = "constant"
  config.optim.grad_clip = 1.0
  config.optim.weight_decay = 0.0
  config.optim.ema_decay = 0.9 if tiny else 0.9999

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16 if tiny else 128
  config.train.num_steps = 4 if tiny else 1_300_000
  config.train.steps_per_dispatch = 1 if tiny else 10
  config.train.log_every = 2 if tiny else 1000
  config.train.eval_every = 4 if tiny else 50_000
  config.train.checkpoint_every = 2 if tiny else 10_000
  config.train.keep_checkpoints = 2 if tiny else 3

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 16 if tiny else 256
  config.eval.num_examples = 16 if tiny else 1024
  config.eval.sigmas = (0.12, 0.25, 0.5, 1.0)
  config.eval.loss_buckets = 1 if tiny else 4

  config.lock()
  return config

"""Runs tried on the way to cifar10-cpu and not shipped (README.md beside this file says what each showed).

Each variant is configs/score_cifar10.py:cpu_stage1 with the changes below; the data paths are the recipe's:
  python scripts/train_score.py --config configs/proj/cifar10_cpu/ablations.py:VARIANT \
      --workdir workdirs/cifar10_cpu_ablations/VARIANT
``more`` and ``deep`` start from stage 1's export (run stage 1 first, configs/score_cifar10.py).
"""

from scoresmooth_jax.runtime import configs_util

VARIANTS = ("first", "wide", "more", "deep", "edm")
STAGE1 = "configs/score_cifar10.py:cpu_stage1"
STAGE1_EXPORT = "workdirs/cifar10_cpu/stage1/export"  # where the recipe's stage 1 writes it


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}: use one of " + ", ".join(map(repr, VARIANTS)) + ".")
  config = configs_util.load_config(STAGE1)
  with config.unlocked():
    if variant in ("first", "wide"):  # short runs at peak 1e-3, evaluated on 512 images
      config.optim.learning_rate = 1e-3
      config.train.update(dict(num_steps=5000 if variant == "first" else 3500, eval_every=500))
      config.eval.num_examples = 512
    if variant == "first":  # 32 channels, log-uniform sigmas
      config.model.kwargs.channels = 32
      config.sigma.update(dict(focus_min=0.0, focus_prob=0.0))
    if variant in ("more", "deep"):  # a second cosine from stage 1's export, as the recipe's restarts
      config.optim.update(dict(learning_rate=1e-3, warmup_steps=500))
      config.train.init_from = STAGE1_EXPORT
    if variant == "deep":  # two residual blocks at 32x32 and 16x16, the added ones starting as the identity
      del config.model.kwargs.num_res_blocks  # an int in the recipe, a tuple (one count per level) here
      config.model.kwargs.num_res_blocks = (2, 2, 1)
      config.train.num_steps = 5000
    if variant == "edm":  # EDM's preconditioning (models/score_unet.py) at CIFAR-10's pixel standard deviation
      config.model.kwargs.sigma_data = 0.25
  return config


"""CIFAR-style ResNet-8 classifier for the embedded 8x8 digits, plain or with Gaussian noise augmentation.

Run (2 CPU cores, under a minute each):
  python scripts/train_classifier.py --config configs/classifier_digits.py --workdir runs/clf_digits
  python scripts/train_classifier.py --config configs/classifier_digits.py:gaussian_0.25 --workdir runs/clf_digits_g025
Tiny variant for tests (width 8, 150 steps, still >= 95 % test accuracy):
  python scripts/train_classifier.py --config configs/classifier_digits.py:tiny --workdir /tmp/clf_tiny

Variants: "" (plain training: the classifier denoised smoothing protects without retraining), "gaussian_<sigma>"
(Cohen et al.'s noise augmentation at that sigma: the white-box smoothing baseline), "tiny" (few steps).
The normalisation constants are the digits training split's pixel mean and standard deviation.
"""

import ml_collections


def get_config(variant: str = ""):
  tiny = variant == "tiny"
  noise_sigma = 0.0
  if variant.startswith("gaussian_"):
    noise_sigma = float(variant[len("gaussian_"):])
  elif variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: use '', 'tiny' or 'gaussian_<sigma>' (e.g. gaussian_0.25).")
  config = ml_collections.ConfigDict()
  config.task = "classifier"
  config.seed = 0
  config.distributed = False
  config.report_only = False
  config.noise_sigma = noise_sigma  # Gaussian augmentation in [0, 1] pixel space; 0 = plain training

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  config.data.image_size = ml_collections.config_dict.placeholder(int)
  config.data.image_shape = (8, 8, 1)
  config.data.random_flip = False  # a mirrored digit is not a digit

  config.normalization = ml_collections.ConfigDict()
  config.normalization.mean = (0.3057,)
  config.normalization.std = (0.3764,)

  config.model = ml_collections.ConfigDict()
  config.model.name = "cifar_resnet"
  config.model.kwargs = ml_collections.ConfigDict()
  config.model.kwargs.depth = 8
  config.model.kwargs.num_classes = 10
  config.model.kwargs.shortcut = "B"
  config.model.kwargs.width = 8 if tiny else 16

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 10 if tiny else 50
  config.optim.schedule = "cosine"
  config.optim.grad_clip = 1.0
  config.optim.weight_decay = 1e-4
  config.optim.ema_decay = 0.0  # BatchNorm statistics track the raw parameters; evaluate those

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 64 if tiny else 128
  config.train.num_steps = 150 if tiny else 600
  config.train.steps_per_dispatch = 1  # XLA:CPU runs convs in loop bodies slowly (train_state.py)
  config.train.log_every = 50 if tiny else 100
  config.train.eval_every = 150 if tiny else 600
  config.train.checkpoint_every = 150 if tiny else 600
  config.train.keep_checkpoints = 1

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 200
  config.eval.num_examples = 400  # the whole digits test split
  config.eval.noise_sigmas = (0.25, 0.5)

  config.lock()
  return config

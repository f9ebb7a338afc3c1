"""CIFAR-10 ResNet-110 classifier (Cohen et al.'s architecture: shortcut "B"), plain or noise-augmented.

Run (a GPU/TPU host; tfds downloads cifar10 on first use):
  python scripts/train_classifier.py --config configs/classifier_cifar10.py --workdir runs/clf_cifar10
  python scripts/train_classifier.py --config configs/classifier_cifar10.py:gaussian_0.25 --workdir runs/clf_c10_g025
Tiny variant (CPU tests):
  python scripts/train_classifier.py --config configs/classifier_cifar10.py:tiny --workdir /tmp/clf_c10_tiny

Variants: "" (plain: the model denoised smoothing wraps), "gaussian_<sigma>" (Cohen et al.'s Gaussian noise
augmentation at that sigma, the white-box smoothing baseline), "tiny". Normalisation is Cohen et al.'s
(``_CIFAR10_MEAN`` / ``_CIFAR10_STDDEV`` in their datasets.py). About 90 epochs of 50,000 images at batch 256,
AdamW with a cosine schedule instead of their SGD step schedule; random flips only (no random crops).
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
  config.noise_sigma = noise_sigma

  config.data = ml_collections.ConfigDict()
  config.data.name = "cifar10"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  config.data.image_size = ml_collections.config_dict.placeholder(int)
  config.data.image_shape = (32, 32, 3)
  config.data.random_flip = True

  config.normalization = ml_collections.ConfigDict()
  config.normalization.mean = (0.4914, 0.4822, 0.4465)
  config.normalization.std = (0.2023, 0.1994, 0.2010)

  config.model = ml_collections.ConfigDict()
  config.model.name = "cifar_resnet"
  config.model.kwargs = ml_collections.ConfigDict()
  config.model.kwargs.depth = 8 if tiny else 110
  config.model.kwargs.num_classes = 10
  config.model.kwargs.shortcut = "B"
  config.model.kwargs.width = 4 if tiny else 16

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 2 if tiny else 1000
  config.optim.schedule = "cosine"
  config.optim.grad_clip = 1.0
  config.optim.weight_decay = 0.05
  config.optim.ema_decay = 0.0  # BatchNorm statistics track the raw parameters; evaluate those

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16 if tiny else 256
  config.train.num_steps = 4 if tiny else 17_600
  config.train.steps_per_dispatch = 1 if tiny else 10
  config.train.log_every = 2 if tiny else 200
  config.train.eval_every = 4 if tiny else 2000
  config.train.checkpoint_every = 2 if tiny else 2000
  config.train.keep_checkpoints = 2

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 16 if tiny else 512
  config.eval.num_examples = 16 if tiny else 10_000
  config.eval.noise_sigmas = (0.25, 0.5)

  config.lock()
  return config

"""CIFAR-10 ResNet-110 classifier (Cohen et al.'s architecture: shortcut "B"), plain or noise-augmented.

Run (a GPU/TPU host; tfds downloads cifar10 on first use):
  python scripts/train_classifier.py --config configs/classifier_cifar10.py --workdir runs/clf_cifar10
  python scripts/train_classifier.py --config configs/classifier_cifar10.py:gaussian_0.25 --workdir runs/clf_c10_g025
Tiny variant (CPU tests):
  python scripts/train_classifier.py --config configs/classifier_cifar10.py:tiny --workdir /tmp/clf_c10_tiny

Variants: "" (plain: the model denoised smoothing wraps), "gaussian_<sigma>" (Cohen et al.'s Gaussian noise
augmentation at that sigma, the white-box smoothing baseline), "tiny". Normalisation is Cohen et al.'s
(``_CIFAR10_MEAN`` / ``_CIFAR10_STDDEV`` in their datasets.py). About 90 epochs of 50,000 images at batch 256,
AdamW with a cosine schedule instead of their SGD step schedule; their augmentation: random crops with 4 pixels
of zero padding and random horizontal flips.
"""

from scoresmooth_jax.training.train import base_config


def get_config(variant: str = ""):
  tiny = variant == "tiny"
  config = base_config("classifier", "cifar10", (32, 32, 3), random_flip=True, random_crop_padding=4)
  if variant.startswith("gaussian_"):
    config.noise_sigma = float(variant[len("gaussian_"):])
  elif variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: use '', 'tiny' or 'gaussian_<sigma>' (e.g. gaussian_0.25).")
  config.normalization.update(dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)))
  config.model.name = "cifar_resnet"
  config.model.kwargs.update(dict(depth=8 if tiny else 110, num_classes=10, shortcut="B", width=4 if tiny else 16))
  config.optim.update(dict(learning_rate=1e-3, warmup_steps=2 if tiny else 1000, schedule="cosine",
                           weight_decay=0.05))
  config.train.update(dict(batch_size=16 if tiny else 256, num_steps=4 if tiny else 17_600,
                           steps_per_dispatch=1 if tiny else 10, log_every=2 if tiny else 200,
                           eval_every=4 if tiny else 2000, checkpoint_every=2 if tiny else 2000))
  config.eval.update(dict(batch_size=16 if tiny else 512, num_examples=16 if tiny else 10_000))
  config.lock()
  return config

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

from scoresmooth_jax.runtime import config_schema


def get_config(variant: str = ""):
  tiny = variant == "tiny"
  # random_flip=False: a mirrored digit is not a digit
  config = config_schema.training_config("classifier", "digits", (8, 8, 1), random_flip=False)
  if variant.startswith("gaussian_"):
    config.noise_sigma = float(variant[len("gaussian_"):])
  elif variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: use '', 'tiny' or 'gaussian_<sigma>' (e.g. gaussian_0.25).")
  config.normalization.update(dict(mean=(0.3057,), std=(0.3764,)))
  config.model.name = "cifar_resnet"
  config.model.kwargs.update(dict(depth=8, num_classes=10, shortcut="B", width=8 if tiny else 16))
  config.optim.update(dict(learning_rate=3e-3, warmup_steps=10 if tiny else 50, schedule="cosine",
                           weight_decay=1e-4))
  config.train.update(dict(batch_size=64 if tiny else 128, num_steps=150 if tiny else 600,
                           log_every=50 if tiny else 100, eval_every=150 if tiny else 600,
                           checkpoint_every=150 if tiny else 600, keep_checkpoints=1))
  config.eval.update(dict(batch_size=200, num_examples=400))  # the whole digits test split
  config.lock()
  return config

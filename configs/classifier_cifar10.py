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

"finetune_gaussian_<sigma>": the white-box baseline without training from scratch: a pretrained ResNet-20
(akamaster's, converted with scripts/convert_torch_classifier.py) fine-tuned with Gaussian noise augmentation at
that sigma, 4 epochs at batch 128 from train.init_from (its normalisation), here on a JPEG folder of the 50,000
training images and evaluated, clean and at sigma, on lossless test images:
  python scripts/convert_torch_classifier.py --checkpoint=resnet20-12fca82f.th --output=exports/resnet20
  python scripts/train_classifier.py --config configs/classifier_cifar10.py:finetune_gaussian_0.25 \
      --workdir runs/resnet20_gaussian_0.25 --config.train.init_from=exports/resnet20 \
      --config.data.name=folder:data/cifar10 --config.data.eval_name=npz:/path/cifar10_test.npz
"""

from scoresmooth_jax.runtime import config_schema

FINETUNE_EPOCHS = 4  # at sigma 0.25 the last epoch adds 0.3 points of noisy test accuracy (metrics.jsonl, per epoch)
_FINETUNE_STEPS_PER_EPOCH = 390  # 50,000 images at batch 128


def get_config(variant: str = ""):
  tiny = variant == "tiny"
  config = config_schema.training_config("classifier", "cifar10", (32, 32, 3), random_flip=True,
                                         random_crop_padding=4)
  if variant.startswith("finetune_gaussian_"):
    return _finetune(config, float(variant[len("finetune_gaussian_"):]))
  if variant.startswith("gaussian_"):
    config.noise_sigma = float(variant[len("gaussian_"):])
  elif variant not in ("", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: use '', 'tiny', 'gaussian_<sigma>' (e.g. gaussian_0.25) or "
                     "'finetune_gaussian_<sigma>'.")
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


def _finetune(config, sigma: float):
  """A pretrained akamaster ResNet-20 (train.init_from) fine-tuned with Gaussian noise augmentation at sigma."""
  config.noise_sigma = sigma
  config.normalization.update(dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))  # akamaster's
  config.model.name = "cifar_resnet"
  config.model.kwargs.update(dict(depth=20, num_classes=10, shortcut="A", width=16))
  steps = FINETUNE_EPOCHS * _FINETUNE_STEPS_PER_EPOCH
  # A short warm-up and a small peak: the start is already a good classifier, which a large step would undo.
  config.optim.update(dict(learning_rate=1e-3, warmup_steps=100, schedule="cosine", weight_decay=1e-4))
  config.train.update(dict(batch_size=128, num_steps=steps, log_every=_FINETUNE_STEPS_PER_EPOCH // 3,
                           eval_every=_FINETUNE_STEPS_PER_EPOCH, checkpoint_every=_FINETUNE_STEPS_PER_EPOCH // 3,
                           keep_checkpoints=1))
  config.data.in_memory = True  # a JPEG folder decodes once, not once per epoch
  config.eval.update(dict(batch_size=500, num_examples=1000, noise_sigmas=(sigma,)))
  config.lock()
  return config

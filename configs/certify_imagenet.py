"""Certify ImageNet validation images (Cohen et al.: every 100th image, n0 = 100, alpha = 0.001).

  python scripts/certify.py --config configs/certify_imagenet.py --workdir workdirs/certify_imagenet \
      --config.classifier.path=workdirs/resnet50_torchvision --config.denoiser.score=workdirs/score_imagenet/export \
      --config.noise.sigma=0.5
The data must be prepared with tfds beforehand (README). Images are resized to 224 (shorter side, then centre
crop). The tiny variant (tests, CPU) certifies 2 mock images at 32x32. All keys: config_schema.certification_config.
"""

from scoresmooth_jax.runtime import config_schema


def get_config(variant: str = ""):
  config = config_schema.certification_config()
  config.dataset.name = "imagenet2012"
  config.dataset.split = "validation"
  config.dataset.image_size = 224
  config.dataset.skip = 100
  config.classifier.path = "workdirs/resnet50/export"
  config.denoiser.score = "workdirs/score_imagenet/export"
  config.noise.sigma = 0.5
  config.certify.n = 10_000
  config.certify.batch_size = 100  # per device; 224x224 images and a score network per draw
  if variant == "tiny":
    config.dataset.image_size = 32
    config.dataset.skip = 1
    config.dataset.max = 2
    config.denoiser.kind = "one_step"
    config.certify.n0 = 8
    config.certify.n = 16
    config.certify.batch_size = 2
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of certify_imagenet: use '' or 'tiny'.")
  config.lock()
  return config

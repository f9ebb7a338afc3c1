"""Certify CIFAR-10 test images (Cohen et al.'s protocol: every 20th image, n0 = 100, alpha = 0.001).

With our score model and a converted or trained classifier, on a GPU/TPU host:
  python scripts/certify.py --config configs/certify_cifar10.py --workdir workdirs/certify_cifar10 \
      --config.classifier.path=workdirs/resnet110_cohen --config.denoiser.score=workdirs/score_cifar10/export \
      --config.noise.sigma=0.25
With a published score_sde model: --config.denoiser.score=score_sde:cifar10_ncsnpp_continuous:/path/checkpoint_26
Cohen's n = 100,000: --config.certify.n=100000. The tiny variant (tests, CPU) certifies 2 images with
few draws and a one-step denoiser. All keys: scoresmooth_jax.runtime.config_schema.certification_config.
"""

from scoresmooth_jax.runtime import config_schema


def get_config(variant: str = ""):
  config = config_schema.certification_config()
  config.dataset.name = "cifar10"
  config.dataset.skip = 20
  config.classifier.path = "workdirs/classifier_cifar10/export"
  config.denoiser.score = "workdirs/score_cifar10/export"
  config.certify.n = 10_000        # the paper's N; Cohen et al. use 100,000
  config.certify.batch_size = 400  # per device
  if variant == "tiny":
    config.dataset.skip = 1
    config.dataset.max = 2
    config.denoiser.kind = "one_step"
    config.certify.n0 = 8
    config.certify.n = 16
    config.certify.batch_size = 2
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of certify_cifar10: use '' or 'tiny'.")
  config.lock()
  return config

"""Certify the embedded 8x8 digits test set with a denoised smoothed classifier (CPU-sized).

First train the models (scripts/quickstart.sh does all of this):
  python scripts/train_score.py --config configs/score_digits.py --workdir workdirs/score_digits
  python scripts/train_classifier.py --config configs/classifier_digits.py --workdir workdirs/classifier_digits
Then:
  python scripts/certify.py --config configs/certify_digits.py --workdir workdirs/certify_digits \
      --config.noise.type=laplace --config.noise.sigma=0.5 --config.denoiser.kind=annealed
`--config configs/certify_digits.py:tiny` is the variant the tests use (few images, few draws).
All keys: scoresmooth_jax.runtime.config_schema.certification_config.
"""

from scoresmooth_jax.runtime import config_schema


def get_config(variant: str = ""):
  config = config_schema.certification_config()
  config.classifier.path = "workdirs/classifier_digits/export"
  config.denoiser.score = "workdirs/score_digits/export"
  if variant == "tiny":
    config.dataset.max = 6
    config.denoiser.num_levels = 3
    config.denoiser.steps_per_level = 1
    config.certify.n0 = 10
    config.certify.n = 40
    config.certify.batch_size = 4
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of certify_digits: use '' or 'tiny'.")
  config.lock()
  return config

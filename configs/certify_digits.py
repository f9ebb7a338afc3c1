"""Certify the embedded 8x8 digits test set with a denoised smoothed classifier (CPU-sized).

First train the models (scripts/quickstart.sh does all of this):
  python scripts/train_score.py --config configs/score_digits.py --workdir workdirs/score_digits
  python scripts/train_classifier.py --config configs/classifier_digits.py --workdir workdirs/classifier_digits
Then:
  python scripts/certify.py --config configs/certify_digits.py --workdir workdirs/certify_digits \
      --config.noise.type=laplace --config.noise.sigma=0.5 --config.denoiser.kind=annealed
`--config configs/certify_digits.py:tiny` is the variant the tests use (few images, few draws).
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = "certify"          # certify | predict (scripts/predict.py sets predict)
  # Multi-host: one process per host, each certifies its own images. Empty values: JAX detects the cluster.
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=0, process_id=-1))
  config.dataset = ml_collections.ConfigDict(dict(
      name="digits",               # digits | npz:/path/to/images.npz | any tfds image dataset
      split="test",
      data_dir="",                 # tfds data_dir ("" for the default)
      image_size=0,                # resize tfds images to this size (0: as stored)
      skip=1,                      # Cohen's --skip: every skip-th image
      max=-1,                      # Cohen's --max: only indices below this (-1: all)
  ))
  config.classifier = ml_collections.ConfigDict(dict(
      path="workdirs/classifier_digits/export",
      compute_dtype="float32",     # float32 | bfloat16 (certify in the precision you deploy)
  ))
  config.denoiser = ml_collections.ConfigDict(dict(
      kind="annealed",             # none | one_step | annealed
      score="workdirs/score_digits/export",  # or score_sde:<preset>:<checkpoint>
      sigma_min=0.01,              # annealed schedule: geometric from noise.sigma down to sigma_min
      num_levels=10,
      steps_per_level=3,
      relative_step=0.5,           # a_i = relative_step * sigma_i^2
  ))
  config.noise = ml_collections.ConfigDict(dict(type="gaussian", sigma=0.25))
  config.certify = ml_collections.ConfigDict(dict(n0=100, n=10_000, alpha=0.001, batch_size=1000, seed=0))
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

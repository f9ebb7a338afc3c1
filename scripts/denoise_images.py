"""A PNG grid like the paper's Fig. 1: clean, noisy, one-step and annealed trajectory for each noise type.

  python scripts/denoise_images.py --score workdirs/score_digits/export --dataset digits --sigma 0.5 \
      --out workdirs/denoise_digits.png
--score also takes score_sde:<preset>:<checkpoint> for published score_sde models and openai:<preset>:<path.pt>
for improved-/guided-diffusion checkpoints (README), e.g. ImageNet at the model's 256 x 256:
  python scripts/denoise_images.py --score openai:256x256_diffusion_uncond:models/256x256_diffusion_uncond.pt \
      --dataset imagenet2012 --split validation --image_size 256 --noises gaussian --sigma 0.5 --out adm.png
"""

import numpy as np
import jax
from absl import flags

from scoresmooth_jax import denoise, noise
from scoresmooth_jax.certification import figures
from scoresmooth_jax.datasets import data
from scoresmooth_jax.runtime import cli, xla_cpu
from scoresmooth_jax.modelio import score_models

_SCORE = flags.DEFINE_string("score", None, "Score model: export directory, score_sde:<preset>:<path> or "
                             "openai:<preset>:<path.pt>.")
_DATASET = flags.DEFINE_string("dataset", "digits", "digits, npz:/path.npz or a tfds name.")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Resize tfds images to this size (the score model's).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 3, "Images per noise type.")
_SIGMA = flags.DEFINE_float("sigma", 0.5, "Noise level (per-coordinate standard deviation, [0, 1] units).")
_NOISES = flags.DEFINE_list("noises", ["gaussian", "laplace", "uniform"], "Noise types, one block of rows each.")
_SIGMA_MIN = flags.DEFINE_float("sigma_min", denoise.DEFAULT_SIGMA_MIN, "Last level of the annealing schedule.")
_LEVELS = flags.DEFINE_integer("num_levels", denoise.DEFAULT_NUM_LEVELS, "Annealing levels L.")
_STEPS = flags.DEFINE_integer("steps_per_level", denoise.DEFAULT_STEPS_PER_LEVEL, "Steps per level T.")
_REL_STEP = flags.DEFINE_float("relative_step", denoise.DEFAULT_RELATIVE_STEP, "a_i = relative_step * sigma_i^2.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_OUT = flags.DEFINE_string("out", "denoising.png", "Output PNG.")
flags.mark_flag_as_required("score")


def main(argv):
  del argv
  xla_cpu.apply_recommended_cpu_flags()  # before the first computation starts JAX's backend
  score_fn = score_models.load_score(_SCORE.value)
  source = data.get_source(_DATASET.value, _SPLIT.value, image_size=_IMAGE_SIZE.value)
  images = np.stack([source[i][0] for i in range(_NUM_IMAGES.value)])
  noises = [noise.make(name, _SIGMA.value) for name in _NOISES.value]
  rows = figures.denoising_rows(score_fn, images, noises, jax.random.key(_SEED.value), sigma_min=_SIGMA_MIN.value,
                                num_levels=_LEVELS.value, steps_per_level=_STEPS.value,
                                relative_step=_REL_STEP.value)
  print(f"wrote {figures.save_grid(rows, _OUT.value)}")


if __name__ == "__main__":
  cli.run(main)

"""Predict (Cohen et al.'s PREDICT) a dataset with a (denoised) smoothed classifier; resumable like certify.

  python scripts/predict.py --config configs/certify_digits.py --workdir workdirs/predict_digits
"""

from absl import flags
from ml_collections import config_flags

from scoresmooth_jax.certification import certify_job
from scoresmooth_jax.runtime import cli, xla_cpu

_CONFIG = config_flags.DEFINE_config_file("config", None, "Certification config (configs/certify_*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for records; reused to resume.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  xla_cpu.apply_recommended_cpu_flags()  # before the first computation starts JAX's backend
  certify_job.run_prediction(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)

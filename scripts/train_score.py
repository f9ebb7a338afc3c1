"""Trains a noise-conditional score network: a thin entry point over scoresmooth_jax.training.train.

  python scripts/train_score.py --config configs/score_digits.py --workdir runs/score_digits

Prints the model's parameter count and forward FLOPs per image first; ``--config.report_only`` stops there.
Running the same command again with the same workdir resumes from the latest checkpoint.
"""

from absl import flags, logging
from ml_collections import config_flags

from scoresmooth_jax.runtime import cli, xla_cpu
from scoresmooth_jax.training import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/score_*.py file (a ':tiny' suffix picks the "
                                          "test variant).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics.jsonl and the export.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  xla_cpu.apply_recommended_cpu_flags()  # before the first computation starts JAX's backend
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress lines are printed
  train.run_training_command(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)

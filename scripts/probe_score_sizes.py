"""Times the training step of several widths of a score config and picks the widest that fits a time budget.

  python scripts/probe_score_sizes.py --config configs/score_cifar10.py:gpu --widths 112,96,64 \
      --seconds 15 --train_seconds 270 --min_steps 15000 --out workdirs/probe.json

Each width is the config with ``model.kwargs.channels`` set to it (other ``--config.*`` overrides apply to all);
``training/rate_probe.py`` compiles their train steps, times each for --seconds on synthetic batches, and picks
the first width (largest first) whose rate gives at least --min_steps steps in 90 % of --train_seconds. Writes
--out (JSON: every rate, the parameter counts, and the chosen width with its step count and evaluation interval)
and the same table as Markdown beside it (.md); when no width fits it writes them too and exits with status 2 and
one line naming every rate.
"""

import json
import pathlib

import jax
from absl import flags, logging
from ml_collections import config_flags

from scoresmooth_jax.runtime import cli, xla_cpu
from scoresmooth_jax.training import rate_probe, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (configs/score_*.py[:variant]).",
                                          lock_config=True)
_WIDTHS = flags.DEFINE_list("widths", None, "Candidate model.kwargs.channels, largest first.")
_SECONDS = flags.DEFINE_float("seconds", 15.0, "Timed seconds of steps per width (after compiling).")
_TRAIN_SECONDS = flags.DEFINE_float("train_seconds", None, "Time budget of the training run, in seconds.")
_MIN_STEPS = flags.DEFINE_integer("min_steps", 15_000, "Fewest steps the chosen width must train in the budget.")
_EVALS = flags.DEFINE_integer("evaluations", 10, "Evaluations of the training run (its PSNR curve).")
_OUT = flags.DEFINE_string("out", None, "JSON file to write (a .md table goes beside it).")
flags.mark_flags_as_required(["config", "widths", "train_seconds", "out"])

FRACTION = 0.9  # of the budget for steps; the rest compiles, evaluates and checkpoints


def main(argv):
  del argv
  xla_cpu.apply_recommended_cpu_flags()  # before the first computation starts JAX's backend
  logging.set_verbosity(logging.WARNING)
  widths = [int(w) for w in _WIDTHS.value]
  configs = {}
  for width in widths:
    config = _CONFIG.value.copy_and_resolve_references()
    with config.unlocked():
      config.model.kwargs.channels = width
    configs[width] = config
  params = {w: train.model_report(c)["params"] for w, c in configs.items()}
  rates = rate_probe.measure_steps_per_sec(configs, _SECONDS.value)
  k = int(_CONFIG.value.train.steps_per_dispatch)
  budget = lambda w: int(rates[w] * _TRAIN_SECONDS.value * FRACTION) // k * k
  lines = [f"Training rate of each width on {jax.device_count()} x {jax.devices()[0].device_kind} "
           f"(batch {_CONFIG.value.train.batch_size}, {_SECONDS.value:g} s timed each; steps in {FRACTION:g} x "
           f"{_TRAIN_SECONDS.value:g} s):", "", "| channels | parameters | steps/s | steps in the budget |",
           "|---|---|---|---|"]
  lines += [f"| {w} | {params[w]:,} | {rates[w]:.1f} | {budget(w):,} |" for w in widths]
  print("\n".join(lines), flush=True)
  result = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "seconds": _SECONDS.value,
            "train_seconds": _TRAIN_SECONDS.value, "min_steps": _MIN_STEPS.value,
            "candidates": [{"channels": w, "params": params[w], "steps_per_sec": rates[w], "steps_in_budget": budget(w)}
                           for w in widths]}
  try:
    width, steps = rate_probe.plan(rates, widths, _TRAIN_SECONDS.value, _MIN_STEPS.value, k, FRACTION)
  except ValueError as err:
    result["chosen"] = None
    _write(result, lines + ["", f"None chosen: {err}"])
    raise
  eval_every = max(k, steps // _EVALS.value // k * k)
  rated = ", ".join(f"{w} channels ({rates[w]:.1f} steps/s)" for w in widths)
  note = (f"Width chosen on {result['device']} by timing the train step (scripts/probe_score_sizes.py): the widest of "
          f"{rated} that trains at least {_MIN_STEPS.value:,} steps in {FRACTION:g} x {_TRAIN_SECONDS.value:g} s.")
  result["chosen"] = {"channels": width, "num_steps": steps, "eval_every": eval_every,
                      "checkpoint_every": eval_every * max(1, _EVALS.value // 2), "note": note}
  _write(result, lines + ["", f"Chosen: {width} channels, {steps:,} steps (the widest with at least "
                              f"{_MIN_STEPS.value:,})."])
  print(f"chosen: {width} channels, {steps} steps", flush=True)


def _write(result: dict, lines: list[str]):
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  cli.run(main)

"""Loading ``configs/<name>.py[:variant]`` files outside absl flags (tests, the quickstart, notebooks)."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository: scoresmooth_jax/runtime/ is two below


def load_config(path, variant: str = "", **overrides):
  """Calls ``get_config(variant)`` of a config file and applies ``overrides``.

  The variant may also follow the path as on the command line: ``load_config("configs/score_cifar10.py:accel")``.
  Relative paths are taken from the project root if they do not exist from the working directory. Override
  keys name nested fields with double underscores: ``certify__n=100`` sets ``config.certify.n``.
  """
  path = str(path)
  if not path.endswith(".py") and ":" in path:
    path, suffix = path.rsplit(":", 1)
    if variant and variant != suffix:
      raise ValueError(f"config {path!r} names variant {suffix!r} and variant={variant!r}; give one of them.")
    variant = suffix
  path = pathlib.Path(path)
  if not path.is_absolute() and not path.exists():
    path = ROOT / path
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} not found: give a configs/*.py path, from the working directory "
                            f"or the project root {ROOT}.")
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  if overrides:
    with config.unlocked():
      for dotted, value in overrides.items():
        *sections, key = dotted.split("__")
        target = config
        for part in sections:
          target = target[part]
        target[key] = value
  return config

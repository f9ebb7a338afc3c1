"""Loading ``configs/<name>.py[:variant]`` files outside absl flags (tests, the quickstart, notebooks)."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(path, variant: str = ""):
  """Calls ``get_config(variant)`` of a config file; relative paths are taken from the project root."""
  path = pathlib.Path(path)
  if not path.is_absolute() and not path.exists():
    path = ROOT / path
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()

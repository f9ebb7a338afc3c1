"""Orbax checkpoints: exported models for inference (params + metadata).

An exported model is a directory::

    <path>/metadata.json   what rebuilds the model: {"kind", "model", "model_kwargs", ...}
    <path>/variables/      the Flax variables ({"params": ..., maybe "batch_stats": ...}), Orbax format

Readers check both parts and fail with a message naming the path and what is wrong, so a missing or corrupt
checkpoint is caught before any computation.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import orbax.checkpoint as ocp

METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete or does not fit what was asked of it."""


def save_model(path, variables: Any, metadata: dict) -> pathlib.Path:
  """Writes ``variables`` (a pytree of arrays) and JSON-serialisable ``metadata`` to directory ``path``.

  Overwrites an existing export at ``path``. Returns the absolute path.
  """
  path = pathlib.Path(path).expanduser().resolve()
  path.mkdir(parents=True, exist_ok=True)
  text = json.dumps(metadata, indent=1, sort_keys=True)  # fails early on non-serialisable metadata
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / VARIABLES_DIR, variables, force=True)
  checkpointer.wait_until_finished()
  # metadata.json is written last: its presence marks a complete export.
  (path / METADATA_FILE).write_text(text)
  return path


def load_metadata(path) -> dict:
  """Reads an export's metadata, failing clearly when the export is missing or incomplete."""
  path = pathlib.Path(path).expanduser().resolve()
  if not path.is_dir():
    raise CheckpointError(f"checkpoint {path} does not exist (expected a directory written by "
                          "scoresmooth_jax.checkpoint.save_model, a training run or the converter).")
  meta_file = path / METADATA_FILE
  if not meta_file.is_file():
    raise CheckpointError(f"checkpoint {path} has no {METADATA_FILE}: it is incomplete (interrupted export?) "
                          "or not a scoresmooth_jax model export; export it again.")
  try:
    return json.loads(meta_file.read_text())
  except json.JSONDecodeError as err:
    raise CheckpointError(f"checkpoint {path}: {METADATA_FILE} is corrupt ({err}); export it again.") from None


def load_model(path, kind: str | None = None) -> tuple[Any, dict]:
  """Reads an export: returns ``(variables, metadata)``; ``kind`` ("classifier", "score") is checked if given."""
  metadata = load_metadata(path)
  path = pathlib.Path(path).expanduser().resolve()
  if kind is not None and metadata.get("kind") != kind:
    raise CheckpointError(f"checkpoint {path} holds a {metadata.get('kind')!r} model, not a {kind!r} model.")
  try:
    variables = ocp.StandardCheckpointer().restore(path / VARIABLES_DIR)
  except Exception as err:  # Orbax raises many types for unreadable data; the user needs the path and cause.
    raise CheckpointError(f"checkpoint {path}: cannot read {VARIABLES_DIR}/ ({type(err).__name__}: {err}); "
                          "the files are missing or corrupt, export it again.") from err
  return variables, metadata

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
                          "scoresmooth_jax.modelio.checkpoint.save_model, a training run or the converter).")
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


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints: the whole training state, every K steps, the last M kept, resumable.
# ---------------------------------------------------------------------------------------------------------

STATE_ITEM = "state"
CONFIG_ITEM = "config"


class TrainCheckpoints:
  """An Orbax ``CheckpointManager`` over ``directory`` holding {"state": pytree, "config": JSON dict}.

  ``save`` writes when ``step`` is a multiple of ``save_every`` (or when forced, e.g. at the last step),
  asynchronously, keeping the newest ``keep``. ``restore`` reads the latest (or a given) step into the
  shapes, dtypes and shardings of ``abstract_state`` (build it with ``jax.eval_shape`` and attach
  shardings), so nothing is materialised twice and the restored arrays land where training wants them.
  """

  def __init__(self, directory, *, save_every: int, keep: int):
    if save_every < 1 or keep < 1:
      raise ValueError(f"checkpoint save_every={save_every} and keep={keep} must both be >= 1.")
    self.directory = pathlib.Path(directory).expanduser().resolve()
    self.save_every = save_every
    # The interval is applied in save(): Orbax's own policy would also save the first step it sees.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, CONFIG_ITEM))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, config: dict, *, force: bool = False) -> bool:
    """Saves (asynchronously) when ``step`` is a multiple of ``save_every`` or ``force``; returns whether it did."""
    if not force and step % self.save_every:
      return False
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), CONFIG_ITEM: ocp.args.JsonSave(config)})
    return self._manager.save(int(step), args=args, force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Returns ``(state, config)`` from ``step`` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no training checkpoint in {self.directory} to restore.")
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                                 CONFIG_ITEM: ocp.args.JsonRestore()})
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as err:  # shape/structure mismatches come as many types; name the fix.
      raise CheckpointError(f"cannot restore step {step} from {self.directory} ({type(err).__name__}: {err}); "
                            "the checkpoint was written with a different model or optimizer config: use the "
                            "config it was trained with, or a new workdir.") from err
    return restored[STATE_ITEM], restored[CONFIG_ITEM]

  def wait(self):
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()

"""How the scripts end on bad input: one line that names the value and the fix, exit status 2, no traceback.

The package reports what a user can fix (a mistyped model name, a sigma outside a model's range, a missing
checkpoint or image, a workdir made with other settings) as ``ValueError`` (``CheckpointError`` and
``WorkdirMismatchError`` among them) or as a missing / unreadable file, with a message that says what to do. A
traceback would bury that message, so ``run`` prints the message alone. Other exceptions are bugs and keep their
traceback; ``SCORESMOOTH_TRACEBACK=1`` keeps it for these too, to see where one was raised.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Callable

from absl import app

INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_BAD_INPUT = 2


def run(main: Callable) -> None:
  """``absl.app.run(main)``, with bad input reported as one line on stderr and exit status 2."""
  try:
    app.run(main)
  except INPUT_ERRORS as err:
    if os.environ.get("SCORESMOOTH_TRACEBACK"):
      raise
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"{pathlib.Path(sys.argv[0]).name}: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)

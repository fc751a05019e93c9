"""What the read-only commands share: one-line usage errors, a prompt stop.

Standard library only, so every command (predict, evaluate, pretrained,
layout) can use it before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import NoReturn

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one `error:` line naming the flag."""

  def error(self, message: str) -> NoReturn:
    print(f'error: {message} (python {self.prog.removeprefix("python ")} '
          '--help lists the arguments)', file=sys.stderr)
    sys.exit(2)


def exit_on_stop_signals() -> None:
  """SIGINT/SIGTERM end a read-only command at once: no traceback.

  Such a command writes nothing but its console output, so there is nothing
  to save; os._exit also ends decoding threads and does not raise into an
  import (jaxlib's garbage-collection callback swallows KeyboardInterrupt,
  and an exception inside a C extension's initialisation aborts the process).
  A compile or device computation in progress ends first (Python runs the
  handler between bytecodes).
  """
  for sig in STOP_SIGNALS:
    signal.signal(sig, _stop)


def _stop(signum, frame) -> NoReturn:
  del frame
  try:
    sys.stdout.flush()
  except (OSError, ValueError):
    pass
  print(f'\nstopped ({signal.Signals(signum).name}).', file=sys.stderr,
        flush=True)
  os._exit(128 + signum)  # pylint: disable=protected-access

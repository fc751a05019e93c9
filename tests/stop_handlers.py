"""Waiting until a child Python process handles SIGTERM/SIGINT itself.

Until a command installs its stop handler, the interpreter is still starting
(runpy, numpy): Python's own KeyboardInterrupt applies to SIGINT, and SIGTERM
ends the process with -15. A fixed sleep before signalling guesses at that
moment and loses under load. The kernel shows the handler: SIGTERM's bit in
/proc/PID/status SigCgt (Python catches SIGINT from the start, SIGTERM only
once a handler is installed).
"""

import signal
import time

import pytest


def handles_sigterm(pid: int) -> bool:
  with open(f'/proc/{pid}/status') as status:
    caught = next(int(line.split()[1], 16) for line in status
                  if line.startswith('SigCgt:'))
  return bool(caught & (1 << (signal.SIGTERM - 1)))


def wait_for_stop_handler(process, timeout=60):
  """Returns once `process` (a Popen) has installed its SIGTERM handler."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and process.poll() is None:
    if handles_sigterm(process.pid):
      return
    time.sleep(0.01)
  process.kill()
  pytest.fail('the command never installed its stop handler: '
              f'{process.communicate()}')

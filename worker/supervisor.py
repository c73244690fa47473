"""Keeps one child process running: restarts it when it dies, stops it on SIGTERM/SIGINT.

`python -m worker` is this supervisor around the rq worker process, so a crash, an
out-of-memory kill or a SIGKILL of the rq worker costs a restart, not the whole stack: under
`make run` honcho stops every process as soon as one of them exits.

- The child runs in a process group of its own. A signal sent to the supervisor's group
  (honcho, a terminal's Ctrl-C) reaches the child once, forwarded by the supervisor, so rq
  sees one SIGTERM (warm shutdown: the current job finishes) and a second one only when a
  second one is sent (cold shutdown).
- When the child dies, whatever it left in its group (rq's scheduler process, forked by the
  worker) is terminated before the restart; the work-horse has a group of its own and
  finishes its job, as it would without us.
- Restarts wait 1 s, doubling up to 30 s while the child keeps dying young; a child that ran
  for a minute starts the next restart at 1 s again.
- The child is expected to stop when the supervisor dies (worker/__main__.py asks Linux
  for SIGTERM then), so a SIGKILLed supervisor leaves no worker behind.

This module loads neither rq nor an image library: the supervisor stays small.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger(__name__)

FIRST_DELAY = 1.0
MAX_DELAY = 30.0
# A child that ran this long was healthy: the next restart is quick again.
HEALTHY_AFTER = 60.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Supervisor:
    """Runs `argv` until told to stop; see the module docstring."""

    def __init__(self, argv: Sequence[str], name: str = "child") -> None:
        self.argv = list(argv)
        self.name = name
        self.child: subprocess.Popen[bytes] | None = None
        # Set by the signal handler: a plain flag, since a handler must not take locks
        # (threading.Event) or write logs the interrupted code may be writing.
        self.stopping = False

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; then the child's exit status (0 when it stopped
        cleanly)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._forward)
        delay = FIRST_DELAY
        while not self.stopping:
            started = time.monotonic()
            status = self._run_child()
            if self.stopping:
                log.info("%s stopped (%s)", self.name, _describe(status))
                return 0 if status in (0, -signal.SIGTERM, -signal.SIGINT) else 1
            if time.monotonic() - started >= HEALTHY_AFTER:
                delay = FIRST_DELAY
            log.error("%s %s; restarting it in %.0f s", self.name, _describe(status), delay)
            self._pause(delay)
            delay = min(delay * 2, MAX_DELAY)
        return 0

    def _pause(self, seconds: float) -> None:
        """Sleep, but return at once when a stop signal arrives."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _run_child(self) -> int:
        """Start the child, wait for it to end, clear its process group; its exit status."""
        child = subprocess.Popen(self.argv, process_group=0)
        self.child = child
        if self.stopping:  # the signal came while we were starting it: not yet forwarded
            os.kill(child.pid, signal.SIGTERM)
        log.info("%s started (pid %d)", self.name, child.pid)
        # Wait without reaping: while the dead leader is unreaped its group id cannot be
        # reused, so the killpg below cannot hit an unrelated process.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        # Leftovers (rq's scheduler, forked by a worker that was killed): stop them. Nothing
        # is left after a clean exit.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGTERM)
        status = child.wait()
        self.child = None
        return status

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        """Signal handler: stop supervising; pass the signal on to the child (each one: a
        second SIGTERM is rq's cold shutdown)."""
        self.stopping = True
        child = self.child
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)


def _describe(status: int) -> str:
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"

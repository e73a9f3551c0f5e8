"""Fault injection for the crash tests: `CDM_CRASH_AT=<name>` kills the process at the
crash point of that name, as a power cut would. The crash points are the steps of
adding and forgetting (docs/operations.md lists them)."""

import os
import signal

from .settings import CRASH_ENV, CRASH_ONCE_ENV


def crashpoint(name: str) -> None:
    """SIGKILL this process here (no cleanup, no `finally`) when CDM_CRASH_AT names
    `name`; otherwise do nothing. With CDM_CRASH_ONCE=<file>, only the first process
    to get here dies (it creates the file): a server's restarted worker, or the
    other worker, then goes through the same point and recovers."""
    if os.environ.get(CRASH_ENV) != name:
        return
    once = os.environ.get(CRASH_ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)

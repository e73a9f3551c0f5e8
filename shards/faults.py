"""Fault injection for the crash tests: `CDM_CRASH_AT=<name>` kills the process at the
crash point of that name, as a power cut would. The crash points are the steps of
adding and forgetting (docs/operations.md lists them)."""

import os
import signal

from .settings import CRASH_ENV


def crashpoint(name: str) -> None:
    """SIGKILL this process here (no cleanup, no `finally`) when CDM_CRASH_AT names
    `name`; otherwise do nothing."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)

"""Child processes that do not outlive the process that started them.

The demo starts a broker and device processes; if the demo is killed (SIGKILL, a CI timeout) they
would otherwise keep running, holding ports and CPU. On Linux the kernel sends the child SIGTERM
when its parent dies (PR_SET_PDEATHSIG); elsewhere this is a no-op and atexit clean-up remains.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Callable, Optional

_PR_SET_PDEATHSIG = 1


def die_with_parent_preexec() -> Optional[Callable[[], None]]:
    """A preexec_fn for subprocess.Popen, or None where unsupported.

    The kernel ties the signal to the thread that forked: call Popen from a thread that lives as
    long as the child should (the main thread in the demo).
    """
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()
    # Resolved here, in the parent: the child of a multi-threaded process should do as little as
    # possible between fork and exec (no dlopen, whose lock another thread may have held).
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec

"""A deadline for calls that can block forever: an SPMD step some of whose ranks failed to start.

When one rank of a jitted multi-device program cannot allocate its buffers, XLA fails that rank and the others
wait for it in their first collective with no timeout (4x H200: ranks 1-3 could not place a 31.5 GiB
buffer in a fragmented pool, rank 0 waited in NCCL's clique rendezvous until killed). The waiting call holds the
Python thread inside XLA, so no exception can reach it: past the deadline the process says why and exits.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable

EXIT_CODE = 3


def abort(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


class Deadline:
    """`with Deadline(seconds, what):` calls `on_expire` (default `abort`) with a message naming `what` if the body
    has not finished after `seconds`; seconds <= 0: no deadline."""

    def __init__(self, seconds: float, what: str, on_expire: Callable[[str], None] | None = None):
        self.seconds, self.what = seconds, what
        self.on_expire = on_expire or abort
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "Deadline":
        if self.seconds > 0:
            self._timer = threading.Timer(self.seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        self.on_expire(f"{self.what} did not finish in {self.seconds:g} s: most likely a rank failed (an allocation; "
                       f"see the log above) and the others wait for it in a collective, which never times out; "
                       f"exiting with code {EXIT_CODE}")

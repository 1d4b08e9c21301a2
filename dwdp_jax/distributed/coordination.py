"""The coordination service of one multi-controller world (`jax.distributed`): process ids, a key-value store,
barriers, and the start-up agreement checks that make a bad launch fail fast on every process.

Every wait has a deadline and its error names what is missing: a process that never joined, a key a peer never
wrote, the processes that did not reach a barrier. Recoverability is on, so a peer that dies does not abort the
survivors from inside the runtime: their next wait times out and says which process it was. The exception is
process 0, which hosts the service: when it dies, the runtime aborts the others at once (SIGABRT, "the leader task
was preempted/died"); they still end without hanging, and the router re-runs the group's requests elsewhere.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax

from dwdp_jax.runtime import watchdog


class LaunchError(RuntimeError):
    """A launch that cannot work: a process missing, configurations that differ, a handle that cannot be mapped."""


class Coordination:
    """This process's handle on its world; `connect` joins it (once per process)."""

    def __init__(self, address: str, process_id: int, num_processes: int, timeout_s: float = 30.0):
        if not isinstance(num_processes, int) or num_processes < 1:
            raise ValueError(f"num_processes must be an integer >= 1, got {num_processes!r}")
        if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be an integer in [0, {num_processes - 1}], got {process_id!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.address, self.process_id, self.num_processes = address, process_id, num_processes
        self.timeout_s = timeout_s
        self.client = None

    def connect(self, heartbeat_s: int = 10, exit_code: int = 2) -> "Coordination":
        """Joins the world. The runtime aborts a process whose world does not assemble in time, with no word of
        why, so our own deadline fires first: it says what is missing and exits with `exit_code`."""
        jax.config.update("jax_enable_recoverability", True)
        message = (f"process {self.process_id}: the world of {self.num_processes} processes at {self.address} did "
                   f"not assemble within {self.timeout_s:g} s (a process is missing, was started with another "
                   f"process count, or cannot reach the coordinator)")

        def expire(_):
            print(message, file=sys.stderr, flush=True)
            os._exit(exit_code)

        with watchdog.Deadline(self.timeout_s, "joining the world", on_expire=expire):
            try:
                jax.distributed.initialize(self.address, self.num_processes, self.process_id,
                                           initialization_timeout=int(self.timeout_s) + 30,
                                           heartbeat_timeout_seconds=heartbeat_s)
            except Exception as e:
                raise LaunchError(f"{message}: {str(e).splitlines()[0]}") from e
        from jax._src import distributed  # the client is the runtime's; jax exposes no public handle on it

        self.client = distributed.global_state.client
        return self

    def set(self, key: str, value: str) -> None:
        self.client.key_value_set(key, value)

    def get(self, key: str, who: int | str, timeout_s: float | None = None) -> str:
        """The value `who` writes under `key`, waiting at most the deadline."""
        wait_ms = int(1000 * (self.timeout_s if timeout_s is None else timeout_s))
        try:
            return self.client.blocking_key_value_get(key, wait_ms)
        except Exception as e:
            raise LaunchError(f"process {self.process_id}: process {who} did not publish {key!r} within "
                              f"{wait_ms / 1000:g} s (it died, stalled or was never started)") from e

    def barrier(self, name: str, timeout_s: float | None = None) -> None:
        wait_ms = int(1000 * (self.timeout_s if timeout_s is None else timeout_s))
        try:
            self.client.wait_at_barrier(name, wait_ms)
        except Exception as e:
            missing = _timed_out_tasks(str(e))
            who = f"process(es) {missing}" if missing else "a process"
            raise LaunchError(f"process {self.process_id}: {who} did not reach barrier {name!r} within "
                              f"{wait_ms / 1000:g} s") from e

    def agree(self, name: str, fields: dict[str, Any]) -> None:
        """Every process publishes `fields`; each compares them with every other's and raises, naming the first
        field that differs and both values, so every process of a mismatched launch fails with the same story."""
        self.set(f"agree/{name}/{self.process_id}", json.dumps(fields, sort_keys=True, default=str))
        mine = json.loads(json.dumps(fields, sort_keys=True, default=str))
        for other in range(self.num_processes):
            if other == self.process_id:
                continue
            theirs = json.loads(self.get(f"agree/{name}/{other}", other))
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    lo, hi = sorted((self.process_id, other))
                    values = {self.process_id: mine.get(key), other: theirs.get(key)}
                    raise LaunchError(f"{name} differs across processes: {key} = {values[lo]!r} on process {lo}, "
                                      f"{values[hi]!r} on process {hi}")

    def all_ok(self, name: str, error: str | None) -> None:
        """A start-up step every process must pass: each reports its outcome, and all raise if any failed."""
        self.set(f"ok/{name}/{self.process_id}", error or "")
        failures = {}
        for other in range(self.num_processes):
            said = error if other == self.process_id else self.get(f"ok/{name}/{other}", other)
            if said:
                failures[other] = said
        if failures:
            raise LaunchError(f"{name} failed on process(es) {sorted(failures)}: "
                              + "; ".join(f"process {p}: {m}" for p, m in sorted(failures.items())))

    def leave(self, code: int, grace_s: float = 1.0) -> None:
        """Ends the process after the world's last barrier. The runtime's orderly shutdown is skipped on purpose:
        with recoverable tasks it does not synchronize, and a client whose service (process 0) is gone mid-shutdown
        is aborted by the runtime; so the others exit at once and process 0, which hosts the service, a moment
        later."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.process_id == 0:
            time.sleep(grace_s)
        os._exit(code)


def _timed_out_tasks(message: str) -> list[int]:
    lines = message.splitlines()
    for i, line in enumerate(lines):
        if "timed out task" in line:
            return [int(t) for t in lines[i + 1].replace(",", " ").split() if t.isdigit()]
    return []

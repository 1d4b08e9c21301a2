"""The deadline on calls that can block forever: it fires past its time, with a message naming the call, and not
before or after a body that finished."""

import threading
import time

from dwdp_jax.runtime import watchdog


def test_fires_past_the_deadline_naming_the_call():
    fired = threading.Event()
    said = []
    with watchdog.Deadline(0.05, "the slow call", on_expire=lambda m: (said.append(m), fired.set())):
        assert fired.wait(5)  # the body "hangs" until the deadline fires
    assert said[0].startswith("the slow call did not finish in 0.05 s") and f"code {watchdog.EXIT_CODE}" in said[0]


def test_silent_for_a_body_that_finishes_and_without_a_deadline():
    said = []
    with watchdog.Deadline(0.2, "fast", on_expire=said.append):
        pass
    with watchdog.Deadline(0, "none", on_expire=said.append):
        time.sleep(0.05)
    time.sleep(0.3)  # past the first deadline: cancelled on exit
    assert said == []

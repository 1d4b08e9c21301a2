"""The simulator and roofline studies the figures read, run where their results are missing (a fresh clone tracks none).

Each study runs exactly as `python -m experiments.simulate --config=configs/simulate.py:NAME` runs it
(experiments.simulate.produce with that config) and writes the same results file. They are CPU-only and independent,
so they run in worker processes, longest first, one per core. A study that cannot run here (calibration without GPU
measurements) is reported with its reason and skipped; any other error is a bug and propagates.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dwdp_jax.results import RESULTS_ROOT
from experiments import simulate

# The studies whose results some figure reads, longest first (seconds on one core: planner and contention about a
# minute each, pareto half a minute, the rest seconds), so that the short ones fill in behind the long ones.
STUDIES = ("planner", "contention", "pareto", "calibration", "sync_cv", "roofline")


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: a killed parent cannot stop its pool (a timed-out command would leave minutes of
    simulation running on a shared machine), so each worker watches for it and exits when it is gone."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def missing(results_root: str | Path | None = None) -> list[str]:
    """The studies of STUDIES without any results file under the results root."""
    root = Path(results_root or RESULTS_ROOT)
    return [s for s in STUDIES if not any((root / simulate.EXPERIMENTS[s]).glob("*.json"))]


def run_missing(results_root: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                workers: int | None = None) -> dict[str, str]:
    """Runs every missing study into the results root; returns {study: "wrote PATH" | "not run: REASON"}.

    `overrides` maps a study to config values (experiments.simulate.options) replacing the config file's for that
    study (the tests run cheap settings this way); `workers` defaults to the CPU count."""
    todo = missing(results_root)
    if not todo:
        return {}
    out = str(results_root or RESULTS_ROOT)
    opts = {s: simulate.options(s, **{**(overrides or {}).get(s, {}), "results_root": out, "run": ""}) for s in todo}
    outcome: dict[str, str] = {}
    context = multiprocessing.get_context("spawn")  # the parent may hold threads (a test's JAX): never fork it
    with ProcessPoolExecutor(max_workers=min(workers or os.cpu_count() or 1, len(todo)), mp_context=context,
                             initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool, \
            tqdm(total=len(todo), desc="simulating missing results", unit="study") as bar:
        running = {pool.submit(simulate.produce, opts[s]): s for s in todo}
        bar.set_postfix_str(", ".join(todo))
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                study = running.pop(future)
                try:
                    outcome[study] = f"wrote {future.result()}"
                except ValueError as e:  # the study's inputs are not here (e.g. no GPU calibration): say why
                    outcome[study] = f"not run: {e}"
                tqdm.write(f"  {study}: {outcome[study]}")
                bar.update()
                bar.set_postfix_str(", ".join(running.values()))
    return outcome

"""The results-file contract shared by every experiment, the simulator and the figure scripts.

A results file is one JSON object:
  experiment, run, config (resolved), environment (jax/jaxlib versions, device kind and count, git sha, source hash,
  date, python, host), raw (all repeats, unreduced), metrics (derived), verification ({strategy: {rel_err, passed}}),
  plus optional free-form sections (the main job's `timing`: platform, devices, host cores, passes and
  functional_check, true where virtual CPU devices share the host's cores and the timings make no speed claim).
  Figure scripts read only these files.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

RESULTS_ROOT = Path(os.environ.get("DWDP_RESULTS", "results"))


def git_sha(root: Path | None = None) -> str:
    """HEAD's short sha, with "-dirty" where tracked files differ from it (uncommitted changes, or a copy of a
    working tree whose git metadata is stale): then `source_hash` alone names the code."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, check=True,
                              cwd=root or Path(__file__).resolve().parent).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_SOURCE_DIRS = ("dwdp_jax", "models", "experiments", "configs")


def source_hash(root: Path | None = None, dirs: tuple[str, ...] = _SOURCE_DIRS) -> str:
    """sha256 (first 12 hex) of the code's Python files, paths included: identifies the code that ran even where
    the checkout's git metadata is stale (the GPU machine runs a copy of the working tree, not a clone)."""
    import hashlib

    root = root or Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(p for d in dirs for p in (root / d).rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def environment(with_devices: bool = True) -> dict[str, Any]:
    """Versions, devices and provenance. `with_devices=False` avoids initializing a JAX backend (simulator)."""
    env: dict[str, Any] = {
        "git_sha": git_sha(),
        "source_hash": source_hash(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        import jax
        import jaxlib

        env["jax"] = jax.__version__
        env["jaxlib"] = jaxlib.__version__
        if with_devices:
            devices = jax.devices()
            env["device_kind"] = devices[0].device_kind
            env["device_count"] = len(devices)
            env["platform"] = devices[0].platform
    except ImportError:
        env["jax"] = None
    return env


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, numpy scalars/arrays, ConfigDicts and paths into plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
        return to_jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    return obj


def write_results(experiment: str, run: str, *, config: Any, raw: Any, metrics: Any,
                  verification: dict[str, dict[str, Any]] | None = None, root: Path | str | None = None,
                  with_devices: bool = True, **sections: Any) -> Path:
    """Writes results/<experiment>/<run>.json and returns its path."""
    path = Path(root or RESULTS_ROOT) / experiment / f"{run}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "experiment": experiment,
        "run": run,
        "config": to_jsonable(config),
        "environment": environment(with_devices),
        "raw": to_jsonable(raw),
        "metrics": to_jsonable(metrics),
        "verification": to_jsonable(verification or {}),
        **{k: to_jsonable(v) for k, v in sections.items()},
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=True))
    tmp.replace(path)
    return path


def run_stamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_measurements(experiment: str, *, config: Any, raw: Any, metrics: dict[str, float],
                       root: Path | str | None = None, run: str | None = None, echo: bool = True) -> Path:
    """A timestamped run of a measurement script (flat float metrics): written, then printed as a two-column table.
    Scripts with several long cases pass one `run` (`run_stamp()`) and rewrite it after each case, echoing at the
    end only: a run cut short keeps the cases it finished."""
    path = write_results(experiment, run or run_stamp(), config=config, raw=raw, metrics=metrics, root=root)
    if not echo:
        return path
    for key, value in metrics.items():
        print(f"{key:<36}{value:>12.4f}")
    print(f"results: {path}")
    return path


def read_results(experiment: str, root: Path | str | None = None) -> list[dict[str, Any]]:
    """All results files of an experiment, sorted by run name; unreadable files raise naming the file."""
    folder = Path(root or RESULTS_ROOT) / experiment
    docs = []
    for path in sorted(folder.glob("*.json")):
        try:
            docs.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"results file {path} is not valid JSON: {e}") from e
    return docs

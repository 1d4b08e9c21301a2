"""Block sizes of the split-weight grouped GEMMs, tuned once per shape and card and cached in a JSON file.

`experiments.bench_grouped_gemm --tune` times every candidate of a kernel at a problem (K, N, fused, rows) on the
card at hand and records the fastest in the cache (`record`); the kernels look their blocks up when they trace
(`lookup`): the entry of the same kernel, card, K, N and fused whose row count is nearest in log scale (the kernels
see many row counts, one per token bucket, and a tile schedule's best blocks change slowly with it). Without an
entry, a kernel uses its defaults. The cache is `configs/kernel_blocks.json`, or the file named by
$DWDP_KERNEL_BLOCKS.

File format: {"version": 1, "entries": [{"kernel": str, "device_kind": str, "k": int, "n": int, "fused": bool,
"rows": int, "blocks": {field: value}, "tflops": float, "measured": str}]}; a malformed file is refused with the
file and the field named.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

VERSION = 1
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "configs" / "kernel_blocks.json"
_FIELDS = {"kernel": str, "device_kind": str, "k": int, "n": int, "fused": bool, "rows": int, "blocks": dict,
           "tflops": float, "measured": str}
_loaded: dict[tuple[str, float], list[dict[str, Any]]] = {}


def cache_path() -> Path:
    return Path(os.environ.get("DWDP_KERNEL_BLOCKS") or DEFAULT_PATH)


def read(path: Path | None = None) -> list[dict[str, Any]]:
    """The cache's entries (none when the file does not exist); ValueError naming the file and field if malformed."""
    path = Path(path or cache_path())
    if not path.exists():
        return []
    key = (str(path), path.stat().st_mtime)
    if key not in _loaded:
        _loaded[key] = _validated(path)
    return _loaded[key]


def _validated(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"kernel block cache {path}: not readable JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("entries"), list):
        raise ValueError(f"kernel block cache {path}: needs {{'version': {VERSION}, 'entries': [...]}}")
    for i, entry in enumerate(doc["entries"]):
        for name, kind in _FIELDS.items():
            value = entry.get(name) if isinstance(entry, dict) else None
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
                isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if not ok:
                raise ValueError(f"kernel block cache {path}: entries[{i}].{name} must be a {kind.__name__}, "
                                 f"got {value!r}")
        if min(entry["k"], entry["n"], entry["rows"]) < 1:
            raise ValueError(f"kernel block cache {path}: entries[{i}] needs k, n and rows >= 1")
    return doc["entries"]


def _nearest(kernel: str, device_kind: str, k: int, n: int, fused: bool, rows: int,
             path: Path | None) -> dict[str, Any] | None:
    same = [e for e in read(path) if (e["kernel"], e["device_kind"], e["k"], e["n"], e["fused"]) ==
            (kernel, device_kind, k, n, fused)]
    return min(same, key=lambda e: abs(math.log(e["rows"]) - math.log(max(rows, 1)))) if same else None


def lookup(kernel: str, blocks_type: type, device_kind: str, k: int, n: int, fused: bool, rows: int,
           path: Path | None = None):
    """The cached blocks (an instance of `blocks_type`) of the entry nearest in rows, or None without one."""
    best = _nearest(kernel, device_kind, k, n, fused, rows, path)
    if best is None:
        return None
    names = {f.name for f in dataclasses.fields(blocks_type)}
    unknown = set(best["blocks"]) - names
    if unknown:
        raise ValueError(f"kernel block cache {path or cache_path()}: {kernel} blocks have unknown fields "
                         f"{sorted(unknown)} (allowed: {sorted(names)})")
    return blocks_type(**best["blocks"])


def fastest(kernels: tuple[str, ...], device_kind: str, k: int, n: int, fused: bool, rows: int,
            path: Path | None = None) -> str | None:
    """Of these kernels, the one whose entry nearest in rows timed fastest for this problem and card (each
    kernel's rate at its own tuned blocks), or None when none has an entry."""
    rates = {name: e["tflops"] for name in kernels if (e := _nearest(name, device_kind, k, n, fused, rows, path))}
    return max(rates, key=rates.get) if rates else None


def record(kernel: str, device_kind: str, k: int, n: int, fused: bool, rows: int, blocks, tflops: float,
           measured: str, path: Path | None = None) -> None:
    """Adds (or replaces) the entry of this kernel, card and problem; written atomically."""
    path = Path(path or cache_path())
    entry = {"kernel": kernel, "device_kind": device_kind, "k": k, "n": n, "fused": fused, "rows": rows,
             "blocks": dataclasses.asdict(blocks), "tflops": float(tflops), "measured": measured}
    key = ("kernel", "device_kind", "k", "n", "fused", "rows")
    entries = [e for e in read(path) if any(e[f] != entry[f] for f in key)] + [entry]
    entries.sort(key=lambda e: tuple(str(e[f]) for f in key))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump({"version": VERSION, "entries": entries}, f, indent=1)
    os.replace(f.name, path)

"""Where a served pass's device time goes, read from a profiler trace of the pass itself.

The profiled breakdown (`profiling.rank_by_rank_breakdown` / `profiling.dep_breakdown`) times each stage alone with a
sync; this reads every kernel the devices ran while serving, in place, and attributes it to the `jax.named_scope`
it came from. A trace event names
its program (`program_id`, XLA's module id) and HLO instruction (`hlo_op`); the compiled HLO that XLA dumps
(`--xla_dump_to=DIR --xla_dump_hlo_as_text`, files `module_<id>.<name>.*after_optimizations.txt`) maps each
instruction to its op_name (`jit(f)/layer_3/attention/...`), whose innermost component among `STAGES` is the
stage. Memory copies (a peer pull's memcpy) count as `copy`, instructions without an op_name as `other`.

Per device: the span from its first kernel to its last, the time any computing kernel ran (busy: intervals merged,
copies left out, so idle = span - busy is time the device computed nothing), and each stage's merged time (stages
on concurrent streams may overlap, so they need not sum to busy). The idle time is charged to the instruction whose
kernel ended each gap (`idle_gaps`): a launch that waited on the host, such as a new program's dispatch.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Any

# The named scopes of models/ and runtime/dep.py, innermost first where they nest (moe_gmm inside routed_experts).
# moe_combine also names an MoE layer's residual add, into which XLA fuses the combine's weighted sum; norm every
# RMSNorm (the paper's "Others"), the small ones inside mla_proj and lm_head too.
STAGES = ("attention", "attention_fp8_inputs", "mla_proj", "rope", "mla_out", "router", "shared_expert", "moe_quantize",
          "moe_permute", "moe_gmm", "moe_combine", "dispatch", "combine", "dense_mlp", "embed", "lm_head", "norm")

_MODULE_FILE = re.compile(r"^module_(\d+)\.([^.]+)\..*after_optimizations\.txt$")
_THUNK_FILE = re.compile(r"^module_(\d+)\.[^.]+\.thunk_metadata\.txt$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ")
_OP_NAME = re.compile(r"metadata=\{[^}]*?op_name=\"([^\"]*)\"")
_THUNK = re.compile(r'thunk_info \{\s*(?:profile_annotation: "([^"]*)")?[^}]*\}\s*thunk_kind: "(\w+)"')
_BUFFER = "kCommandBuffer"
_BUFFER_ANNOTATION = "command_buffer"  # how XLA names a command buffer's thunk (command_buffer_44)
# Thunks that only hold or move others (copies count as `copy` by their events' names; memsets belong to the
# library call they clear for), and the kernels XLA generates, named after their instruction or, where two fusions
# compile to one kernel, after the other's (loop_add_fusion, fusion.253, wrapped_concatenate, gemm_fusion_dot.1).
_PLAIN_THUNKS = (_BUFFER, "kSequential", "kCopy", "kMemset32BitValue", "kMemzero")
_KERNEL_THUNKS = ("kKernel", "kCustomKernel")
_XLA_KERNEL = re.compile(r"fusion|^wrapped_")


def op_names(hlo_text: str) -> dict[str, str]:
    """{instruction name: op_name} of an HLO module's text ("" where an instruction has none)."""
    ops = {}
    for line in hlo_text.splitlines():
        if m := _INSTRUCTION.match(line):
            n = _OP_NAME.search(line)
            ops[m.group(1)] = n.group(1) if n else ""
    return ops


def command_buffers(thunk_text: str) -> dict[str, list[tuple[str, str]]]:
    """{command buffer: [(instruction, thunk kind)]} from XLA's `thunk_metadata.txt` dump of a program. The file
    lists the thunks in pre-order without their nesting, so a buffer's list is its own thunks and then the top-level
    ones up to the next buffer."""
    buffers, current = {}, None
    for annotation, kind in _THUNK.findall(thunk_text):
        if kind == _BUFFER:
            current = buffers[annotation] = []
        elif current is not None and annotation:
            current.append((annotation, kind))
    return buffers


def hlo_scopes(dump_dir: str | Path, events: list[tuple] = ()) -> dict[int | str, dict[str, str]]:
    """{program id: {instruction name: op_name}} from XLA's after-optimization HLO text dumps in `dump_dir`, and
    under each module name the union of its programs' (for trace events that name the module, not the program).

    With the trace's `events` (`device_kernels`), also {command buffer: op_name} where the buffer's other kernels
    (cuBLAS's GEMMs and their memsets, Triton's: events that name only the buffer and no instruction) have one
    stage: the buffer's thunks (`command_buffers`) less the instructions whose kernels the trace names directly are
    its members, and where its members other than XLA's own kernels share a stage, that stage is theirs."""
    scopes: dict[int | str, dict[str, str]] = {}
    paths = list(Path(dump_dir).iterdir())
    for path in paths:
        if m := _MODULE_FILE.match(path.name):
            ops = scopes[int(m.group(1))] = op_names(path.read_text())
            scopes.setdefault(m.group(2), {}).update(ops)
    if not events:
        return scopes
    direct = {(program, op) for _, _, program, _, op, _ in events}
    for path in paths:
        m = _THUNK_FILE.match(path.name)
        if not m or int(m.group(1)) not in scopes:
            continue
        program = int(m.group(1))
        ops = scopes[program]
        for buffer, thunks in command_buffers(path.read_text()).items():
            members = [i for i, kind in thunks if (program, i) not in direct and _library_thunk(i, kind)]
            others = sorted({ops.get(i, "") for i in members})
            if others and len({stage_of(o) for o in others}) == 1:
                ops[buffer] = others[0]
    return scopes


def _library_thunk(instruction: str, kind: str) -> bool:
    """Whether a buffer's thunk runs kernels not named after an XLA instruction (a library's), not one that only
    holds or moves others or a kernel XLA generated."""
    return kind not in _PLAIN_THUNKS and not (kind in _KERNEL_THUNKS and _XLA_KERNEL.search(instruction))


def stage_of(op_name: str) -> str:
    """The innermost component of an op_name path that is a stage, else "other"."""
    for part in reversed(op_name.split("/")):
        if part in STAGES:
            return part
    return "other"


def program_ops(scopes: dict[int | str, dict[str, str]], program: int | None, module: str | None
                ) -> dict[str, str] | None:
    """The op_names of an event's program (`hlo_scopes`), found by its id or else its module's name; None where
    no dump describes it."""
    return scopes.get(program, scopes.get(module))


def event_op_name(ops: dict[str, str], op: str | None, kernel: str) -> str:
    """The op_name of the instruction a trace event ran: its `hlo_op`'s, or for a kernel inside an XLA command
    buffer (whose events name the buffer) the fusion the kernel is named after (XLA names a fusion's kernel after
    the instruction with its '.' as '_': loop_add_fusion.1 -> loop_add_fusion_1), else the buffer's library calls'
    where `hlo_scopes` found them (cuBLAS's GEMMs and their memsets); else none."""
    if ops.get(op) and not op.startswith(_BUFFER_ANNOTATION):
        return ops[op]
    named = ops.get(re.sub(r"_(\d+)$", r".\1", kernel), ops.get(kernel))
    return named if named is not None else ops.get(op, "")


def device_kernels(xplane_path: str | Path) -> dict[int, list[tuple]]:
    """{device: [(start_ns, end_ns, program_id, hlo_module, hlo_op, event name)]} of the kernels in a trace: GPU
    device planes (`/device:GPU:<n>`), or on CPU the host plane's XLA thunks (tagged with `device_ordinal`)."""
    from jax.profiler import ProfileData

    kernels = collections.defaultdict(list)
    for plane in ProfileData.from_file(str(xplane_path)).planes:
        gpu = re.match(r"/device:GPU:(\d+)", plane.name)
        if not gpu and plane.name != "/host:CPU":
            continue
        # GPU planes also carry whole-module spans on other lines: only the CUDA streams' kernels, where named
        streams = [line for line in plane.lines if line.name.startswith("Stream")] if gpu else []
        for line in streams or plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" not in stats and not (gpu and _is_copy(event.name)):
                    continue  # host threads (Python, the runtime), module-wide spans
                device = int(gpu.group(1)) if gpu else int(stats.get("device_ordinal", 0))
                program = stats.get("program_id")
                kernels[device].append((int(event.start_ns), int(event.start_ns + event.duration_ns),
                                        int(program) if program is not None else None, stats.get("hlo_module"),
                                        stats.get("hlo_op"), event.name))
    return dict(kernels)


def _is_copy(event_name: str) -> bool:
    return "memcpy" in event_name.lower()


def merged_ns(intervals: list[tuple[int, int]]) -> int:
    """Total length of a union of [start, end) intervals."""
    total, end = 0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def breakdown(kernels: dict[int, list], scopes: dict[int | str, dict[str, str]]) -> dict[int, dict[str, Any]]:
    """Per device: span, busy and idle milliseconds, each stage's merged milliseconds, and how many kernels came
    from a program no dump describes (`undumped_kernels`, counted as "other"; instructions XLA added without an
    op_name, such as layout copies, are "other" too)."""
    out = {}
    for device, events in sorted(kernels.items()):
        by_stage, undumped = collections.defaultdict(list), 0
        for start, end, program, module, op, name in events:
            if _is_copy(name):  # a copy-engine pull is no compute, even when launched inside a custom call
                stage = "copy"
            else:
                ops = program_ops(scopes, program, module)
                undumped += ops is None
                stage = stage_of(event_op_name(ops or {}, op, name))
            by_stage[stage].append((start, end))
        span = max(e for _, e, *_ in events) - min(s for s, *_ in events)
        busy = merged_ns([iv for stage, ivs in by_stage.items() if stage != "copy" for iv in ivs])
        out[device] = {"span_ms": span / 1e6, "busy_ms": busy / 1e6, "idle_ms": (span - busy) / 1e6,
                       "stages_ms": {k: merged_ns(v) / 1e6 for k, v in sorted(by_stage.items())},
                       "kernels": len(events), "undumped_kernels": undumped}
    return out


def top_kernels(events: list[tuple], scopes: dict[int | str, dict[str, str]], n: int) -> list[dict[str, Any]]:
    """One device's `n` costliest instructions over a trace (`device_kernels`' events): each with its stage, HLO
    instruction, op_name, kernel names, launches and summed milliseconds, costliest first."""
    totals: dict[tuple, dict[str, Any]] = {}
    for start, end, program, module, op, name in events:
        op_name = event_op_name(program_ops(scopes, program, module) or {}, op, name)
        row = totals.setdefault((module, op, op_name), {"stage": "copy" if _is_copy(name) else stage_of(op_name),
                                               "hlo_op": op, "op_name": op_name, "kernels": set(), "calls": 0,
                                               "ms": 0.0})
        row["kernels"].add(name)
        row["calls"] += 1
        row["ms"] += (end - start) / 1e6
    rows = sorted(totals.values(), key=lambda r: -r["ms"])[:n]
    return [{**r, "kernels": sorted(r["kernels"])} for r in rows]


def idle_gaps(events: list[tuple], scopes: dict[int | str, dict[str, str]], n: int) -> list[dict[str, Any]]:
    """One device's idle time charged to the instruction whose kernel ended it: each gap in which no computing
    kernel ran (copies left out, as `breakdown`'s busy), between its first and last computing kernel, goes to the
    kernel that starts after it, summed per instruction; each row with its stage, HLO instruction, op_name, the
    stages that ran before its gaps, how many gaps and their summed milliseconds, costliest `n` first. A launch
    that waits on the host (a callback, a program's dispatch) shows here, not in any stage's time."""
    totals: dict[tuple, dict[str, Any]] = {}
    end, before = None, None
    for start, stop, program, module, op, name in sorted(e for e in events if not _is_copy(e[5])):
        op_name = event_op_name(program_ops(scopes, program, module) or {}, op, name)
        if end is not None and start > end:
            row = totals.setdefault((module, op, op_name), {"stage": stage_of(op_name), "hlo_op": op,
                                                            "op_name": op_name, "after": set(), "gaps": 0, "ms": 0.0})
            row["after"].add(before)
            row["gaps"] += 1
            row["ms"] += (start - end) / 1e6
        if end is None or stop > end:
            end, before = stop, stage_of(op_name)
    rows = sorted(totals.values(), key=lambda r: -r["ms"])[:n]
    return [{**r, "after": sorted(r["after"])} for r in rows]


def newest_xplane(trace_dir: str | Path) -> Path:
    """The trace file jax.profiler.trace wrote last under `trace_dir`."""
    paths = sorted(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise ValueError(f"no profiler trace (*.xplane.pb) under {trace_dir}")
    return paths[-1]

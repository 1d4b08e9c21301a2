"""Device time by named scope from a profiler trace (dwdp_jax.stage_trace), and the benchmark's traced pass."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from dwdp_jax import bench, profiling, report, stage_trace

ROOT = Path(__file__).resolve().parents[1]


def test_intervals_merge_and_op_names_map_to_their_innermost_stage(tmp_path):
    assert stage_trace.merged_ns([(0, 10), (5, 20), (30, 40), (40, 45), (1, 2)]) == 35
    assert stage_trace.stage_of("jit(step)/layer_3/routed_experts/dispatch/all-to-all") == "dispatch"
    assert stage_trace.stage_of("jit(moe_layer)/routed_experts/moe_gmm/custom-call") == "moe_gmm"
    assert stage_trace.stage_of("jit(front)/embed/gather") == "embed"
    assert stage_trace.stage_of("jit(front)/convert_element_type") == "other"
    text = ('  %fusion.3 = f32[4]{0} fusion(%p), kind=kLoop, calls=%c, metadata={op_name="jit(f)/attention/exp"}\n'
            '  ROOT %copy.1 = f32[4]{0} copy(%fusion.3)\n')
    assert stage_trace.op_names(text) == {"fusion.3": "jit(f)/attention/exp", "copy.1": ""}
    for name in ("module_0012.jit_f.sm_9.0_gpu_after_optimizations.txt",
                 "module_0013.jit_f.cpu_after_optimizations.txt",
                 "module_0012.jit_f.sm_9.0_gpu_after_optimizations-buffer-assignment.txt"):
        (tmp_path / name).write_text(text)
    scopes = stage_trace.hlo_scopes(tmp_path)
    assert set(scopes) == {12, 13, "jit_f"} and scopes[12] == {"fusion.3": "jit(f)/attention/exp", "copy.1": ""}


def test_breakdown_counts_span_busy_idle_and_stages_per_device():
    scopes = {7: {"a": "jit(f)/attention/dot", "g": "jit(f)/moe_gmm/custom-call"}}
    kernels = {0: [(0, 4_000_000, 7, "jit_f", "a", "k"), (2_000_000, 6_000_000, 7, "jit_f", "g", "k"),
                   (8_000_000, 9_000_000, None, None, None, "MemcpyP2P"),
                   (9_000_000, 10_000_000, 9, "jit_g", "x", "k")]}
    t = stage_trace.breakdown(kernels, scopes)[0]
    assert (t["span_ms"], t["busy_ms"], t["idle_ms"]) == (10.0, 7.0, 3.0)  # the copy is not computing
    assert t["stages_ms"] == {"attention": 4.0, "copy": 1.0, "moe_gmm": 4.0, "other": 1.0}
    assert (t["kernels"], t["undumped_kernels"]) == (4, 1)
    # events that name their module but not their program find it by name
    by_name = {"jit_f": scopes[7]}
    kernels = {0: [(0, 4_000_000, None, "jit_f", "a", "k")]}
    assert stage_trace.breakdown(kernels, by_name)[0]["stages_ms"] == {"attention": 4.0}


def _thunks(*thunks: tuple[str, str]) -> str:
    """XLA's thunk_metadata.txt for (instruction, thunk kind) pairs; a kCommandBuffer's own kSequential follows it."""
    out = []
    for i, (name, kind) in enumerate(thunks):
        out.append(f'thunk_metadata {{\n  thunk_info {{\n    profile_annotation: "{name}"\n    thunk_id: {i}\n  }}\n'
                   f'  thunk_kind: "{kind}"\n}}\n')
        if kind == "kCommandBuffer":
            out.append('thunk_metadata {\n  thunk_info {\n  }\n  thunk_kind: "kSequential"\n}\n')
    return "".join(out)


# The bf16 MoE layer's second command buffer as XLA dumped it on H100 (2026-12-07; fewer fusions): the shared
# expert's three cuBLAS GEMMs inside it, the routed experts' Triton kernels listed after it but run outside.
_THUNKS = _thunks(("command_buffer_44", "kCommandBuffer"), ("loop_add_fusion.2", "kCustomKernel"),
                  ("pallas_call.0", "kCustomKernel"), ("fusion.251", "kCustomKernel"),
                  ("custom-call.8", "kCublasLtMatmul"), ("fusion.252", "kCustomKernel"),
                  ("custom-call.9", "kCublasLtMatmul"), ("custom-call.5", "kCublasLtMatmul"),
                  ("loop_add_fusion.1", "kCustomKernel"))
_OPS = {"loop_add_fusion.2": "jit(f)/router/add", "pallas_call.0": "jit(f)/moe_gmm/pallas_call",
        "fusion.251": "jit(f)/shared_expert/mul", "fusion.252": "jit(f)/shared_expert/mul",
        "custom-call.8": "jit(f)/shared_expert/dot_general", "custom-call.9": "jit(f)/shared_expert/dot_general",
        "custom-call.5": "jit(f)/shared_expert/dot_general", "loop_add_fusion.1": "jit(f)/moe_combine/add",
        "fusion.9": ""}


def test_command_buffers_list_each_buffers_thunks_from_xlas_thunk_dump():
    text = _thunks(("command_buffer_1", "kCommandBuffer"), ("fusion.1", "kCustomKernel"),
                   ("custom-call.2", "kCublasLtMatmul"), ("command_buffer_3", "kCommandBuffer"),
                   ("mpmd_map.4", "kCustomCall"))
    assert stage_trace.command_buffers(_thunks(("fusion.0", "kCustomKernel")) + text) == {
        "command_buffer_1": [("fusion.1", "kCustomKernel"), ("custom-call.2", "kCublasLtMatmul")],
        "command_buffer_3": [("mpmd_map.4", "kCustomCall")]}


def _buffer_scopes(tmp_path, events, ops=_OPS, thunks=_THUNKS):
    hlo = "".join(f'  %{name} = f32[4]{{0}} fusion(%p), kind=kLoop, calls=%c, metadata={{op_name="{op}"}}\n'
                  for name, op in ops.items())
    (tmp_path / "module_0007.jit_f.sm_9.0a_gpu_after_optimizations.txt").write_text(hlo)
    (tmp_path / "module_0007.jit_f.thunk_metadata.txt").write_text(thunks)
    return stage_trace.hlo_scopes(tmp_path, events)


def test_kernels_inside_a_command_buffer_take_their_fusions_or_the_buffers_library_calls_stage(tmp_path):
    """XLA's command buffers: each kernel's event names the buffer (no op_name). A fusion's kernel is named after its
    instruction ('.' as '_'), so it finds its stage, even where it runs another fusion's kernel; a library kernel
    (cuBLAS's GEMMs, their memsets) takes the stage its buffer's library calls share, the kernels the trace names
    directly (the Triton GEMM listed after the buffer) left out."""
    buffer = [(0, 1_000_000, 7, "jit_f", "command_buffer_44", "loop_add_fusion_2"),
              (1_000_000, 2_000_000, 7, "jit_f", "command_buffer_44", "fusion_251"),
              (2_000_000, 2_500_000, 7, "jit_f", "command_buffer_44", "Memset 3"),
              (2_500_000, 4_000_000, 7, "jit_f", "command_buffer_44", "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT"),
              # fusion.252 runs fusion.251's kernel (XLA compiled the two alike, and named the kernel once)
              (4_000_000, 5_000_000, 7, "jit_f", "command_buffer_44", "fusion_251"),
              (5_000_000, 7_000_000, 7, "jit_f", "command_buffer_44", "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT"),
              (7_000_000, 8_000_000, 7, "jit_f", "command_buffer_44", "loop_add_fusion_1")]
    direct = [(8_000_000, 9_000_000, 7, "jit_f", "pallas_call.0", "split_ragged_dot_fused")]
    scopes = _buffer_scopes(tmp_path, buffer + direct)
    assert scopes[7]["command_buffer_44"] == "jit(f)/shared_expert/dot_general"
    t = stage_trace.breakdown({0: buffer + direct}, scopes)[0]
    assert t["stages_ms"] == {"router": 1.0, "shared_expert": 6.0, "moe_combine": 1.0, "moe_gmm": 1.0}
    rows = stage_trace.top_kernels(buffer + direct, scopes, 10)
    assert {(r["stage"], r["op_name"]) for r in rows} == {
        ("router", "jit(f)/router/add"), ("shared_expert", "jit(f)/shared_expert/mul"),
        ("shared_expert", "jit(f)/shared_expert/dot_general"), ("moe_combine", "jit(f)/moe_combine/add"),
        ("moe_gmm", "jit(f)/moe_gmm/pallas_call")}
    assert "command_buffer_44" not in stage_trace.hlo_scopes(tmp_path)[7]  # without the trace: no attribution


@pytest.mark.parametrize("case", ["two stages", "no op_name", "a Triton kernel inside", "fusion without op_name"])
def test_a_command_buffers_library_kernels_stay_other_where_the_trace_cannot_tell_them_apart(tmp_path, case):
    """Library calls of two stages in one buffer, one without an op_name, or a Triton kernel of another stage run
    inside it (its kernel is not named after its instruction either): the unnamed kernels stay "other"."""
    buffer = [(0, 1_000_000, 7, "jit_f", "command_buffer_44", "loop_add_fusion_2"),
              (1_000_000, 2_000_000, 7, "jit_f", "command_buffer_44", "fusion_251"),
              (2_000_000, 4_000_000, 7, "jit_f", "command_buffer_44", "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT"),
              (4_000_000, 5_000_000, 7, "jit_f", "command_buffer_44", "fusion_252"),
              (5_000_000, 6_000_000, 7, "jit_f", "command_buffer_44", "loop_add_fusion_1")]
    direct = [(8_000_000, 9_000_000, 7, "jit_f", "pallas_call.0", "split_ragged_dot_fused")]
    ops, thunks = dict(_OPS), _THUNKS
    if case == "two stages":
        ops["custom-call.5"] = "jit(f)/mla_out/dot_general"
    elif case == "no op_name":
        ops["custom-call.5"] = ""
    elif case == "a Triton kernel inside":
        direct = []
    else:  # a kernel named after a fusion that has no op_name is "other", not the library's
        buffer.append((6_000_000, 7_000_000, 7, "jit_f", "command_buffer_44", "fusion_9"))
        thunks = _THUNKS + _thunks(("fusion.9", "kCustomKernel"))
    scopes = _buffer_scopes(tmp_path, buffer + direct, ops, thunks)
    other = stage_trace.breakdown({0: buffer + direct}, scopes)[0]["stages_ms"].get("other")
    assert other == (1.0 if case == "fusion without op_name" else 2.0)


def test_top_kernels_sum_each_instruction_and_sort_by_time():
    scopes = {7: {"a": "jit(f)/attention/dot", "g": "jit(f)/moe_gmm/custom-call"}}
    events = [(0, 4_000_000, 7, "jit_f", "a", "k_a"), (5_000_000, 6_000_000, 7, "jit_f", "g", "k_g"),
              (6_000_000, 10_000_000, 7, "jit_f", "g", "k_g2"), (10_000_000, 10_500_000, None, None, None, "Memcpy"),
              (11_000_000, 11_200_000, 9, "jit_h", "x", "k_x")]
    rows = stage_trace.top_kernels(events, scopes, 3)
    assert [(r["stage"], r["hlo_op"], r["calls"], r["ms"]) for r in rows] == [
        ("moe_gmm", "g", 2, 5.0), ("attention", "a", 1, 4.0), ("copy", None, 1, 0.5)]
    assert rows[0]["kernels"] == ["k_g", "k_g2"] and rows[0]["op_name"] == "jit(f)/moe_gmm/custom-call"
    assert stage_trace.top_kernels(events, scopes, 10)[-1]["stage"] == "other"  # no dump names program 9


def test_idle_gaps_charge_each_gap_to_the_kernel_that_ends_it_and_sum_to_the_idle_time():
    scopes = {7: {"a": "jit(f)/attention/dot", "g": "jit(f)/moe_gmm/custom-call", "o": "jit(f)/mla_out/cb"}}
    events = [(0, 4_000_000, 7, "jit_f", "a", "k_a"), (1_000_000, 5_000_000, 7, "jit_f", "a", "k_a"),  # overlap
              (5_500_000, 6_000_000, 7, "jit_f", "g", "k_g"),  # 0.5 ms after attention
              (6_000_000, 7_000_000, None, None, None, "MemcpyD2D"),  # a copy does not end a gap
              (8_000_000, 9_000_000, 7, "jit_f", "o", "k_o"),  # 2 ms after moe_gmm
              (9_500_000, 9_600_000, 7, "jit_f", "g", "k_g"),  # 0.5 ms after mla_out
              (9_600_000, 9_700_000, 9, "jit_h", "x", "k_x")]  # no gap: it starts as the last one ends
    rows = stage_trace.idle_gaps(events, scopes, 5)
    assert [(r["stage"], r["hlo_op"], r["after"], r["gaps"], r["ms"]) for r in rows] == [
        ("mla_out", "o", ["moe_gmm"], 1, 2.0), ("moe_gmm", "g", ["attention", "mla_out"], 2, 1.0)]
    idle = stage_trace.breakdown({0: events}, scopes)[0]["idle_ms"]
    assert sum(r["ms"] for r in rows) == pytest.approx(idle)  # the copy lies inside the span
    assert stage_trace.idle_gaps(events, scopes, 1) == rows[:1]


def test_a_cpu_trace_names_each_kernel_by_its_scope(tmp_path):
    @jax.jit
    def f(x):
        with jax.named_scope("attention"):
            y = jnp.tanh(x @ x)
        with jax.named_scope("moe_gmm"):
            return jnp.sin(y @ x) + 1.0

    x = jnp.ones((256, 256))
    text = f.lower(x).compile().as_text()
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        f(x).block_until_ready()
    kernels = stage_trace.device_kernels(stage_trace.newest_xplane(tmp_path))
    programs = {p for events in kernels.values() for _, _, p, *_ in events}
    assert len(programs) == 1  # one program ran; its instructions are those of the compiled text
    (device, t), = stage_trace.breakdown(kernels, {programs.pop(): stage_trace.op_names(text)}).items()
    assert device == jax.devices()[0].id and t["undumped_kernels"] == 0
    assert t["stages_ms"]["attention"] > 0 and t["stages_ms"]["moe_gmm"] > 0
    assert t["busy_ms"] <= t["span_ms"]
    with pytest.raises(ValueError, match="no profiler trace"):
        stage_trace.newest_xplane(tmp_path / "empty")


def test_trace_needs_the_hlo_dump(monkeypatch):
    from test_bench import small_config

    c = small_config(Path("/nonexistent"))
    c.trace = "/tmp/unused_trace_dir"
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.raises(ValueError, match="config.trace needs XLA's HLO dump"):
        bench.plan(c)


def test_a_failing_trace_keeps_the_measurements(tmp_path, monkeypatch):
    from test_bench import small_config

    c = small_config(tmp_path, strategies="dwdp")
    c.trace = str(tmp_path / "trace")
    monkeypatch.setenv("XLA_FLAGS", profiling.trace_dump_flags(c.trace))  # in-process the backend has started: no dump

    def unreadable(path):
        raise ValueError("trace format (simulated)")

    monkeypatch.setattr(stage_trace, "device_kernels", unreadable)
    doc = bench.run(c)
    assert doc["metrics"]["dwdp"]["tps_per_gpu"] > 0
    assert doc["metrics"]["dwdp"]["trace"] == {"error": "ValueError: trace format (simulated)"}
    assert "dwdp traced pass failed: ValueError: trace format (simulated)" in report.format_table(doc)


def test_a_used_trace_directory_is_refused(tmp_path):
    (tmp_path / "hlo").mkdir()
    (tmp_path / "hlo" / "module_0001.jit_f.cpu_after_optimizations.txt").write_text("")
    proc = subprocess.run([sys.executable, "-m", "experiments.context_bench", f"--config.trace={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"config.trace='{tmp_path}'" in proc.stderr and "new or empty" in proc.stderr


def test_context_bench_traced_pass_attributes_each_strategys_stages(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.context_bench", f"--config.trace={tmp_path / 'trace'}",
                           "--config.breakdown=False", "--config.workload.num_requests=8",
                           f"--config.results_root={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dwdp traced pass, ms per iteration" in proc.stdout and "dep traced pass" in proc.stdout
    (path,) = (tmp_path / "context_bench").glob("*.json")
    m = json.loads(path.read_text())["metrics"]
    for name in ("dwdp", "dep"):
        t = m[name]["trace"]
        active = {rank for rank, n in t["iterations"].items() if n}  # 8 requests need not reach every DWDP rank
        assert active and set(t["ranks"]) == active
        for d in t["ranks"].values():
            assert d["undumped_kernels"] == 0 and 0 < d["busy_ms"] <= d["span_ms"]
            assert d["stages_ms"]["attention"] > 0 and d["stages_ms"]["moe_gmm"] > 0
    # the all-to-all is DEP's alone
    assert all(d["stages_ms"].get("dispatch", 0) > 0 for d in m["dep"]["trace"]["ranks"].values())
    assert not any("dispatch" in d["stages_ms"] or "combine" in d["stages_ms"]
                   for d in m["dwdp"]["trace"]["ranks"].values())

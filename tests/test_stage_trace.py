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
    assert stage_trace.stage_of("jit(front)/embed/gather") == "other"
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


# A command buffer as XLA's GPU dump writes it: its fusions, and two cuBLAS GEMMs of the shared expert.
_BUFFER_HLO = """\
%command_buffer.44 (p: bf16[8,16], p.1: bf16[16,32]) -> (bf16[8,32], f32[8]) {
  %custom-call.13 = (bf16[8,32]{1,0}, s8[64]{0}) custom-call(%p, %p.1), custom_call_target="__cublas$gemm", \
metadata={op_name="jit(f)/shared_expert/dot_general" source_file="m.py" source_line=3}
  %fusion.253 = bf16[8,32]{1,0} fusion(%custom-call.13), kind=kLoop, calls=%fc, \
metadata={op_name="jit(f)/shared_expert/mul"}
  %custom-call.14 = (bf16[8,32]{1,0}, s8[64]{0}) custom-call(%fusion.253, %p.1), custom_call_target="__cublas$gemm", \
metadata={op_name="jit(f)/shared_expert/dot_general"}
  %loop_add_fusion.1 = bf16[8,32]{1,0} fusion(%custom-call.14), kind=kLoop, calls=%fa, \
metadata={op_name="jit(f)/moe_combine/add"}
  %loop_convert_fusion = f32[8]{0} fusion(%p), kind=kLoop, calls=%fb, metadata={op_name="jit(f)/router/convert"}
  %fusion.9 = bf16[8,32]{1,0} fusion(%p), kind=kLoop, calls=%fd
  ROOT %tuple = (bf16[8,32]{1,0}, f32[8]{0}) tuple(%loop_add_fusion.1, %loop_convert_fusion)
}

ENTRY %main.1 (a: bf16[8,16], b: bf16[16,32]) -> (bf16[8,32], f32[8]) {
  %a = bf16[8,16]{1,0} parameter(0)
  %b = bf16[16,32]{1,0} parameter(1)
  ROOT %call = (bf16[8,32]{1,0}, f32[8]{0}) call(%a, %b), to_apply=%command_buffer.44
}
"""


def test_kernels_inside_a_command_buffer_take_their_fusions_or_the_buffers_library_calls_stage():
    """XLA's command buffers: each kernel's event names the buffer (no op_name); a fusion's kernel is named after its
    instruction ('.' as '_'), so it finds its stage; a library kernel (cuBLAS's GEMMs, their memsets) takes the stage
    its buffer's library calls share, and stays "other" where they differ; a fusion without an op_name is "other"."""
    scopes = {7: stage_trace.op_names(_BUFFER_HLO)}
    assert scopes[7]["command_buffer_44"] == "jit(f)/shared_expert/dot_general"
    kernels = {0: [(0, 1_000_000, 7, "jit_f", "command_buffer_44", "loop_add_fusion_1"),
                   (1_000_000, 2_000_000, 7, "jit_f", "command_buffer_44", "loop_convert_fusion"),
                   (2_000_000, 3_000_000, 7, "jit_f", "command_buffer_44", "fusion_253"),
                   (3_000_000, 4_000_000, 7, "jit_f", "command_buffer_44", "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT"),
                   (4_000_000, 4_500_000, 7, "jit_f", "command_buffer_44", "Memset 3"),
                   (5_000_000, 6_000_000, 7, "jit_f", "command_buffer_44", "fusion_9")]}
    t = stage_trace.breakdown(kernels, scopes)[0]
    assert t["stages_ms"] == {"moe_combine": 1.0, "router": 1.0, "shared_expert": 2.5, "other": 1.0}
    rows = stage_trace.top_kernels(kernels[0], scopes, 10)
    assert {(r["stage"], r["op_name"]) for r in rows} == {
        ("moe_combine", "jit(f)/moe_combine/add"), ("router", "jit(f)/router/convert"),
        ("shared_expert", "jit(f)/shared_expert/mul"), ("shared_expert", "jit(f)/shared_expert/dot_general"),
        ("other", "")}
    # library calls of two stages (or one without an op_name) in one buffer: their kernels cannot be told apart
    for other in ('metadata={op_name="jit(f)/mla_out/dot_general"}', ""):
        mixed = _BUFFER_HLO.replace('metadata={op_name="jit(f)/shared_expert/dot_general"}', other)
        scopes = {7: stage_trace.op_names(mixed)}
        assert "command_buffer_44" not in scopes[7]
        assert stage_trace.breakdown(kernels, scopes)[0]["stages_ms"]["other"] == 2.5


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

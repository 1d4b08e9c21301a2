"""Memory planner: exact weight accounting, refusal with the numbers before any allocation, monotone depth search."""

import re
from types import SimpleNamespace

import pytest

from dwdp_jax import memory
from dwdp_jax.placement import Placement
from models.config import deepseek_r1, deepseek_v3_lite, tiny

GB = 10 ** 9
GIB = 1 << 30


def test_replicated_plus_all_local_experts_is_the_whole_model():
    cfg = deepseek_r1()
    placement = Placement.uniform(cfg.n_routed_experts, 4)
    plan = memory.plan_dwdp(cfg, placement, max_num_tokens=8192)
    biases_fp32 = 2 * cfg.num_moe_layers * cfg.n_routed_experts  # 4 bytes, not 2; the routers' weights bf16
    whole = 2 * cfg.param_count() + biases_fp32
    assert plan.replicated_weight_bytes + placement.num_ranks * plan.local_expert_bytes == whole
    assert plan.prefetch_slot_bytes == 2 * 192 * cfg.expert_params() * 2
    reference = memory.plan_reference(cfg, 8192)
    assert reference.replicated_weight_bytes + reference.local_expert_bytes == whole


def test_tile_aligned_rows_are_counted():
    """Padding every expert's rows to a 128-row tile adds E (align - 1) rows to the MoE's sorted buffers."""
    cfg = deepseek_r1()
    placement = Placement.uniform(cfg.n_routed_experts, 4)
    plain = memory.plan_dwdp(cfg, placement, 8192, attention_impl="flash")
    aligned = memory.plan_dwdp(cfg, placement, 8192, attention_impl="flash", row_align=128)
    extra_rows = cfg.n_routed_experts * 127
    assert aligned.activation_bytes - plain.activation_bytes == extra_rows * (
        cfg.hidden_size + 2 * cfg.moe_intermediate_size) * 2


def test_redundancy_trades_local_memory_for_slot_memory():
    cfg = deepseek_v3_lite()
    least = memory.plan_dwdp(cfg, Placement.for_group(72, 4), 1024)
    redundant = memory.plan_dwdp(cfg, Placement.for_group(72, 4, local_experts=24), 1024)
    expert_bytes = cfg.expert_params() * 2
    assert redundant.local_expert_bytes - least.local_expert_bytes == 6 * cfg.num_moe_layers * expert_bytes
    assert least.prefetch_slot_bytes - redundant.prefetch_slot_bytes == 2 * 6 * expert_bytes


def test_full_r1_on_an_80_gb_device_is_refused_with_the_numbers():
    cfg = deepseek_r1()
    placement = Placement.uniform(cfg.n_routed_experts, 4)
    with pytest.raises(ValueError) as error:
        memory.plan_dwdp(cfg, placement, 8192, device_bytes=80 * GB)
    message = str(error.value)
    plan = memory.plan_dwdp(cfg, placement, 8192)
    for name in ("replicated weights", "local experts", "prefetch slots", "activations", "device_bytes"):
        assert name in message
    for value in (plan.replicated_weight_bytes, plan.local_expert_bytes, plan.prefetch_slot_bytes,
                  plan.activation_bytes, plan.total_bytes, 80 * GB):
        assert f"({value} B)" in message
    assert "N=4 L=64 P=64" in message


def test_tiny_model_fits_one_gb():
    cfg = tiny()
    for num_ranks in (2, 3, 4):
        plan = memory.plan_dwdp(cfg, Placement.for_group(cfg.n_routed_experts, num_ranks), 512, device_bytes=GB)
        assert 0 < plan.total_bytes < GB
        assert plan.check(GB) == GB - plan.total_bytes
    memory.plan_dep(cfg, 4, 512, device_bytes=GB)
    memory.plan_reference(cfg, 512, device_bytes=GB)


def test_flash_attention_drops_the_quadratic_term():
    cfg = deepseek_r1()
    rows = 8192 * cfg.num_experts_per_tok
    naive = memory.activation_bytes(cfg, 8192, rows, "naive")
    flash = memory.activation_bytes(cfg, 8192, rows, "flash")
    assert naive - 2 * 8192 * cfg.hidden_size * 2 == cfg.num_attention_heads * 8192 ** 2 * 6 + 8192 * (
        1536 + 512 + 64) * 2 + 8192 * 128 * (2 * 192 + 2 * 128) * 2
    assert flash < naive / 5
    with pytest.raises(ValueError, match="attention_impl"):
        memory.activation_bytes(cfg, 8192, rows, "paged")


def test_dep_sizes_for_the_worst_case_all_to_all():
    cfg = deepseek_r1()
    dep = memory.plan_dep(cfg, 4, 8192, attention_impl="flash")
    dwdp = memory.plan_dwdp(cfg, Placement.uniform(256, 4), 8192, attention_impl="flash")
    # the dispatch's N*T*K receive rows and one combine output of T*K rows, both threaded through the layers
    assert dep.all_to_all_bytes == (4 + 1) * 8192 * 8 * cfg.hidden_size * 2
    assert dep.local_expert_bytes == dwdp.local_expert_bytes and dep.prefetch_slot_bytes == 0
    assert dep.activation_bytes > dwdp.activation_bytes
    with pytest.raises(ValueError, match="num_ranks"):
        memory.plan_dep(cfg, 3, 8192)


def test_dep_receives_fp8_experts_tokens_quantized():
    """FP8 experts on a split backend take their tokens as e4m3 rows with an fp32 scale per 128 values (what
    `dep_dispatch.dispatch_tokens(quantize=True)` sends): the receive buffer shrinks to D + 4 D/128 bytes a row;
    the combine's rows stay bf16. Strategies ask the backend."""
    from dwdp_jax import strategies

    cfg = deepseek_r1().replace(fp8_experts=True)
    rows, d = 8192 * 8, cfg.hidden_size
    quantized = memory.plan_dep(cfg, 8, 8192, attention_impl="flash", fp8_dispatch=True)
    bf16_rows = memory.plan_dep(cfg, 8, 8192, attention_impl="flash")
    assert quantized.all_to_all_bytes == 8 * rows * (d + 4 * d // 128) + rows * d * 2
    assert bf16_rows.all_to_all_bytes == 9 * rows * d * 2
    assert bf16_rows.total_bytes - quantized.total_bytes == 8 * rows * (d - 4 * d // 128)  # 7.1 GB at R1's width
    with pytest.raises(ValueError, match="fp8_dispatch needs FP8 experts"):
        memory.plan_dep(deepseek_r1(), 8, 8192, fp8_dispatch=True)

    p = SimpleNamespace(dep=SimpleNamespace(num_ranks=8), batching=SimpleNamespace(max_num_tokens=8192),
                        weights=SimpleNamespace())
    for backend, quantizes in (("pallas_split_mgpu", True), ("xla", False)):
        p.weights.gemm_backend = backend
        plan = strategies.get("dep").plan_memory(p, cfg)
        assert plan.all_to_all_bytes == (quantized if quantizes else bf16_rows).all_to_all_bytes, backend


def test_max_layers_that_fit_is_monotone_and_fits():
    cfg = deepseek_r1()
    placement = Placement.uniform(256, 4)
    depths = []
    for device_gb in (55, 60, 80, 100, 141, 200, 400, 800):
        depth = memory.max_layers_that_fit(cfg, placement, 8192, device_gb * GB, attention_impl="flash")
        shallow = cfg.replace(num_hidden_layers=depth)
        memory.plan_dwdp(shallow, placement, 8192, attention_impl="flash", device_bytes=device_gb * GB)
        if depth < cfg.num_hidden_layers:
            with pytest.raises(ValueError):
                memory.plan_dwdp(cfg.replace(num_hidden_layers=depth + 1), placement, 8192, attention_impl="flash",
                                 device_bytes=device_gb * GB)
        depths.append(depth)
    assert depths == sorted(depths)
    assert depths[-1] == cfg.num_hidden_layers and depths[0] > cfg.first_k_dense_replace
    with pytest.raises(ValueError, match=re.escape("not even one MoE layer fits")):
        memory.max_layers_that_fit(cfg, placement, 8192, 10 * GB)


def test_bad_inputs():
    cfg = tiny()
    with pytest.raises(ValueError, match="n_routed_experts"):
        memory.plan_dwdp(cfg, Placement.uniform(256, 4), 16)
    with pytest.raises(ValueError, match="max_num_tokens"):
        memory.plan_dwdp(cfg, Placement.uniform(8, 4), 0)
    with pytest.raises(ValueError, match="weight_bytes_per_param"):
        memory.plan_reference(cfg, 16, weight_bytes_per_param=0)


@pytest.mark.parametrize("layers, measured_gib", [(7, 50.385), (8, 50.385)])
def test_dep_step_plan_covers_the_steps_measured_on_h200(layers, measured_gib):
    """XLA's temporaries of the full-budget DEP4 step at R1 width (T 32768, flash attention, serving logits, the
    dispatch's receive buffer and the combine's output threaded through the layers) on 4x H200
    (`experiments.dep_step_memory --depths=7,8`): the plan must not count less, nor much more."""
    cfg = deepseek_r1()
    dep = memory.plan_dep(cfg.replace(num_hidden_layers=layers), 4, 32768, attention_impl="flash")
    step = dep.all_to_all_bytes + dep.activation_bytes
    assert measured_gib * GIB <= step <= 1.15 * measured_gib * GIB


def test_program_fit_names_the_device_and_the_knobs():
    memory.check_program_fits("step", 10 * GIB, [None, 11 * GIB])
    with pytest.raises(ValueError, match=r"device 1: 9.00 GiB.*memory_fraction"):
        memory.check_program_fits("step", 10 * GIB, [11 * GIB, 9 * GIB])


class _Device:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


@pytest.mark.parametrize("stats,free", [
    (None, None),  # CPU: no allocator statistics, no limit
    ({"bytes_limit": 100, "bytes_in_use": 40, "largest_free_block_bytes": 25}, 25),  # BFC, fragmented
    ({"bytes_limit": 100, "bytes_in_use": 100, "largest_free_block_bytes": 0}, 0),  # BFC, full
    ({"bytes_limit": 100, "bytes_in_use": 40, "largest_free_block_bytes": 0}, 60),  # cuda_async: no blocks
    ({"bytes_limit": 100, "bytes_in_use": 40}, 60),
])
def test_largest_free_block_per_allocator(stats, free):
    assert memory.largest_free_block(_Device(stats)) == free

"""DeepSeek-R1 as it ships on CPU: routed experts kept FP8 from the HuggingFace checkpoint through placement, both
transports, DEP, Orbax and the memory plan.

FP8 tolerance: every strategy runs the same quantized math as the FP8 reference (`fp8.reference_ffn`, one dot per
expert whatever the slab holds), so in fp32 their logits equal the reference's bit for bit. Against the same weights
dequantized, the activations' 1 x 128 quantization is the difference: 2.5% relative per quantization and 4% per
expert FFN on random data, 13% at the logits after the two MoE layers of this random model, within 0.2;
`fp8.reference_ffn` itself is checked against a numpy oracle at 1e-5.
"""

from __future__ import annotations

import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dwdp_jax import checkpoint, memory
from dwdp_jax.kernels import fp8
from dwdp_jax.packing import pack
from dwdp_jax.placement import Placement
from dwdp_jax.runtime import reference
from dwdp_jax.runtime.dep import DepRuntime
from dwdp_jax.runtime.dwdp import DwdpEngine, DwdpOptions
from dwdp_jax.sim import hardware, studies
from models.config import get_preset, tiny
from models import deepseek_v3
from models.experts import ExpertView
from test_checkpoint import (BLOCK, CONFIG, FP8_WEIGHT, hf_config, hf_tensors, quantize_fp8, random_params,
                             write_checkpoint)

QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
DEQUANTIZED = 0.2  # the model with FP8 experts against the same weights dequantized
DEQUANTIZED_ALL = 0.45  # with every projection FP8 too


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def fp8_checkpoint(path, config, params, shards=2) -> tuple[str, dict]:
    """`params` as DeepSeek ships them: every projection FP8 with 128 x 128 scales (edge blocks partial)."""
    quantized = {}
    for name, w in hf_tensors(config, params).items():
        if FP8_WEIGHT.search(name) and ".eh_proj." not in name:
            q, scale = quantize_fp8(w)
            quantized |= {name: q, name + "_scale_inv": scale}
        else:
            quantized[name] = w
    return write_checkpoint(path, hf_config(config, quantization_config=QUANT), quantized, shards=shards), quantized


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """CONFIG (hidden 160, expert width 136: partial blocks) written FP8 over two shards, then loaded FP8-kept."""
    path, tensors = fp8_checkpoint(tmp_path_factory.mktemp("fp8"), CONFIG, random_params(CONFIG, seed=5))
    config, params = checkpoint.load_hf_checkpoint(path, fp8="keep")
    return path, tensors, config, params


def test_experts_stay_fp8_as_stored(shipped):
    path, tensors, config, params = shipped
    assert config.fp8_experts and params.experts[0].fp8
    layer = config.first_k_dense_replace
    gate = params.experts[0].w_gate_EDF.check("gate")
    for e in (0, config.n_routed_experts - 1):
        name = f"model.layers.{layer}.mlp.experts.{e}.gate_proj.weight"
        np.testing.assert_array_equal(np.asarray(gate.values_GNK[e]).view(np.uint8), tensors[name].view(np.uint8))
        np.testing.assert_array_equal(np.asarray(gate.scales_GRS[e]), tensors[name + "_scale_inv"])
    # every other projection too, in HF's [out, in] layout; the dequantized load holds the same weight [in, out]
    assert config.fp8_dense
    name = "model.layers.0.mlp.gate_proj.weight"
    dense = params.model.layers[0].mlp.gate_proj.get_value().check("dense gate_proj")
    np.testing.assert_array_equal(np.asarray(dense.values_GNK).view(np.uint8), tensors[name].view(np.uint8))
    np.testing.assert_array_equal(np.asarray(dense.scales_GRS), tensors[name + "_scale_inv"])
    _, dequantized = checkpoint.load_hf_checkpoint(path)
    np.testing.assert_array_equal(
        np.asarray(fp8.dequantize_weights(dense.values_GNK[None], dense.scales_GRS[None])[0].T),
        np.asarray(dequantized.model.layers[0].mlp.gate_proj[...]))


def test_lazy_experts_read_only_the_rows_asked_for(shipped):
    path, _, config, params = shipped
    _, lazy = checkpoint.load_hf_checkpoint(path, fp8="keep", experts="lazy")
    rows = lazy.experts.rows(1, 2, 5, jax.devices()[0])
    assert rows.start == 2 and rows.count == 3 and rows.fp8
    for ours, want in zip(rows.arrays(), params.experts[1].rows(2, 5).arrays(), strict=True):
        np.testing.assert_array_equal(np.asarray(ours).view(np.uint8), np.asarray(want).view(np.uint8))


def test_keep_refuses_experts_that_are_not_fp8(tmp_path):
    path = write_checkpoint(tmp_path, hf_config(CONFIG), hf_tensors(CONFIG, random_params(CONFIG, seed=1)))
    with pytest.raises(ValueError, match=r"fp8='keep': the routed experts are F32 .*not FP8 e4m3"):
        checkpoint.load_hf_checkpoint(path, fp8="keep")
    with pytest.raises(ValueError, match=r"fp8='bf16' must be one of \('dequantize', 'keep', 'keep_experts'\)"):
        checkpoint.load_hf_checkpoint(path, fp8="bf16")


@pytest.fixture(scope="module")
def fp8_reference(shipped):
    _, _, config, params = shipped
    batches = [pack([[5, 7, 9, 11, 3, 60], [2, 4], [8] * 9], budget=32), pack([[1, 2, 3] * 5], budget=32)]
    return params, batches, [reference.prefill(params, b) for b in batches]


@pytest.mark.parametrize("transport", ["device_put", "copy_engine"])
def test_dwdp_with_fp8_experts_matches_the_fp8_reference(fp8_reference, transport):
    params, batches, refs = fp8_reference
    engine = DwdpEngine(params, Placement.for_group(CONFIG.n_routed_experts, 4), jax.devices()[:4],
                        DwdpOptions(transport=transport, poison=True))  # released slots NaN: a stale read shows
    assert engine.transport.remote_specs(0)[0].fp8
    for rank, (batch, ref) in enumerate(zip(batches, refs)):
        out = engine.step(rank + 2, batch).output
        np.testing.assert_array_equal(out.logits_TV, ref.logits_TV)
        assert all((a == b).all() for a, b in zip(out.expert_ids, ref.expert_ids, strict=True))


def test_dep_with_fp8_experts_matches_the_fp8_reference(fp8_reference):
    params, batches, refs = fp8_reference
    outs = DepRuntime(params, 4, 32, devices=jax.devices()[:4]).step([batches[0], None, batches[1], None])
    for out, ref in zip((outs[0], outs[2]), refs):
        np.testing.assert_array_equal(out.logits_TV, ref.logits_TV)
        assert all((a == b).all() for a, b in zip(out.expert_ids, ref.expert_ids, strict=True))


def _router_scores(params, batch) -> np.ndarray:
    """The first MoE layer's biased router scores (what top-k chooses by) per token of `batch`."""
    model, k = params.model, params.model.cfg.first_k_dense_replace
    x = model.embed(batch.tokens_T)
    for layer in model.layers[:k]:
        x, _ = layer(x, batch.segment_ids_T, batch.positions_T)
    moe = model.layers[k]
    h = moe.post_attention_layernorm(moe.attention(x, batch.segment_ids_T, batch.positions_T))
    logits = np.asarray(h, np.float32) @ np.asarray(moe.mlp.gate.weight[...], np.float32)
    return 1 / (1 + np.exp(-logits)) + np.asarray(moe.mlp.gate.e_score_correction_bias[...])


def test_fp8_model_tracks_the_dequantized_model(shipped, fp8_reference):
    """FP8 experts alone leave the first MoE layer's routing as the dequantized model's; with the projections FP8
    too, the router's input moves, and a token may choose otherwise only between experts whose dequantized scores
    lie within twice the largest score shift of that token (a near-tie), recorded here."""
    path, *_ = shipped
    params, batches, refs = fp8_reference
    _, experts_only = checkpoint.load_hf_checkpoint(path, fp8="keep_experts")
    _, dequantized = checkpoint.load_hf_checkpoint(path)
    assert experts_only.model.cfg.fp8_experts and not experts_only.model.cfg.fp8_dense
    near_ties = 0
    for batch, ref in zip(batches, refs):
        want = reference.prefill(dequantized, batch)
        experts = reference.prefill(experts_only, batch)
        assert 0 < rel_err(experts.logits_TV, want.logits_TV) <= DEQUANTIZED
        # the first MoE layer routes on the dense layers' output, which the experts' format does not touch
        assert (experts.expert_ids[0] == want.expert_ids[0]).all()
        assert 0 < rel_err(ref.logits_TV, want.logits_TV) <= DEQUANTIZED_ALL
        fp8_scores, dq_scores = _router_scores(params, batch), _router_scores(dequantized, batch)
        cfg = params.model.cfg
        for t in range(batch.num_tokens):
            mine, theirs = set(ref.expert_ids[0][t].tolist()), set(want.expert_ids[0][t].tolist())
            if mine == theirs:
                continue
            # the router's two decisions: groups by the sum of their top-2 scores, then experts in the kept groups
            groups = [np.sort(s.reshape(cfg.n_group, -1), axis=1)[:, -2:].sum(1) for s in (fp8_scores[t], dq_scores[t])]
            kept = [set(np.argsort(-g)[:cfg.topk_group].tolist()) for g in groups]
            if kept[0] != kept[1]:
                shift, values = np.abs(groups[0] - groups[1]).max(), groups[1]
                swapped = (kept[0] - kept[1], kept[1] - kept[0])
            else:
                shift, values = np.abs(fp8_scores[t] - dq_scores[t]).max(), dq_scores[t]
                swapped = (mine - theirs, theirs - mine)
            gap = min(abs(values[a] - values[b]) for a in swapped[0] for b in swapped[1])
            assert gap <= 2 * shift, (t, gap, shift)
            near_ties += 1
    print(f"first MoE layer: {near_ties} near-tie token(s) chose otherwise with FP8 projections")


def _np_fp8_rows(x: np.ndarray) -> np.ndarray:
    """x as an FP8 GEMM sees it, one (row, 128-column group) at a time."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        for j in range(0, x.shape[1], BLOCK):
            group = x[i, j:j + BLOCK]
            scale = max(np.abs(group).max(), 1e-12) / 448
            out[i, j:j + BLOCK] = (group / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    return out


def test_reference_ffn_against_a_numpy_oracle():
    """Per group: x quantized per row and 128 columns, times the block-dequantized weights; SwiGLU; quantized
    again; the down projection. Partial blocks (160 and 136 wide) included; rows past the groups are zero."""
    rng = np.random.default_rng(0)
    sizes = [5, 0, 9, 3]
    x = rng.standard_normal((sum(sizes) + 4, 160)).astype(np.float32)
    ws = [0.1 * rng.standard_normal(shape).astype(np.float32) for shape in ((4, 136, 160), (4, 136, 160),
                                                                          (4, 160, 136))]
    q = [fp8.quantize_weights(jax.numpy.asarray(w)) for w in ws]
    gate, up, down = (np.asarray(fp8.dequantize_weights(*b)) for b in q)
    want, row = np.zeros_like(x), 0
    for g, n in enumerate(sizes):
        xq = _np_fp8_rows(x[row:row + n])
        a, b = xq @ gate[g].T, xq @ up[g].T
        h = (a / (1 + np.exp(-a)) * b).astype(np.float32)
        want[row:row + n] = _np_fp8_rows(h) @ down[g].T
        row += n
    ours = fp8.reference_ffn(jax.numpy.asarray(x), jax.numpy.asarray(sizes), *q)
    assert rel_err(ours, want) <= 1e-5 and not np.asarray(ours)[row:].any()


def test_dense_fp8_linear_against_a_numpy_oracle():
    """A projection [N, K] = [200, 300] (partial blocks both ways): x quantized per row and 128 columns times the
    block-dequantized weight; exact in fp32, within bf16 operand rounding in bf16."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 300)).astype(np.float32)
    q = fp8.quantize_weights(jax.numpy.asarray(0.1 * rng.standard_normal((1, 200, 300)), np.float32))
    w = fp8.BlockScaled(q.values_GNK[0], q.scales_GRS[0]).check("w")
    want = _np_fp8_rows(x).astype(np.float64) @ np.asarray(fp8.dequantize_weights(*q))[0].T.astype(np.float64)
    assert rel_err(fp8.linear(jax.numpy.asarray(x), w), want) <= 1e-6
    x16 = x.astype(ml_dtypes.bfloat16)
    want16 = _np_fp8_rows(x16.astype(np.float32)).astype(np.float64) @ np.asarray(fp8.dequantize_weights(*q))[0].T
    bf16 = fp8.linear(jax.numpy.asarray(x16), w)
    assert bf16.dtype == jax.numpy.bfloat16 and rel_err(np.asarray(bf16, np.float32), want16) <= 5e-3


def test_pulls_move_half_the_bf16_bytes():
    """Per MoE layer and rank, the copy engine's copies of FP8 experts (values and scales) against bf16's."""
    moved = {}
    for fp8_experts in (False, True):
        cfg = tiny(hidden_size=256, moe_intermediate_size=128, dtype="bfloat16", fp8_experts=fp8_experts,
                   num_nextn_predict_layers=0)
        params = reference.Params(*deepseek_v3.init_model(cfg, seed=0))
        engine = DwdpEngine(params, Placement.for_group(cfg.n_routed_experts, 4), jax.devices()[:4],
                            DwdpOptions(transport="copy_engine"))
        moved[fp8_experts] = sum(c.nbytes for c in engine.transport._plans[(0, 0, 0)].copies)
        remote = cfg.n_routed_experts - engine.placement.local_experts
        assert moved[fp8_experts] == remote * cfg.expert_bytes()
    scales = 3 * 2 * 4  # per expert: three weights of 2 x 1 blocks, an fp32 scale each
    assert moved[True] / moved[False] == pytest.approx((3 * 256 * 128 + scales) / (3 * 256 * 128 * 2))
    assert moved[True] / moved[False] < 0.501


def test_orbax_saves_and_restores_fp8_experts_per_rank(shipped, tmp_path):
    _, _, config, params = shipped
    path = str(tmp_path / "ckpt")
    checkpoint.save_model(path, config, params)
    placement = Placement.for_group(config.n_routed_experts, 2)
    rank = checkpoint.restore_rank(path, placement, 1, jax.devices()[1])
    start, stop = placement.local_range(1)
    for m, local in enumerate(rank.local):
        assert local.fp8 and local.start == start
        for ours, want in zip(local.arrays(), params.experts[m].rows(start, stop).arrays(), strict=True):
            np.testing.assert_array_equal(np.asarray(ours).view(np.uint8), np.asarray(want).view(np.uint8))
    restored_config, whole = checkpoint.restore_model(path)
    assert restored_config.fp8_experts and whole.experts[0].fp8


def test_the_memory_plan_counts_fp8_experts_with_their_scales():
    bf16, fp8_cfg = tiny(dtype="bfloat16"), tiny(dtype="bfloat16", fp8_experts=True)
    for cfg in (bf16, fp8_cfg):
        slab = deepseek_v3.init_expert_slab(cfg, jax.random.key(0))
        assert slab.bytes() == cfg.n_routed_experts * cfg.expert_bytes()
    placement = Placement.for_group(bf16.n_routed_experts, 4)
    plans = [memory.plan_dwdp(c, placement, 64) for c in (bf16, fp8_cfg)]
    assert plans[1].replicated_weight_bytes == plans[0].replicated_weight_bytes
    assert plans[1].local_expert_bytes < 0.55 * plans[0].local_expert_bytes


def test_a_rank_loads_its_experts_with_bounded_host_memory(tmp_path):
    """64 experts of 256 x 256 over four shards: reading one rank's 16 experts of a layer peaks near their bytes,
    far below the layer's."""
    cfg = tiny(hidden_size=256, moe_intermediate_size=256, n_routed_experts=64, n_group=8, topk_group=4,
               num_nextn_predict_layers=0)
    path, _ = fp8_checkpoint(tmp_path, cfg, random_params(cfg, seed=2), shards=4)
    config, params = checkpoint.load_hf_checkpoint(path, fp8="keep", experts="lazy")
    slab_bytes = 16 * config.expert_bytes()
    layer_bytes = config.n_routed_experts * config.expert_bytes()
    tracemalloc.start()
    try:
        rows = params.experts.rows(0, 16, 32, jax.devices()[0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_tensor = cfg.hidden_size * cfg.moe_intermediate_size * 4  # the fp32 dequantized copy each read checks
    assert rows.bytes() == slab_bytes
    assert peak <= 2 * slab_bytes + 2 * one_tensor + (1 << 20) < layer_bytes, (peak, slab_bytes, layer_bytes)


def test_fp8_weights_of_the_wrong_shape_are_named():
    slab = deepseek_v3.init_expert_slab(tiny(fp8_experts=True), jax.random.key(0))
    bad = fp8.BlockScaled(slab.w_up_EDF.values_GNK, slab.w_up_EDF.scales_GRS[:, :, :0])
    with pytest.raises(ValueError, match=r"w_up_EDF: FP8 weight values float8_e4m3fn\[8, 16, 32\] with scales"):
        bad.check("w_up_EDF")


def test_full_r1_fp8_shapes_and_scale_layout_from_the_abstract_model():
    """The released layout, checked without memory: gate [256, 2048, 7168] e4m3 with [256, 16, 56] fp32 scales."""
    cfg = get_preset("deepseek_r1_fp8")
    _, slabs = deepseek_v3.abstract_model(cfg)
    assert len(slabs) == cfg.num_moe_layers + cfg.num_nextn_predict_layers == 59
    gate, down = slabs[0].w_gate_EDF, slabs[0].w_down_EFD
    assert (gate.values_GNK.shape, gate.values_GNK.dtype) == ((256, 2048, 7168), fp8.E4M3)
    assert (gate.scales_GRS.shape, gate.scales_GRS.dtype) == ((256, 16, 56), np.float32)
    assert down.values_GNK.shape == (256, 7168, 2048) and down.scales_GRS.shape == (256, 56, 16)
    assert sum(a.size * a.dtype.itemsize for a in slabs[0].arrays()) == 256 * cfg.expert_bytes()


@pytest.mark.parametrize("router_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("preset", ["deepseek_r1", "deepseek_r1_released"])
def test_planned_replicated_bytes_are_the_models(preset, router_dtype):
    """The planner's replicated weights against the abstract model's own arrays (the MTP module and the routed
    experts are not replicated serving weights), at R1's widths with its 3 dense layers and 2 MoE layers (the
    planner's terms are per layer), with the routers' weights as R1 stores them (bf16) or in fp32; as released,
    every projection is FP8 in [out, in] with 128 x 128 block scales, partial edge blocks included (kv_a: 576 rows
    = 4.5 blocks)."""
    cfg = get_preset(preset).replace(num_hidden_layers=5, router_dtype=router_dtype)
    model, _ = deepseek_v3.abstract_model(cfg)
    flat = nnx.to_flat_state(nnx.state(model))
    held = sum(a.size * a.dtype.itemsize for p, v in flat if p[0] != "mtp" for a in jax.tree.leaves(v.get_value()))
    assert memory.replicated_bytes(cfg) == held
    if cfg.fp8_dense:
        kv_a = model.layers[0].self_attn.kv_a_proj_with_mqa.get_value().check("kv_a_proj_with_mqa")
        assert kv_a.values_GNK.shape == (576, 7168) and kv_a.scales_GRS.shape == (5, 56)
        o = model.layers[4].self_attn.o_proj.get_value()
        assert o.values_GNK.shape == (7168, 128 * 128) and o.values_GNK.dtype == fp8.E4M3
        full = get_preset(preset)  # at full depth (the formula checked above), FP8 projections hold < 0.6 of bf16's
        assert memory.replicated_bytes(full) < 0.6 * memory.replicated_bytes(full.replace(fp8_dense=False))


def test_memory_study_of_full_depth_r1():
    cards = [hardware.H100_SXM, hardware.H200, hardware.B200]
    doc = studies.memory_study([get_preset("deepseek_r1_fp8"), get_preset("deepseek_r1")], cards, [8, 32],
                               [16384], 0.9)
    rows = {(r["fp8_experts"], r["strategy"], r["group_size"]): r for r in doc["raw"]["rows"]}
    fp8_cfg = get_preset("deepseek_r1_fp8")
    dwdp8 = rows[(True, "dwdp", 8)]
    assert dwdp8["local_expert_bytes"] == 32 * 58 * fp8_cfg.expert_bytes()  # L = 256 / 8 experts, 58 MoE layers
    assert dwdp8["prefetch_slot_bytes"] == 2 * 224 * fp8_cfg.expert_bytes()  # two slots of the 7 peers' 32 each
    assert rows[(False, "dwdp", 8)]["local_expert_bytes"] == 2 * 32 * 58 * fp8_cfg.expert_params()
    for r in rows.values():
        assert r["fits"] == {hw.name: r["total_bytes"] <= 0.9 * hw.memory_bytes for hw in cards}
        assert r["total_bytes_fp8_dense"] < r["total_bytes"]
    assert doc["metrics"]["smallest_dwdp_group"]["fp8 experts, MNT 16384, b200"] == 8
    with pytest.raises(ValueError, match="memory_fraction must be in"):
        studies.memory_study([fp8_cfg], cards, [8], [16384], 1.5)


def test_the_scaled_split_kernel_runs_fp8_slabs_through_the_view():
    """The model's MoE over two FP8 slabs on the split kernel (Pallas interpret mode) against the reference path."""
    cfg = tiny(hidden_size=256, moe_intermediate_size=128, fp8_experts=True, dtype="bfloat16")
    slab = deepseek_v3.init_expert_slab(cfg, jax.random.key(0))
    slabs = (slab.rows(0, 3), slab.rows(3, cfg.n_routed_experts))
    x = jax.random.normal(jax.random.key(1), (64, 256), jax.numpy.float32).astype(jax.numpy.bfloat16)
    ids = jax.random.randint(jax.random.key(2), (64, 2), 0, cfg.n_routed_experts)
    weights = jax.numpy.full((64, 2), 0.5, jax.numpy.float32)
    want = ExpertView(slabs, cfg.n_routed_experts, "xla")(x, ids, weights)
    ours = ExpertView(slabs, cfg.n_routed_experts, "pallas_split_interpret")(x, ids, weights)
    assert rel_err(np.asarray(ours, np.float32), np.asarray(want, np.float32)) <= 1e-3  # bf16 output: 7.7e-5 seen
    with pytest.raises(ValueError, match="grouped GEMM backend 'pallas_mgpu' has no FP8 path"):
        ExpertView(slabs, cfg.n_routed_experts, "pallas_mgpu")(x, ids, weights)


def test_slabs_stay_within_what_the_triton_kernel_addresses():
    """A weight of all 256 R1 experts has 3.76e9 elements, past Triton's int32 offsets (an illegal address on H200):
    the kernel refuses it before launch, and the single-device reference places a layer as slabs it can address."""
    from dwdp_jax.expert_source import SlabExperts, slabs_of
    from dwdp_jax.kernels import split_gemm

    assert split_gemm.max_slab_experts(7168, 2048) == 146
    spec = jax.ShapeDtypeStruct
    x = spec((1024, 7168), fp8.E4M3)
    weights = (fp8.BlockScaled(spec((256, 2048, 7168), fp8.E4M3), spec((256, 16, 56), np.float32)),)
    with pytest.raises(ValueError, match=r"slab 0 weight \(256, 2048, 7168\) has 3758096384 elements, more than the "
                                         r"2147483647 Triton addresses .* at most 146"):
        jax.eval_shape(lambda x, sizes, w, scales: split_gemm.split_ragged_dot(x, sizes, w, x_scale_SM=scales), x,
                       spec((256,), np.int32), weights, spec((56, 1024), np.float32))
    slab = deepseek_v3.init_expert_slab(tiny(fp8_experts=True), jax.random.key(0))
    parts = slabs_of(SlabExperts((slab,)), 0, 0, 8, jax.devices()[0], max_experts=3)
    assert [(s.start, s.count) for s in parts] == [(0, 3), (3, 3), (6, 2)]

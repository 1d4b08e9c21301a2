"""Roofline model of DeepSeek-V3/R1 prefill (and decode, for the generation servers) per rank and per layer.

Why: the paper's case for DWDP (section 3, blog Table 1) is a roofline argument. Per MoE layer a DWDP rank computes its
own tokens with all E experts while pulling the (E - L) experts it does not store, T_DWDP = max(T_compute,
T_prefetch); a DEP rank computes with its E/N experts and pays two all-to-alls, T_DEP = T_compute + T_all2all. The
same per-op costs drive the discrete-event simulator, so the table and the simulations share one model.

Each operator is a FLOP count and a byte count; its time is T_op = max(flops / peak, bytes / HBM bandwidth), and a
block's time is the sum over its operators (no overlap between operators). Peaks come from the HardwareSpec for the
operator's precision, except that a calibrated spec may carry achieved rates for attention and the grouped GEMM.

Modelling choices (global, not per point):
- Weights in the precision of their group (`Precision`): routed and shared experts NVFP4 (the checkpoint the paper
  serves, nvidia/DeepSeek-R1-0528-NVFP4), MLA projections / dense MLP / router / LM head bf16, the attention core (QK^T
  and PV, naive MLA form with 192-dim q/k and 128-dim v per head, as in prefill) bf16. GEMM inputs are read in the
  weight precision (W4A4, W8A8), outputs written in bf16.
- Causal attention over each sequence of a batch separately: s(s+1)/2 query-key pairs per sequence.
- Memory-bound elementwise work (2 RMSNorms and 2 residual adds per layer: 10 passes over tokens x hidden in bf16).
- Routing uniform over experts: a rank touching `a` token-expert assignments reads the weights of the expected number
  of distinct experts hit, h (1 - (1 - 1/E)^a) of the h it holds.
- DEP all-to-all without de-duplication: each token sends topk (N-1)/N expert copies, the dispatch payload in the
  MoE precision (activations are quantized before dispatch), the combine payload in bf16.
- DWDP prefetch: (E - L) experts per layer at one copy stream's rate (serial pulls, no contention; the simulator
  adds contention).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from dwdp_jax.placement import Placement
from dwdp_jax.sim.hardware import BYTES_PER_ELEMENT, PRECISIONS, HardwareSpec
from models.config import ModelConfig

ELEMENTWISE_PASSES = 10  # per decoder layer: 2 RMSNorms (read + write) and 2 residual adds (2 reads + 1 write)
ACTIVATION_BYTES = BYTES_PER_ELEMENT["bf16"]

# Blog Table 1 (GB200, DeepSeek-R1, DWDP4 vs DEP4, batch 1): ISL -> (T_compute/T_prefetch, T_DEP/T_DWDP).
PUBLISHED_TABLE1 = {1024: (0.19, 0.10), 8192: (0.62, 0.73), 16384: (1.52, 1.27), 32768: (4.77, 1.17)}


@dataclasses.dataclass(frozen=True)
class Precision:
    """Storage/compute precision of each weight group (bf16 | fp8 | nvfp4); see the module docstring."""

    moe: str = "nvfp4"  # routed and shared experts; also the DEP dispatch payload
    dense: str = "bf16"  # MLA projections, dense MLP, router, LM head
    attention: str = "bf16"  # QK^T and PV operands
    combine: str = "bf16"  # DEP combine payload
    kv_cache: str = "fp8"  # decode: the latent KV cache read per step

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) not in PRECISIONS:
                raise ValueError(f"Precision.{field.name} must be one of {PRECISIONS}, "
                                 f"got {getattr(self, field.name)!r}")


@dataclasses.dataclass(frozen=True)
class OpCost:
    """One operator: FLOPs, HBM bytes, the precision its tensor cores run in, and which peak applies."""

    name: str
    kind: str  # gemm | grouped_gemm | grouped_gemm_down | attention | memory
    flops: float
    bytes: float
    precision: str = "bf16"


def op_time_s(op: OpCost, hw: HardwareSpec) -> float:
    """T_op = max(F / P_peak, B / BW_mem)."""
    if op.kind == "memory":
        return op.bytes / hw.hbm_bytes_per_s
    peak = hw.peak_flops_per_s(op.precision)
    if op.kind == "attention" and hw.attention_flops_per_s:
        peak = hw.attention_flops_per_s
    if op.kind in ("grouped_gemm", "grouped_gemm_down"):
        # an achieved kernel rate belongs to the experts' precision it was measured in
        rates = {"bf16": (hw.grouped_gemm_flops_per_s, hw.grouped_gemm_down_flops_per_s),
                 "fp8": (hw.grouped_gemm_fp8_flops_per_s, hw.grouped_gemm_fp8_down_flops_per_s)}
        rate, down = rates.get(op.precision, (None, None))
        peak = (down if op.kind == "grouped_gemm_down" and down else rate) or peak
    return max(op.flops / peak, op.bytes / hw.hbm_bytes_per_s)


def ops_time_s(ops: Sequence[OpCost], hw: HardwareSpec) -> float:
    return sum(op_time_s(op, hw) for op in ops)


def gemm(name: str, m: float, k: int, n: int, precision: str) -> OpCost:
    """[m, k] x [k, n]: weights and inputs in `precision`, output in bf16."""
    b = BYTES_PER_ELEMENT[precision]
    return OpCost(name, "gemm", 2.0 * m * k * n, k * n * b + m * k * b + m * n * ACTIVATION_BYTES, precision)


def elementwise(name: str, tokens: float, width: int, passes: int) -> OpCost:
    return OpCost(name, "memory", 0.0, tokens * width * ACTIVATION_BYTES * passes)


def causal_pairs(seq_lens: Sequence[int] | np.ndarray) -> float:
    """Query-key pairs of causal attention, each sequence on its own: sum s(s+1)/2."""
    s = np.asarray(seq_lens, dtype=np.float64)
    return float(np.sum(s * (s + 1) / 2))


def mla_projection_ops(cfg: ModelConfig, tokens: float, prec: Precision) -> list[OpCost]:
    """One MLA block without its attention core: q/kv/o projections, norms and residuals."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank:
        q = [gemm("q_a_proj", tokens, d, cfg.q_lora_rank, prec.dense),
             gemm("q_b_proj", tokens, cfg.q_lora_rank, h * cfg.qk_head_dim, prec.dense)]
    else:
        q = [gemm("q_proj", tokens, d, h * cfg.qk_head_dim, prec.dense)]
    kv = [gemm("kv_a_proj", tokens, d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, prec.dense),
          gemm("kv_b_proj", tokens, cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), prec.dense)]
    out = gemm("o_proj", tokens, h * cfg.v_head_dim, d, prec.dense)
    return [elementwise("norms_residuals", tokens, d, ELEMENTWISE_PASSES), *q, *kv, out]


def prefill_attention_core(cfg: ModelConfig, tokens: float, pairs: float, prec: Precision) -> OpCost:
    """Causal attention in the naive MLA form (qk_head_dim q/k, v_head_dim v per head) over `pairs` query-key pairs;
    bytes: Q, K, V read once in the attention precision, O written in bf16."""
    h = cfg.num_attention_heads
    b = BYTES_PER_ELEMENT[prec.attention]
    return OpCost("attention_core", "attention", 2.0 * pairs * h * (cfg.qk_head_dim + cfg.v_head_dim),
                  tokens * h * ((2 * cfg.qk_head_dim + cfg.v_head_dim) * b + cfg.v_head_dim * ACTIVATION_BYTES),
                  prec.attention)


def attention_ops(cfg: ModelConfig, tokens: float, pairs: float, prec: Precision) -> list[OpCost]:
    """One MLA block in prefill: projections, norms, residuals and the causal attention core."""
    return [*mla_projection_ops(cfg, tokens, prec), prefill_attention_core(cfg, tokens, pairs, prec)]


def dense_mlp_ops(cfg: ModelConfig, tokens: float, prec: Precision) -> list[OpCost]:
    return [gemm("mlp_gate_up", tokens, cfg.hidden_size, 2 * cfg.intermediate_size, prec.dense),
            gemm("mlp_down", tokens, cfg.intermediate_size, cfg.hidden_size, prec.dense)]


def shared_and_router_ops(cfg: ModelConfig, tokens: float, prec: Precision) -> list[OpCost]:
    """The MoE block's work that needs no routed expert: router logits and the shared expert(s)."""
    width = cfg.moe_intermediate_size * cfg.n_shared_experts
    ops = [gemm("router", tokens, cfg.hidden_size, cfg.n_routed_experts, prec.dense)]
    if width:
        ops += [gemm("shared_gate_up", tokens, cfg.hidden_size, 2 * width, prec.moe),
                gemm("shared_down", tokens, width, cfg.hidden_size, prec.moe)]
    return ops


def experts_touched(cfg: ModelConfig, assignments: float, experts_held: float) -> float:
    """Expected distinct experts hit among `experts_held`, with `assignments` token-expert pairs uniform over E."""
    return experts_held * -math.expm1(assignments * math.log1p(-1.0 / cfg.n_routed_experts))


def routed_ops(cfg: ModelConfig, assignments: float, experts_held: float, prec: Precision) -> list[OpCost]:
    """Grouped GEMMs of the routed experts (FC1 gate+up with SwiGLU, FC2 down) over `assignments` token-expert rows."""
    d, inter = cfg.hidden_size, cfg.moe_intermediate_size
    b = BYTES_PER_ELEMENT[prec.moe]
    touched = experts_touched(cfg, assignments, experts_held)
    fc1 = OpCost("routed_fc1", "grouped_gemm", 2.0 * assignments * d * 2 * inter,
                 touched * d * 2 * inter * b + assignments * (d * b + inter * ACTIVATION_BYTES), prec.moe)
    fc2 = OpCost("routed_fc2", "grouped_gemm_down", 2.0 * assignments * inter * d,
                 touched * inter * d * b + assignments * (inter * b + d * ACTIVATION_BYTES), prec.moe)
    return [fc1, fc2]


def lm_head_ops(cfg: ModelConfig, num_tokens: float, prec: Precision) -> list[OpCost]:
    """Final norm and LM head for the tokens that produce logits (the last token of each sequence in prefill)."""
    return [elementwise("final_norm", num_tokens, cfg.hidden_size, 2),
            gemm("lm_head", num_tokens, cfg.hidden_size, cfg.vocab_size, prec.dense)]


def expert_bytes(cfg: ModelConfig, prec: Precision) -> float:
    """One routed expert of one layer (gate, up, down) in the MoE precision, scales included."""
    return cfg.expert_params() * BYTES_PER_ELEMENT[prec.moe]


@dataclasses.dataclass(frozen=True)
class PrefillTimes:
    """One rank's prefill of a batch, split where the simulator needs the seams (seconds).

    dense_s: all dense layers; pre_moe_s: one MoE layer up to its routed experts (attention, router, shared expert);
    routed_s: one MoE layer's routed experts on this rank's own tokens with all E experts (the DWDP case);
    head_s: final norm and LM head (one token per sequence); attention_s: one layer's attention (part of pre_moe_s,
    and of each dense layer), which a pull in flight slows more than a GEMM.
    """

    dense_s: float
    pre_moe_s: float
    routed_s: float
    head_s: float
    attention_s: float = 0.0


def prefill_times(cfg: ModelConfig, hw: HardwareSpec, seq_lens: Sequence[int] | np.ndarray,
                  prec: Precision, padded_tokens: float | None = None) -> PrefillTimes:
    """`padded_tokens`: the batch's static token count when it is padded to a shape (a runtime with static shapes,
    dwdp_jax.run_plan.token_buckets): every per-token GEMM (projections, dense MLP, router, shared expert) runs over
    the padding too; the attention core and the routed experts skip it (masked, never routed)."""
    tokens = float(np.sum(seq_lens))
    padded = tokens if padded_tokens is None else float(padded_tokens)
    if padded < tokens:
        raise ValueError(f"prefill_times: padded_tokens={padded_tokens} is below the batch's {tokens:.0f} tokens")
    pairs = causal_pairs(seq_lens)
    attention = ops_time_s([*mla_projection_ops(cfg, padded, prec), prefill_attention_core(cfg, tokens, pairs, prec)],
                           hw)
    dense = cfg.first_k_dense_replace * (attention + ops_time_s(dense_mlp_ops(cfg, padded, prec), hw))
    pre_moe = attention + ops_time_s(shared_and_router_ops(cfg, padded, prec), hw)
    routed = ops_time_s(routed_ops(cfg, tokens * cfg.num_experts_per_tok, cfg.n_routed_experts, prec), hw)
    head = ops_time_s(lm_head_ops(cfg, len(seq_lens), prec), hw)
    return PrefillTimes(dense, pre_moe, routed, head, attention)


def dep_routed_s(cfg: ModelConfig, hw: HardwareSpec, total_tokens: float, group_size: int, prec: Precision) -> float:
    """One DEP rank's routed experts in one MoE layer: E/N experts, a balanced 1/N share of all assignments."""
    assignments = total_tokens * cfg.num_experts_per_tok / group_size
    return ops_time_s(routed_ops(cfg, assignments, cfg.n_routed_experts / group_size, prec), hw)


def all_to_all_rank_bytes(cfg: ModelConfig, rank_tokens: Sequence[float] | np.ndarray, payload_bytes: float
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank (sent, received) bytes of one all-to-all (dispatch; combine is the same with the roles swapped),
    expert-parallel over N ranks with uniform routing: each token sends topk/N copies to every other rank."""
    t = np.asarray(rank_tokens, dtype=np.float64)
    n = len(t)
    per_copy = cfg.hidden_size * payload_bytes * cfg.num_experts_per_tok / n
    sent = t * (n - 1) * per_copy
    received = (t.sum() - t) * per_copy
    return sent, received


def dep_all_to_all_s(cfg: ModelConfig, hw: HardwareSpec, rank_tokens: Sequence[float] | np.ndarray,
                     prec: Precision) -> tuple[float, np.ndarray]:
    """One MoE layer's dispatch + combine: (the step's all-to-all time, each rank's own transfer time [ranks]).

    A rank's own time in each collective is max(sent, received) / per-rank all-to-all bandwidth; each collective ends
    with its slowest rank, so the step pays the sum over the two collectives of the per-collective maximum.
    """
    step_s, busy_s = 0.0, np.zeros(len(rank_tokens))
    for payload in (BYTES_PER_ELEMENT[prec.moe], BYTES_PER_ELEMENT[prec.combine]):
        sent, received = all_to_all_rank_bytes(cfg, rank_tokens, payload)
        rank_s = np.maximum(sent, received) / hw.all_to_all
        step_s += float(rank_s.max())
        busy_s += rank_s
    return step_s, busy_s


def prefetch_bytes(cfg: ModelConfig, placement: Placement, prec: Precision) -> float:
    """Bytes a DWDP rank pulls per MoE layer: all its E - L remote experts, whatever the routing."""
    return (placement.num_experts - placement.local_experts) * expert_bytes(cfg, prec)


def prefetch_s(cfg: ModelConfig, hw: HardwareSpec, placement: Placement, prec: Precision) -> float:
    """Contention-free prefetch of one layer: serial pulls at one copy stream's rate (capped by the ingress link)."""
    return prefetch_bytes(cfg, placement, prec) / min(hw.copy_bytes_per_s, hw.ingress)


def weights_bytes_per_rank(cfg: ModelConfig, placement: Placement, prec: Precision) -> float:
    """DWDP weight memory of one rank: replicated non-expert weights, the local expert slabs of every MoE layer, and
    two prefetch slots of one layer's remote experts."""
    routed_total = cfg.num_moe_layers * cfg.n_routed_experts * cfg.expert_params()
    replicated = (cfg.param_count() - routed_total) * BYTES_PER_ELEMENT[prec.dense]
    local = cfg.num_moe_layers * placement.local_experts * expert_bytes(cfg, prec)
    return replicated + local + 2 * prefetch_bytes(cfg, placement, prec)


@dataclasses.dataclass(frozen=True)
class RooflinePoint:
    """One MoE layer at (ISL, batch) for DWDP-N vs DEP-N, perfectly balanced (every rank has `batch` x ISL)."""

    isl: int
    batch: int
    group_size: int
    t_compute_s: float  # DWDP rank: attention + shared + router + routed with all E experts
    t_compute_dep_s: float  # DEP rank: the same with E/N experts and N times the assignments per expert
    t_prefetch_s: float
    t_all2all_s: float
    t_dwdp_s: float
    t_dep_s: float

    @property
    def compute_over_prefetch(self) -> float:
        return self.t_compute_s / self.t_prefetch_s

    @property
    def dep_over_dwdp(self) -> float:
        return self.t_dep_s / self.t_dwdp_s

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "compute_over_prefetch": self.compute_over_prefetch,
                "dep_over_dwdp": self.dep_over_dwdp}


def roofline_point(cfg: ModelConfig, hw: HardwareSpec, isl: int, batch: int, placement: Placement,
                   prec: Precision) -> RooflinePoint:
    if isl < 1 or batch < 1:
        raise ValueError(f"isl and batch must be >= 1, got isl={isl}, batch={batch}")
    n = placement.num_ranks
    seq_lens = [isl] * batch
    times = prefill_times(cfg, hw, seq_lens, prec)
    t_compute = times.pre_moe_s + times.routed_s
    t_compute_dep = times.pre_moe_s + dep_routed_s(cfg, hw, isl * batch * n, n, prec)
    t_all2all, _ = dep_all_to_all_s(cfg, hw, [isl * batch] * n, prec)
    t_prefetch = prefetch_s(cfg, hw, placement, prec)
    return RooflinePoint(isl, batch, n, t_compute, t_compute_dep, t_prefetch, t_all2all,
                         max(t_compute, t_prefetch), t_compute_dep + t_all2all)


def roofline_table(cfg: ModelConfig, hw: HardwareSpec, isls: Sequence[int], batches: Sequence[int],
                   placement: Placement, prec: Precision) -> list[RooflinePoint]:
    return [roofline_point(cfg, hw, isl, b, placement, prec) for b in batches for isl in isls]


def crossover_isl(points: Sequence[RooflinePoint], batch: int) -> float | None:
    """The ISL where T_compute / T_prefetch crosses 1 at `batch` (log-log interpolation between table rows); None
    when it does not cross within the table."""
    rows = sorted((p for p in points if p.batch == batch), key=lambda p: p.isl)
    for lo, hi in zip(rows, rows[1:]):
        if lo.compute_over_prefetch < 1 <= hi.compute_over_prefetch:
            x0, x1 = math.log(lo.isl), math.log(hi.isl)
            y0, y1 = math.log(lo.compute_over_prefetch), math.log(hi.compute_over_prefetch)
            return math.exp(x0 + (0 - y0) * (x1 - x0) / (y1 - y0))
    return None


def published_distance(points: Sequence[RooflinePoint]) -> list[dict]:
    """For each ISL of blog Table 1 present at batch 1: ours, published, and ours - published, for both ratios."""
    by_isl = {p.isl: p for p in points if p.batch == 1}
    out = []
    for isl, (cp_pub, speed_pub) in PUBLISHED_TABLE1.items():
        if isl in by_isl:
            p = by_isl[isl]
            out.append({"isl": isl, "compute_over_prefetch": p.compute_over_prefetch,
                        "compute_over_prefetch_published": cp_pub,
                        "compute_over_prefetch_diff": p.compute_over_prefetch - cp_pub,
                        "dep_over_dwdp": p.dep_over_dwdp, "dep_over_dwdp_published": speed_pub,
                        "dep_over_dwdp_diff": p.dep_over_dwdp - speed_pub})
    return out


@dataclasses.dataclass(frozen=True)
class GenServer:
    """A fixed generation server: `num_gpus` GPUs with attention DP + expert parallelism, at most `max_batch`
    requests in flight, MTP with `mtp_tokens` draft tokens per step each accepted with probability `mtp_acceptance`
    (chained: the i-th draft is kept with probability acceptance^i)."""

    num_gpus: int
    max_batch: int
    mtp_tokens: int = 0
    mtp_acceptance: float = 0.8

    def __post_init__(self):
        if self.num_gpus < 1 or self.max_batch < 1 or self.mtp_tokens < 0:
            raise ValueError(f"GenServer needs num_gpus >= 1, max_batch >= 1, mtp_tokens >= 0, got {self}")
        if not 0 <= self.mtp_acceptance <= 1:
            raise ValueError(f"GenServer.mtp_acceptance must be in [0, 1], got {self.mtp_acceptance}")

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens emitted per request per decode step."""
        return 1.0 + sum(self.mtp_acceptance ** i for i in range(1, self.mtp_tokens + 1))


def decode_step_s(cfg: ModelConfig, hw: HardwareSpec, gen: GenServer, active: int, context_len: float,
                  prec: Precision) -> float:
    """One decode step of a generation server with `active` requests of `context_len` tokens of context.

    Per GPU: active/G requests each computing (1 + mtp) query tokens; MLA in absorbed form reads the latent KV cache
    (kv_lora + rope per token) once per request; every layer's routed experts are expert-parallel over the G GPUs
    (an all-to-all when G > 1); the MTP module runs one extra MoE layer per draft token.
    """
    if active < 1:
        raise ValueError(f"decode_step_s: active must be >= 1, got {active}")
    g = gen.num_gpus
    requests = active / g
    queries = requests * (1 + gen.mtp_tokens)
    h, latent = cfg.num_attention_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    core = OpCost("decode_attention", "attention", 2.0 * queries * context_len * h * (latent + cfg.kv_lora_rank),
                  requests * context_len * latent * BYTES_PER_ELEMENT[prec.kv_cache], prec.attention)
    attention = ops_time_s(mla_projection_ops(cfg, queries, prec), hw) + op_time_s(core, hw)
    dense = attention + ops_time_s(dense_mlp_ops(cfg, queries, prec), hw)
    moe = (attention + ops_time_s(shared_and_router_ops(cfg, queries, prec), hw)
           + dep_routed_s(cfg, hw, queries * g, g, prec))
    if g > 1:
        moe += dep_all_to_all_s(cfg, hw, [queries] * g, prec)[0]
    layers = cfg.first_k_dense_replace * dense + (cfg.num_moe_layers + gen.mtp_tokens) * moe
    return layers + ops_time_s(lm_head_ops(cfg, queries, prec), hw)

"""Per-rank memory planner for the reference, DEP and DWDP runtimes: fail before any allocation, with the numbers.

A plan is arithmetic on the model config (no jax, no devices), so an R1-sized run that cannot fit is refused
in milliseconds on a laptop instead of as an out-of-memory error minutes into weight loading, and so that
reduced-depth R1-width configs for a given card can be derived (`max_layers_that_fit`).

Weights are counted exactly from `ModelConfig` (the MTP head is not served and not counted, as in
`cfg.param_count()`). Activations are an estimate of the peak of one forward step over a packed batch of
T = max_num_tokens tokens (context-only: no KV cache outlives the step); see `activation_bytes`.
`device_bytes` is what the process may allocate on one device (e.g. `device.memory_stats()["bytes_limit"]`,
which reflects XLA's preallocation fraction), not the card's nameplate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from dwdp_jax.placement import Placement
from models.config import DTYPE_BYTES, FP8_BLOCK, ModelConfig

_DTYPE_BYTES = DTYPE_BYTES
_FP32_BYTES = 4
ATTENTION_IMPLS = ("naive", "flash")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes one rank needs, by category. `description` names the shape that produced the numbers."""

    description: str
    replicated_weight_bytes: int
    local_expert_bytes: int
    prefetch_slot_bytes: int
    all_to_all_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return (self.replicated_weight_bytes + self.local_expert_bytes + self.prefetch_slot_bytes
                + self.all_to_all_bytes + self.activation_bytes)

    def check(self, device_bytes: int) -> int:
        """Raise ValueError listing every category when the plan exceeds `device_bytes`; else return the headroom."""
        headroom_bytes = device_bytes - self.total_bytes
        if headroom_bytes < 0:
            raise ValueError(f"does not fit: {self.summary()} > device_bytes {_format_bytes(device_bytes)} "
                             f"(short by {_format_bytes(-headroom_bytes)})")
        return headroom_bytes

    def summary(self) -> str:
        parts = [("replicated weights", self.replicated_weight_bytes), ("local experts", self.local_expert_bytes),
                 ("prefetch slots", self.prefetch_slot_bytes), ("all-to-all buffers", self.all_to_all_bytes),
                 ("activations", self.activation_bytes)]
        listed = " + ".join(f"{name} {_format_bytes(value)}" for name, value in parts if value)
        return f"{self.description}: {listed} = total {_format_bytes(self.total_bytes)}"


def plan_dwdp(cfg: ModelConfig, placement: Placement, max_num_tokens: int, *,
              weight_bytes_per_param: float | None = None, attention_impl: str = "naive",
              device_bytes: int | None = None, live_slots: int = 2, row_align: int = 1) -> MemoryPlan:
    """One DWDP rank: replicated non-expert weights, L local experts per MoE layer, `live_slots` buffers of one
    layer's (N-1)P remote experts, and the activations of its own T tokens (they never leave the rank); with
    `row_align` > 1 (`grouped_gemm.row_alignment`) the sorted rows are padded to it per expert.

    Two slots with persistent buffers; the device_put transport allocates each pull afresh, so while MoE m still
    reads its slot the pull of m + 2 already holds a third buffer (live_slots=3, measured as an OOM on H200).

    With `device_bytes` the plan is also checked (ValueError with the numbers when it does not fit).
    """
    if placement.num_experts != cfg.n_routed_experts:
        raise ValueError(f"placement.num_experts={placement.num_experts} must equal cfg.n_routed_experts="
                         f"{cfg.n_routed_experts}")
    remote_experts = placement.num_experts - placement.local_experts
    return _plan(cfg, weight_bytes_per_param, device_bytes,
                 f"dwdp N={placement.num_ranks} L={placement.local_experts} P={placement.prefetch_experts}, "
                 f"{cfg.num_moe_layers} MoE layers, T={max_num_tokens}, {attention_impl} attention",
                 experts=placement.local_experts * cfg.num_moe_layers, slot_experts=live_slots * remote_experts,
                 activations=activation_bytes(cfg, max_num_tokens, max_num_tokens * cfg.num_experts_per_tok
                                              + cfg.n_routed_experts * (row_align - 1), attention_impl))


def plan_dep(cfg: ModelConfig, num_ranks: int, max_num_tokens: int, *, weight_bytes_per_param: float | None = None,
             attention_impl: str = "naive", device_bytes: int | None = None,
             fp8_dispatch: bool = False) -> MemoryPlan:
    """One DEP rank: replicated non-expert weights, E/N experts per MoE layer, all-to-all buffers, activations.

    Dropless expert parallelism must size for the worst case, every row of the group routed to this rank:
    the dispatch receives up to N*T*K rows of D (plus its own T*K-row send buffer; the combine reuses both), and
    its grouped GEMM runs over those N*T*K rows. XLA:GPU (jax 0.11.2) keeps every ragged_all_to_all output in
    collective memory without sharing it between layers, so both outputs, the dispatch's receive buffer and the
    combine's T*K rows, are threaded through the layers (`dep.ReceiveBuffer`): one of each, whatever the depth.
    Measured at T 32768 on 4x H200 (`experiments.dep_step_memory`): DEP4 50.4 GiB of
    temporaries at both 4 and 5 MoE layers (before the threading: 56.9 / 70.9 / 102.6 GiB at 2 / 3 / 5); this plan
    says 54.7 GiB for all-to-all buffers and activations there.
    fp8_dispatch: the tokens travel quantized (FP8 experts on a split backend, `experts.quantizes_tokens`): the
    receive buffer holds e4m3 rows and their fp32 scales (D + 4 D/128 bytes a row, 0.52 of bf16's); the combine's
    rows stay in the model dtype.
    """
    if fp8_dispatch and not cfg.fp8_experts:
        raise ValueError("plan_dep fp8_dispatch needs FP8 experts (cfg.fp8_experts): bf16 experts take bf16 rows")
    if num_ranks < 1 or cfg.n_routed_experts % num_ranks:
        raise ValueError(f"plan_dep num_ranks must divide n_routed_experts={cfg.n_routed_experts}, got {num_ranks}")
    rows_per_rank = max_num_tokens * cfg.num_experts_per_tok
    local_experts = cfg.n_routed_experts // num_ranks
    return _plan(cfg, weight_bytes_per_param, device_bytes,
                 f"dep N={num_ranks} E/N={local_experts}, {cfg.num_moe_layers} MoE layers, T={max_num_tokens}, "
                 f"{attention_impl} attention",
                 experts=local_experts * cfg.num_moe_layers,
                 all_to_all_bytes=num_ranks * rows_per_rank * dispatch_row_bytes(cfg, fp8_dispatch)
                 + rows_per_rank * cfg.hidden_size * _DTYPE_BYTES[cfg.dtype],
                 activations=activation_bytes(cfg, max_num_tokens, num_ranks * rows_per_rank, attention_impl))


def dispatch_row_bytes(cfg: ModelConfig, fp8: bool) -> int:
    """Bytes of one token row as DEP's dispatch sends it: e4m3 values with an fp32 scale per 128, or the dtype."""
    d = cfg.hidden_size
    return d + 4 * -(-d // FP8_BLOCK) if fp8 else d * _DTYPE_BYTES[cfg.dtype]


def plan_reference(cfg: ModelConfig, max_num_tokens: int, *, weight_bytes_per_param: float | None = None,
                   attention_impl: str = "naive", device_bytes: int | None = None) -> MemoryPlan:
    """The single-device ground truth: every weight on one device, T tokens."""
    return _plan(cfg, weight_bytes_per_param, device_bytes,
                 f"reference, T={max_num_tokens}, {attention_impl} attention",
                 experts=cfg.n_routed_experts * cfg.num_moe_layers,
                 activations=activation_bytes(cfg, max_num_tokens, max_num_tokens * cfg.num_experts_per_tok,
                                                   attention_impl))


def _plan(cfg: ModelConfig, weight_bytes_per_param: float | None, device_bytes: int | None, description: str, *,
          experts: int, activations: int, slot_experts: int = 0, all_to_all_bytes: int = 0) -> MemoryPlan:
    """The plan every strategy shares the shape of: replicated weights, routed experts held (`experts`, over all
    MoE layers), prefetch slots (`slot_experts`), all-to-all buffers and activations; checked against
    `device_bytes` when given. Experts take `cfg.expert_bytes()` (FP8 values with their block scales, or dtype)
    unless `weight_bytes_per_param` sets every weight's size."""
    param_bytes = _weight_bytes_per_param(cfg, weight_bytes_per_param)
    expert_bytes = (cfg.expert_bytes() if weight_bytes_per_param is None
                    else cfg.expert_params() * weight_bytes_per_param)
    stored = weight_bytes_per_param is None
    experts_format = ("FP8 experts, " if cfg.fp8_experts and stored else "") + (
        "FP8 projections, " if cfg.fp8_dense and stored else "")
    plan = MemoryPlan(
        description=f"{description}, {experts_format}{param_bytes} B/param",
        replicated_weight_bytes=(replicated_bytes(cfg) if weight_bytes_per_param is None
                                 else math.ceil(replicated_params(cfg) * param_bytes)),
        local_expert_bytes=math.ceil(experts * expert_bytes),
        prefetch_slot_bytes=math.ceil(slot_experts * expert_bytes),
        all_to_all_bytes=all_to_all_bytes,
        activation_bytes=activations)
    if device_bytes is not None:
        plan.check(device_bytes)
    return plan


def max_layers_that_fit(cfg: ModelConfig, placement: Placement, max_num_tokens: int, device_bytes: int, *,
                        weight_bytes_per_param: float | None = None, attention_impl: str = "naive",
                        live_slots: int = 2, row_align: int = 1) -> int:
    """The largest num_hidden_layers <= cfg.num_hidden_layers, keeping first_k_dense_replace and at least one MoE
    layer, whose DWDP plan fits `device_bytes`: the depth of an R1-width model that a given card can hold.

    Raises ValueError with the numbers when even one MoE layer does not fit.
    """
    if cfg.num_moe_layers < 1:
        raise ValueError(f"max_layers_that_fit needs a config with MoE layers, got num_hidden_layers="
                         f"{cfg.num_hidden_layers} = first_k_dense_replace={cfg.first_k_dense_replace}")
    for num_layers in range(cfg.num_hidden_layers, cfg.first_k_dense_replace, -1):
        plan = plan_dwdp(cfg.replace(num_hidden_layers=num_layers), placement, max_num_tokens,
                         weight_bytes_per_param=weight_bytes_per_param, attention_impl=attention_impl,
                         live_slots=live_slots, row_align=row_align)
        if plan.total_bytes <= device_bytes:
            return num_layers
    raise ValueError(f"not even one MoE layer fits: {plan.summary()} > device_bytes {_format_bytes(device_bytes)}")


def replicated_params(cfg: ModelConfig) -> int:
    """Weights every rank holds: embedding, lm_head, final norm and each layer's non-routed part (attention,
    norms, dense MLPs, shared experts, routers with their bias)."""
    embeddings = 2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    return embeddings + sum(cfg.layer_params(layer)["replicated"] for layer in range(cfg.num_hidden_layers))


def projection_shapes(cfg: ModelConfig, layer: int) -> list[tuple[int, int]]:
    """(out, in) of every linear layer of decoder layer `layer` that the checkpoint stores in FP8: the attention
    projections, the dense MLP or the shared experts (not the router, not the norms)."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    q = ([(h * cfg.qk_head_dim, d)] if cfg.q_lora_rank is None
         else [(cfg.q_lora_rank, d), (h * cfg.qk_head_dim, cfg.q_lora_rank)])
    attention = q + [(cfg.kv_lora_rank + cfg.qk_rope_head_dim, d),
                     (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), (d, h * cfg.v_head_dim)]
    f = cfg.moe_intermediate_size * cfg.n_shared_experts if cfg.is_moe_layer(layer) else cfg.intermediate_size
    return attention + ([(f, d), (f, d), (d, f)] if f else [])


def fp8_matrix_bytes(n: int, k: int) -> int:
    """An [n, k] e4m3 matrix with one fp32 scale per 128 x 128 block (partial edge blocks included)."""
    return n * k + 4 * -(-n // FP8_BLOCK) * -(-k // FP8_BLOCK)


def replicated_bytes(cfg: ModelConfig, fp8_dense: bool | None = None) -> int:
    """Bytes of the weights every rank holds (`replicated_params`) as the model stores them: `dtype`, the routers'
    weights `router_dtype` and their correction biases fp32, and every `projection_shapes` matrix FP8 when
    `fp8_dense` (default: `cfg.fp8_dense`, the model's own choice)."""
    fp8_dense = cfg.fp8_dense if fp8_dense is None else fp8_dense
    a, e = _DTYPE_BYTES[cfg.dtype], cfg.n_routed_experts
    router = cfg.hidden_size * e * (_DTYPE_BYTES[cfg.router_dtype] - a) + e * (4 - a)
    total = replicated_params(cfg) * a + cfg.num_moe_layers * router
    if fp8_dense:
        for layer in range(cfg.num_hidden_layers):
            for n, k in projection_shapes(cfg, layer):
                total += fp8_matrix_bytes(n, k) - n * k * _DTYPE_BYTES[cfg.dtype]
    return math.ceil(total)


def routed_params(cfg: ModelConfig) -> int:
    """All routed-expert weights of the model (every MoE layer, every expert)."""
    return cfg.num_moe_layers * cfg.n_routed_experts * cfg.expert_params()


def activation_bytes(cfg: ModelConfig, max_num_tokens: int, routed_rows: int, attention_impl: str = "naive") -> int:
    """Estimated peak activation bytes of one forward step over T = max_num_tokens packed tokens.

    The residual stream lives through the whole step; the phases (attention, dense MLP, MoE, logits) run one at
    a time, so the peak is the residual plus the largest phase. With a = activation dtype bytes, f = 4 (fp32),
    D hidden, H heads, V vocab, E experts, F = moe_intermediate_size, F_d = intermediate_size:
      residual   = 2 T D a                                    (hidden state and its normed copy)
      attention  = T (q_lora + kv_lora + rope) a              (MLA latents)
                 + T H (2 qk_head_dim + 2 v_head_dim) a       (q, k, v and output, k/v expanded per head)
                 + naive: H T^2 (f + a)                       (fp32 scores and probabilities of the packed batch)
                   flash: 2 T H f                             (running max and sum; no T x T matrix)
      dense MLP  = 2 T F_d a                                  (gate and up; only with dense layers)
      MoE        = T E f + routed_rows (D + 2F) a                   (router logits; the grouped GEMM's rows)
                 + T K D (2 a + f) + 2 T F n_shared a           (sorted rows, the rows back in token order
                                                                 and an fp32 copy of them; shared expert)
      logits     = T V f
    routed_rows is T*K for the reference and DWDP (tokens stay on their rank; plus E (align - 1) padding rows when
    the kernel's groups are tile-aligned) and the worst case N*T*K for DEP.
    The T K D (2 a + f) term was missing until a DEP2 step at R1 width (T 32768) asked XLA for 35.0 GiB of
    temporaries on an H200 (2026-11-27): with DEP's all-to-all buffers and the residual the plan now counts
    36.7 GiB for it (it counted 27.2). That step still unsorted by a scatter and summed an fp32 copy; the gather
    combine since needs less on CPU, and the term stays until a GPU run measures it.
    """
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    if max_num_tokens < 1:
        raise ValueError(f"max_num_tokens must be >= 1, got {max_num_tokens}")
    t, d, h = max_num_tokens, cfg.hidden_size, cfg.num_attention_heads
    a = _DTYPE_BYTES[cfg.dtype]
    residual = 2 * t * d * a
    attention = t * ((cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim) * a
    attention += t * h * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim) * a
    attention += h * t * t * (_FP32_BYTES + a) if attention_impl == "naive" else 2 * t * h * _FP32_BYTES
    dense_mlp = 2 * t * cfg.intermediate_size * a if cfg.first_k_dense_replace else 0
    moe = t * cfg.n_routed_experts * _FP32_BYTES + routed_rows * (d + 2 * cfg.moe_intermediate_size) * a
    moe += t * cfg.num_experts_per_tok * d * (2 * a + _FP32_BYTES)
    moe += 2 * t * cfg.moe_intermediate_size * cfg.n_shared_experts * a
    logits = t * cfg.vocab_size * _FP32_BYTES
    return residual + max(attention, dense_mlp, moe, logits)


class DoesNotFit(ValueError):
    """A compiled program needs more device memory than is free (found on the device, after other work ran)."""


def check_program_fits(what: str, need_bytes: int, available_bytes: Sequence[int | None]) -> None:
    """Raise DoesNotFit when a compiled program's temporaries and outputs (`need_bytes`, from XLA's buffer
    assignment) exceed the largest free block of any of its devices (None: the device reports no limit, e.g. CPU).

    Checked before the first run of an SPMD program: one rank out of memory would leave the others waiting in
    their collectives forever, so the failure must come first and on every rank at once.
    """
    short = [(i, free) for i, free in enumerate(available_bytes) if free is not None and need_bytes > free]
    if short:
        listed = ", ".join(f"device {i}: {_format_bytes(free)}" for i, free in short)
        raise DoesNotFit(f"{what} needs {_format_bytes(need_bytes)} of temporaries and outputs per device, more than "
                         f"the largest free block ({listed}); lower config.memory_fraction (the depth planner's "
                         "share), model.num_hidden_layers or max_num_tokens, or run the strategy alone")


def largest_free_block(device) -> int | None:
    """The device allocator's largest free block (what one program's temporaries must fit in), if it reports one.

    Allocators without one (XLA's cuda_async pool maps pages on demand: `largest_free_block_bytes` is 0 or absent)
    get what is left under the limit; a full BFC pool reports 0 for both."""
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return stats.get("largest_free_block_bytes") or max(stats["bytes_limit"] - stats.get("bytes_in_use", 0), 0)


def _weight_bytes_per_param(cfg: ModelConfig, weight_bytes_per_param: float | None) -> float:
    """The storage dtype's size unless given (e.g. 1 + 4 / 128**2 for FP8 with 128x128 fp32 block scales)."""
    if weight_bytes_per_param is None:
        return _DTYPE_BYTES[cfg.dtype]
    if weight_bytes_per_param <= 0:
        raise ValueError(f"weight_bytes_per_param must be > 0, got {weight_bytes_per_param}")
    return weight_bytes_per_param


def _format_bytes(num_bytes: int) -> str:
    """GiB for model-sized numbers, KiB/MiB for test-sized ones; the exact byte count always follows."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.2f} {unit} ({num_bytes} B)"
    return f"{num_bytes} B"

"""DeepSeek-V3/R1 in Flax NNX: the whole model in one file, pure math.

Dimension letters: T tokens of a packed batch, D hidden, F MLP width, H heads, K per-head q/k width
(nope + rope), N nope width, R rope width, V value width (einsums) / vocab (shapes), Q q-LoRA rank,
C kv-LoRA rank, E experts. Weights are stored [in, out] (the transpose of the HF checkpoint).

Routed experts are not module state: every MoE layer receives them as an argument (`models.experts`), so the
same modules run the reference, DEP and DWDP. Nothing here knows about devices or placement.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dwdp_jax.kernels import attention as attention_kernels
from dwdp_jax.kernels import dense_fp8, fp8, fp32_dot, norm_rows
from models.config import ModelConfig
from models.experts import WEIGHTS, ExpertSlab, RoutedExperts

INIT_STD = 0.02  # HF initializer_range


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> nnx.Param:
    return nnx.Param(INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype))


def _projection(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, fp8_blocks: bool, in_axes: int = 1) -> nnx.Param:
    """A linear layer's weight [*in, *out] (`in_axes` input axes) in `dtype`, or (`fp8_blocks`) as the checkpoint
    stores it: an FP8 `BlockScaled` of the [prod(out), prod(in)] matrix (e4m3, one fp32 scale per 128 x 128
    block)."""
    if not fp8_blocks:
        return _param(rngs, shape, dtype)
    w = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    q = fp8.quantize_weights(w.reshape(math.prod(shape[:in_axes]), -1).T[None])
    return nnx.Param(fp8.BlockScaled(q.values_GNK[0], q.scales_GRS[0]))


def project(x_TK: jax.Array, w: nnx.Param) -> jax.Array:
    """x [T, in] through a `_projection` weight: [T, prod(out)] (an FP8 weight through `dense_fp8.linear`: the
    block-scaled kernel on Hopper)."""
    value = w.get_value()
    if isinstance(value, fp8.BlockScaled):
        return dense_fp8.linear(x_TK, value)
    return x_TK @ value.reshape(x_TK.shape[-1], -1)


def project_stacked(x_TK: jax.Array, ws: Sequence[nnx.Param]) -> list[jax.Array]:
    """x through several `_projection` weights that share it: FP8 weights as one block-scaled GEMM over the
    weights stacked along their outputs (`dense_fp8.linear_stacked`), else one projection each."""
    values = [w.get_value() for w in ws]
    if all(isinstance(v, fp8.BlockScaled) for v in values):
        return dense_fp8.linear_stacked(x_TK, values)
    return [project(x_TK, w) for w in ws]


def project_heads(x_TK: jax.Array, w: nnx.Param, parts: Sequence[int], tail_T1R: jax.Array) -> list[jax.Array]:
    """x through a per-head `_projection` weight [in, H, sum(parts)] as one [T, H, part] array per part of each
    head's outputs (MLA's kv_b: k_nope, v), each from its own GEMM over the weight's columns of that part: no copy
    of the outputs to split them. The first part comes out with tail_T1R after it in every head (MLA's k: k_nope,
    then the rope key all heads share). FP8 weights whose parts are whole 128-row scale blocks take their blocks'
    rows, the first part's GEMM writing each head's columns where they lie in [T, H, part + tail], and the tail
    written in place after it; others are projected at once, split and concatenated with the tail."""
    value, t = w.get_value(), x_TK.shape[0]
    bounds = [sum(parts[:i]) for i in range(len(parts) + 1)]
    scaled = isinstance(value, fp8.BlockScaled)
    h = value.values_GNK.shape[0] // bounds[-1] if scaled else value.shape[1]
    tail_THR = jnp.broadcast_to(tail_T1R, (t, h, tail_T1R.shape[-1]))
    if scaled and not any(p % fp8.BLOCK for p in parts):
        first, *rest = _fp8_head_parts(x_TK, value, bounds, h, tail_THR.shape[-1])
        return [jax.lax.dynamic_update_slice(first, tail_THR.astype(first.dtype), (0, 0, parts[0])), *rest]
    if scaled:
        out_THP = project(x_TK, w).reshape(t, h, bounds[-1])
        outs = [out_THP[..., a:b] for a, b in zip(bounds, bounds[1:])]
    else:
        outs = [(x_TK @ value[:, :, a:b].reshape(x_TK.shape[-1], -1)).reshape(t, h, b - a)
                for a, b in zip(bounds, bounds[1:])]
    return [jnp.concatenate([outs[0], tail_THR], axis=-1), *outs[1:]]


def _fp8_head_parts(x_TK: jax.Array, value: fp8.BlockScaled, bounds: Sequence[int], h: int,
                    tail: int) -> list[jax.Array]:
    """`project_heads`' FP8 GEMMs, a weight of each part's block rows: [T, H, part] each, the first [T, H, part +
    tail] with its last `tail` columns unspecified (`dense_fp8.linear_each`'s out_spread)."""
    width, block, t = bounds[-1], fp8.BLOCK, x_TK.shape[0]
    values_HPK = value.values_GNK.reshape(h, width, -1)
    scales_HRS = value.scales_GRS.reshape(h, width // block, -1)
    ws = [fp8.BlockScaled(values_HPK[:, a:b].reshape(h * (b - a), -1),
                          scales_HRS[:, a // block:b // block].reshape(h * (b - a) // block, -1))
          for a, b in zip(bounds, bounds[1:])]
    spreads = [(bounds[1], bounds[1] + tail)] + [None] * (len(ws) - 1)
    return [out.reshape(t, h, -1) for out in dense_fp8.linear_each(x_TK, ws, spreads)]


# The q/kv LoRA norms keep RMSNorm's default eps whatever rms_norm_eps says: DeepSeek's own inference code
# (`RMSNorm(self.kv_lora_rank)`) and HF's DeepseekV3Attention both build them without the config's eps, so a
# checkpoint with rms_norm_eps != 1e-6 is computed with 1e-6 there and with rms_norm_eps everywhere else.
LORA_NORM_EPS = 1e-6


class RMSNorm(nnx.Module):
    """Normalized in fp32, cast back to the input dtype before the weight multiply (as HF)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        with jax.named_scope("norm"):
            return norm_rows.rms_norm(x, self.weight[...], self.eps)

    def quantized(self, x_TD) -> dense_fp8.QuantizedRows:
        """The normed rows as the FP8 kernels take them, computed with the norm in one kernel where it runs."""
        with jax.named_scope("norm"):
            return dense_fp8.QuantizedRows(*norm_rows.rms_norm_quantized(x_TD, self.weight[...], self.eps), x_TD.dtype)


def rope_inv_freq(cfg: ModelConfig) -> tuple[jax.Array, float]:
    """Inverse frequencies of the rope dims, YaRN-blended whenever the config has yarn scaling, and the
    cos/sin attention factor (1.0 for R1: YaRN's magnitude correction lives in the softmax scale)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    yarn = cfg.rope_scaling
    if yarn is None:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / max(high - low, 1e-3), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = inv_freq / yarn.factor * (1 - extrapolation) + inv_freq * extrapolation

    def mscale(scale: float, m: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if yarn.mscale and yarn.mscale_all_dim:
        factor = mscale(yarn.factor, yarn.mscale) / mscale(yarn.factor, yarn.mscale_all_dim)
    else:
        factor = mscale(yarn.factor, 1.0)
    return inv_freq, factor


def apply_rope(x_THR: jax.Array, positions_T: jax.Array, inv_freq_R2: jax.Array, factor: float) -> jax.Array:
    """Rotates the checkpoint's interleaved pairs (x0, x1), (x2, x3), ...; output order [evens' ; odds']."""
    angles_TR2 = positions_T[:, None].astype(jnp.float32) * inv_freq_R2[None, :]
    cos_T1R2 = (jnp.cos(angles_TR2) * factor)[:, None, :]
    sin_T1R2 = (jnp.sin(angles_TR2) * factor)[:, None, :]
    x32 = x_THR.astype(jnp.float32)
    even, odd = x32[..., 0::2], x32[..., 1::2]
    out = jnp.concatenate([even * cos_T1R2 - odd * sin_T1R2, odd * cos_T1R2 + even * sin_T1R2], axis=-1)
    return out.astype(x_THR.dtype)


class MLA(nnx.Module):
    """Multi-head latent attention, prefill form: latents expanded per head, naive causal attention."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, attention_impl: str = "xla"):
        dt = jnp.dtype(cfg.dtype)
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.cfg = cfg
        self.attention_impl = attention_impl
        proj = functools.partial(_projection, rngs, dtype=dt, fp8_blocks=cfg.fp8_dense)
        if cfg.q_lora_rank is None:
            self.q_proj = proj((d, h, cfg.qk_head_dim))
        else:
            self.q_a_proj = proj((d, cfg.q_lora_rank))
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS, dt)
            self.q_b_proj = proj((cfg.q_lora_rank, h, cfg.qk_head_dim))
        self.kv_a_proj_with_mqa = proj((d, cfg.kv_lora_rank + cfg.qk_rope_head_dim))
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LORA_NORM_EPS, dt)
        self.kv_b_proj = proj((cfg.kv_lora_rank, h, cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = proj((h, cfg.v_head_dim, d), in_axes=2)

    def takes_quantized(self, x_TD) -> bool:
        """Whether x may come as `dense_fp8.QuantizedRows` (`fp8_fused_norm`): every projection of x on the kernel."""
        first = (self.q_proj,) if self.cfg.q_lora_rank is None else (self.q_a_proj,)
        values = [w.get_value() for w in (*first, self.kv_a_proj_with_mqa)]
        return self.cfg.fp8_fused_norm and all(isinstance(v, fp8.BlockScaled) and dense_fp8.on_kernel(x_TD, v)
                                               for v in values)

    def __call__(self, x_TD, segment_ids_T, positions_T):
        """x_TD: the normed rows, or with `takes_quantized` their FP8 quantization."""
        cfg = self.cfg
        t, h = x_TD.shape[0], cfg.num_attention_heads
        with jax.named_scope("mla_proj"):
            if cfg.q_lora_rank is None:
                q_THK = project(x_TD, self.q_proj).reshape(t, h, cfg.qk_head_dim)
                kv_a = project(x_TD, self.kv_a_proj_with_mqa)
            else:
                q_a, kv_a = project_stacked(x_TD, (self.q_a_proj, self.kv_a_proj_with_mqa))
                q_THK = project(self.q_a_layernorm(q_a), self.q_b_proj).reshape(t, h, cfg.qk_head_dim)
            c_TC = self.kv_a_layernorm(kv_a[:, :cfg.kv_lora_rank])
        with jax.named_scope("rope"):
            inv_freq, factor = rope_inv_freq(cfg)
            # q's rope dims rotated where they lie: one pass over them, not a copy of all of q
            n = cfg.qk_nope_head_dim
            q_THK = q_THK.at[..., n:].set(apply_rope(q_THK[..., n:], positions_T, inv_freq, factor))
            # one rope key shared by all heads
            k_pe_T1R = apply_rope(kv_a[:, None, cfg.kv_lora_rank:], positions_T, inv_freq, factor)
        with jax.named_scope("mla_proj"):
            # each head's key: its k_nope, then the rope key
            k_THK, v_THV = project_heads(c_TC, self.kv_b_proj, (n, cfg.v_head_dim), k_pe_T1R)
        if cfg.fp8_attention_qkv:
            with jax.named_scope("attention_fp8_inputs"):
                q_THK, k_THK, v_THV = map(fp8.as_fp8_token_blocks, (q_THK, k_THK, v_THV))
        with jax.named_scope("attention"):
            attend = attention_kernels.get_backend(self.attention_impl)
            o_THV = attend(q_THK, k_THK, v_THV, segment_ids_T, positions_T, scale=cfg.softmax_scale)
        with jax.named_scope("mla_out"):
            return project(o_THV.reshape(t, -1), self.o_proj)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the dense layers and the shared experts."""

    def __init__(self, d: int, f: int, dtype, rngs: nnx.Rngs, fp8_blocks: bool = False):
        self.gate_proj = _projection(rngs, (d, f), dtype, fp8_blocks)
        self.up_proj = _projection(rngs, (d, f), dtype, fp8_blocks)
        self.down_proj = _projection(rngs, (f, d), dtype, fp8_blocks)

    def __call__(self, x_TD):
        weights = [w.get_value() for w in (self.gate_proj, self.up_proj, self.down_proj)]
        if all(isinstance(w, fp8.BlockScaled) for w in weights):
            return dense_fp8.swiglu(x_TD, *weights)
        gate_TF, up_TF = project_stacked(x_TD, (self.gate_proj, self.up_proj))
        h_TF = jax.nn.silu(gate_TF) * up_TF
        return project(h_TF, self.down_proj)


class Router(nnx.Module):
    """Sigmoid router with group-limited top-k (DeepSeek `noaux_tc`), all in fp32 (the dot's products and sums in
    fp32, `fp32_dot.dot_f32`, unless the `router_precision` ablation says otherwise).

    The correction bias only chooses experts and scores groups (sum of each group's top-2); the weights are
    the unbiased sigmoid scores of the chosen experts, normalized, times routed_scaling_factor.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.weight = _param(rngs, (cfg.hidden_size, cfg.n_routed_experts), jnp.dtype(cfg.router_dtype))
        self.e_score_correction_bias = nnx.Param(jnp.zeros((cfg.n_routed_experts,), jnp.float32))

    def __call__(self, x_TD):
        cfg = self.cfg
        if cfg.router_precision == "float32":
            logits_TE = fp32_dot.dot_f32(x_TD, self.weight[...])
        else:
            logits_TE = jnp.einsum("td,de->te", x_TD.astype(jnp.float32), self.weight[...].astype(jnp.float32),
                                   precision=jax.lax.Precision(cfg.router_precision))
        scores_TE = jax.nn.sigmoid(logits_TE)
        choice_TE = scores_TE + self.e_score_correction_bias[...]
        t = x_TD.shape[0]
        choice_TGe = choice_TE.reshape(t, cfg.n_group, -1)
        group_scores_TG = jax.lax.top_k(choice_TGe, 2)[0].sum(-1) if choice_TGe.shape[-1] > 1 else choice_TGe[..., 0]
        _, kept_groups = jax.lax.top_k(group_scores_TG, cfg.topk_group)
        keep_TG = jnp.zeros((t, cfg.n_group), bool).at[jnp.arange(t)[:, None], kept_groups].set(True)
        choice_TE = jnp.where(jnp.repeat(keep_TG, cfg.n_routed_experts // cfg.n_group, axis=1), choice_TE, -jnp.inf)
        _, ids_TK = jax.lax.top_k(choice_TE, cfg.num_experts_per_tok)
        weights_TK = jnp.take_along_axis(scores_TE, ids_TK, axis=1)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdims=True) + 1e-20)
        return weights_TK * cfg.routed_scaling_factor, ids_TK


class MoE(nnx.Module):
    """Router + routed experts (given as an argument) + shared experts on the same normed input."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gate = Router(cfg, rngs)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                                  jnp.dtype(cfg.dtype), rngs, cfg.fp8_dense) if cfg.n_shared_experts else None

    def __call__(self, x_TD, experts: RoutedExperts, valid_T=None):
        with jax.named_scope("router"):
            weights_TK, ids_TK = self.gate(x_TD)
        with jax.named_scope("routed_experts"):
            y_TD = experts(x_TD, ids_TK, weights_TK, valid_T)
        if self.shared_experts is not None:
            with jax.named_scope("shared_expert"):
                y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD, ids_TK


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: x += MLA(norm(x)); x += FFN(norm(x)), FFN dense or MoE."""

    def __init__(self, cfg: ModelConfig, moe: bool, rngs: nnx.Rngs, attention_impl: str = "xla"):
        dt = jnp.dtype(cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.self_attn = MLA(cfg, rngs, attention_impl)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.mlp = MoE(cfg, rngs) if moe else MLP(cfg.hidden_size, cfg.intermediate_size, dt, rngs, cfg.fp8_dense)

    def attention(self, x_TD, segment_ids_T, positions_T):
        norm = self.input_layernorm
        h_TD = norm.quantized(x_TD) if self.self_attn.takes_quantized(x_TD) else norm(x_TD)
        return x_TD + self.self_attn(h_TD, segment_ids_T, positions_T)

    def ffn(self, x_TD, experts: RoutedExperts | None = None, valid_T=None):
        h_TD = self.post_attention_layernorm(x_TD)
        if isinstance(self.mlp, MoE):
            y_TD, ids_TK = self.mlp(h_TD, experts, valid_T)
            with jax.named_scope("moe_combine"):  # XLA fuses the combine's weighted sum into this add
                return x_TD + y_TD, ids_TK
        with jax.named_scope("dense_mlp"):
            return x_TD + self.mlp(h_TD), None

    def __call__(self, x_TD, segment_ids_T, positions_T, experts: RoutedExperts | None = None, valid_T=None):
        return self.ffn(self.attention(x_TD, segment_ids_T, positions_T), experts, valid_T)


class MTP(nnx.Module):
    """Multi-token prediction module (checkpoint layer num_hidden_layers): predicts token i+2 from the main
    model's final hidden state at i and the embedding of token i+1; embedding and head are the main model's."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, attention_impl: str = "xla"):
        dt = jnp.dtype(cfg.dtype)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.eh_proj = _param(rngs, (2 * cfg.hidden_size, cfg.hidden_size), dt)  # bf16 in the checkpoint
        self.layer = DecoderLayer(cfg, moe=True, rngs=rngs, attention_impl=attention_impl)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)  # checkpoint name: shared_head.norm


class DeepseekV3(nnx.Module):
    """Embedding, decoder layers, final norm, lm_head (untied) and the MTP modules."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, attention_impl: str = "xla"):
        dt = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.embed_tokens = nnx.Param(INIT_STD * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size),
                                                                   jnp.float32).astype(dt))
        self.layers = nnx.List([DecoderLayer(cfg, cfg.is_moe_layer(i), rngs, attention_impl)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), dt)
        self.mtp = nnx.List([MTP(cfg, rngs, attention_impl) for _ in range(cfg.num_nextn_predict_layers)])

    def embed(self, tokens_T):
        with jax.named_scope("embed"):
            return self.embed_tokens[...][tokens_T]

    def head(self, h_TD):
        """Final norm and fp32 logits."""
        with jax.named_scope("lm_head"):
            return jnp.einsum("td,dv->tv", self.norm(h_TD), self.lm_head[...], preferred_element_type=jnp.float32)

    def __call__(self, tokens_T, segment_ids_T, positions_T, experts: Sequence[RoutedExperts], logit_rows_R=None):
        """Packed prefill. `experts[m]` serves the m-th MoE layer. Returns (final hidden [T, D] before the final
        norm, logits fp32 [T, V] or, with `logit_rows_R`, [R, V] of those rows only (a sequence's first generated
        token needs only its last row), expert ids per MoE layer [T, top-k])."""
        valid_T = segment_ids_T >= 0
        x_TD = self.embed(tokens_T)
        expert_ids = []
        moe_layers = iter(experts)
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x_TD, ids = layer(x_TD, segment_ids_T, positions_T,
                                  next(moe_layers) if self.cfg.is_moe_layer(i) else None, valid_T)
            if ids is not None:
                expert_ids.append(ids)
        return x_TD, self.head(x_TD if logit_rows_R is None else x_TD[logit_rows_R]), expert_ids

    def mtp_logits(self, h_TD, next_tokens_T, segment_ids_T, positions_T, experts: RoutedExperts, depth: int = 0):
        """Logits of MTP module `depth` from the main model's final hidden states (after the final norm, as the
        serving engines feed it) and the embeddings of the next tokens."""
        mtp = self.mtp[depth]
        e_TD = mtp.enorm(self.embed(next_tokens_T))
        x_TD = project(jnp.concatenate([e_TD, mtp.hnorm(self.norm(h_TD))], axis=-1), mtp.eh_proj)
        x_TD, ids_TK = mtp.layer(x_TD, segment_ids_T, positions_T, experts, segment_ids_T >= 0)
        return jnp.einsum("td,dv->tv", mtp.norm(x_TD), self.lm_head[...], preferred_element_type=jnp.float32), ids_TK


class Params(NamedTuple):
    """A whole model: the NNX module (every non-routed weight) and one full expert slab per MoE layer."""

    model: DeepseekV3
    experts: tuple[ExpertSlab, ...]


def init_expert_slab(cfg: ModelConfig, key: jax.Array) -> ExpertSlab:
    """All routed experts of one MoE layer as a single slab (FP8 with `cfg.fp8_experts`)."""
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    dt = jnp.dtype(cfg.dtype)
    kg, ku, kd = jax.random.split(key, 3)
    slab = ExpertSlab(w_gate_EDF=(INIT_STD * jax.random.normal(kg, (e, d, f), jnp.float32)).astype(dt),
                      w_up_EDF=(INIT_STD * jax.random.normal(ku, (e, d, f), jnp.float32)).astype(dt),
                      w_down_EFD=(INIT_STD * jax.random.normal(kd, (e, f, d), jnp.float32)).astype(dt))
    return fp8_slab(slab) if cfg.fp8_experts else slab


def fp8_slab(slab: ExpertSlab) -> ExpertSlab:
    """The slab's experts in FP8 as the checkpoint stores them: each weight an e4m3 [out, in] `BlockScaled`."""
    return ExpertSlab(*(fp8.quantize_weights_kn(getattr(slab, w)) for w in WEIGHTS), start=slab.start)


def num_expert_layers(cfg: ModelConfig) -> int:
    """MoE layers of the main model followed by one per MTP module."""
    return cfg.num_moe_layers + cfg.num_nextn_predict_layers


def init_experts(cfg: ModelConfig, key: jax.Array) -> tuple[ExpertSlab, ...]:
    return tuple(init_expert_slab(cfg, k) for k in jax.random.split(key, num_expert_layers(cfg)))


def init_model(cfg: ModelConfig, seed: int = 0, attention_impl: str = "xla"):
    """Random parameters: (model, experts), experts[m] the routed experts of MoE layer m (MTP layers last)."""
    model = DeepseekV3(cfg, nnx.Rngs(seed), attention_impl)
    return model, init_experts(cfg, jax.random.key(seed + 1))


def abstract_model(cfg: ModelConfig):
    """Shapes and dtypes only (no memory): the full 671B model checks on a laptop."""
    model = nnx.eval_shape(lambda: DeepseekV3(cfg, nnx.Rngs(0)))
    return model, jax.eval_shape(lambda: init_experts(cfg, jax.random.key(1)))

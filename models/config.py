"""DeepSeek-V3/R1 model configuration: one frozen dataclass, presets derived from the real checkpoint.

Field names follow the HuggingFace `config.json` of DeepSeek-V3/R1 so a checkpoint's config maps 1:1.
Every preset other than `deepseek_r1` is `dataclasses.replace(deepseek_r1(), ...)`, so a tiny test model
differs from the real one only in the fields it names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ROUTER_PRECISIONS = ("float32", "tensorfloat32")
FP8_BLOCK = 128  # the checkpoint's weight_block_size


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN RoPE scaling (HF `rope_scaling` of type yarn)."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The DeepSeek-V3 architecture. Defaults are DeepSeek-R1 671B (HF config.json)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnConfig | None = YarnConfig()
    max_position_embeddings: int = 163840
    num_nextn_predict_layers: int = 1
    # Storage dtype of parameters and the activation dtype. Norms, router and softmax always run in fp32.
    # (The router's fp32 dot: see router_precision.)
    dtype: str = "bfloat16"
    # Routed experts stored FP8 e4m3 with one fp32 scale per 128 x 128 block, as the released checkpoint stores
    # them; each expert GEMM quantizes its input in 1 x 128 groups (DeepSeek-V3's inference). False: `dtype`.
    fp8_experts: bool = False
    # Every other linear layer the checkpoint stores in FP8 (the attention projections, dense and shared MLPs) kept
    # so: e4m3 [out, in] with 128 x 128 block scales, inputs quantized in 1 x 128 groups.
    # Embedding, lm_head and norms stay `dtype`, the router `router_dtype` (as in the checkpoint). False: `dtype`.
    fp8_dense: bool = False
    # Where MLA's FP8 projections (fp8_dense) run on the block-scaled kernel: each layer's input RMSNorm and the FP8
    # quantization of its rows in one kernel (`norm_rows`: one read of the rows, no bf16 copy of the normed ones),
    # HF's arithmetic (the normed rows rounded to bf16 before the weight multiply). Without FP8 projections it has
    # nothing to fuse. Ablation False: the norm writes its rows and the quantization reads them back, two passes.
    fp8_fused_norm: bool = True
    # Ablation (no checkpoint's behaviour): Q, K and V rounded to e4m3 with one fp32 scale per 128 tokens of one
    # head before attention, the inputs an FP8 attention kernel (FlashAttention-3's FP8 path) would read; the
    # attention itself runs on the configured backend in `dtype`, so this measures the accuracy, not the speed.
    fp8_attention_qkv: bool = False
    # The router's fp32 dot: "float32", HF's (DeepseekV3TopkRouter runs the gate in fp32; `fp32_dot.dot_f32`:
    # exact products, fp32 sums). Ablation "tensorfloat32": JAX's default for fp32 dots on NVIDIA GPUs (inputs
    # rounded to a 10-bit mantissa), which can flip near-tie expert choices; CPUs compute fp32 either way.
    router_precision: str = "float32"
    # Storage dtype of the router's weight: "bfloat16", as the released checkpoint stores `mlp.gate.weight`
    # (`load_hf_checkpoint` takes the checkpoint's own, "float32" for transformers' `save_pretrained`, which keeps
    # the gate in fp32). Its dot is fp32 either way (`fp32_dot.dot_f32`): a bf16 weight in one bf16 pass, whose
    # products are exact, where an fp32 weight takes three.
    router_dtype: str = "bfloat16"

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("n_shared_experts", "num_nextn_predict_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"ModelConfig.q_lora_rank must be None (direct q projection) or > 0, "
                             f"got {self.q_lora_rank}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(f"ModelConfig.first_k_dense_replace must be in [0, num_hidden_layers="
                             f"{self.num_hidden_layers}], got {self.first_k_dense_replace}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"ModelConfig.qk_rope_head_dim must be even (RoPE rotates pairs), "
                             f"got {self.qk_rope_head_dim}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"ModelConfig.n_routed_experts ({self.n_routed_experts}) must be divisible by "
                             f"n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"ModelConfig.topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
        group_size = self.n_routed_experts // self.n_group
        if self.n_group > 1 and group_size < 2:
            raise ValueError(f"ModelConfig.n_routed_experts / n_group must be >= 2 (groups score by their top-2), "
                             f"got {group_size}")
        if self.num_experts_per_tok > self.topk_group * group_size:
            raise ValueError(f"ModelConfig.num_experts_per_tok must be in [1, topk_group * experts per group = "
                             f"{self.topk_group * group_size}], got {self.num_experts_per_tok}")
        if self.routed_scaling_factor <= 0 or self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("ModelConfig.routed_scaling_factor, rms_norm_eps and rope_theta must be > 0")
        for name in ("dtype", "router_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(f"ModelConfig.{name} must be one of {', '.join(DTYPE_BYTES)}, "
                                 f"got {getattr(self, name)!r}")
        if self.router_precision not in ROUTER_PRECISIONS:
            raise ValueError(f"ModelConfig.router_precision must be one of {ROUTER_PRECISIONS}, "
                             f"got {self.router_precision!r}")
        for name in ("fp8_experts", "fp8_dense", "fp8_fused_norm", "fp8_attention_qkv"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 whenever YaRN is configured."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def expert_bytes(self) -> int:
        """Bytes of one routed expert as stored: FP8 values and their fp32 block scales, or `dtype`."""
        if not self.fp8_experts:
            return self.expert_params() * DTYPE_BYTES[self.dtype]
        blocks = -(-self.hidden_size // FP8_BLOCK) * -(-self.moe_intermediate_size // FP8_BLOCK)
        return self.expert_params() + 3 * blocks * 4

    def attention_params(self) -> int:
        """Parameters of one MLA block (projections and its two LoRA norms)."""
        d, h = self.hidden_size, self.num_attention_heads
        q = (d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
             if self.q_lora_rank else d * h * self.qk_head_dim)
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * self.hidden_size

    def layer_params(self, layer: int) -> dict[str, int]:
        """Parameters of decoder layer `layer` split into replicated (non-expert) and routed-expert parts."""
        d = self.hidden_size
        replicated = self.attention_params() + 2 * d
        if self.is_moe_layer(layer):
            replicated += d * self.n_routed_experts + self.n_routed_experts  # router weight and bias
            replicated += 3 * d * self.moe_intermediate_size * self.n_shared_experts
            return {"replicated": replicated, "routed": self.n_routed_experts * self.expert_params()}
        return {"replicated": replicated + 3 * d * self.intermediate_size, "routed": 0}

    def mtp_params(self) -> dict[str, int]:
        """Parameters of the MTP modules (each: enorm, hnorm, eh_proj and one MoE decoder layer)."""
        one = self.layer_params(self.num_hidden_layers)
        extra = 2 * self.hidden_size + 2 * self.hidden_size * self.hidden_size + self.hidden_size
        return {k: self.num_nextn_predict_layers * (v + (extra if k == "replicated" else 0)) for k, v in one.items()}

    def param_count(self, include_mtp: bool = False) -> int:
        """Analytic parameter count (embedding, layers, final norm, lm_head; MTP optional)."""
        total = 2 * self.vocab_size * self.hidden_size + self.hidden_size
        total += sum(sum(self.layer_params(i).values()) for i in range(self.num_hidden_layers))
        return total + (sum(self.mtp_params().values()) if include_mtp else 0)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def deepseek_r1() -> ModelConfig:
    """DeepSeek-R1 / V3 671B, exactly as its HF config.json (YaRN included)."""
    return ModelConfig()


def deepseek_v3_lite() -> ModelConfig:
    """A small DeepSeek-V3-architecture model (the 72-expert 'DSv3-Lite' shape used by the DWDP tests)."""
    return deepseek_r1().replace(
        vocab_size=32000, hidden_size=2048, intermediate_size=8192, moe_intermediate_size=1024,
        num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=None,
        n_routed_experts=72, num_experts_per_tok=6, n_group=8, topk_group=4)


def tiny(**changes: Any) -> ModelConfig:
    """A few-kilobyte model of the R1 architecture for CPU tests (YaRN, groups, q-LoRA, dense first layer kept)."""
    base = deepseek_r1().replace(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        dtype="float32")
    return base.replace(**changes)


def deepseek_r1_fp8() -> ModelConfig:
    """DeepSeek-R1 with its routed experts FP8 as released (the other weights in `dtype`)."""
    return deepseek_r1().replace(fp8_experts=True)


def deepseek_r1_released() -> ModelConfig:
    """DeepSeek-R1 laid out as the released checkpoint: routed experts and every other linear layer FP8."""
    return deepseek_r1().replace(fp8_experts=True, fp8_dense=True)


PRESETS = {"deepseek_r1": deepseek_r1, "deepseek_r1_fp8": deepseek_r1_fp8, "deepseek_r1_released": deepseek_r1_released,
           "deepseek_v3_lite": deepseek_v3_lite, "tiny": tiny}


def get_preset(name: str, **changes: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]().replace(**changes)

"""config.json of a HuggingFace-format DeepSeek-V3/R1 checkpoint -> ModelConfig: the architecture fields, the
values this model implements only one of, rope (default or yarn), the parameter dtype and the FP8 block size."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from dwdp_jax.checkpoint.common import CheckpointError, json_object
from models.config import ModelConfig, YarnConfig

# config.json fields copied verbatim into ModelConfig (same names).
_ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "rms_norm_eps",
                "max_position_embeddings")

# Fields whose only value this model implements. transformers 5.x configs omit several (scoring_func,
# topk_method, moe_layer_freq): absent means the DeepSeek-V3 value.
_FIXED_FIELDS = {"model_type": "deepseek_v3", "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                 "moe_layer_freq": 1, "hidden_act": "silu", "attention_bias": False, "rope_interleave": True,
                 "tie_word_embeddings": False}

# Parameter dtypes a checkpoint loads as (load_hf_config's `dtype`).
DTYPES = ("float32", "bfloat16", "float16")

DEFAULT_FP8_BLOCK = (128, 128)


def load_hf_config(path: str, dtype: Any = None) -> ModelConfig:
    """The ModelConfig of `path`/config.json, with num_nextn_predict_layers as declared there.

    Rejects a config.json that is not a JSON object, and configs this model does not implement (non-sigmoid
    scoring, another top-k method, rope other than default/yarn, non-interleaved rope, a field of the wrong type,
    ...), with a CheckpointError naming the file and the field. `dtype`, one of DTYPES (default: the config's
    `dtype`/`torch_dtype` when it is one, else bfloat16), is the parameter and activation dtype; any other value
    is a ValueError.
    """
    return model_config(path, config_json(path), dtype)


def config_json(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is not a HuggingFace checkpoint directory: no config.json")
    return json_object(config_path)


def model_config(path: str, hf: dict, dtype: Any) -> ModelConfig:
    dtype = _dtype_name(dtype, hf)  # outside the try: a bad `dtype` argument is the caller's, not config.json's
    try:
        return _parse_config(hf, dtype)
    except (TypeError, ValueError) as e:  # TypeError: a field of the wrong JSON type reached a comparison
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: {e}") from e


def _optional_object(hf: dict, *names: str) -> dict:
    """The first of the fields `names` that is set, which must be a JSON object; {} when none is."""
    for name in names:
        value = hf.get(name)
        if value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{name}={value!r} must be a JSON object")
            return value
    return {}


def _parse_config(hf: dict, dtype: str) -> ModelConfig:
    for name, value in _FIXED_FIELDS.items():
        if hf.get(name, value) != value:
            raise ValueError(f"unsupported {name}={hf[name]!r}: this model implements only {value!r}")
    heads = hf.get("num_attention_heads")
    if hf.get("num_key_value_heads") not in (None, heads):
        raise ValueError(f"unsupported num_key_value_heads={hf['num_key_value_heads']}: MLA needs it equal to "
                         f"num_attention_heads={heads}")
    missing = [name for name in _ARCH_FIELDS if name not in hf]
    if missing:
        raise ValueError(f"missing fields {missing}")
    _check_field_types(hf)
    rope = _optional_object(hf, "rope_parameters", "rope_scaling")
    fp8_block_size(hf)  # rejects an unsupported quantization before any tensor is read
    return ModelConfig(**{name: hf[name] for name in _ARCH_FIELDS},
                       rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
                       rope_scaling=_yarn_config(rope, hf["max_position_embeddings"]),
                       num_nextn_predict_layers=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)),
                       dtype=dtype)


_JSON_TYPES = {bool: ((bool,), "boolean"), int: ((int,), "integer"), float: ((int, float), "number")}


def _check_field_types(hf: dict) -> None:
    """Each architecture field must have the JSON type of ModelConfig's default (q_lora_rank may be null): a
    string or a list would otherwise fail inside ModelConfig without the field's name."""
    defaults = ModelConfig()
    for name in _ARCH_FIELDS:
        value, kind = hf[name], type(getattr(defaults, name))
        if value is None and name == "q_lora_rank":
            continue
        allowed, noun = _JSON_TYPES[kind]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, allowed):  # JSON true is an int too
            raise ValueError(f"{name}={value!r} must be a JSON {noun}")


def _yarn_config(rope: dict, max_position_embeddings: int) -> YarnConfig | None:
    """transformers' yarn semantics: absent mscale/mscale_all_dim are 0 (no softmax mscale), absent factor is
    max_position_embeddings / original_max_position_embeddings."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f"unsupported rope type {kind!r}: only default and yarn are implemented")
    if rope.get("attention_factor") is not None or rope.get("truncate", True) is not True:
        raise ValueError("unsupported yarn attention_factor / truncate=false: DeepSeek-V3 uses neither")
    if "original_max_position_embeddings" not in rope:
        raise ValueError("yarn rope scaling lacks original_max_position_embeddings")
    original = rope["original_max_position_embeddings"]
    return YarnConfig(factor=float(rope.get("factor") or max_position_embeddings / original),
                      original_max_position_embeddings=int(original),
                      beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                      mscale=float(rope.get("mscale") or 0), mscale_all_dim=float(rope.get("mscale_all_dim") or 0))


def _dtype_name(dtype: Any, hf: dict) -> str:
    if dtype is None:
        dtype = hf.get("dtype", hf.get("torch_dtype"))
        dtype = dtype if dtype in DTYPES else "bfloat16"
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    return name


def fp8_block_size(hf: dict) -> tuple[int, int]:
    """The FP8 weight block (rows, cols) of the quantization_config; 128x128 when there is none."""
    quant = _optional_object(hf, "quantization_config")
    if not quant:
        return DEFAULT_FP8_BLOCK
    if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"unsupported quantization_config {quant}: only fp8 e4m3 block scales are implemented")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError("unsupported static fp8 activation scales: only activation_scheme=dynamic is implemented")
    block = quant.get("weight_block_size")
    if not block or len(block) != 2:
        raise ValueError(f"unsupported fp8 weight_block_size={block}: only 2-D block scales are implemented")
    return int(block[0]), int(block[1])

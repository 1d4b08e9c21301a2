"""Import a HuggingFace-format DeepSeek-V3/R1 checkpoint (config.json + safetensors shards) into this model.

Two expert layouts exist in the wild: DeepSeek's original per-expert tensors
(`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`, what the published checkpoints and transformers'
`save_pretrained` write) and transformers 5.x's fused in-memory layout (`experts.gate_up_proj` [E, 2I, H], gate
rows first, and `experts.down_proj` [E, H, I]). Both load. FP8 e4m3 tensors are dequantized on the way in:
W = fp8 * weight_scale_inv, one scale per block (128x128 for R1; edge blocks partial), computed in fp32.

Every expected tensor and shape is checked against the shard headers before any data is read, so a bad
checkpoint fails in seconds, naming the tensor. Data is then read one tensor at a time (host peak: the
parameters being built plus one tensor).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import struct
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from dwdp_jax.runtime.reference import Params
from models.config import ModelConfig, YarnConfig
from models.deepseek_v3 import abstract_model
from models.experts import ExpertSlab

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

# safetensors' numpy backend cannot hand these out; they are read from the raw bytes.
_RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn}
_SUPPORTED_DTYPES = {"F32", "BF16", "F16", *_RAW_DTYPES}
_FP8 = "F8_E4M3"
_DEFAULT_FP8_BLOCK = (128, 128)

Read = Callable[[str], np.ndarray]  # a checkpoint tensor by name, dequantized, in its stored layout


def load_hf_config(path: str, dtype: Any = None) -> ModelConfig:
    """The ModelConfig of `path`/config.json, with num_nextn_predict_layers as declared there.

    Rejects configs this model does not implement (non-sigmoid scoring, another top-k method, rope other than
    default/yarn, non-interleaved rope, ...) with a ValueError naming the field. `dtype` (default: the config's
    `dtype`/`torch_dtype` when it is fp32/bf16/fp16, else bfloat16) is the parameter and activation dtype.
    """
    return _model_config(path, _config_json(path), dtype)


def load_hf_checkpoint(path: str, dtype: Any = None) -> tuple[ModelConfig, Params]:
    """Loads a HuggingFace-format DeepSeek-V3/R1 directory into (config, Params).

    The shards are those of model.safetensors.index.json's weight_map when the index exists, else every
    *.safetensors file in `path`. The MTP modules (checkpoint layers num_hidden_layers...) load when their
    tensors are present; a checkpoint without them (transformers' save_pretrained drops them) loads with
    num_nextn_predict_layers=0 in the returned config. The MTP layer's copies of embed_tokens and
    shared_head.head are shape-checked and skipped: the model uses the main embedding and lm_head.

    Raises ValueError for an unsupported config, a missing tensor (named, with its expected shape), a tensor of
    the wrong shape (named, expected vs found) and tensors the model has no place for (listed).
    """
    hf = _config_json(path)
    config = _model_config(path, hf, dtype)
    fp8_block = _fp8_block(hf)
    with contextlib.ExitStack() as stack:
        shards = _Shards(path, stack)
        config = config.replace(num_nextn_predict_layers=_present_mtp_layers(config, shards.names))
        model, expert_targets = abstract_model(config)
        graphdef, abstract_state = nnx.split(model)
        flat = list(nnx.to_flat_state(abstract_state))
        param_entries = [_param_entry(_hf_name(config, p), p, v) for p, v in flat]
        expert_entries = [_experts_entry(prefix, slab, fused=prefix + "gate_up_proj" in shards.names)
                          for prefix, slab in zip(_expert_prefixes(config), expert_targets)]
        _validate(shards, param_entries + expert_entries, _mtp_copies(config, shards), fp8_block)
        read = shards.reader(fp8_block)
        state = nnx.from_flat_state([(p, v.replace(jnp.asarray(e.build(read)))) for (p, v), e in
                                     zip(flat, param_entries)])
        experts = tuple(jax.tree.map(jnp.asarray, e.build(read)) for e in expert_entries)
    return config, Params(nnx.merge(graphdef, state), experts)


# --- config.json -> ModelConfig -----------------------------------------------------------------------------

def _config_json(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is not a HuggingFace checkpoint directory: no config.json")
    with open(config_path) as f:
        return json.load(f)


def _model_config(path: str, hf: dict, dtype: Any) -> ModelConfig:
    try:
        return _parse_config(hf, dtype)
    except ValueError as e:
        raise ValueError(f"{os.path.join(path, 'config.json')}: {e}") from e


def _parse_config(hf: dict, dtype: Any) -> ModelConfig:
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
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    _fp8_block(hf)  # rejects an unsupported quantization before any tensor is read
    return ModelConfig(**{name: hf[name] for name in _ARCH_FIELDS},
                       rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
                       rope_scaling=_yarn_config(rope, hf["max_position_embeddings"]),
                       num_nextn_predict_layers=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)),
                       dtype=_dtype_name(dtype, hf))


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
        dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "bfloat16"
    return jnp.dtype(dtype).name


def _fp8_block(hf: dict) -> tuple[int, int]:
    """The FP8 weight block (rows, cols) of the quantization_config; 128x128 when there is none."""
    quant = hf.get("quantization_config")
    if quant is None:
        return _DEFAULT_FP8_BLOCK
    if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"unsupported quantization_config {quant}: only fp8 e4m3 block scales are implemented")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError("unsupported static fp8 activation scales: only activation_scheme=dynamic is implemented")
    block = quant.get("weight_block_size")
    if not block or len(block) != 2:
        raise ValueError(f"unsupported fp8 weight_block_size={block}: only 2-D block scales are implemented")
    return int(block[0]), int(block[1])


# --- safetensors shards --------------------------------------------------------------------------------------

class _Shards:
    """Every tensor of the checkpoint by name; headers up front, data one tensor at a time."""

    def __init__(self, path: str, stack: contextlib.ExitStack):
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({os.path.join(path, file) for file in weight_map.values()})
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{path} holds no *.safetensors files")
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"model.safetensors.index.json names {file}, which does not exist")
        handles = {file: stack.enter_context(safe_open(file, framework="np")) for file in files}
        self._file: dict[str, str] = {}
        if os.path.isfile(index_path):
            for name, file in weight_map.items():
                file = os.path.join(path, file)
                if name not in handles[file].keys():
                    raise ValueError(f"model.safetensors.index.json puts {name} in {file}, which lacks it")
                self._file[name] = file
        else:
            for file, handle in handles.items():
                for name in handle.keys():
                    if name in self._file:
                        raise ValueError(f"tensor {name} is in both {self._file[name]} and {file}")
                    self._file[name] = file
        self._handles = handles
        self._raw_headers: dict[str, dict] = {}

    @property
    def names(self) -> set[str]:
        return set(self._file)

    def dtype(self, name: str) -> str:
        return self._handles[self._file[name]].get_slice(name).get_dtype()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file[name]].get_slice(name).get_shape())

    def stored(self, name: str) -> np.ndarray:
        """The tensor as stored (fp8 still quantized)."""
        dtype = self.dtype(name)
        if dtype in _RAW_DTYPES:
            return self._raw(name, _RAW_DTYPES[dtype])
        return self._handles[self._file[name]].get_tensor(name)

    def reader(self, fp8_block: tuple[int, int]) -> Read:
        def read(name: str) -> np.ndarray:
            if self.dtype(name) == _FP8:
                return dequantize_fp8(self.stored(name), self.stored(name + "_scale_inv"), fp8_block)
            return self.stored(name)
        return read

    def _raw(self, name: str, dtype) -> np.ndarray:
        file = self._file[name]
        if file not in self._raw_headers:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                self._raw_headers[file] = {"data_start": 8 + size, **json.loads(f.read(size))}
        header = self._raw_headers[file]
        begin, end = header[name]["data_offsets"]
        with open(file, "rb") as f:
            f.seek(header["data_start"] + begin)
            data = f.read(end - begin)
        return np.frombuffer(data, dtype).reshape(header[name]["shape"])


def dequantize_fp8(w: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """fp32 W = w * scale over the last two axes, scale[i, j] covering rows [i*b0, (i+1)*b0) and columns
    [j*b1, (j+1)*b1); edge blocks are partial. (DeepSeek's name, weight_scale_inv, notwithstanding: multiply.)"""
    rows, cols = w.shape[-2:]
    expected = _scale_shape(w.shape, block)
    if scale.shape != expected:
        raise ValueError(f"fp8 block scale has shape {scale.shape}, expected {expected} for a weight of shape "
                         f"{w.shape} with {block[0]}x{block[1]} blocks")
    scale_full = np.repeat(np.repeat(scale.astype(np.float32), block[0], axis=-2), block[1], axis=-1)
    return w.astype(np.float32) * scale_full[..., :rows, :cols]


def _scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


# --- what goes where -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
    """One destination (a module parameter or one layer's expert slab): the checkpoint tensors it needs with
    their expected shapes, and how to build it from them."""

    expected: dict[str, tuple[int, ...]]
    build: Callable[[Read], Any]


def _hf_name(config: ModelConfig, path: tuple) -> str:
    """Checkpoint name of the module parameter at `path` (its state path in DeepseekV3)."""
    head, *rest = path
    if head == "mtp":  # MTP module d is checkpoint layer num_hidden_layers + d; its decoder layer is inlined
        depth, *rest = rest
        rest = rest[1:] if rest[0] == "layer" else ["shared_head", *rest] if rest[0] == "norm" else rest
        name = ".".join(["model.layers", str(config.num_hidden_layers + depth), *rest])
    elif head == "lm_head":
        name = "lm_head"
    else:
        name = ".".join(["model", str(head), *map(str, rest)])
    return name if path[-1] in ("weight", "e_score_correction_bias") else name + ".weight"


def _param_entry(name: str, path: tuple, target: jax.ShapeDtypeStruct) -> _Entry:
    """Vectors and the embedding load as stored; every other weight is a linear stored [out, in] by HF and
    [in..., out...] here (o_proj is the one with two input axes: heads, v)."""
    shape, dtype = target.shape, target.dtype
    if len(shape) == 1 or path[-1] == "embed_tokens":
        return _Entry({name: shape}, lambda read: np.asarray(read(name), dtype))
    n_in = 2 if path[-1] == "o_proj" else 1
    hf_shape = (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    return _Entry({name: hf_shape}, lambda read: np.asarray(read(name).T.reshape(shape), dtype))


def _expert_prefixes(config: ModelConfig) -> list[str]:
    """Checkpoint prefix of every MoE layer's routed experts, in Params.experts order (main layers, then MTP)."""
    layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    layers += [config.num_hidden_layers + d for d in range(config.num_nextn_predict_layers)]
    return [f"model.layers.{i}.mlp.experts." for i in layers]


def _experts_entry(prefix: str, target: ExpertSlab, fused: bool) -> _Entry:
    e, d, f = target.w_gate_EDF.shape
    dtype = target.w_gate_EDF.dtype
    if fused:
        gate_up, down = prefix + "gate_up_proj", prefix + "down_proj"

        def build_fused(read: Read) -> ExpertSlab:
            w_gate_up_EXD = read(gate_up)
            return ExpertSlab(w_gate_EDF=np.asarray(w_gate_up_EXD[:, :f].transpose(0, 2, 1), dtype),
                              w_up_EDF=np.asarray(w_gate_up_EXD[:, f:].transpose(0, 2, 1), dtype),
                              w_down_EFD=np.asarray(read(down).transpose(0, 2, 1), dtype))
        return _Entry({gate_up: (e, 2 * f, d), down: (e, d, f)}, build_fused)

    names = {proj: [f"{prefix}{i}.{proj}.weight" for i in range(e)] for proj in ("gate_proj", "up_proj", "down_proj")}

    def stack(read: Read, proj: str, shape: tuple[int, int]) -> np.ndarray:
        out = np.empty((e, *shape), dtype)
        for i, name in enumerate(names[proj]):
            out[i] = read(name).T
        return out

    def build_per_expert(read: Read) -> ExpertSlab:
        return ExpertSlab(w_gate_EDF=stack(read, "gate_proj", (d, f)), w_up_EDF=stack(read, "up_proj", (d, f)),
                          w_down_EFD=stack(read, "down_proj", (f, d)))
    expected = {n: (f, d) for n in names["gate_proj"] + names["up_proj"]} | {n: (d, f) for n in names["down_proj"]}
    return _Entry(expected, build_per_expert)


def _present_mtp_layers(config: ModelConfig, names: set[str]) -> int:
    """num_nextn_predict_layers if the checkpoint holds every declared MTP layer, 0 if it holds none."""
    prefixes = [f"model.layers.{config.num_hidden_layers + d}." for d in range(config.num_nextn_predict_layers)]
    present = [p for p in prefixes if any(n.startswith(p) for n in names)]
    if present and len(present) != len(prefixes):
        missing = sorted(set(prefixes) - set(present))
        raise ValueError(f"checkpoint holds {len(present)} of the {len(prefixes)} declared MTP layers; "
                         f"no tensors under {missing}")
    return config.num_nextn_predict_layers if present else 0


def _mtp_copies(config: ModelConfig, shards: _Shards) -> dict[str, tuple[int, ...]]:
    """The MTP layers' copies of the embedding and lm_head that the checkpoint holds (not loaded)."""
    shape = (config.vocab_size, config.hidden_size)
    names = [f"model.layers.{config.num_hidden_layers + d}.{t}.weight" for d in range(config.num_nextn_predict_layers)
             for t in ("embed_tokens", "shared_head.head")]
    return {name: shape for name in names if name in shards.names}


def _validate(shards: _Shards, entries: list[_Entry], skipped: dict[str, tuple[int, ...]],
              fp8_block: tuple[int, int]) -> None:
    """Names, shapes and dtypes of everything against the headers, before any data is read."""
    expected = dict(skipped)
    for entry in entries:
        expected.update(entry.expected)
    available = shards.names
    missing = [f"{name} (expected shape {shape})" for name, shape in expected.items() if name not in available]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s): " + ", ".join(missing[:20]))
    scales = set()
    for name, shape in expected.items():
        found, dtype = shards.shape(name), shards.dtype(name)
        if found != shape:
            raise ValueError(f"checkpoint tensor {name} has shape {found}, expected {shape}")
        if dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"checkpoint tensor {name} has unsupported dtype {dtype}")
        if dtype == _FP8:
            scale, scale_shape = name + "_scale_inv", _scale_shape(shape, fp8_block)
            if scale not in available:
                raise ValueError(f"fp8 checkpoint tensor {name} has no block scale {scale}")
            if shards.shape(scale) != scale_shape:
                raise ValueError(f"checkpoint tensor {scale} has shape {shards.shape(scale)}, expected {scale_shape}"
                                 f" ({fp8_block[0]}x{fp8_block[1]} blocks of {name} {shape})")
            scales.add(scale)
    unexpected = sorted(available - expected.keys() - scales)
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} tensor(s) this model has no place for: "
                         + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))

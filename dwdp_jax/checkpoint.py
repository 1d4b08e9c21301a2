"""Import a HuggingFace-format DeepSeek-V3/R1 checkpoint (config.json + safetensors shards) into this model, and
save/restore the model as an Orbax checkpoint (whole, per DWDP rank, or sharded for DEP; see the Orbax section).

Two expert layouts exist in the wild: DeepSeek's original per-expert tensors
(`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`, what the published checkpoints and transformers'
`save_pretrained` write) and transformers 5.x's fused in-memory layout (`experts.gate_up_proj` [E, 2I, H], gate
rows first, and `experts.down_proj` [E, H, I]). Both load. FP8 e4m3 tensors are dequantized on the way in:
W = fp8 * weight_scale_inv, one scale per block (128x128 for R1; edge blocks partial), computed in fp32.

Every expected tensor and shape is checked against the shard headers before any data is read, so a bad
checkpoint fails in seconds, naming the tensor and its shard. Data is then read one tensor at a time (host peak:
the parameters being built plus one tensor), each checked for NaN and Inf: safetensors has no checksums, and
overwritten bytes most visibly decode as non-finite values. Every problem with a checkpoint's files raises
CheckpointError, naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import struct
import sys
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx
from safetensors import SafetensorError, safe_open

from dwdp_jax.placement import Placement
from models.config import ModelConfig, YarnConfig
from models.deepseek_v3 import DeepseekV3, Params, abstract_model, num_expert_layers
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

# Parameter dtypes a checkpoint loads as (load_hf_config's `dtype`).
DTYPES = ("float32", "bfloat16", "float16")

# safetensors' numpy backend cannot hand these out; they are read from the raw bytes.
_RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn}
_SUPPORTED_DTYPES = {"F32", "BF16", "F16", *_RAW_DTYPES}
_FP8 = "F8_E4M3"
_DEFAULT_FP8_BLOCK = (128, 128)

Read = Callable[[str], np.ndarray]  # a checkpoint tensor by name, dequantized, in its stored layout


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, partial, corrupt, unsupported or inconsistent with its own config; the
    message names the file and says which."""


def load_hf_config(path: str, dtype: Any = None) -> ModelConfig:
    """The ModelConfig of `path`/config.json, with num_nextn_predict_layers as declared there.

    Rejects a config.json that is not a JSON object, and configs this model does not implement (non-sigmoid
    scoring, another top-k method, rope other than default/yarn, non-interleaved rope, a field of the wrong type,
    ...), with a CheckpointError naming the file and the field. `dtype`, one of DTYPES (default: the config's
    `dtype`/`torch_dtype` when it is one, else bfloat16), is the parameter and activation dtype; any other value
    is a ValueError.
    """
    return _model_config(path, _config_json(path), dtype)


def load_hf_checkpoint(path: str, dtype: Any = None) -> tuple[ModelConfig, Params]:
    """Loads a HuggingFace-format DeepSeek-V3/R1 directory into (config, Params).

    The shards are those of model.safetensors.index.json's weight_map when the index exists, else every
    *.safetensors file in `path`. The MTP modules (checkpoint layers num_hidden_layers...) load when their
    tensors are present; a checkpoint without them (transformers' save_pretrained drops them) loads with
    num_nextn_predict_layers=0 in the returned config. The MTP layer's copies of embed_tokens and
    shared_head.head are shape-checked and skipped: the model uses the main embedding and lm_head.

    Raises CheckpointError for an unsupported config, a shard that is not a readable safetensors file (truncated,
    corrupt header), a missing tensor (named, with its expected shape), a tensor of the wrong shape (named,
    expected vs found), tensors the model has no place for (listed) and a tensor holding NaN or Inf; each names
    the file.
    """
    hf = _config_json(path)
    config = _model_config(path, hf, dtype)
    fp8_block = _fp8_block(hf)
    with contextlib.ExitStack() as stack:
        shards = _Shards(path, stack)
        config = config.replace(num_nextn_predict_layers=_present_mtp_layers(config, shards))
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
    return _json_object(config_path)


def _json_object(file: str) -> dict:
    with open(file, "rb") as f:
        try:
            value = json.load(f)
        except ValueError as e:  # a file that is not UTF-8 raises UnicodeDecodeError, a ValueError too
            raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a JSON {type(value).__name__}, expected an object")
    return value


def _model_config(path: str, hf: dict, dtype: Any) -> ModelConfig:
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
    _fp8_block(hf)  # rejects an unsupported quantization before any tensor is read
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


def _fp8_block(hf: dict) -> tuple[int, int]:
    """The FP8 weight block (rows, cols) of the quantization_config; 128x128 when there is none."""
    quant = _optional_object(hf, "quantization_config")
    if not quant:
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
        self.path = path
        index_path = os.path.join(path, "model.safetensors.index.json")
        weight_map = _weight_map(index_path) if os.path.isfile(index_path) else None
        if weight_map is not None:
            files = sorted({os.path.join(path, file) for file in weight_map.values()})
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{path} holds no *.safetensors files")
        for file in files:
            if not os.path.isfile(file):
                raise CheckpointError(f"{index_path} names {file}, which does not exist")
        handles = {file: _open_shard(file, stack) for file in files}
        self._file: dict[str, str] = {}
        if weight_map is not None:
            for name, file in weight_map.items():
                file = os.path.join(path, file)
                if name not in handles[file].keys():
                    raise CheckpointError(f"{index_path} puts {name} in {file}, which lacks it")
                self._file[name] = file
        else:
            for file, handle in handles.items():
                for name in handle.keys():
                    if name in self._file:
                        raise CheckpointError(f"tensor {name} is in both {self._file[name]} and {file}")
                    self._file[name] = file
        self._handles = handles
        self._raw_headers: dict[str, dict] = {}

    @property
    def names(self) -> set[str]:
        return set(self._file)

    def file(self, name: str) -> str:
        return self._file[name]

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
            if self.dtype(name) == _FP8:  # checked dequantized: a corrupt scale shows there too
                value = dequantize_fp8(self.stored(name), self.stored(name + "_scale_inv"), fp8_block)
            else:
                value = self.stored(name)
            _check_finite(self._file[name], name, value)
            return value
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


def _weight_map(index_path: str) -> dict[str, str]:
    weight_map = _json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index_path} has no weight_map object of tensor name -> shard file")
    return weight_map


def _open_shard(file: str, stack: contextlib.ExitStack) -> Any:
    try:
        return stack.enter_context(safe_open(file, framework="np"))
    except SafetensorError as e:
        raise CheckpointError(f"{file} ({os.path.getsize(file)} bytes) is not a readable safetensors file, "
                              f"truncated or corrupt: {e}") from None


def _check_finite(file: str, name: str, value: np.ndarray) -> None:
    finite = np.isfinite(value)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise CheckpointError(f"{file}: tensor {name} holds {len(bad)} non-finite value(s) (NaN or Inf), the "
                              f"first at index {tuple(int(i) for i in bad[0])}: the shard is corrupt")


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


def _present_mtp_layers(config: ModelConfig, shards: _Shards) -> int:
    """num_nextn_predict_layers if the checkpoint holds every declared MTP layer, 0 if it holds none."""
    prefixes = [f"model.layers.{config.num_hidden_layers + d}." for d in range(config.num_nextn_predict_layers)]
    names = shards.names
    present = [p for p in prefixes if any(n.startswith(p) for n in names)]
    if present and len(present) != len(prefixes):
        missing = sorted(set(prefixes) - set(present))
        raise CheckpointError(f"{shards.path}: checkpoint holds {len(present)} of the {len(prefixes)} declared MTP "
                              f"layers; no tensors under {missing}")
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
        raise CheckpointError(f"{shards.path}: checkpoint lacks {len(missing)} tensor(s): " + ", ".join(missing[:20]))
    scales = set()
    for name, shape in expected.items():
        found, dtype, file = shards.shape(name), shards.dtype(name), shards.file(name)
        if found != shape:
            raise CheckpointError(f"{file}: tensor {name} has shape {found}, expected {shape}")
        if dtype not in _SUPPORTED_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        if dtype == _FP8:
            scale, scale_shape = name + "_scale_inv", _scale_shape(shape, fp8_block)
            if scale not in available:
                raise CheckpointError(f"{file}: fp8 tensor {name} has no block scale {scale}")
            if shards.shape(scale) != scale_shape:
                raise CheckpointError(f"{shards.file(scale)}: tensor {scale} has shape {shards.shape(scale)}, "
                                      f"expected {scale_shape} ({fp8_block[0]}x{fp8_block[1]} blocks of {name} "
                                      f"{shape})")
            scales.add(scale)
    unexpected = sorted(available - expected.keys() - scales)
    if unexpected:
        raise CheckpointError(f"{shards.path}: checkpoint has {len(unexpected)} tensor(s) this model has no place "
                              "for: " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))


# === Orbax model checkpoints ==================================================================================
#
# A directory holding one Orbax composite checkpoint and a config.json beside it:
#   model/       Orbax tree: the NNX state of every weight that is not a routed expert, keyed by module path.
#   experts/     Orbax tree: per MoE layer m (main layers, then MTP) the arrays w_gate_EDF, w_up_EDF, w_down_EFD
#                of all E experts, stored one expert per chunk and without OCDBT, so every expert row of every
#                layer is its own file and a DWDP rank opens exactly the files of its rows [rP, rP + L).
#   config.json  written last (a save cut short has none): format tag, the ModelConfig and a manifest of every
#                array (shape, dtype, CRC32; per expert row for the experts), checked on every restore so that a
#                partial, corrupt or mismatched checkpoint fails naming the array.
# Orbax restores whole trees and DEP's expert-sharded arrays itself (each device reads the index its sharding gives
# it). A DWDP rank's rows [rP, rP + L) are not the index of any one-device sharding (a restore's global_shape only
# truncates from the end), so they are read as a slice of the TensorStore array that Orbax's own spec names.

ORBAX_FORMAT = "dwdp_jax.orbax_model"
ORBAX_VERSION = 1
_CONFIG_FILE = "config.json"
_EXPERT_NAMES = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")


class RankParams(NamedTuple):
    """What one DWDP rank restores, all on its device: the replicated weights and only its own expert rows."""

    model: DeepseekV3  # every non-routed weight
    local: tuple[ExpertSlab, ...]  # per MoE layer (main, then MTP): experts [rP, rP + L), start = rP
    device: jax.Device


def is_orbax_checkpoint(path: str) -> bool:
    """Whether `path` holds a model written by save_model (an HF directory also has a config.json, without the tag)."""
    try:
        return _json_object(os.path.join(path, _CONFIG_FILE)).get("format") == ORBAX_FORMAT
    except (OSError, ValueError):
        return False


def save_model(path: str, config: ModelConfig, params: Params) -> None:
    """Writes `params` as an Orbax model checkpoint at `path` (which must not exist); see the layout above."""
    path = os.path.abspath(path)
    if params.model.cfg != config:
        raise ValueError("save_model: params.model was built for a different ModelConfig than the one given")
    _check_slabs(config, params.experts)
    if os.path.exists(path):
        raise FileExistsError(f"save_model: {path} exists; a checkpoint is never overwritten")
    model_arrays = _model_arrays(params.model)
    expert_arrays = {f"{m}/{name}": getattr(slab, name) for m, slab in enumerate(params.experts)
                     for name in _EXPERT_NAMES}
    one_expert_per_chunk = ocp.SaveArgs(shard_axes=(0,))
    _checkpointer().save(path, args=ocp.args.Composite(
        model=ocp.args.PyTreeSave(_nest(model_arrays)),
        experts=ocp.args.PyTreeSave(_nest(expert_arrays),
                                    save_args=_nest({k: one_expert_per_chunk for k in expert_arrays}))))
    header = {"format": ORBAX_FORMAT, "version": ORBAX_VERSION, "model_config": dataclasses.asdict(config),
              "arrays": {"model": {k: _manifest_entry(v) for k, v in model_arrays.items()},
                         "experts": {k: _manifest_entry(v, per_row=True) for k, v in expert_arrays.items()}}}
    tmp = os.path.join(path, _CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(header, f, indent=1)
    os.replace(tmp, os.path.join(path, _CONFIG_FILE))


def load_config(path: str) -> ModelConfig:
    """The ModelConfig of an Orbax model checkpoint, reading only its config.json."""
    return _read_header(path)[0]


class ModelCheckpoint:
    """An Orbax model checkpoint, opened and checked (header, every array's shape and dtype against the config and
    the manifest) before any data is read; its parts are then read on demand, each checked against its CRC32.

    It is also an expert source (`num_layers`, `num_experts`, `rows`): `rows` reads any row range of any MoE layer
    straight onto a device as a sliced TensorStore read of the array Orbax wrote, which opens only the chunk files
    of those rows (one per expert), so host memory peaks at one array's rows and no other expert is read.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.config, self._header, self._layout = _open(self.path)
        self._ts_context = ts.Context()  # one cache for every sliced read of this checkpoint
        self.num_layers = num_expert_layers(self.config)
        self.num_experts = self.config.n_routed_experts

    def replicated(self, put: Callable[[np.ndarray], jax.Array]) -> DeepseekV3:
        """The non-expert weights (every rank's replicated share), read to host, checked, then placed by `put`."""
        manifest = self._header["arrays"]["model"]
        arrays = _restore_tree(self.path, "model", {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in manifest})
        for name, value in arrays.items():
            if _crc32(value) != manifest[name]["crc32"]:
                raise CheckpointError(f"{self.path}: array model/{name} fails its CRC32 check: the checkpoint is "
                                      "corrupt")
        graphdef, abstract = nnx.split(abstract_model(self.config)[0])
        return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(put(arrays[_path_name(p)])))
                                                         for p, v in nnx.to_flat_state(abstract)]))

    def rows(self, layer: int, start: int, stop: int, device: jax.Device) -> ExpertSlab:
        """Experts [start, stop) of MoE layer `layer` (main layers, then MTP) as a slab on `device`."""
        if not (0 <= layer < self.num_layers and 0 <= start < stop <= self.num_experts):
            raise ValueError(f"rows({layer}, {start}, {stop}) outside {self.num_layers} MoE layers x "
                             f"{self.num_experts} experts")

        def read(name: str) -> jax.Array:
            key = f"{layer}/{name}"
            value = _read_rows(self.path, key, self._layout["experts"][key], start, stop, self._ts_context)
            self._verify_rows(key, value, start)
            return jax.device_put(value, device)

        return ExpertSlab(*(read(n) for n in _EXPERT_NAMES), start=start)

    def experts(self, restore_args: ocp.RestoreArgs) -> tuple[ExpertSlab, ...]:
        """Every expert array whole, restored by Orbax as `restore_args` says (host, or sharded over a mesh, each
        device then reading only its own rows), each shard checked."""
        arrays = _restore_tree(self.path, "experts", {k: restore_args for k in self._layout["experts"]})
        for name, value in arrays.items():
            for shard in getattr(value, "addressable_shards", None) or [None]:
                rows, start = (value, 0) if shard is None else (np.asarray(shard.data), shard.index[0].start or 0)
                self._verify_rows(name, rows, start)
        return tuple(ExpertSlab(*(arrays[f"{m}/{n}"] for n in _EXPERT_NAMES)) for m in range(self.num_layers))

    def _verify_rows(self, name: str, rows: np.ndarray, start: int) -> None:
        crcs = self._header["arrays"]["experts"][name]["crc32_rows"]
        for i, row in enumerate(rows):
            if _crc32(row) != crcs[start + i]:
                raise CheckpointError(f"{self.path}: expert {start + i} of array experts/{name} fails its CRC32 "
                                      "check: the checkpoint is corrupt")


def restore_model(path: str) -> tuple[ModelConfig, Params]:
    """The whole model on the default device."""
    ckpt = ModelCheckpoint(path)
    experts = jax.tree.map(jnp.asarray, ckpt.experts(ocp.RestoreArgs(restore_type=np.ndarray)))
    return ckpt.config, Params(ckpt.replicated(jnp.asarray), experts)


def restore_rank(path: str, placement: Placement, rank: int, device: jax.Device) -> RankParams:
    """DWDP rank `rank`'s weights straight onto `device`: the replicated weights and, of every MoE layer, only the
    expert rows [rP, rP + L) (sliced reads: see ModelCheckpoint)."""
    ckpt = ModelCheckpoint(path)
    if placement.num_experts != ckpt.num_experts:
        raise ValueError(f"placement.num_experts ({placement.num_experts}) must equal the checkpoint's "
                         f"n_routed_experts ({ckpt.num_experts})")
    start, stop = placement.local_range(rank)
    local = tuple(ckpt.rows(m, start, stop, device) for m in range(ckpt.num_layers))
    return RankParams(ckpt.replicated(lambda x: jax.device_put(x, device)), local, device)


def restore_dep(path: str, mesh: jax.sharding.Mesh) -> tuple[ModelConfig, Params]:
    """The model for DEP on `mesh` (first axis = the expert axis): replicated weights on every device, each expert
    array sharded along its expert axis, every device reading only its own E/N rows."""
    ckpt = ModelCheckpoint(path)
    axis = mesh.axis_names[0]
    if ckpt.num_experts % mesh.shape[axis]:
        raise ValueError(f"n_routed_experts ({ckpt.num_experts}) must be divisible by the mesh's expert axis "
                         f"{axis!r} ({mesh.shape[axis]})")
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_expert = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    experts = ckpt.experts(ocp.ArrayRestoreArgs(sharding=by_expert))
    return ckpt.config, Params(ckpt.replicated(lambda x: jax.device_put(x, replicated)), experts)


# --- Orbax helpers --------------------------------------------------------------------------------------------

def _checkpointer() -> ocp.Checkpointer:
    """Without OCDBT every array is a directory of chunk files; expert arrays have one chunk per expert."""
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        model=ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False),
        experts=ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)))


def _check_slabs(config: ModelConfig, experts: tuple[ExpertSlab, ...]) -> None:
    if len(experts) != num_expert_layers(config):
        raise ValueError(f"params.experts has {len(experts)} slabs, expected one per MoE layer including MTP "
                         f"({num_expert_layers(config)})")
    for m, slab in enumerate(experts):
        if slab.start != 0 or slab.count != config.n_routed_experts:
            raise ValueError(f"params.experts[{m}] holds experts [{slab.start}, {slab.start + slab.count}), expected "
                             f"all {config.n_routed_experts}")


def _path_name(path: tuple) -> str:
    return "/".join(map(str, path))


def _model_arrays(model: DeepseekV3) -> dict[str, jax.Array]:
    return {_path_name(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}: the Orbax tree, whose parameter names are the keys joined by dots."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, name + "/") if isinstance(value, dict) else {name: value})
    return out


def _crc32(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).tobytes())


def _manifest_entry(value: jax.Array, per_row: bool = False) -> dict[str, Any]:
    host = np.asarray(value)
    entry = {"shape": list(host.shape), "dtype": host.dtype.name}
    entry.update({"crc32_rows": [_crc32(row) for row in host]} if per_row else {"crc32": _crc32(host)})
    return entry


def _read_header(path: str) -> tuple[ModelConfig, dict]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config_path = os.path.join(path, _CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path} has no {_CONFIG_FILE}: not an Orbax model checkpoint, or a partial one "
                              "(save_model writes config.json last)")
    header = _json_object(config_path)
    if header.get("format") != ORBAX_FORMAT:
        raise CheckpointError(f"{config_path} is not a {ORBAX_FORMAT} header (format={header.get('format')!r}); "
                              "a HuggingFace directory loads with load_hf_checkpoint")
    if header.get("version") != ORBAX_VERSION:
        raise CheckpointError(f"{config_path} has format version {header.get('version')!r}, this code reads "
                              f"{ORBAX_VERSION}")
    try:
        fields = dict(header["model_config"])
        yarn = fields.pop("rope_scaling")
        config = ModelConfig(**fields, rope_scaling=None if yarn is None else YarnConfig(**yarn))
        if not {"model", "experts"} <= header["arrays"].keys():
            raise KeyError("arrays.model and arrays.experts")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: invalid model_config or manifest: {e!r}") from e
    return config, header


def _expected_arrays(config: ModelConfig) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    """Shape and dtype of every array the config implies, named as in the manifest."""
    model, slabs = abstract_model(config)
    expected_model = {_path_name(p): (tuple(v.get_value().shape), jnp.dtype(v.get_value().dtype).name)
                      for p, v in nnx.to_flat_state(nnx.state(model))}
    expected_experts = {f"{m}/{n}": (tuple(getattr(s, n).shape), jnp.dtype(getattr(s, n).dtype).name)
                        for m, s in enumerate(slabs) for n in _EXPERT_NAMES}
    return {"model": expected_model, "experts": expected_experts}


def _open(path: str) -> tuple[ModelConfig, dict, dict[str, dict[str, Any]]]:
    """The header, then every array of the Orbax tree checked against the config and the manifest, before any data
    is read. Returns (config, header, the Orbax array metadata by item and name)."""
    config, header = _read_header(path)
    try:
        items = _checkpointer().metadata(path).item_metadata
        layout = {item: _flatten(items[item].tree) for item in ("model", "experts")}
    except Exception as e:  # orbax raises many types for a missing or garbled tree
        raise CheckpointError(f"{path}: the Orbax tree is missing or unreadable (partial or corrupt checkpoint): "
                              f"{e!r}") from e
    expected = _expected_arrays(config)
    for item in ("model", "experts"):
        manifest, stored, wanted = header["arrays"][item], layout[item], expected[item]
        missing = sorted(wanted.keys() - stored.keys())
        if missing:
            raise CheckpointError(f"{path}: the Orbax tree '{item}' lacks {len(missing)} array(s) the config needs: "
                                  f"{missing[:10]} (partial checkpoint, or config.json of another model)")
        extra = sorted(stored.keys() - wanted.keys())
        if extra:
            raise CheckpointError(f"{path}: the Orbax tree '{item}' holds array(s) the config has no place for: "
                                  f"{extra[:10]} (config.json of another model?)")
        for name, (shape, dtype) in wanted.items():
            found = (tuple(stored[name].shape), jnp.dtype(stored[name].dtype).name)
            if found != (shape, dtype):
                raise CheckpointError(f"{path}: array {item}/{name} is {found[1]}{list(found[0])} in the checkpoint "
                                      f"but its config.json implies {dtype}{list(shape)} (config does not match)")
            entry = manifest.get(name)
            if entry is None:
                raise CheckpointError(f"{path}: array {item}/{name} is missing from the config.json manifest "
                                      "(mixed checkpoint)")
            if (tuple(entry["shape"]), entry["dtype"]) != found:
                raise CheckpointError(f"{path}: array {item}/{name} is {found} in the Orbax tree but "
                                      f"{(tuple(entry['shape']), entry['dtype'])} in the config.json manifest "
                                      "(mixed checkpoint)")
    return config, header, layout


def _restore_tree(path: str, item: str, restore_args: dict[str, Any]) -> dict[str, Any]:
    try:
        restored = _checkpointer().restore(path, args=ocp.args.Composite(**{
            item: ocp.args.PyTreeRestore(restore_args=_nest(restore_args))}))
    except Exception as e:  # tensorstore/orbax errors name the file; say what it means
        _drop_closed_loop_reports()
        raise CheckpointError(f"{path}: reading the Orbax tree '{item}' failed, the checkpoint is partial or "
                              f"corrupt: {e}") from e
    return _flatten(restored[item])


class _DropClosedLoopReports:
    """An unraisable-exception hook passing everything but 'Event loop is closed' on to the one it replaced."""

    def __init__(self, previous: Callable[[Any], None]):
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            self.previous(unraisable)


def _drop_closed_loop_reports() -> None:
    """A failed Orbax restore closes its event loop while TensorStore reads of the other arrays are still in
    flight; each of those, completing, finds the loop closed and Python prints a 'RuntimeError: Event loop is
    closed' traceback for it, after and unrelated to the error that matters. From here on those are dropped."""
    if not isinstance(sys.unraisablehook, _DropClosedLoopReports):
        sys.unraisablehook = _DropClosedLoopReports(sys.unraisablehook)


def _read_rows(path: str, name: str, meta: Any, start: int, stop: int, context: ts.Context) -> np.ndarray:
    """Rows [start, stop) of an expert array: a sliced TensorStore read of the array Orbax wrote."""
    info = ocp.type_handlers.ParamInfo(name=meta.name, parent_dir=epath.Path(meta.directory),
                                       is_ocdbt_checkpoint=False, use_zarr3=False, ts_context=context)
    try:
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=False)
        return ts.open(spec, open=True, context=context).result()[start:stop].read().result()
    except Exception as e:  # a missing chunk file is a partial checkpoint, a garbled one a corrupt one
        raise CheckpointError(f"{path}: reading rows [{start}, {stop}) of expert array {name} failed, the checkpoint "
                              f"is partial or corrupt: {e}") from e

"""Import a HuggingFace-format DeepSeek-V3/R1 checkpoint (config.json + safetensors shards) into this model; its
config.json is read by hf_config.

Two expert layouts exist in the wild: DeepSeek's original per-expert tensors
(`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`, what the published checkpoints and transformers'
`save_pretrained` write) and transformers 5.x's fused in-memory layout (`experts.gate_up_proj` [E, 2I, H], gate
rows first, and `experts.down_proj` [E, H, I]). Both load. FP8 e4m3 tensors are dequantized on the way in:
W = fp8 * weight_scale_inv, one scale per block (128x128 for R1; edge blocks partial), computed in fp32; with
`fp8="keep"` the routed experts stay FP8 (`ModelConfig.fp8_experts`: values and scales as stored), and so do the
other projections when the checkpoint stores every one of them FP8 (`ModelConfig.fp8_dense`); `fp8="keep_experts"`
keeps the routed experts only (for GPUs without a block-scaled dense FP8 GEMM).

With `experts="lazy"` no expert is read at load time: `Params.experts` is an `HfExperts` source whose `rows` reads
only the experts asked for, straight onto a device, so a DWDP rank holds its own slab and never the checkpoint's.

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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from dwdp_jax.checkpoint.common import CheckpointError, json_object
from dwdp_jax.checkpoint.hf_config import config_json, fp8_block_size, model_config
from dwdp_jax.kernels import fp8 as fp8_kernels
from models.config import ModelConfig
from models.deepseek_v3 import Params, abstract_model
from models.experts import ExpertSlab

# safetensors' numpy backend cannot hand these out; they are read from the raw bytes.
_RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn}
_SUPPORTED_DTYPES = {"F32", "BF16", "F16", *_RAW_DTYPES}
_FP8 = "F8_E4M3"
_ROUTER_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

Read = Callable[[str], np.ndarray]  # a checkpoint tensor by name, dequantized, in its stored layout
FP8_MODES = ("dequantize", "keep", "keep_experts")
EXPERT_LOADING = ("load", "lazy")


def load_hf_checkpoint(path: str, dtype: Any = None, fp8: str = "dequantize", experts: str = "load"
                       ) -> tuple[ModelConfig, Params]:
    """Loads a HuggingFace-format DeepSeek-V3/R1 directory into (config, Params).

    The shards are those of model.safetensors.index.json's weight_map when the index exists, else every
    *.safetensors file in `path`. The MTP modules (checkpoint layers num_hidden_layers...) load when their
    tensors are present; a checkpoint without them (transformers' save_pretrained drops them) loads with
    num_nextn_predict_layers=0 in the returned config. The MTP layer's copies of embed_tokens and
    shared_head.head are shape-checked and skipped: the model uses the main embedding and lm_head.

    Raises CheckpointError for an unsupported config, a shard that is not a readable safetensors file (truncated,
    corrupt header), a missing tensor (named, with its expected shape), a tensor of the wrong shape (named,
    expected vs found), tensors the model has no place for (listed) and a tensor holding NaN or Inf; each names
    the file. `fp8="keep"` of a checkpoint whose experts are not FP8 in 128 x 128 blocks, and a bad `fp8` or
    `experts`, raise ValueError.
    """
    if fp8 not in FP8_MODES or experts not in EXPERT_LOADING:
        raise ValueError(f"load_hf_checkpoint: fp8={fp8!r} must be one of {FP8_MODES} and experts={experts!r} one "
                         f"of {EXPERT_LOADING}")
    hf = config_json(path)
    config = model_config(path, hf, dtype)
    fp8_block = fp8_block_size(hf)
    with contextlib.ExitStack() as stack:
        shards = _Shards(path, stack)
        config = config.replace(num_nextn_predict_layers=_present_mtp_layers(config, shards),
                                fp8_experts=fp8 != "dequantize", fp8_dense=fp8 == "keep")
        config = config.replace(router_dtype=_router_dtype(config, shards))
        if fp8 != "dequantize":
            _check_fp8_experts(shards, config, fp8_block, fp8)
        model, expert_targets = abstract_model(config)
        graphdef, abstract_state = nnx.split(model)
        flat = list(nnx.to_flat_state(abstract_state))
        projections = [_hf_name(config, p) for p, v in flat if isinstance(v.get_value(), fp8_kernels.BlockScaled)]
        if config.fp8_dense and not all(n in shards.names and shards.dtype(n) == _FP8 for n in projections):
            config = config.replace(fp8_dense=False)  # projections stored in bf16 are loaded as stored
            model, expert_targets = abstract_model(config)
            graphdef, abstract_state = nnx.split(model)
            flat = list(nnx.to_flat_state(abstract_state))
        param_entries = [_param_entry(_hf_name(config, p), p, v) for p, v in flat]
        expert_entries = [_experts_entry(prefix, slab, fused=prefix + "gate_up_proj" in shards.names)
                          for prefix, slab in zip(_expert_prefixes(config), expert_targets)]
        _validate(shards, param_entries + expert_entries, _mtp_copies(config, shards), fp8_block)
        read = shards.reader(fp8_block)
        state = nnx.from_flat_state([(p, v.replace(jax.tree.map(jnp.asarray, e.build(read)))) for (p, v), e in
                                     zip(flat, param_entries)])
        if experts == "lazy":
            source = HfExperts(path, config, expert_entries, fp8_block)
        else:
            source = tuple(jax.tree.map(jnp.asarray, e.build(read)) for e in expert_entries)
    return config, Params(nnx.merge(graphdef, state), source)


class HfExperts:
    """The routed experts of a HuggingFace checkpoint as an expert source: `rows` opens the shards, reads only the
    tensors of experts [start, stop) of one MoE layer (each checked for NaN and Inf) and places them on a device.
    Host memory peaks at those experts' arrays plus one tensor."""

    def __init__(self, path: str, config: ModelConfig, entries: list["_Entry"], fp8_block: tuple[int, int]):
        self.path, self.config, self._entries, self._fp8_block = path, config, entries, fp8_block
        self.num_layers = len(entries)
        self.num_experts = config.n_routed_experts

    def rows(self, layer: int, start: int, stop: int, device: jax.Device) -> ExpertSlab:
        if not (0 <= layer < self.num_layers and 0 <= start < stop <= self.num_experts):
            raise ValueError(f"rows({layer}, {start}, {stop}) outside {self.num_layers} MoE layers x "
                             f"{self.num_experts} experts")
        with contextlib.ExitStack() as stack:
            read = _Shards(self.path, stack).reader(self._fp8_block)
            slab = self._entries[layer].build(read, start, stop)
        return jax.device_put(slab.at(start), device)


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
        """Tensors by name, dequantized; `read.fp8(name)` an FP8 tensor as stored: (e4m3 values, fp32 scales)."""
        def fp8(name: str) -> tuple[np.ndarray, np.ndarray]:
            values, scales = self.stored(name), self.stored(name + "_scale_inv").astype(np.float32)
            # checked dequantized: a corrupt scale shows there too
            _check_finite(self._file[name], name, dequantize_fp8(values, scales, fp8_block))
            return values, scales

        def read(name: str) -> np.ndarray:
            if self.dtype(name) == _FP8:  # checked dequantized: a corrupt scale shows there too
                value = dequantize_fp8(self.stored(name), self.stored(name + "_scale_inv"), fp8_block)
            else:
                value = self.stored(name)
            _check_finite(self._file[name], name, value)
            return value
        read.fp8 = fp8
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
    weight_map = json_object(index_path).get("weight_map")
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


def _param_entry(name: str, path: tuple, target: nnx.Param) -> _Entry:
    """Vectors and the embedding load as stored; an FP8 projection (`fp8.BlockScaled`) keeps HF's [out, in] values
    and block scales as stored; every other weight is a linear stored [out, in] by HF and [in..., out...] here
    (o_proj is the one with two input axes: heads, v)."""
    value = target.get_value()
    if isinstance(value, fp8_kernels.BlockScaled):
        return _Entry({name: value.values_GNK.shape}, lambda read: fp8_kernels.BlockScaled(*read.fp8(name)))
    shape, dtype = value.shape, value.dtype
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
    """The entry of one MoE layer's experts; its `build(read, start=0, stop=E)` reads experts [start, stop) only,
    kept FP8 ([out, in] values and block scales, as stored) when `target` is an FP8 slab."""
    keep_fp8 = target.fp8
    e = target.count
    if keep_fp8:
        f, d = target.w_gate_EDF.values_GNK.shape[1:]
    else:
        d, f = target.w_gate_EDF.shape[1:]
    dtype = jax.tree.leaves(target.w_gate_EDF)[0].dtype
    if fused:
        gate_up, down = prefix + "gate_up_proj", prefix + "down_proj"

        def build_fused(read: Read, start: int = 0, stop: int = e) -> ExpertSlab:
            if keep_fp8:
                raise CheckpointError(f"{prefix}gate_up_proj: FP8 kept from the fused expert layout is not "
                                      "implemented (its gate and up halves share scale blocks); load with "
                                      "fp8='dequantize'")
            w_gate_up_EXD = read(gate_up)[start:stop]
            return ExpertSlab(w_gate_EDF=np.asarray(w_gate_up_EXD[:, :f].transpose(0, 2, 1), dtype),
                              w_up_EDF=np.asarray(w_gate_up_EXD[:, f:].transpose(0, 2, 1), dtype),
                              w_down_EFD=np.asarray(read(down)[start:stop].transpose(0, 2, 1), dtype))
        return _Entry({gate_up: (e, 2 * f, d), down: (e, d, f)}, build_fused)

    names = {proj: [f"{prefix}{i}.{proj}.weight" for i in range(e)] for proj in ("gate_proj", "up_proj", "down_proj")}

    def stack(read: Read, proj: str, shape: tuple[int, int], start: int, stop: int):
        if keep_fp8:  # HF's [out, in] is the FP8 layout: no transpose
            pairs = [read.fp8(name) for name in names[proj][start:stop]]
            return fp8_kernels.BlockScaled(np.stack([v for v, _ in pairs]), np.stack([s for _, s in pairs]))
        out = np.empty((stop - start, *shape), dtype)
        for i, name in enumerate(names[proj][start:stop]):
            out[i] = read(name).T
        return out

    def build_per_expert(read: Read, start: int = 0, stop: int = e) -> ExpertSlab:
        return ExpertSlab(w_gate_EDF=stack(read, "gate_proj", (d, f), start, stop),
                          w_up_EDF=stack(read, "up_proj", (d, f), start, stop),
                          w_down_EFD=stack(read, "down_proj", (f, d), start, stop))
    expected = {n: (f, d) for n in names["gate_proj"] + names["up_proj"]} | {n: (d, f) for n in names["down_proj"]}
    return _Entry(expected, build_per_expert)


def _check_fp8_experts(shards: "_Shards", config: ModelConfig, fp8_block: tuple[int, int], mode: str) -> None:
    """fp8="keep" / "keep_experts" needs the routed experts stored FP8 in the model's 128 x 128 blocks."""
    if fp8_block != (fp8_kernels.BLOCK, fp8_kernels.BLOCK):
        raise ValueError(f"fp8={mode!r}: the checkpoint's weight_block_size is {list(fp8_block)}; FP8 weights are "
                         f"kept in {fp8_kernels.BLOCK} x {fp8_kernels.BLOCK} blocks only")
    prefix = _expert_prefixes(config)[0]
    name = next((n for n in (f"{prefix}0.gate_proj.weight", prefix + "gate_up_proj") if n in shards.names), None)
    if name is not None and shards.dtype(name) != _FP8:
        raise ValueError(f"fp8={mode!r}: the routed experts are {shards.dtype(name)} ({name}), not FP8 e4m3; load "
                         f"with fp8='dequantize'")


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


def _router_dtype(config: ModelConfig, shards: _Shards) -> str:
    """The routers' weights as stored (DeepSeek-R1: bf16; transformers' `save_pretrained`: fp32), fp32 where the
    layers differ; a config without MoE layers, or a checkpoint lacking a router (`_validate` names it), keeps
    its own."""
    names = [f"{p[:-len('experts.')]}gate.weight" for p in _expert_prefixes(config)]
    stored = {n: shards.dtype(n) for n in names if n in shards.names}
    if not stored:
        return config.router_dtype
    if bad := {n: d for n, d in stored.items() if d not in _ROUTER_DTYPES}:
        raise CheckpointError(f"{shards.path}: router weights stored as {bad}; supported dtypes: "
                              f"{sorted(_ROUTER_DTYPES)}")
    dtypes = set(stored.values())
    return _ROUTER_DTYPES[dtypes.pop()] if len(dtypes) == 1 else "float32"


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


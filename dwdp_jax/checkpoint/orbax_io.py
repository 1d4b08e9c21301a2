"""Orbax model checkpoints: save the model, restore it whole, per DWDP rank or sharded for DEP.

A directory holding one Orbax composite checkpoint and a config.json beside it:
  model/       Orbax tree: the NNX state of every weight that is not a routed expert, keyed by module path.
  experts/     Orbax tree: per MoE layer m (main layers, then MTP) the arrays w_gate_EDF, w_up_EDF, w_down_EFD
               of all E experts, stored one expert per chunk and without OCDBT, so every expert row of every
               layer is its own file and a DWDP rank opens exactly the files of its rows [rP, rP + L).
  config.json  written last (a save cut short has none): format tag, the ModelConfig and a manifest of every
               array (shape, dtype, CRC32; per expert row for the experts), checked on every restore so that a
               partial, corrupt or mismatched checkpoint fails naming the array.
Orbax restores whole trees and DEP's expert-sharded arrays itself (each device reads the index its sharding gives
it). A DWDP rank's rows [rP, rP + L) are not the index of any one-device sharding (a restore's global_shape only
truncates from the end), so they are read as a slice of the TensorStore array that Orbax's own spec names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from dwdp_jax.checkpoint.common import CheckpointError, json_object
from dwdp_jax.kernels.fp8 import BlockScaled
from dwdp_jax.placement import Placement
from models.config import ModelConfig, YarnConfig
from models.deepseek_v3 import DeepseekV3, Params, abstract_model, num_expert_layers
from models.experts import ExpertSlab

ORBAX_FORMAT = "dwdp_jax.orbax_model"
ORBAX_VERSION = 1
_CONFIG_FILE = "config.json"


class RankParams(NamedTuple):
    """What one DWDP rank restores, all on its device: the replicated weights and only its own expert rows."""

    model: DeepseekV3  # every non-routed weight
    local: tuple[ExpertSlab, ...]  # per MoE layer (main, then MTP): experts [rP, rP + L), start = rP
    device: jax.Device


def is_orbax_checkpoint(path: str) -> bool:
    """Whether `path` holds a model written by save_model (an HF directory also has a config.json, without the tag)."""
    try:
        return json_object(os.path.join(path, _CONFIG_FILE)).get("format") == ORBAX_FORMAT
    except (OSError, ValueError):
        return False


def save_model(path: str, config: ModelConfig, params: Params) -> None:
    """Writes `params` as an Orbax model checkpoint at `path` (which must not exist); layout: the module docstring."""
    path = os.path.abspath(path)
    if params.model.cfg != config:
        raise ValueError("save_model: params.model was built for a different ModelConfig than the one given")
    _check_slabs(config, params.experts)
    if os.path.exists(path):
        raise FileExistsError(f"save_model: {path} exists; a checkpoint is never overwritten")
    model_arrays = _model_arrays(params.model)
    expert_arrays = {f"{m}/{name}": array for m, slab in enumerate(params.experts)
                     for name, array in slab.named_arrays().items()}
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
        self._slab = abstract_model(self.config)[1][0]  # the kind of slab the config implies (bf16 or FP8)

    def replicated(self, put: Callable[[np.ndarray], jax.Array]) -> DeepseekV3:
        """The non-expert weights (every rank's replicated share), read to host, checked, then placed by `put`."""
        manifest = self._header["arrays"]["model"]
        arrays = _restore_tree(self.path, "model", {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in manifest})
        for name, value in arrays.items():
            if _crc32(value) != manifest[name]["crc32"]:
                raise CheckpointError(f"{self.path}: array model/{name} fails its CRC32 check: the checkpoint is "
                                      "corrupt")
        graphdef, abstract = nnx.split(abstract_model(self.config)[0])
        return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(_rebuild(v.get_value(), _path_name(p), arrays,
                                                                               put)))
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

        return self._slab.with_arrays([read(n) for n in self._slab.named_arrays()], start=start)

    def experts(self, restore_args: ocp.RestoreArgs) -> tuple[ExpertSlab, ...]:
        """Every expert array whole, restored by Orbax as `restore_args` says (host, or sharded over a mesh, each
        device then reading only its own rows), each shard checked."""
        arrays = _restore_tree(self.path, "experts", {k: restore_args for k in self._layout["experts"]})
        for name, value in arrays.items():
            for shard in getattr(value, "addressable_shards", None) or [None]:
                rows, start = (value, 0) if shard is None else (np.asarray(shard.data), shard.index[0].start or 0)
                self._verify_rows(name, rows, start)
        return tuple(self._slab.with_arrays([arrays[f"{m}/{n}"] for n in self._slab.named_arrays()])
                     for m in range(self.num_layers))

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


def _leaves(name: str, value) -> dict[str, Any]:
    """A parameter's arrays by manifest name: itself, or an FP8 projection's values and scales under it."""
    if isinstance(value, BlockScaled):
        return {f"{name}/{field}": a for field, a in value._asdict().items()}
    return {name: value}


def _rebuild(template, name: str, arrays: dict[str, np.ndarray], put: Callable[[np.ndarray], jax.Array]):
    if isinstance(template, BlockScaled):
        return BlockScaled(*(put(arrays[f"{name}/{field}"]) for field in BlockScaled._fields))
    return put(arrays[name])


def _model_arrays(model: DeepseekV3) -> dict[str, jax.Array]:
    return {k: a for p, v in nnx.to_flat_state(nnx.state(model))
            for k, a in _leaves(_path_name(p), v.get_value()).items()}


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
    header = json_object(config_path)
    if header.get("format") != ORBAX_FORMAT:
        raise CheckpointError(f"{config_path} is not a {ORBAX_FORMAT} header (format={header.get('format')!r}); "
                              "a HuggingFace directory loads with load_hf_checkpoint")
    if header.get("version") != ORBAX_VERSION:
        raise CheckpointError(f"{config_path} has format version {header.get('version')!r}, this code reads "
                              f"{ORBAX_VERSION}")
    try:
        # headers written before ModelConfig.router_dtype existed hold the router weights in fp32
        fields = {"router_dtype": "float32", **header["model_config"]}
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
    expected_model = {k: (tuple(a.shape), jnp.dtype(a.dtype).name) for p, v in nnx.to_flat_state(nnx.state(model))
                      for k, a in _leaves(_path_name(p), v.get_value()).items()}
    expected_experts = {f"{m}/{n}": (tuple(a.shape), jnp.dtype(a.dtype).name)
                        for m, s in enumerate(slabs) for n, a in s.named_arrays().items()}
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
    # before the restore: reads that complete between a failure and this function's handler of it report too
    _drop_closed_loop_reports()
    try:
        restored = _checkpointer().restore(path, args=ocp.args.Composite(**{
            item: ocp.args.PyTreeRestore(restore_args=_nest(restore_args))}))
    except Exception as e:  # tensorstore/orbax errors name the file; say what it means
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
    closed' traceback for it, after and unrelated to the error that matters. From the first restore on those
    are dropped."""
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

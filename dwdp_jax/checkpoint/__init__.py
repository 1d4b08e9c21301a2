"""Checkpoints of the model, in two formats, one module each; every public name is re-exported here, so
`dwdp_jax.checkpoint.X` is the way to reach them.

  common     CheckpointError (every problem with a checkpoint's files raises it, naming the file) and the reading
             of a JSON object file; imports nothing of the package, so both formats use it.
  hf_config  a HuggingFace config.json -> ModelConfig (load_hf_config, DTYPES).
  hf         the HuggingFace safetensors import (load_hf_checkpoint, dequantize_fp8): bf16, fp32 and FP8 e4m3
             with block scales (dequantized, or the routed experts kept FP8), per-expert or fused expert layout;
             HfExperts reads any experts of any layer on demand (a DWDP rank's own slab only).
  orbax_io   Orbax model checkpoints: save_model, then restore whole (restore_model), per DWDP rank (restore_rank,
             ModelCheckpoint's sliced expert reads) or sharded for DEP (restore_dep).

Imports point down only: hf -> hf_config -> common, orbax_io -> common; this file sits above them all.
"""

from dwdp_jax.checkpoint.common import CheckpointError
from dwdp_jax.checkpoint.hf import HfExperts, dequantize_fp8, load_hf_checkpoint
from dwdp_jax.checkpoint.hf_config import DTYPES, load_hf_config
from dwdp_jax.checkpoint.orbax_io import (ORBAX_FORMAT, ORBAX_VERSION, ModelCheckpoint, RankParams,
                                          is_orbax_checkpoint, load_config, restore_dep, restore_model,
                                          restore_rank, save_model)

__all__ = ["DTYPES", "ORBAX_FORMAT", "ORBAX_VERSION", "CheckpointError", "HfExperts", "ModelCheckpoint", "RankParams",
           "dequantize_fp8", "is_orbax_checkpoint", "load_config", "load_hf_checkpoint", "load_hf_config",
           "restore_dep", "restore_model", "restore_rank", "save_model"]

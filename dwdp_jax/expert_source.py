"""Where routed-expert rows come from when a runtime places them: full slabs, or generated on the device.

Placing R1-width experts must not go through one host or one device holding them all (an R1-width MoE layer
is 22.5 GB in bf16). A source hands out any row range of any MoE layer straight onto a device:
  SlabExperts      slices of full slabs (imported or trained weights; the reference's own parameters),
  SyntheticExperts deterministic random experts, expert e of layer m always the same numbers wherever and
                   however it is generated, so DWDP ranks, DEP shards and the streaming reference agree.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp

from dwdp_jax.kernels import fp8
from models.config import ModelConfig
from models.deepseek_v3 import INIT_STD
from models.experts import ExpertSlab


class ExpertSource(Protocol):
    num_layers: int
    num_experts: int

    def rows(self, layer: int, start: int, stop: int, device: jax.Device) -> ExpertSlab:
        """Experts [start, stop) of MoE layer `layer` as a slab on `device` (slab.start == start)."""


@dataclasses.dataclass(frozen=True)
class SlabExperts:
    slabs: tuple[ExpertSlab, ...]

    @property
    def num_layers(self) -> int:
        return len(self.slabs)

    @property
    def num_experts(self) -> int:
        return self.slabs[0].count

    def rows(self, layer: int, start: int, stop: int, device: jax.Device) -> ExpertSlab:
        return jax.device_put(self.slabs[layer].rows(start - self.slabs[layer].start, stop - self.slabs[layer].start),
                              device)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "fp8_blocks"))
def _expert_weights(key, expert_ids, shape, dtype, fp8_blocks=False):
    """[experts, *shape] in `dtype`, or with `fp8_blocks` an FP8 `BlockScaled` of the [out, in] transpose, each
    expert quantized as it is drawn (no full fp32 slab)."""
    def one(e):
        w = INIT_STD * jax.random.normal(jax.random.fold_in(key, e), shape, jnp.float32)
        return fp8.quantize_weights_kn(w[None]) if fp8_blocks else w.astype(dtype)

    ws = jax.lax.map(one, expert_ids)
    return fp8.BlockScaled(*(a[:, 0] for a in ws)) if fp8_blocks else ws


@dataclasses.dataclass(frozen=True)
class SyntheticExperts:
    """Random experts as `init_expert_slab` draws them in distribution (N(0, 0.02)), keyed per (layer, weight,
    expert) so any subset can be generated anywhere, one expert at a time (no full-slab fp32 temporaries)."""

    cfg: ModelConfig
    seed: int = 0
    num_layers: int = 0

    def __post_init__(self):
        if not self.num_layers:
            object.__setattr__(self, "num_layers", self.cfg.num_moe_layers)

    @property
    def num_experts(self) -> int:
        return self.cfg.n_routed_experts

    def rows(self, layer: int, start: int, stop: int, device: jax.Device) -> ExpertSlab:
        if not (0 <= layer < self.num_layers and 0 <= start < stop <= self.num_experts):
            raise ValueError(f"rows({layer}, {start}, {stop}) outside {self.num_layers} layers x "
                             f"{self.num_experts} experts")
        d, f, dt = self.cfg.hidden_size, self.cfg.moe_intermediate_size, jnp.dtype(self.cfg.dtype)
        ids = jax.device_put(jnp.arange(start, stop, dtype=jnp.uint32), device)
        layer_key = jax.random.fold_in(jax.random.key(self.seed), layer)
        keys = [jax.device_put(jax.random.fold_in(layer_key, w), device) for w in range(3)]
        q = self.cfg.fp8_experts
        return ExpertSlab(_expert_weights(keys[0], ids, (d, f), dt, q), _expert_weights(keys[1], ids, (d, f), dt, q),
                          _expert_weights(keys[2], ids, (f, d), dt, q), start=start)


def slabs_of(source: ExpertSource, layer: int, start: int, stop: int, device: jax.Device, max_experts: int
             ) -> tuple[ExpertSlab, ...]:
    """Experts [start, stop) of MoE layer `layer` on `device` as consecutive slabs of at most `max_experts` each
    (`split_gemm.max_slab_experts`: a kernel's addressing limit)."""
    return tuple(source.rows(layer, a, min(a + max_experts, stop), device) for a in range(start, stop, max_experts))


def as_source(experts: ExpertSource | Sequence[ExpertSlab]) -> ExpertSource:
    return experts if hasattr(experts, "rows") else SlabExperts(tuple(experts))

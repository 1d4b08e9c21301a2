"""The expert weights view: how the routed-expert computation receives its weights.

A MoE layer's routed experts arrive as an explicit argument, never as module state, so one model serves the
reference (one slab holding all E experts), DWDP (the local slab plus the prefetched remote slabs, consumed
where they lie, no merge) and DEP (its own shard, behind an all-to-all). A view is an ordered tuple of slabs
whose global expert ranges [start, start + count) tile [0, E) in order; tokens sorted by global expert id are
therefore also sorted by slab, and each slab runs one grouped GEMM over its own rows of the shared buffer.

A slab's weights are arrays in the model's dtype, or FP8 (`ModelConfig.fp8_experts`): each an `fp8.BlockScaled`
pair in the checkpoint's [out, in] layout with its block scales. Every array of a slab, values and scales alike,
has the expert on axis 0, so slicing, placing and pulling experts treat both alike (`ExpertSlab.rows`, `arrays`).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from dwdp_jax.kernels import fp8, fp8_rows, grouped_gemm
from dwdp_jax.kernels.split_gemm import count_at_or_below

WEIGHTS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")
Weight = jax.Array | fp8.BlockScaled


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertSlab:
    """Consecutive experts [start, start + count) of one MoE layer: SwiGLU weights stored [in, out], or FP8
    `BlockScaled` pairs stored [out, in] as the checkpoint stores them."""

    w_gate_EDF: Weight
    w_up_EDF: Weight
    w_down_EFD: Weight
    start: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def count(self) -> int:
        return jax.tree.leaves(self.w_gate_EDF)[0].shape[0]

    @property
    def fp8(self) -> bool:
        return isinstance(self.w_gate_EDF, fp8.BlockScaled)

    def arrays(self) -> list[jax.Array]:
        """Every array it holds (values and scales), each with the expert on axis 0."""
        return jax.tree.leaves(self)

    def with_arrays(self, arrays, start: int | None = None) -> "ExpertSlab":
        """A slab of the same kind holding `arrays` (in `arrays()`'s order), starting at expert `start`."""
        return jax.tree.unflatten(jax.tree.structure(self.at(start if start is not None else self.start)),
                                  list(arrays))

    def at(self, start: int) -> "ExpertSlab":
        return dataclasses.replace(self, start=start)

    def rows(self, first: int, stop: int) -> "ExpertSlab":
        """Its experts [start + first, start + stop) (slab-relative indices), values and scales alike."""
        return self.with_arrays([a[first:stop] for a in self.arrays()], self.start + first)

    def named_arrays(self) -> dict[str, jax.Array]:
        """`arrays()` by name: w_gate_EDF, ..., or for FP8 w_gate_EDF/values_GNK, w_gate_EDF/scales_GRS, ..."""
        named = {}
        for w in WEIGHTS:
            value = getattr(self, w)
            named.update({f"{w}/{f}": getattr(value, f) for f in value._fields}
                         if isinstance(value, fp8.BlockScaled) else {w: value})
        return named

    def bytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.arrays())


class RoutedExperts(Protocol):
    """Anything that applies the routed experts to routed tokens (the view below, DEP's dispatcher)."""

    def __call__(self, x_TD: jax.Array, ids_TK: jax.Array, weights_TK: jax.Array,
                 valid_T: jax.Array | None = None) -> jax.Array: ...


def take_rows(x_RD: jax.Array, rows_Q: jax.Array) -> jax.Array:
    """x_RD's rows at rows_Q ([Q, D]), zero rows where an index is out of range (R: padding rows). Rows of narrow
    dtypes move as 32-bit words: XLA's GPU gather moves one element per thread step, so an e4m3 row of 7168 bytes
    took 7168 of them (H100: 2.77 ms for R1's 262144 routed rows, 1.4 TB/s of the HBM's 3.35)."""
    d, width = x_RD.shape[1], jnp.dtype(x_RD.dtype).itemsize
    if width >= 4 or (d * width) % 4:
        return jnp.take(x_RD, rows_Q, axis=0, mode="fill", fill_value=0)
    words_RW = jax.lax.bitcast_convert_type(x_RD.reshape(x_RD.shape[0], -1, 4 // width), jnp.uint32)
    out_QW = jnp.take(words_RW, rows_Q, axis=0, mode="fill", fill_value=0)
    return jax.lax.bitcast_convert_type(out_QW, x_RD.dtype).reshape(rows_Q.shape[0], d)


def sort_by_expert(ids_TK: jax.Array, num_experts: int, valid_T: jax.Array | None = None):
    """Stable order of the T*K (token, choice) rows by expert; padding tokens go last and count nowhere.

    Returns (order_M, group_sizes_E) with M = T*K; row m of the sorted buffer is token order_M[m] // K.
    """
    flat_ids_M = ids_TK.reshape(-1)
    if valid_T is not None:
        flat_ids_M = jnp.where(jnp.repeat(valid_T, ids_TK.shape[1]), flat_ids_M, num_experts)
    order_M = jnp.argsort(flat_ids_M, stable=True)
    group_sizes_E = jnp.zeros((num_experts,), jnp.int32).at[flat_ids_M].add(1, mode="drop")
    return order_M, group_sizes_E


def align_groups(group_sizes_E: jax.Array, num_rows: int, align: int):
    """The sorted buffer with every expert's rows starting at a multiple of `align` (a tiled kernel's row tile, so
    no tile holds two experts; `grouped_gemm.row_alignment`). Returns (aligned_M, padded_sizes_E, num_aligned):
    sorted row m sits at row aligned_M[m] of a buffer of num_aligned = num_rows + E (align - 1) rows (static),
    each group padded to a multiple of `align`; rows past the real ones (padding tokens) follow the last group."""
    num_experts = group_sizes_E.shape[0]
    padded_E = (group_sizes_E + align - 1) // align * align
    extra_E = padded_E - group_sizes_E
    shift_E = jnp.cumsum(extra_E) - extra_E  # padding rows before group e
    rows_M = jnp.arange(num_rows, dtype=group_sizes_E.dtype)
    expert_M = count_at_or_below(jnp.cumsum(group_sizes_E), rows_M)
    shift_M = jnp.where(expert_M < num_experts, shift_E[jnp.minimum(expert_M, num_experts - 1)], extra_E.sum())
    return rows_M + shift_M, padded_E, num_rows + num_experts * (align - 1)


def grouped_ffn_over_slabs(x_sorted_MD: jax.Array, group_sizes_E: jax.Array, slabs: tuple[ExpertSlab, ...],
                           backend: str, x_scale_SM: jax.Array | None = None, out_dtype=None) -> jax.Array:
    """The grouped GEMMs over the slabs, the weights used where they lie: one kernel over all slabs for a split
    backend, else one grouped GEMM per slab over the rows of the sorted buffer. `x_scale_SM`: the rows come
    quantized (e4m3 with `fp8.quantize_rows` scales; FP8 experts on a split backend), the output in `out_dtype`."""
    split = grouped_gemm.get_split_backend(backend)
    if slabs[0].fp8:
        grouped_gemm.check_fp8(backend)
    if split is not None:
        if x_scale_SM is None:
            return split(x_sorted_MD, group_sizes_E, slabs)
        return split(x_sorted_MD, group_sizes_E, slabs, x_scale_SM=x_scale_SM, out_dtype=out_dtype)
    if x_scale_SM is not None:
        raise ValueError(f"grouped GEMM backend {backend!r} takes bf16 rows; quantized rows go to a split backend")
    ffn = grouped_gemm.get_backend(backend)
    m = x_sorted_MD.shape[0]
    starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    y_sorted_MD = jnp.zeros_like(x_sorted_MD)
    for slab in slabs:
        sizes_G = jax.lax.dynamic_slice_in_dim(group_sizes_E, slab.start, slab.count)
        if slab.start == 0:
            y_sorted_MD = y_sorted_MD + ffn(x_sorted_MD, sizes_G, slab.w_gate_EDF, slab.w_up_EDF, slab.w_down_EFD)
            continue
        # Rotate this slab's rows to the front (the kernel's groups start at row 0) and back; a gather on
        # activations, never a copy of weights.
        row0 = starts_E[slab.start]
        rows_M = jnp.arange(m)
        x_slab_MD = x_sorted_MD[(rows_M + row0) % m]
        y_slab_MD = ffn(x_slab_MD, sizes_G, slab.w_gate_EDF, slab.w_up_EDF, slab.w_down_EFD)
        y_sorted_MD = y_sorted_MD + y_slab_MD[(rows_M - row0) % m]
    return y_sorted_MD


def combine(y_sorted_MD: jax.Array, order_M: jax.Array, weights_TK: jax.Array,
            aligned_M: jax.Array | None = None) -> jax.Array:
    """Unsort the expert outputs and take the routing-weighted sum over the K choices (fp32 accumulation).
    `aligned_M`: where each sorted row sits when the buffer is tile-aligned (`align_groups`).

    A gather through the inverse order (an int32 scatter of M indices) feeding the weighted sum: no [M, D] scatter
    buffer, and the fp32 conversion can fuse into the sum (XLA:CPU still materializes the fp32 rows: 128 of the
    scatter version's 256 MiB at T 4096, K 8, D 1024)."""
    t, k = weights_TK.shape
    m = order_M.shape[0]
    rows_M = jnp.arange(m, dtype=order_M.dtype) if aligned_M is None else aligned_M.astype(order_M.dtype)
    position_M = jnp.zeros((m,), order_M.dtype).at[order_M].set(rows_M)
    y_TKD = y_sorted_MD[position_M].reshape(t, k, -1)
    # an elementwise product and a reduction, which XLA may fuse; an einsum would lower to a dot over fp32 rows
    y_TD = (y_TKD.astype(jnp.float32) * weights_TK.astype(jnp.float32)[:, :, None]).sum(axis=1)
    return y_TD.astype(y_sorted_MD.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertView:
    """All E experts of one MoE layer as an ordered tuple of slabs tiling [0, E)."""

    slabs: tuple[ExpertSlab, ...]
    num_experts: int = dataclasses.field(metadata=dict(static=True))
    backend: str = dataclasses.field(default="xla", metadata=dict(static=True))

    def __post_init__(self):
        expected = 0
        for i, slab in enumerate(self.slabs):
            if not hasattr(slab, "start") or not all(hasattr(a, "shape") for a in jax.tree.leaves(slab)):
                return  # a pytree of non-arrays (specs, shardings) built by a JAX transform
            if slab.start != expected:
                raise ValueError(f"ExpertView slab {i} starts at expert {slab.start}, expected {expected}: "
                                 f"slabs must tile [0, {self.num_experts}) in order")
            expected += slab.count
        if expected != self.num_experts:
            raise ValueError(f"ExpertView slabs cover {expected} experts, expected num_experts={self.num_experts}")

    @classmethod
    def single(cls, slab: ExpertSlab, backend: str = "xla") -> "ExpertView":
        return cls(slabs=(slab,), num_experts=slab.count, backend=backend)

    def merged(self) -> "ExpertView":
        """The slabs concatenated into one (a copy of every expert weight): the paper's D2D merge, kept only as an
        ablation of split-weight consumption."""
        arrays = zip(*(s.arrays() for s in self.slabs))
        slab = self.slabs[0].with_arrays([jnp.concatenate(a, axis=0) for a in arrays], start=0)
        return ExpertView((slab,), self.num_experts, self.backend)

    def __call__(self, x_TD: jax.Array, ids_TK: jax.Array, weights_TK: jax.Array,
                 valid_T: jax.Array | None = None) -> jax.Array:
        k = ids_TK.shape[1]
        align = grouped_gemm.row_alignment(self.backend)
        out_dtype = x_TD.dtype
        scale_ST = None
        if self.quantizes_tokens:
            # Row quantization is per row, so quantizing each token once before the copy into expert order gives
            # the kernel the bytes it would quantize there, and the copy moves e4m3 rows: 1/K of the quantization
            # work and half the bytes of the copy.
            with jax.named_scope("moe_quantize"):
                x_TD, scale_ST = fp8_rows.quantize_rows(x_TD)
        with jax.named_scope("moe_permute"):
            order_M, group_sizes_E = sort_by_expert(ids_TK, self.num_experts, valid_T)
            aligned_M = None
            if align > 1:  # one gather straight into the aligned buffer; its padding rows read a zero row
                aligned_M, group_sizes_E, num_aligned = align_groups(group_sizes_E, order_M.shape[0], align)
                token_P = jnp.full((num_aligned,), x_TD.shape[0], order_M.dtype).at[aligned_M].set(order_M // k)
            else:
                token_P = order_M // k
            x_sorted_MD = take_rows(x_TD, token_P)
            scale_SM = None if scale_ST is None else jnp.take(scale_ST, token_P, axis=1, mode="fill", fill_value=0)
        with jax.named_scope("moe_gmm"):
            y_sorted_MD = grouped_ffn_over_slabs(x_sorted_MD, group_sizes_E, self.slabs, self.backend,
                                                 x_scale_SM=scale_SM, out_dtype=out_dtype)
        with jax.named_scope("moe_combine"):
            return combine(y_sorted_MD, order_M, weights_TK, aligned_M)

    @property
    def quantizes_tokens(self) -> bool:
        """FP8 experts on a split backend with whole 128-wide groups: the tokens are quantized before dispatch."""
        return quantizes_tokens(self.slabs[0], self.backend)


def quantizes_tokens(slab: ExpertSlab, backend: str) -> bool:
    """Whether the tokens reach these experts quantized (e4m3 rows, `fp8.quantize_rows` scales), each once before
    it is copied or sent to its experts: FP8 experts on a split backend (whose kernel takes quantized rows) with
    whole 128-wide groups."""
    return tokens_quantized(slab.fp8, backend, slab.w_gate_EDF[0].shape[-1])


def tokens_quantized(fp8_experts: bool, backend: str, hidden_size: int) -> bool:
    """`quantizes_tokens` from the config alone (the memory planner's question): FP8 experts, a split backend,
    and a hidden size of whole 128-wide groups."""
    return fp8_experts and grouped_gemm.get_split_backend(backend) is not None and hidden_size % fp8.BLOCK == 0

"""The DWDP runtime: one independent worker per device, no collectives, remote experts pulled a layer ahead.

Each rank holds the replicated weights (embedding, attention, dense layers, shared experts, routers, head) and
its local slab of every MoE layer. A forward step is a Python loop over per-stage jitted programs on the rank's
own device: the dense front, one program per MoE layer (attention + MoE), the head. MoE layer m reads slot m % 2,
which its own pull filled; once that program holds its view the rank releases the slot and requests the pull of
layer m + 2 into it, which the transport starts after the slot has been read (device_put: fresh buffers; the copy
engine: a fence at the end of that program); the first two MoE layers are primed at step start, behind the front.
So a pull overlaps the next layer's attention first. With `pull_issue="after_attention"` the pull of layer m + 1
instead starts inside layer m's program, between its attention and its MoE (the slot it fills was last read by
layer m - 1): it overlaps the grouped GEMM first, and only layer 0 is primed behind the front.
Nothing here ever waits for another rank: owners' weights are immutable and pulls need no cooperation.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from dwdp_jax import checkpoint, memory
from dwdp_jax.expert_source import as_source
from dwdp_jax.kernels import grouped_gemm
from dwdp_jax.packing import PackedBatch
from dwdp_jax.placement import Placement
from dwdp_jax.prefetch import PULL_ISSUES
from dwdp_jax.runtime import stages
from dwdp_jax.runtime.step import StageClock, StepResult
from dwdp_jax.transport import TransportOptions, make_transport, transport_class, transport_options
from models.deepseek_v3 import Params
from models.experts import ExpertSlab, ExpertView

COLLECTIVE_OPS = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter",
                  "ragged-all-to-all", "collective-broadcast")


@dataclasses.dataclass(frozen=True)
class DwdpOptions:
    """Engine knobs; the defaults are the paper's DWDP. Each deviation is an ablation."""

    transport: str = "device_put"  # | "copy_engine" (persistent slots, pulls issued from inside the programs)
    slices: int = 1  # >1: contention mitigation (each pull split into slices, round-robin over owners)
    slice_bytes: int = 0  # copy engine: memcpy pieces of at most this many bytes, round-robin (0 = whole copies)
    poison: bool = False  # NaN-fill released slots (tests)
    prefetch: bool = True  # False: pull each layer synchronously right before its MoE (no overlap)
    merge_experts: bool = False  # True: concatenate local and remote slabs before the MoE (the paper's D2D merge)
    gemm_backend: str = "xla"
    timeline: bool = False  # copy engine on GPU: device timestamps of every pull and fence (transport.timeline)
    # Where the next pull starts: "after_moe" (layer m + 2's, at the end of layer m: it overlaps attention first) or
    # "after_attention" (layer m + 1's, between layer m's attention and MoE: it overlaps the grouped GEMM first, for
    # hardware where a pull slows attention more than a GEMM; serving on 4x H200 showed no such slowdown
    # (experiments.context_bench).
    pull_issue: str = "after_moe"
    # > 0: logits only at the last token of each sequence (serving needs nothing else), for up to this many
    # sequences per batch; 0: logits of every token (verification).
    last_token_logits: int = 0
    # With a device memory budget the engine refuses a group that does not fit before placing any weight.
    device_bytes: int | None = None
    max_num_tokens: int = 0
    attention_memory: str = "naive"  # the activation estimate of the attention kernel in use

    def __post_init__(self):
        self.transport_options()  # the transport and its slicing checked before any device work
        if self.pull_issue not in PULL_ISSUES:
            raise ValueError(f"DwdpOptions.pull_issue must be one of {PULL_ISSUES}, got {self.pull_issue!r}")
        if self.pull_issue != "after_moe" and not self.prefetch:
            raise ValueError(f"DwdpOptions.pull_issue={self.pull_issue!r} places prefetched pulls; prefetch=False "
                             f"pulls each layer right before its MoE")
        if self.timeline and self.transport != "copy_engine":
            raise ValueError(f"DwdpOptions.timeline needs transport='copy_engine', got {self.transport!r}")

    def transport_options(self) -> TransportOptions:
        return transport_options(self.transport, slices=self.slices, poison=self.poison, timeline=self.timeline,
                                 slice_bytes=self.slice_bytes)


@dataclasses.dataclass
class RankWeights:
    """Everything one rank keeps on its device."""

    device: jax.Device
    weights: stages.Weights  # what the stage programs take
    local: tuple[ExpertSlab, ...]  # per MoE layer: this rank's experts [rP, rP + L)


class DwdpEngine:
    """The weights of a DWDP group on its devices, and the per-rank forward step."""

    def __init__(self, params: Params, placement: Placement, devices: list[jax.Device] | None = None,
                 options: DwdpOptions = DwdpOptions()):
        cfg = params.model.cfg
        if placement.num_experts != cfg.n_routed_experts:
            raise ValueError(f"placement.num_experts ({placement.num_experts}) must equal the model's "
                             f"n_routed_experts ({cfg.n_routed_experts})")
        available = jax.devices() if devices is None else devices
        placement.check_devices(len(available))
        transport_cls = transport_class(options.transport)
        if options.timeline and available[0].platform != "gpu":
            raise ValueError("DwdpOptions.timeline needs GPU devices (the copy-engine timeline uses CUDA events), got "
                             f"{available[0].platform}")
        if not options.prefetch and transport_cls.issues_in_program:
            raise ValueError(f"DwdpOptions.prefetch=False needs a transport that copies on request (device_put); "
                             f"{options.transport!r} issues pulls from the programs that follow")
        if options.device_bytes is not None:
            memory.plan_dwdp(cfg, placement, options.max_num_tokens, attention_impl=options.attention_memory,
                             device_bytes=options.device_bytes, live_slots=transport_cls.live_slots,
                             row_align=grouped_gemm.row_alignment(options.gemm_backend))
        self.devices = list(available)[:placement.num_ranks]
        self.cfg, self.placement, self.options = cfg, placement, options
        self.graphs, weights = stages.split_model(params.model)
        self.ranks = [self._place_rank(r, params, weights) for r in range(len(self.devices))]
        self.transport = make_transport(options.transport, placement, [list(w.local) for w in self.ranks],
                                        self.devices, options.transport_options())

    @classmethod
    def from_checkpoint(cls, path: str, placement: Placement, devices: list[jax.Device] | None = None,
                        options: DwdpOptions = DwdpOptions()) -> "DwdpEngine":
        """The group straight from an Orbax model checkpoint, the whole model never materialized: the replicated
        weights are read once to host, and each rank reads only its own expert rows onto its device (the
        checkpoint is the expert source; its sliced reads are those of `checkpoint.restore_rank`)."""
        ckpt = checkpoint.ModelCheckpoint(path)
        return cls(Params(ckpt.replicated(np.asarray), ckpt), placement, devices, options)

    def _place_rank(self, rank, params, weights: stages.Weights, local=None) -> RankWeights:
        """The rank's weights on its device; its expert slabs from `params.experts` unless given (`local`)."""
        device = self.devices[rank]
        start, stop = self.placement.local_range(rank)
        if local is None:
            source = as_source(params.experts)
            local = tuple(source.rows(m, start, stop, device) for m in range(self.cfg.num_moe_layers))
        return RankWeights(device, jax.device_put(weights, device), local)

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    def _view(self, rank: int, layer: int, remote: tuple[ExpertSlab, ...]) -> ExpertView:
        slabs = sorted((self.ranks[rank].local[layer],) + tuple(remote), key=lambda s: s.start)
        return ExpertView(tuple(slabs), self.cfg.n_routed_experts, self.options.gemm_backend)

    def step(self, rank: int, batch: PackedBatch, profile: bool = False) -> StepResult:
        """One prefill of `batch` on `rank`, touching only this rank's device and its own slots.

        `profile` runs every layer's attention and FFN as separate programs and syncs after every stage to time it
        (`StageClock`: embed, attention and dense_mlp of every layer, moe, pull_wait, head, host).
        """
        w, t, opts = self.ranks[rank], self.transport, self.options
        n_moe = self.cfg.num_moe_layers
        clock = StageClock(profile)
        # Validated before any pull is issued, so a refused batch leaves the slots untouched.
        last_rows = stages.last_token_rows(batch, opts.last_token_logits) if opts.last_token_logits else None
        tokens, segs, pos = jax.device_put((batch.tokens_T, batch.segment_ids_T, batch.positions_T), w.device)
        hook = t.hook(rank)
        t.begin_step(rank)
        issue_after = opts.pull_issue.removeprefix("after_")  # the stage whose output starts the next pulls
        # after the attention, the pull of layer m + 1 starts between m's attention and MoE: one layer ahead
        ahead = 1 if issue_after == "attention" else 2
        if opts.prefetch:
            for m in range(min(ahead, n_moe)):
                t.pull(rank, m, m % 2)
        t.seal(rank)
        g, ww = self.graphs, w.weights
        x = stages.run_front(g.dense, ww.dense_states, ww.embed_VD, tokens, segs, pos, clock, hook=hook)
        expert_ids = []
        for m in range(n_moe):
            slot = m % 2
            if not opts.prefetch:
                t.pull(rank, m, slot)
            remote = t.acquire(rank, slot, m)
            clock.lap("pull_wait", remote)
            view = self._view(rank, m, remote)
            # The MoE below holds the view; the slot is refilled with layer m + 2 only after it has been read (the
            # device_put transport copies into fresh buffers, the copy engine issues from the end of this program, or
            # after the attention from the next one, which fills the other slot, last read by layer m - 1's program).
            t.release(rank, slot)
            if opts.prefetch and m + ahead < n_moe:
                t.pull(rank, m + ahead, (m + ahead) % 2)
            t.seal(rank)
            x, ids = stages.run_moe_layer(g.moe, ww.moe_states[m], x, segs, pos, view, clock,
                                          merge=opts.merge_experts, hook=hook, issue_after=issue_after)
            expert_ids.append(ids)
        rows = None if last_rows is None else jax.device_put(last_rows, w.device)
        logits = stages.head(g.norm, ww.norm_state, ww.lm_head_DV, x, rows)
        clock.lap("head", logits)
        return clock.result(stages.host_output(logits, x, expert_ids, batch, last_token=rows is not None))

    def compiled_hlo(self, batch: PackedBatch, rank: int = 0) -> dict[str, str]:
        """Optimized HLO text of the rank's programs (front, one MoE layer, head) for `batch`'s shapes."""
        return stages.compiled_hlo(self.graphs, self.ranks[rank].weights, batch,
                                   self._view(rank, 0, self.transport.remote_specs(rank)), self.transport.hook(rank),
                                   merge=self.options.merge_experts,
                                   issue_after=self.options.pull_issue.removeprefix("after_"))


def count_collectives(hlo_text: str) -> int:
    return sum(hlo_text.count(f" {op}(") + hlo_text.count(f" {op}-start(") for op in COLLECTIVE_OPS)

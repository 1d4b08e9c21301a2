"""Training a small DeepSeek-V3-architecture MoE as a byte-level language model on the Python standard library.

Why: random weights route tokens almost uniformly, while real MoE models have hot experts; a small model of the
real architecture (MLA, sigmoid group-limited routing, shared expert, first dense layer) trained here gives the
benchmark realistic routing skew and gives the three runtimes an accuracy check that means something.

- Data: every `*.py` file of the running interpreter's standard library (site-packages excluded), sorted by
  path, split into train and held-out by a hash of the path (deterministic, by file, no overlap), concatenated
  with a NUL byte between files. Bytes are tokens (vocab 256).
- Batches: non-overlapping windows of seq_len + 1 bytes, each epoch in a fresh permutation seeded by (seed,
  epoch). A run's data position is the number of windows consumed, so (seed, position) says what comes next.
- Model: the reference model's modules with the routed experts as `ExpertView.single` over full slabs, trained
  with optax. Attention runs per sequence (vmapped: the packed prefill's block-diagonal mask without its
  quadratic cost over the whole batch); every other module runs over all tokens of the batch at once.
- Routing balance: DeepSeek-V3's auxiliary-loss-free update. After each step, outside the gradient, every MoE
  layer's correction bias moves by gamma * sign(mean load - load_e): under-loaded experts become likelier.
- Checkpoints: Orbax CheckpointManager every `checkpoint_every` steps (trainable weights, router biases,
  optimizer state, step, data position). A run resumes from its latest checkpoint and, every step being a pure
  function of (state, seed, position), ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sysconfig
import time
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from dwdp_jax.kernels import grouped_gemm
from models import config as model_config
from models.deepseek_v3 import DeepseekV3, Params, init_model
from models.experts import ExpertSlab, ExpertView

FILE_SEPARATOR = 0  # NUL never occurs in Python source: it marks where one file ends and the next begins
BIAS_FILTER = nnx.PathContains("e_score_correction_bias")


# --- a grouped GEMM that is fast on CPU ------------------------------------------------------------------------

def blocked_grouped_ffn(x_MD: jax.Array, group_sizes_G: jax.Array, w_gate_GDF: jax.Array, w_up_GDF: jax.Array,
                        w_down_GFD: jax.Array, block: int = 128) -> jax.Array:
    """The grouped SwiGLU FFN as a batched matmul over blocks of `block` rows, each group padded to whole blocks.

    Why: XLA:CPU's `ragged_dot` costs about as much as running every group over every row (measured 7x slower
    than this, forward and backward, at M=16384, D=128, F=64, G=16 on 2 cores). Exact like it: same contract
    (rows sorted by group, rows past sum(group_sizes) give zeros), fp32 accumulation, differentiable.
    """
    m, d = x_MD.shape
    g = group_sizes_G.shape[0]
    num_blocks = -(-m // block) + g  # each group wastes less than one block
    sizes_G = group_sizes_G.astype(jnp.int32)
    padded_G = -(-sizes_G // block) * block
    padded_end_G = jnp.cumsum(padded_G)
    end_G = jnp.cumsum(sizes_G)
    rows_M = jnp.arange(m, dtype=jnp.int32)
    group_M = jnp.minimum(jnp.searchsorted(end_G, rows_M, side="right"), g - 1)
    row_in_group_M = rows_M - (end_G - sizes_G)[group_M]
    dest_M = jnp.where(rows_M < end_G[-1], (padded_end_G - padded_G)[group_M] + row_in_group_M, num_blocks * block)
    x_BKD = jnp.zeros((num_blocks * block, d), x_MD.dtype).at[dest_M].set(x_MD, mode="drop").reshape(
        num_blocks, block, d)
    group_B = jnp.minimum(jnp.searchsorted(padded_end_G, jnp.arange(num_blocks, dtype=jnp.int32) * block,
                                           side="right"), g - 1)
    acc = jnp.float32
    gate_BKF = jnp.einsum("bkd,bdf->bkf", x_BKD, w_gate_GDF[group_B], preferred_element_type=acc)
    up_BKF = jnp.einsum("bkd,bdf->bkf", x_BKD, w_up_GDF[group_B], preferred_element_type=acc)
    h_BKF = (jax.nn.silu(gate_BKF) * up_BKF).astype(x_MD.dtype)
    y_BKD = jnp.einsum("bkf,bfd->bkd", h_BKF, w_down_GFD[group_B], preferred_element_type=acc).astype(x_MD.dtype)
    return jnp.take(y_BKD.reshape(num_blocks * block, d), dest_M, axis=0, mode="fill", fill_value=0)


grouped_gemm.register_backend("blocked", blocked_grouped_ffn)


# --- data ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Corpus:
    """Train and held-out bytes of the standard library, split by file."""

    root: str
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]
    train_bytes: np.ndarray  # uint8
    heldout_bytes: np.ndarray  # uint8


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str) -> list[str]:
    """Sorted paths (relative to `root`) of the standard library's Python sources, installed packages excluded."""
    paths = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    relative = (os.path.relpath(p, root) for p in paths)
    return sorted(p for p in relative if p.split(os.sep)[0] not in ("site-packages", "dist-packages"))


def is_heldout(relative_path: str, heldout_per_mille: int) -> bool:
    """Deterministic by file name alone (CRC32), so the split does not move when files are added elsewhere."""
    return zlib.crc32(relative_path.encode()) % 1000 < heldout_per_mille


def load_corpus(heldout_per_mille: int = 50, root: str | None = None) -> Corpus:
    root = root or stdlib_root()
    files = stdlib_files(root)
    if not files:
        raise ValueError(f"no Python sources under {root}")
    heldout = tuple(f for f in files if is_heldout(f, heldout_per_mille))
    train = tuple(f for f in files if not is_heldout(f, heldout_per_mille))
    if not heldout or not train:
        raise ValueError(f"heldout_per_mille={heldout_per_mille} leaves an empty split of {len(files)} files")
    return Corpus(root, train, heldout, _concatenate(root, train), _concatenate(root, heldout))


def _concatenate(root: str, files: tuple[str, ...]) -> np.ndarray:
    parts = []
    for f in files:
        with open(os.path.join(root, f), "rb") as fh:
            parts.append(np.frombuffer(fh.read(), np.uint8))
        parts.append(np.array([FILE_SEPARATOR], np.uint8))
    return np.concatenate(parts)


class WindowSampler:
    """Non-overlapping windows of seq_len + 1 bytes in a seeded permutation per epoch; `batch(position, n)` is a
    pure function of (seed, position), which is what makes a resumed run identical to an uninterrupted one."""

    def __init__(self, data: np.ndarray, seq_len: int, seed: int):
        self.data, self.seq_len, self.seed = data, seq_len, seed
        self.num_windows = (data.size - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{data.size} bytes hold no window of seq_len + 1 = {seq_len + 1}")
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._perm

    def batch(self, position: int, batch_size: int) -> np.ndarray:
        """Windows position ... position + batch_size - 1 as int32 [batch_size, seq_len + 1]."""
        out = np.empty((batch_size, self.seq_len + 1), np.int32)
        for i in range(batch_size):
            epoch, k = divmod(position + i, self.num_windows)
            start = int(self._order(epoch)[k]) * self.seq_len
            out[i] = self.data[start:start + self.seq_len + 1]
        return out


def evenly_spaced_windows(data: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """`count` fixed windows of seq_len + 1 bytes spread over `data` (evaluation: the same windows every time)."""
    last = data.size - seq_len - 1
    if last < 0:
        raise ValueError(f"{data.size} bytes hold no window of seq_len + 1 = {seq_len + 1}")
    starts = np.linspace(0, last, count).astype(np.int64)
    return np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)


# --- model -----------------------------------------------------------------------------------------------------

def model_config_from(c) -> model_config.ModelConfig:
    """The ModelConfig of a train config's `model` block (every field given; no YaRN at these lengths)."""
    fields = dict(c.model)
    return model_config.ModelConfig(**fields, rope_scaling=None)


def forward(model: DeepseekV3, experts: tuple[ExpertSlab, ...], tokens_BS: jax.Array,
            backend: str = "xla") -> tuple[jax.Array, list[jax.Array]]:
    """Logits [B, S, V] (fp32) of B independent sequences, and the expert ids [B*S, K] of every MoE layer."""
    cfg = model.cfg
    b, s = tokens_BS.shape
    positions_S = jnp.arange(s, dtype=jnp.int32)
    segment_ids_S = jnp.zeros((s,), jnp.int32)
    x_BSD = model.embed(tokens_BS)
    expert_ids = []
    for i, layer in enumerate(model.layers):
        x_BSD = jax.vmap(layer.attention, in_axes=(0, None, None))(x_BSD, segment_ids_S, positions_S)
        view = ExpertView.single(experts[len(expert_ids)], backend) if cfg.is_moe_layer(i) else None
        x_TD, ids_TK = layer.ffn(x_BSD.reshape(b * s, -1), view)
        x_BSD = x_TD.reshape(b, s, -1)
        if ids_TK is not None:
            expert_ids.append(ids_TK)
    return model.head(x_BSD.reshape(b * s, -1)).reshape(b, s, -1), expert_ids


def expert_loads(expert_ids: list[jax.Array], num_experts: int) -> jax.Array:
    """[MoE layers, E]: (token, choice) rows routed to each expert."""
    return jnp.stack([jnp.bincount(ids.reshape(-1), length=num_experts) for ids in expert_ids])


def update_biases(biases: nnx.State, loads_ME: jax.Array, gamma: float, cfg: model_config.ModelConfig) -> nnx.State:
    """bias_e += gamma * sign(mean load - load_e) in every MoE layer (DeepSeek-V3's auxiliary-loss-free balance)."""
    pure = nnx.to_pure_dict(biases)
    for m in range(cfg.num_moe_layers):
        gate = pure["layers"][cfg.first_k_dense_replace + m]["mlp"]["gate"]
        load_E = loads_ME[m].astype(jnp.float32)
        gate["e_score_correction_bias"] = gate["e_score_correction_bias"] + gamma * jnp.sign(load_E.mean() - load_E)
    out = jax.tree.map(lambda x: x, biases)
    nnx.replace_by_pure_dict(out, pure)
    return out


# --- training state and step -----------------------------------------------------------------------------------

class TrainState(NamedTuple):
    """Everything a step reads and writes; the Orbax checkpoint of a run (plus step and data position)."""

    params: nnx.State  # trainable non-expert weights
    experts: tuple[ExpertSlab, ...]
    biases: nnx.State  # routers' correction biases: updated by the balance rule, not by the optimizer
    opt_state: Any


def make_optimizer(c) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay to 10%; no weight decay on vectors (norms)."""
    t = c.train
    if not 0 <= t.warmup_steps < t.steps:
        raise ValueError(f"config.train.warmup_steps must be in [0, steps={t.steps}), got {t.warmup_steps}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps, t.steps,
                                                  end_value=0.1 * t.learning_rate)

    def decay_mask(tree):
        return jax.tree.map(lambda x: x.ndim > 1, tree)

    return optax.chain(optax.clip_by_global_norm(t.grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=t.weight_decay, mask=decay_mask))


def init_state(cfg: model_config.ModelConfig, optimizer: optax.GradientTransformation, seed: int):
    """(graphdef, TrainState) of a freshly initialized model."""
    model, experts = init_model(cfg, seed=seed)
    graphdef, biases, params = nnx.split(model, BIAS_FILTER, nnx.Param)
    return graphdef, TrainState(params, experts, biases, optimizer.init((params, experts)))


def next_byte_loss(graphdef, params, experts, biases, tokens_BS1, backend: str):
    """Mean next-byte cross entropy (nats) of windows [B, S + 1] and the expert loads of the step."""
    model = nnx.merge(graphdef, biases, params)
    logits_BSV, expert_ids = forward(model, experts, tokens_BS1[:, :-1], backend)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BSV, tokens_BS1[:, 1:]).mean()
    return loss, expert_loads(expert_ids, model.cfg.n_routed_experts)


def make_step(graphdef, optimizer: optax.GradientTransformation, cfg: model_config.ModelConfig, gamma: float,
              backend: str) -> Callable:
    """The jitted train step: (state, tokens [B, S+1]) -> (state, loss, loads [MoE layers, E])."""

    def step(state: TrainState, tokens_BS1: jax.Array):
        def loss_fn(trainable):
            return next_byte_loss(graphdef, *trainable, state.biases, tokens_BS1, backend)

        (loss, loads_ME), grads = jax.value_and_grad(loss_fn, has_aux=True)((state.params, state.experts))
        updates, opt_state = optimizer.update(grads, state.opt_state, (state.params, state.experts))
        params, experts = optax.apply_updates((state.params, state.experts), updates)
        biases = update_biases(state.biases, loads_ME, gamma, cfg)
        return TrainState(params, experts, biases, opt_state), loss, loads_ME

    return jax.jit(step)


def make_eval(graphdef, backend: str) -> Callable:
    """Jitted mean next-byte loss (nats) of a batch of windows."""
    return jax.jit(lambda state, tokens: next_byte_loss(graphdef, state.params, state.experts, state.biases,
                                                        tokens, backend)[0])


def params_of(graphdef, state: TrainState) -> Params:
    """The trained model as the runtimes take it."""
    return Params(nnx.merge(graphdef, state.biases, state.params), tuple(state.experts))


# --- checkpoints and the loop ----------------------------------------------------------------------------------

def _manager(workdir: str, c) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=c.train.keep_checkpoints, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
                                 item_names=("state", "progress"))


def _save(manager: ocp.CheckpointManager, step: int, state: TrainState, position: int, config_json: str) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        progress=ocp.args.JsonSave({"step": step, "data_position": position, "config": config_json})))
    manager.wait_until_finished()


def _restore(manager: ocp.CheckpointManager, step: int, target: TrainState, config_json: str):
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()))
    progress = restored["progress"]
    if progress["config"] != config_json:
        raise ValueError(f"{manager.directory} holds checkpoints of a run with another config; use a fresh workdir "
                         f"or the same config (saved: {progress['config']})")
    return TrainState(*restored["state"]), int(progress["data_position"])


@dataclasses.dataclass
class TrainResult:
    params: Params
    config: model_config.ModelConfig
    history: list[dict[str, float]]  # one record per eval: step, train_loss (mean since last), heldout_loss
    steps_run: int  # steps this call ran (after any resume)
    resumed_from: int  # 0: fresh start
    seconds: float


def run(c, workdir: str, stop_after: int | None = None, corpus: Corpus | None = None) -> TrainResult:
    """Trains per config `c` in `workdir`, resuming from its latest checkpoint if any; checkpoints are written
    every `checkpoint_every` steps and at the last step. `stop_after` simulates a kill: the run stops after that
    step without a checkpoint of its own, so what it did since its last periodic checkpoint is lost."""
    t0 = time.perf_counter()
    cfg = model_config_from(c)
    t = c.train
    corpus = corpus or load_corpus(c.data.heldout_per_mille)
    sampler = WindowSampler(corpus.train_bytes, t.seq_len, c.seed)
    heldout = evenly_spaced_windows(corpus.heldout_bytes, t.seq_len, t.eval_windows)
    train_probe = evenly_spaced_windows(corpus.train_bytes, t.seq_len, t.eval_windows)
    optimizer = make_optimizer(c)
    graphdef, state = init_state(cfg, optimizer, c.seed)
    step_fn, eval_fn = make_step(graphdef, optimizer, cfg, t.bias_update_rate, t.gemm_backend), make_eval(
        graphdef, t.gemm_backend)
    config_json = json.dumps(c.to_dict(), sort_keys=True)
    manager = _manager(workdir, c)
    start, position = 0, 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        state, position = _restore(manager, start, state, config_json)
    last = t.steps if stop_after is None else min(stop_after, t.steps)
    history, losses = [], []
    bar = tqdm(range(start + 1, last + 1), desc="train", unit="step", initial=start, total=t.steps,
               disable=not c.progress)
    for step in bar:
        state, loss, loads_ME = step_fn(state, jnp.asarray(sampler.batch(position, t.batch_size)))
        position += t.batch_size
        losses.append(loss)
        if step % t.eval_every == 0 or step == t.steps:
            record = _evaluate(eval_fn, state, heldout, train_probe, t.batch_size, step, losses, loads_ME)
            history.append(record)
            losses = []
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", heldout=f"{record['heldout_loss']:.3f}",
                            max_load=f"{record['max_over_mean_load']:.2f}")
        if step % t.checkpoint_every == 0 or step == t.steps:
            _save(manager, step, state, position, config_json)
    bar.close()
    manager.close()
    return TrainResult(params_of(graphdef, state), cfg, history, max(last - start, 0), start,
                       time.perf_counter() - t0)


def _evaluate(eval_fn, state, heldout, train_probe, batch_size, step, losses, loads_ME) -> dict[str, float]:
    def mean_loss(windows):
        return float(np.mean([eval_fn(state, jnp.asarray(windows[i:i + batch_size]))
                              for i in range(0, len(windows), batch_size)]))

    loads = np.asarray(loads_ME, np.float64)
    return {"step": step, "train_loss": float(np.mean([float(x) for x in losses])) if losses else float("nan"),
            "train_probe_loss": mean_loss(train_probe), "heldout_loss": mean_loss(heldout),
            "max_over_mean_load": float((loads.max(1) / loads.mean(1)).max())}

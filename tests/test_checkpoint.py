"""Checkpoint import without transformers: FP8 block scales, both expert layouts, MTP, sizes and bad input.

Checkpoints are written here from a random tiny model with an explicit name map (DeepSeek's published names,
R1-style config.json with rope_scaling), independent of the loader's own mapping; the HF parity tests check
that mapping against transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from dwdp_jax.checkpoint import CheckpointError, dequantize_fp8, load_hf_checkpoint, load_hf_config
from models.config import ModelConfig, deepseek_r1, tiny
from models.deepseek_v3 import Params, abstract_model

BLOCK = 128
# hidden 160, widths 200 / 136: none a multiple of 128, so most FP8 weights end in partial blocks.
CONFIG = tiny(hidden_size=160, intermediate_size=200, moe_intermediate_size=136)
# DeepSeek quantizes every projection except the router, eh_proj, the embedding and lm_head.
FP8_WEIGHT = re.compile(r"(_proj|_proj_with_mqa)(\.weight)?$")


# --- writing checkpoints ----------------------------------------------------------------------------------

def _linear(w, n_in: int = 1) -> np.ndarray:
    """This model's [in..., out...] weight as HF's [out, in]."""
    w = np.asarray(w, np.float32)
    return w.reshape(math.prod(w.shape[:n_in]), -1).T


def _attention(prefix: str, attn) -> dict:
    t = {f"{prefix}kv_a_proj_with_mqa.weight": _linear(attn.kv_a_proj_with_mqa[...]),
         f"{prefix}kv_a_layernorm.weight": attn.kv_a_layernorm.weight[...],
         f"{prefix}kv_b_proj.weight": _linear(attn.kv_b_proj[...]),
         f"{prefix}o_proj.weight": _linear(attn.o_proj[...], n_in=2)}
    if hasattr(attn, "q_proj"):
        return t | {f"{prefix}q_proj.weight": _linear(attn.q_proj[...])}
    return t | {f"{prefix}q_a_proj.weight": _linear(attn.q_a_proj[...]),
                f"{prefix}q_a_layernorm.weight": attn.q_a_layernorm.weight[...],
                f"{prefix}q_b_proj.weight": _linear(attn.q_b_proj[...])}


def _mlp(prefix: str, mlp) -> dict:
    return {f"{prefix}{p}.weight": _linear(getattr(mlp, p)[...]) for p in ("gate_proj", "up_proj", "down_proj")}


def _experts(prefix: str, slab, fused: bool) -> dict:
    gate, up, down = (np.asarray(w, np.float32).transpose(0, 2, 1) for w in (slab.w_gate_EDF, slab.w_up_EDF,
                                                                              slab.w_down_EFD))
    if fused:
        return {f"{prefix}gate_up_proj": np.concatenate([gate, up], axis=1), f"{prefix}down_proj": down}
    return {f"{prefix}{e}.{p}.weight": w[e] for p, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down))
            for e in range(w.shape[0])}


def _layer(prefix: str, layer, slab, fused: bool) -> dict:
    t = {f"{prefix}input_layernorm.weight": layer.input_layernorm.weight[...],
         f"{prefix}post_attention_layernorm.weight": layer.post_attention_layernorm.weight[...]}
    t |= _attention(prefix + "self_attn.", layer.self_attn)
    if slab is None:
        return t | _mlp(prefix + "mlp.", layer.mlp)
    router_DE = layer.mlp.gate.weight[...]
    return t | {f"{prefix}mlp.gate.weight": _linear(router_DE).astype(router_DE.dtype),
                f"{prefix}mlp.gate.e_score_correction_bias": layer.mlp.gate.e_score_correction_bias[...],
                **_mlp(prefix + "mlp.shared_experts.", layer.mlp.shared_experts),
                **_experts(prefix + "mlp.experts.", slab, fused)}


def hf_tensors(config: ModelConfig, params, fused: bool = False, mtp: bool = True) -> dict[str, np.ndarray]:
    """`params` under DeepSeek's checkpoint names (transformers' fused expert names if `fused`), fp32 but for the
    routers' weights, in their own dtype (R1's: bf16)."""
    model, slabs = params.model, iter(params.experts)
    t = {"model.embed_tokens.weight": model.embed_tokens[...], "model.norm.weight": model.norm.weight[...],
         "lm_head.weight": _linear(model.lm_head[...])}
    for i, layer in enumerate(model.layers):
        t |= _layer(f"model.layers.{i}.", layer, next(slabs) if config.is_moe_layer(i) else None, fused)
    for d, module in enumerate(model.mtp if mtp else []):
        prefix = f"model.layers.{config.num_hidden_layers + d}."
        t |= {f"{prefix}enorm.weight": module.enorm.weight[...], f"{prefix}hnorm.weight": module.hnorm.weight[...],
              f"{prefix}eh_proj.weight": _linear(module.eh_proj[...]),
              f"{prefix}shared_head.norm.weight": module.norm.weight[...],
              f"{prefix}embed_tokens.weight": t["model.embed_tokens.weight"],
              f"{prefix}shared_head.head.weight": t["lm_head.weight"]}
        t |= _layer(prefix, module.layer, next(slabs), fused)
    return {k: np.ascontiguousarray(v, v.dtype if k.endswith("mlp.gate.weight") else np.float32) for k, v in t.items()}


def hf_config(config: ModelConfig, **changes) -> dict:
    """An R1-style config.json (rope_scaling + top-level rope_theta, scoring_func and topk_method present)."""
    skip = ("rope_scaling", "dtype")
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in skip}
    out |= {"model_type": "deepseek_v3", "torch_dtype": config.dtype, "num_key_value_heads": config.num_attention_heads,
            "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "hidden_act": "silu"}
    if config.rope_scaling is not None:
        out["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(config.rope_scaling)}
    return out | changes


def write_checkpoint(path, config_json: dict, tensors: dict[str, np.ndarray], shards: int = 1) -> str:
    """config.json and the tensors round-robin over `shards` files, with an index when there are several."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_json, f)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] if shards > 1 else [
        "model.safetensors"]
    weight_map = {name: files[i % shards] for i, name in enumerate(sorted(tensors))}
    for file in files:
        save_file({n: tensors[n] for n, f in weight_map.items() if f == file}, os.path.join(path, file))
    if shards > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(path)


def shard_of(path: str, name: str) -> str:
    """The file of a checkpoint written by write_checkpoint that holds tensor `name`."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return os.path.join(path, "model.safetensors")
    with open(index) as f:
        return os.path.join(path, json.load(f)["weight_map"][name])


def overwrite(file: str, offset: int, data: bytes) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def data_offset(file: str, name: str) -> int:
    """Where tensor `name`'s bytes start in a safetensors file (after the 8-byte length and the JSON header)."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return 8 + size + json.loads(f.read(size))[name]["data_offsets"][0]


# --- FP8 ---------------------------------------------------------------------------------------------------

def _blocks(shape: tuple[int, int]):
    for i in range(-(-shape[0] // BLOCK)):
        for j in range(-(-shape[1] // BLOCK)):
            yield i, j, (slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK))


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's weight quantization: per 128x128 block (over the last two axes), scale = amax / 448."""
    if w.ndim == 3:
        q, s = zip(*(quantize_fp8(x) for x in w))
        return np.stack(q), np.stack(s)
    q = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
    scale = np.empty((-(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK)), np.float32)
    for i, j, block in _blocks(w.shape):
        scale[i, j] = np.abs(w[block]).max() / 448
        q[block] = (w[block] / scale[i, j]).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def dequantize_by_block(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The reference dequantization, one block at a time."""
    if q.ndim == 3:
        return np.stack([dequantize_by_block(x, s) for x, s in zip(q, scale)])
    w = np.empty(q.shape, np.float32)
    for i, j, block in _blocks(q.shape):
        w[block] = q[block].astype(np.float32) * scale[i, j]
    return w


def flat_params(params) -> dict[str, np.ndarray]:
    flat = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(params.model))}
    for m, slab in enumerate(params.experts):
        flat |= {f"experts/{m}/{k}": np.asarray(getattr(slab, k)) for k in ("w_gate_EDF", "w_up_EDF", "w_down_EFD")}
    return flat


def assert_params_equal(a, b):
    assert_flat_equal(flat_params(a), flat_params(b))


def assert_flat_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
    """Same names, dtypes and bits."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def random_params(config: ModelConfig, seed: int) -> Params:
    """A random model with norm weights around 1 and random correction biases; filled from numpy (eager jax.random
    would compile once per shape, ~10 s)."""
    rng = np.random.default_rng(seed)
    model, abstract_experts = abstract_model(config)
    graphdef, state = nnx.split(model)

    def fill(path, var):
        if path[-1] == "e_score_correction_bias":
            return 0.05 * rng.random(var.shape, np.float32)
        if var.ndim == 1:
            return 1 + 0.1 * rng.standard_normal(var.shape, np.float32)
        return 0.1 * rng.standard_normal(var.shape, np.float32)
    state = nnx.from_flat_state([(p, v.replace(jnp.asarray(fill(p, v), v.dtype))) for p, v in nnx.to_flat_state(state)])
    experts = jax.tree.map(lambda w: jnp.asarray(0.1 * rng.standard_normal(w.shape, np.float32)), abstract_experts)
    return Params(nnx.merge(graphdef, state), experts)


@pytest.fixture(scope="module")
def original():
    """CONFIG's random model, with an MTP module."""
    return random_params(CONFIG, seed=3)


def test_dequantize_fp8_multiplies_partial_edge_blocks():
    rng = np.random.default_rng(1)
    q, scale = quantize_fp8(rng.standard_normal((300, 200), np.float32))
    assert scale.shape == (3, 2)
    np.testing.assert_array_equal(dequantize_fp8(q, scale, (BLOCK, BLOCK)), dequantize_by_block(q, scale))
    with pytest.raises(ValueError, match=r"\(2, 2\).*expected \(3, 2\)"):
        dequantize_fp8(q, scale[:2], (BLOCK, BLOCK))


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
def test_fp8_checkpoint_loads_the_dequantized_weights(original, tmp_path, fused):
    """FP8 e4m3 + 128x128 scales over two shards with an index load bitwise equal to the dequantized weights."""
    tensors = hf_tensors(CONFIG, original, fused=fused)
    quantized, dequantized = {}, {}
    for name, w in tensors.items():
        if FP8_WEIGHT.search(name) and ".eh_proj." not in name:
            q, scale = quantize_fp8(w)
            quantized |= {name: q, name + "_scale_inv": scale}
            dequantized[name] = dequantize_by_block(q, scale)
        else:
            quantized[name] = dequantized[name] = w
    assert quantized["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 2)  # [200, 160]: edge blocks
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
    fp8_dir = write_checkpoint(tmp_path / "fp8", hf_config(CONFIG, quantization_config=quant), quantized, shards=2)
    ref_dir = write_checkpoint(tmp_path / "ref", hf_config(CONFIG), dequantized)
    _, from_fp8 = load_hf_checkpoint(fp8_dir)
    _, from_ref = load_hf_checkpoint(ref_dir)
    assert_params_equal(from_fp8, from_ref)
    assert not np.array_equal(flat_params(from_fp8)["layers/0/mlp/gate_proj"],
                              flat_params(original)["layers/0/mlp/gate_proj"])  # it did go through fp8


def test_round_trip_with_mtp_and_both_expert_layouts(original, tmp_path):
    for fused in (False, True):
        path = write_checkpoint(tmp_path / str(fused), hf_config(CONFIG), hf_tensors(CONFIG, original, fused=fused))
        config, params = load_hf_checkpoint(path)
        assert config == CONFIG and len(params.model.mtp) == 1
        assert len(params.experts) == CONFIG.num_moe_layers + 1
        assert_params_equal(params, original)


def test_bf16_checkpoint_without_mtp(original, tmp_path):
    """A bf16 checkpoint (router kept fp32, as transformers saves it) without MTP tensors: no MTP module, the routers
    fp32, and every weight equals the original rounded to bf16."""
    router = re.compile(r"mlp\.gate\.(weight|e_score_correction_bias)$")
    tensors = {k: v.astype(np.float32) if router.search(k) else v.astype(ml_dtypes.bfloat16)
               for k, v in hf_tensors(CONFIG, original, mtp=False).items()}
    config, params = load_hf_checkpoint(write_checkpoint(tmp_path, hf_config(CONFIG), tensors),
                                                 dtype="bfloat16")
    assert config == CONFIG.replace(num_nextn_predict_layers=0, dtype="bfloat16", router_dtype="float32")
    assert len(params.model.mtp) == 0 and len(params.experts) == CONFIG.num_moe_layers
    expected = {k: v.astype(np.float32) if "/mlp/gate/" in k else v.astype(ml_dtypes.bfloat16)
                for k, v in flat_params(original).items()
                if not k.startswith("mtp/") and k.split("/")[:2] != ["experts", str(CONFIG.num_moe_layers)]}
    assert_flat_equal(flat_params(params), expected)


def test_routers_load_as_stored(original, tmp_path):
    """The routers' weights keep the checkpoint's dtype (R1's bf16 stays bf16, no fp32 copy); layers stored in two
    dtypes load in fp32, exact for both; a router stored in FP8 is refused, named."""
    tensors = hf_tensors(CONFIG, original)
    name = f"model.layers.{CONFIG.first_k_dense_replace}.mlp.gate.weight"
    assert tensors[name].dtype == ml_dtypes.bfloat16 and CONFIG.router_dtype == "bfloat16"
    config, params = load_hf_checkpoint(write_checkpoint(tmp_path / "bf16", hf_config(CONFIG), tensors))
    assert config.router_dtype == "bfloat16"
    assert params.model.layers[CONFIG.first_k_dense_replace].mlp.gate.weight[...].dtype == jnp.bfloat16
    mixed = tensors | {name: tensors[name].astype(np.float32)}
    config, params = load_hf_checkpoint(write_checkpoint(tmp_path / "mixed", hf_config(CONFIG), mixed))
    assert config.router_dtype == "float32"
    assert_flat_equal(flat_params(params), {k: v.astype(np.float32) if k.endswith("/mlp/gate/weight") else v
                                            for k, v in flat_params(original).items()})
    last = f"model.layers.{CONFIG.num_hidden_layers - 1}.mlp.gate.weight"  # not the first router: named itself
    fp8 = tensors | {last: tensors[last].astype(ml_dtypes.float8_e4m3fn)}
    with pytest.raises(CheckpointError, match=rf"router weights stored as \{{'{re.escape(last)}': 'F8_E4M3'\}}; "
                                              r"supported dtypes: \['BF16', 'F16', 'F32'\]"):
        load_hf_checkpoint(write_checkpoint(tmp_path / "fp8", hf_config(CONFIG), fp8))


# --- bad checkpoints and configs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_tensors(original):
    return hf_tensors(CONFIG, original)


def _load(tmp_path, tensors, **config_changes):
    return load_hf_checkpoint(write_checkpoint(tmp_path, hf_config(CONFIG, **config_changes), tensors))


def _two_shards(tmp_path, tensors) -> tuple[str, str]:
    """A checkpoint over two shards and the second one's path."""
    path = write_checkpoint(tmp_path, hf_config(CONFIG), tensors, shards=2)
    return path, os.path.join(path, "model-00002-of-00002.safetensors")


def test_truncated_shard_is_named(tmp_path, good_tensors):
    path, shard = _two_shards(tmp_path, good_tensors)
    os.truncate(shard, os.path.getsize(shard) - 1000)
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard)} \(\d+ bytes\) is not a readable safetensors "
                                              "file, truncated or corrupt: .*not fully covered"):
        load_hf_checkpoint(path)


def test_corrupt_shard_header_is_named(tmp_path, good_tensors):
    path, shard = _two_shards(tmp_path, good_tensors)
    overwrite(shard, 8, b"#" * 8)  # the start of the JSON header
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard)} .* truncated or corrupt: .*invalid JSON"):
        load_hf_checkpoint(path)


@pytest.mark.parametrize("value", [b"\xff\xff\xff\xff", np.float32(-np.inf).tobytes()], ids=["nan", "inf"])
def test_non_finite_weight_names_the_tensor_and_shard(tmp_path, good_tensors, value):
    """Four bytes overwritten inside lm_head.weight [64, 160]: the shard's header is intact, its data is not."""
    path, _ = _two_shards(tmp_path, good_tensors)
    shard = shard_of(path, "lm_head.weight")
    overwrite(shard, data_offset(shard, "lm_head.weight") + 4 * (160 + 7), value)
    message = rf"{re.escape(shard)}: tensor lm_head\.weight holds 1 non-finite value\(s\) .* at index \(1, 7\)"
    with pytest.raises(CheckpointError, match=message):
        load_hf_checkpoint(path)


def test_corrupt_index_is_named(tmp_path, good_tensors):
    path, _ = _two_shards(tmp_path, good_tensors)
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"weight_map": ["model.safetensors"]}, f)
    with pytest.raises(CheckpointError, match=rf"{re.escape(index)} has no weight_map object"):
        load_hf_checkpoint(path)


@pytest.mark.parametrize("text, message", [("[1, 2]", "holds a JSON list, expected an object"),
                                           ('{"vocab_size": 6', "is not valid JSON: Expecting"),
                                           (b"\xff\xfe{", "is not valid JSON")])
def test_unreadable_config_json_names_the_file(tmp_path, text, message):
    file = tmp_path / "config.json"
    file.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(file))} {message}"):
        load_hf_config(str(tmp_path))


def test_missing_tensor_is_named(tmp_path, good_tensors):
    tensors = dict(good_tensors)
    del tensors["model.layers.2.self_attn.kv_b_proj.weight"], tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    message = rf"{re.escape(str(tmp_path))}: checkpoint lacks 2 tensor\(s\): .*kv_b_proj\.weight \(expected shape " \
              r"\(128, 16\)\).*experts\.5\.up_proj"
    with pytest.raises(CheckpointError, match=message):
        _load(tmp_path, tensors)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, good_tensors):
    tensors = dict(good_tensors, **{"model.layers.1.mlp.experts.3.down_proj.weight": np.zeros((160, 135), np.float32)})
    shard = re.escape(str(tmp_path / "model.safetensors"))
    message = rf"{shard}: tensor model\.layers\.1\.mlp\.experts\.3\.down_proj\.weight has shape \(160, 135\), " \
              r"expected \(160, 136\)"
    with pytest.raises(CheckpointError, match=message):
        _load(tmp_path, tensors)


def test_unexpected_tensors_are_listed(tmp_path, good_tensors):
    tensors = dict(good_tensors, **{"model.layers.1.mlp.experts.8.up_proj.weight": np.zeros((136, 160), np.float32)})
    with pytest.raises(CheckpointError, match=r"no place for: model\.layers\.1\.mlp\.experts\.8\.up_proj\.weight"):
        _load(tmp_path, tensors)


@pytest.mark.parametrize("changes, field", [
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts"),
    (dict(n_group=4, topk_group=5), "topk_group"),
    (dict(n_group=4, topk_group=2, num_experts_per_tok=5), "num_experts_per_tok"),  # 2 kept groups of 2 experts
    (dict(hidden_size=-8), "hidden_size"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
])
def test_invalid_model_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        tiny(**changes)


# deepseek-ai/DeepSeek-R1 config.json as published (auto_map and training-only fields left out).
R1_CONFIG_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_published_r1_config_is_the_deepseek_r1_preset(tmp_path):
    write_checkpoint(tmp_path, R1_CONFIG_JSON, {})
    assert load_hf_config(str(tmp_path)) == deepseek_r1()


@pytest.mark.parametrize("changes, field", [
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(topk_method="greedy"), "topk_method"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
    (dict(rope_interleave=False), "rope_interleave"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    (dict(n_group=3), "n_routed_experts"),
    (dict(n_shared_experts="1"), "n_shared_experts='1' must be a JSON integer"),
    (dict(norm_topk_prob=1), "norm_topk_prob=1 must be a JSON boolean"),
    (dict(rope_scaling=5), "rope_scaling=5 must be a JSON object"),
])
def test_unsupported_hf_config_is_rejected(tmp_path, changes, field):
    write_checkpoint(tmp_path, hf_config(CONFIG, **changes), {})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path / 'config.json'))}: .*{field}"):
        load_hf_config(str(tmp_path))


def test_bad_dtype_argument_is_the_callers_error(tmp_path):
    write_checkpoint(tmp_path, hf_config(CONFIG), {})
    with pytest.raises(ValueError, match=r"^dtype='bogus' is not one of float32, bfloat16, float16$"):
        load_hf_config(str(tmp_path), dtype="bogus")


def test_r1_parameter_count_from_the_abstract_model():
    config = deepseek_r1().replace(num_nextn_predict_layers=0)
    model, experts = abstract_model(config)
    count = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model)))
    count += sum(math.prod(w.shape) for w in jax.tree.leaves(experts))
    assert count == config.param_count()
    assert abs(count - 671e9) / 671e9 <= 0.005, count

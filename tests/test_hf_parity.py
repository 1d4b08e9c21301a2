"""The imported model against HuggingFace transformers' DeepseekV3ForCausalLM (the numerics oracle), fp32.

Each config builds a tiny random HF model once, saves it with save_pretrained (DeepSeek's per-expert names)
and imports it through dwdp_jax.checkpoint.load_hf_checkpoint. Two sequences of different lengths run packed into one
batch here and one at a time in HF, so any attention across sequences shows up as a logits mismatch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any, NamedTuple

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from dwdp_jax.checkpoint import load_hf_checkpoint  # noqa: E402
from dwdp_jax.packing import pack  # noqa: E402
from dwdp_jax.runtime import reference  # noqa: E402
from models import deepseek_v3  # noqa: E402

pytestmark = pytest.mark.parity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQUENCES = [[3, 17, 42, 8, 61, 5, 29, 33, 12, 50, 7], [9, 1, 60, 24, 38]]
REL_TOL = 1e-5
R1_YARN = {"type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
           "original_max_position_embeddings": 4096}
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
            initializer_range=0.1)
CONFIGS = {
    # R1's YaRN, q-LoRA, 4 groups keeping 2, one dense layer.
    "yarn_qlora": dict(TINY, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=24, n_group=4, topk_group=2,
                       num_experts_per_tok=2, rope_scaling=R1_YARN, max_position_embeddings=163840),
    # A direct q projection (V2-Lite style), a YaRN whose ramp and mscale differ from R1's, two dense layers.
    "yarn_no_qlora": dict(TINY, num_hidden_layers=4, first_k_dense_replace=2, q_lora_rank=None, n_group=2,
                          topk_group=1, num_experts_per_tok=3, n_shared_experts=2, max_position_embeddings=256,
                          rope_scaling={"type": "yarn", "factor": 4.0, "beta_fast": 8, "beta_slow": 1, "mscale": 0.707,
                                        "mscale_all_dim": 0.9, "original_max_position_embeddings": 64}),
    # rms_norm_eps 1e-5: HF and DeepSeek keep the q/kv LoRA norms at 1e-6 (models.deepseek_v3.LORA_NORM_EPS).
    "eps1e-5_qlora": dict(TINY, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=24, n_group=4, topk_group=2,
                          num_experts_per_tok=2, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "eps1e-5_no_qlora": dict(TINY, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=None, n_group=2,
                             topk_group=1, num_experts_per_tok=3, n_shared_experts=2, rms_norm_eps=1e-5,
                             max_position_embeddings=4096),
    # Plain RoPE, unnormalized top-k weights with another scaling factor.
    "plain_rope": dict(TINY, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=24, n_group=4, topk_group=3,
                       num_experts_per_tok=4, norm_topk_prob=False, routed_scaling_factor=1.5,
                       max_position_embeddings=4096),
}
# Large enough to change choices (router scores spread by about 0.1 at this init), small enough not to decide them.
BIAS_SCALE = 0.05


def build_hf_model(hf_kwargs: dict, seed: int = 0):
    """A random HF model with randomized norm weights and correction biases (HF initializes them to 1 and 0)."""
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**hf_kwargs, attn_implementation="eager")
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "DeepseekV3RMSNorm":
                module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
            if type(module).__name__ == "DeepseekV3TopkRouter":
                module.e_score_correction_bias.copy_(BIAS_SCALE * torch.rand_like(module.e_score_correction_bias))
    return model


def hf_run(model, sequences):
    """HF logits [T, V] and per MoE layer (expert ids [T, k], router scores [T, E]), one sequence at a time."""
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    calls = [[] for _ in routers]
    hooks = [r.register_forward_hook(lambda _m, _in, out, c=c: c.append(out)) for r, c in zip(routers, calls)]
    try:
        with torch.no_grad():
            logits = [model(input_ids=torch.tensor([seq])).logits[0].numpy() for seq in sequences]
    finally:
        for hook in hooks:
            hook.remove()
    ids = [np.concatenate([out[2].numpy() for out in c]) for c in calls]
    scores = [np.concatenate([torch.sigmoid(out[0]).numpy() for out in c]) for c in calls]
    return np.concatenate(logits), ids, scores


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def flat_params(params) -> dict[str, np.ndarray]:
    flat = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(params.model))}
    for m, slab in enumerate(params.experts):
        flat |= {f"experts/{m}/{k}": np.asarray(getattr(slab, k)) for k in ("w_gate_EDF", "w_up_EDF", "w_down_EFD")}
    return flat


class Case(NamedTuple):
    model: Any  # the HF model
    path: str  # its save_pretrained directory
    hf_logits: np.ndarray
    hf_ids: list[np.ndarray]  # per MoE layer [T, k]
    hf_scores: list[np.ndarray]  # per MoE layer, unbiased sigmoid scores [T, E]
    config: Any
    params: deepseek_v3.Params


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Builds, saves, runs and imports each config once, on first use."""
    built = {}

    def get(name: str) -> Case:
        if name not in built:
            model = build_hf_model(CONFIGS[name])
            path = str(tmp_path_factory.mktemp(name))
            model.save_pretrained(path)
            built[name] = Case(model, path, *hf_run(model, SEQUENCES), *load_hf_checkpoint(path))
        return built[name]
    return get


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_prefill_matches_hf(cases, name):
    case = cases(name)
    out = reference.prefill(case.params, pack(SEQUENCES, vocab_size=case.config.vocab_size))
    err = rel_err(out.logits_TV, case.hf_logits)
    print(f"{name}: logits relative error {err:.3e}")
    assert err <= REL_TOL, f"{name}: logits relative error {err:.3e} > {REL_TOL}"
    assert len(out.expert_ids) == len(case.hf_ids) == case.config.num_moe_layers
    for layer, (ours, theirs) in enumerate(zip(out.expert_ids, case.hf_ids)):
        np.testing.assert_array_equal(np.sort(ours, -1), np.sort(theirs, -1), err_msg=f"{name} MoE layer {layer}")
    # The correction bias and the group limit must matter: plain top-k of the unbiased scores differs somewhere.
    k = case.config.num_experts_per_tok
    plain = [np.sort(np.argsort(-s, -1)[:, :k], -1) for s in case.hf_scores]
    assert any((p != np.sort(i, -1)).any() for p, i in zip(plain, case.hf_ids)), f"{name}: trivial routing"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_maps_hf_fields(cases, name):
    case = cases(name)
    hf, config = case.model.config, case.config
    assert (config.q_lora_rank, config.n_group, config.topk_group, config.first_k_dense_replace) == (
        hf.q_lora_rank, hf.n_group, hf.topk_group, hf.first_k_dense_replace)
    assert config.num_nextn_predict_layers == 0  # save_pretrained writes no MTP tensors
    assert len(case.params.model.mtp) == 0 and len(case.params.experts) == config.num_moe_layers
    np.testing.assert_allclose(config.softmax_scale, case.model.model.layers[0].self_attn.scaling, rtol=1e-12)
    assert (config.rope_scaling is None) == (hf.rope_parameters["rope_type"] == "default")
    assert config.rms_norm_eps == hf.rms_norm_eps
    attention = case.model.model.layers[0].self_attn
    assert attention.kv_a_layernorm.variance_epsilon == deepseek_v3.LORA_NORM_EPS
    assert case.model.model.layers[0].input_layernorm.variance_epsilon == hf.rms_norm_eps


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_expert_layout_loads_like_per_expert(cases, name, tmp_path):
    """transformers' in-memory state dict (fused gate_up_proj [E, 2I, H], gate first) imports identically."""
    case = cases(name)
    state = case.model.state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(case.path, "config.json"), tmp_path / "config.json")
    _, fused = load_hf_checkpoint(str(tmp_path))
    ours, theirs = flat_params(fused), flat_params(case.params)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_prefill_cli_writes_hf_logits(cases, tmp_path):
    case = cases("yarn_qlora")
    output = tmp_path / "logits.npy"
    tokens = ";".join(",".join(map(str, seq)) for seq in SEQUENCES)
    proc = subprocess.run([sys.executable, "-m", "experiments.prefill", f"--hf_dir={case.path}", f"--tokens={tokens}",
                           f"--output={output}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = np.load(output)
    assert logits.dtype == np.float32 and logits.shape == case.hf_logits.shape
    assert rel_err(logits, case.hf_logits) <= REL_TOL

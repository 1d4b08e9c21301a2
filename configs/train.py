"""Training configs for the byte-level stdlib MoE (`--config=configs/train.py:NAME`).

NAME: `cpu` (default; about 1.7M parameters, 2 CPU cores, under 10 minutes: the model shipped in
checkpoints/tiny_stdlib), `gpu` (a wider, deeper model for one GPU, under 10 minutes). Override any field with
`--config.field=value`.
"""

from ml_collections import config_dict


def get_config(name: str = "cpu") -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.name = name
    c.seed = 0
    c.progress = True
    c.workdir = ""  # checkpoints and resumption; default results/train/<name>
    c.export_dir = ""  # the final model as an Orbax model checkpoint ("" = none)
    c.results_root = "results"

    c.data = config_dict.ConfigDict()
    c.data.heldout_per_mille = 50  # files held out, by a hash of their path

    # Every ModelConfig field but rope_scaling (none at these lengths): the DeepSeek-V3 architecture at small width.
    c.model = config_dict.ConfigDict(dict(
        vocab_size=256, hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=4096, num_nextn_predict_layers=0, dtype="float32",
        router_dtype="float32"))  # trained in fp32, as transformers keeps the gate (R1 ships it in bf16)

    c.train = config_dict.ConfigDict()
    c.train.steps = 600
    c.train.batch_size = 16
    c.train.seq_len = 256
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 50
    c.train.weight_decay = 0.01
    c.train.grad_clip = 1.0
    c.train.bias_update_rate = 1e-3  # gamma of the auxiliary-loss-free balance update
    c.train.gemm_backend = "blocked"  # "xla" = one dot per group over every row (G x the FLOPs)
    c.train.eval_every = 100
    c.train.eval_windows = 64  # fixed held-out (and train-probe) windows per evaluation
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 2

    if name == "cpu":
        return c
    if name == "gpu":
        c.model.hidden_size = 256
        c.model.intermediate_size = 768
        c.model.moe_intermediate_size = 128
        c.model.num_hidden_layers = 6
        c.model.num_attention_heads = 8
        c.model.q_lora_rank = 128
        c.model.kv_lora_rank = 64
        c.model.n_routed_experts = 32
        c.model.num_experts_per_tok = 4
        c.model.n_group = 8
        c.model.topk_group = 4
        c.train.steps = 3000
        c.train.batch_size = 32
        c.train.seq_len = 512
        c.train.learning_rate = 2e-3
        c.train.warmup_steps = 100
        c.train.eval_every = 250
        c.train.checkpoint_every = 500
        return c
    raise ValueError(f"unknown train config {name!r}; choose cpu or gpu")

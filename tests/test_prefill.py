"""The prefill command: every flag and path checked before any weight is read, damaged shards named, non-finite
logits refused unless allowed; each failure one line on stderr with exit status 2, never a traceback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from models.config import tiny
from test_checkpoint import data_offset, hf_config, hf_tensors, overwrite, random_params, shard_of, write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = tiny(num_hidden_layers=2, num_nextn_predict_layers=0)
TOKENS = "--tokens=1,2,3;4,5"


def run_prefill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.prefill", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def assert_fails(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 2 and `message` on the last line of stderr, with no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(message, proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]


@pytest.fixture(scope="module")
def tensors():
    return hf_tensors(CONFIG, random_params(CONFIG, seed=5), mtp=False)


@pytest.fixture(scope="module")
def checkpoint(tensors, tmp_path_factory) -> str:
    return write_checkpoint(tmp_path_factory.mktemp("hf"), hf_config(CONFIG), tensors)


@pytest.fixture
def damaged(checkpoint, tmp_path) -> str:
    """A private copy of the checkpoint, for tests that damage it."""
    return shutil.copytree(checkpoint, tmp_path / "hf")


def _config_only(path, text: str) -> str:
    os.makedirs(path)
    (path / "config.json").write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["output_dir", "dtype", "hf_dir", "tokens", "token_ids", "config_list",
                                  "config_json"])
def test_bad_input_fails_before_loading(tmp_path, case):
    """A config.json without weights: every case must fail before reading them, naming the flag or file."""
    hf_dir = write_checkpoint(tmp_path / "hf", hf_config(CONFIG), {})
    output = str(tmp_path / "out.npy")
    args, message = {
        "output_dir": ([f"--output={tmp_path}/missing/out.npy"], rf"--output=.* directory {tmp_path}/missing does "
                                                                 "not exist"),
        "dtype": (["--dtype=bogus"], r"--dtype='bogus' is not one of float32, bfloat16, float16$"),
        "hf_dir": ([f"--hf_dir={tmp_path / 'absent'}"], "is not a checkpoint directory \\(no config.json\\)"),
        "tokens": (["--tokens=1,2;3,x"], r"--tokens sequence 1 \('3,x'\) is not a comma-separated list of integers"),
        "token_ids": ([f"--tokens=1,2;{CONFIG.vocab_size}"], rf"outside \[0, {CONFIG.vocab_size}\): \[64\]"),
        "config_list": ([f"--hf_dir={_config_only(tmp_path / 'list', '[1, 2]')}"],
                        rf"{tmp_path}/list/config.json holds a JSON list, expected an object"),
        "config_json": ([f"--hf_dir={_config_only(tmp_path / 'bad', '{')}"],
                        rf"{tmp_path}/bad/config.json is not valid JSON"),
    }[case]
    assert_fails(run_prefill(f"--hf_dir={hf_dir}", TOKENS, f"--output={output}", *args), message)
    assert not os.path.exists(output)


def test_truncated_shard_is_named(damaged, tmp_path):
    shard = os.path.join(damaged, "model.safetensors")
    os.truncate(shard, os.path.getsize(shard) // 2)
    proc = run_prefill(f"--hf_dir={damaged}", TOKENS, f"--output={tmp_path / 'out.npy'}")
    assert_fails(proc, rf"^prefill: {re.escape(shard)} \(\d+ bytes\) is not a readable safetensors file, truncated "
                       "or corrupt")


def test_nan_bytes_in_lm_head_are_named(damaged, tmp_path):
    shard = shard_of(damaged, "lm_head.weight")
    overwrite(shard, data_offset(shard, "lm_head.weight") + 64, b"\xff" * 4)
    proc = run_prefill(f"--hf_dir={damaged}", TOKENS, f"--output={tmp_path / 'out.npy'}")
    assert_fails(proc, rf"^prefill: {re.escape(shard)}: tensor lm_head\.weight holds 1 non-finite value\(s\)")
    assert not (tmp_path / "out.npy").exists()


def test_nonfinite_logits_are_refused_unless_allowed(tensors, tmp_path):
    """lm_head at 3e38 is finite, but its products with the normed hidden state overflow float32."""
    hf_dir = write_checkpoint(tmp_path / "hf", hf_config(CONFIG),
                              dict(tensors, **{"lm_head.weight": np.full_like(tensors["lm_head.weight"], 3e38)}))
    output = tmp_path / "logits"  # no .npy: written at exactly this path
    refused = run_prefill(f"--hf_dir={hf_dir}", TOKENS, f"--output={output}")
    assert_fails(refused, r"^prefill: the logits hold \d+ non-finite value\(s\) \(NaN or Inf\) in 2 of 2 "
                          r"sequence\(s\): \[0, 1\]; nothing written")
    assert not output.exists()
    allowed = run_prefill(f"--hf_dir={hf_dir}", TOKENS, f"--output={output}", "--allow_nonfinite")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "prefill: warning: the logits hold" in allowed.stderr
    logits = np.load(output)
    assert logits.shape == (5, CONFIG.vocab_size) and not np.isfinite(logits).all()


def test_help_quotes_the_tokens_example():
    """An unquoted --tokens=1,2,3;4,5 would be cut at the ';' by the shell."""
    proc = subprocess.run([sys.executable, "-m", "experiments.prefill", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert "--tokens='1,2,3;4,5'" in proc.stdout
    assert not re.search(r"--tokens=1,2,3;4,5", proc.stdout)

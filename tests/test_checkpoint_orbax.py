"""Orbax model checkpoints: bit-exact round trips, per-rank restore that reads only the rank's own experts (shown
by deleting every other expert's files and by TensorStore's byte counter), DWDP and DEP built from restored
weights, and clear failures for partial, corrupt and mismatched checkpoints."""

import json
import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx
from jax.sharding import Mesh

from dwdp_jax import checkpoint as ckpt
from dwdp_jax.packing import pack
from dwdp_jax.placement import Placement
from dwdp_jax.runtime.dep import DepRuntime
from dwdp_jax.runtime.dwdp import DwdpEngine
from dwdp_jax.runtime.reference import prefill
from models import config as C
from models import deepseek_v3 as M
from models.deepseek_v3 import Params

CFG = C.tiny(num_hidden_layers=4, n_routed_experts=8, n_group=4, topk_group=2)  # 3 MoE layers + 1 MTP layer
PLACEMENT = Placement.for_group(8, 3)  # L = 4, P = 2: neighbouring ranks share two experts
EXPERT_NAMES = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")


@pytest.fixture(scope="module")
def params():
    return Params(*M.init_model(CFG, seed=7))


@pytest.fixture(scope="module")
def saved(params, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("orbax") / "model")
    ckpt.save_model(path, CFG, params)
    return path


@pytest.fixture
def copy(saved, tmp_path):
    """A private copy of the saved checkpoint, for tests that damage it."""
    path = str(tmp_path / "model")
    shutil.copytree(saved, path)
    return path


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def expert_chunk_files(path):
    """{(array dir, expert): chunk file} of every expert array: one zarr chunk per expert row."""
    root = os.path.join(path, "experts")
    files = {}
    for array in sorted(os.listdir(root)):
        if array.split(".")[-1] in EXPERT_NAMES:
            for name in os.listdir(os.path.join(root, array)):
                if not name.startswith("."):
                    files[(array, int(name.split(".")[0]))] = os.path.join(root, array, name)
    return files


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def file_bytes_read():
    for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read"):
        return metric["values"][0]["value"]
    return 0


# --- round trips --------------------------------------------------------------------------------------------

def test_whole_round_trip_is_bit_exact(params, saved):
    config, restored = ckpt.restore_model(saved)
    assert config == CFG and ckpt.load_config(saved) == CFG and ckpt.is_orbax_checkpoint(saved)
    leaves_equal(params, restored)
    assert restored.model.layers[1].mlp.gate.weight[...].dtype == np.dtype(CFG.router_dtype)


@pytest.mark.parametrize("router_dtype", ["bfloat16", "float32"])
def test_bf16_round_trip_keeps_the_router_dtype(tmp_path, router_dtype):
    cfg = CFG.replace(dtype="bfloat16", router_dtype=router_dtype)
    params = Params(*M.init_model(cfg, seed=1))
    ckpt.save_model(str(tmp_path / "bf16"), cfg, params)
    config, restored = ckpt.restore_model(str(tmp_path / "bf16"))
    assert config == cfg
    leaves_equal(params, restored)
    assert restored.experts[0].w_up_EDF.dtype == np.dtype("bfloat16")
    assert restored.model.layers[1].mlp.gate.weight[...].dtype == np.dtype(router_dtype)


def test_a_header_without_router_dtype_holds_fp32_routers(tmp_path):
    """Checkpoints written before ModelConfig.router_dtype (the shipped tiny model among them) stored the routers'
    weights in fp32: they restore so."""
    cfg = CFG.replace(router_dtype="float32")
    path = str(tmp_path / "old")
    ckpt.save_model(path, cfg, Params(*M.init_model(cfg, seed=2)))
    header_path = os.path.join(path, "config.json")
    with open(header_path) as f:
        header = json.load(f)
    del header["model_config"]["router_dtype"]
    with open(header_path, "w") as f:
        json.dump(header, f)
    config, restored = ckpt.restore_model(path)
    assert config == cfg and restored.model.layers[1].mlp.gate.weight[...].dtype == np.float32


def test_each_expert_row_is_its_own_file(saved):
    files = expert_chunk_files(saved)
    arrays = M.num_expert_layers(CFG) * len(EXPERT_NAMES)
    assert len(files) == arrays * CFG.n_routed_experts
    assert sorted({e for _, e in files}) == list(range(CFG.n_routed_experts))


def test_save_refuses_to_overwrite_and_wrong_config(params, saved, tmp_path):
    with pytest.raises(FileExistsError, match="never overwritten"):
        ckpt.save_model(saved, CFG, params)
    with pytest.raises(ValueError, match="different ModelConfig"):
        ckpt.save_model(str(tmp_path / "x"), CFG.replace(rms_norm_eps=1e-5), params)


# --- per-rank restore ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", range(PLACEMENT.num_ranks))
def test_rank_restore_creates_only_its_rows_on_its_device(params, saved, rank):
    device = jax.devices()[rank]
    restored = ckpt.restore_rank(saved, PLACEMENT, rank, device)
    start, stop = PLACEMENT.local_range(rank)
    assert len(restored.local) == M.num_expert_layers(CFG)
    for slab, full in zip(restored.local, params.experts, strict=True):
        assert slab.start == start and slab.count == PLACEMENT.local_experts == stop - start
        for name in EXPERT_NAMES:
            array = getattr(slab, name)
            assert array.devices() == {device}
            np.testing.assert_array_equal(np.asarray(array), np.asarray(getattr(full, name))[start:stop])
    leaves_equal(nnx.state(params.model), nnx.state(restored.model))
    assert all(leaf.devices() == {device} for leaf in jax.tree.leaves(nnx.state(restored.model)))


def test_rank_restore_never_reads_other_experts(params, copy):
    """Every other expert's files deleted: the rank restores exactly, while a whole restore fails."""
    rank = 1
    start, stop = PLACEMENT.local_range(rank)
    for (_, expert), file in expert_chunk_files(copy).items():
        if not start <= expert < stop:
            os.remove(file)
    restored = ckpt.restore_rank(copy, PLACEMENT, rank, jax.devices()[0])
    for slab, full in zip(restored.local, params.experts):
        np.testing.assert_array_equal(np.asarray(slab.w_down_EFD), np.asarray(full.w_down_EFD)[start:stop])
    with pytest.raises(ckpt.CheckpointError, match="partial or corrupt"):
        ckpt.restore_model(copy)
    with pytest.raises(ckpt.CheckpointError, match=r"rows \[0, 4\) of expert array 0/w_gate_EDF"):
        ckpt.restore_rank(copy, PLACEMENT, 0, jax.devices()[0])


def test_rank_restore_bytes_read_are_its_share(saved):
    """TensorStore's file byte counter: a rank reads the replicated weights and its own expert chunks, no more."""
    rank = 2
    start, stop = PLACEMENT.local_range(rank)
    own = sum(os.path.getsize(f) for (_, e), f in expert_chunk_files(saved).items() if start <= e < stop)
    others = sum(os.path.getsize(f) for (_, e), f in expert_chunk_files(saved).items() if not start <= e < stop)
    before = file_bytes_read()
    ckpt.restore_rank(saved, PLACEMENT, rank, jax.devices()[0])
    read = file_bytes_read() - before
    assert own <= read <= dir_bytes(os.path.join(saved, "model")) + own + 8192  # + the experts' .zarray headers
    assert read < dir_bytes(saved) - others + 8192


def test_dwdp_from_checkpoint_equals_whole_restore(saved):
    _, whole = ckpt.restore_model(saved)
    devices = jax.devices()[:PLACEMENT.num_ranks]
    from_whole = DwdpEngine(whole, PLACEMENT, devices)
    per_rank = DwdpEngine.from_checkpoint(saved, PLACEMENT, devices)
    batch = pack([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5]], budget=16)
    for rank in range(PLACEMENT.num_ranks):
        ours, theirs = per_rank.step(rank, batch).output, from_whole.step(rank, batch).output
        np.testing.assert_array_equal(ours.logits_TV, theirs.logits_TV)
        for a, b in zip(ours.expert_ids, theirs.expert_ids, strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(per_rank.step(0, batch).output.logits_TV, prefill(whole, batch).logits_TV,
                               rtol=1e-5, atol=1e-6)


def test_dep_restore_shards_experts_and_matches_reference(params, saved):
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("ep",))
    config, restored = ckpt.restore_dep(saved, mesh)
    leaves_equal(params, restored)
    for shard in restored.experts[0].w_gate_EDF.addressable_shards:
        assert shard.data.shape[0] == CFG.n_routed_experts // 4
    dep = DepRuntime(restored, 4, 16, devices=list(mesh.devices.flat))
    batch = pack([[7, 8, 9, 10, 11]], budget=16)
    out = dep.step([batch, None, None, None])[0]
    np.testing.assert_allclose(out.logits_TV, prefill(params, batch).logits_TV, rtol=1e-5, atol=1e-6)


# --- failures -----------------------------------------------------------------------------------------------

def edit_header(path, edit):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        header = json.load(f)
    edit(header)
    with open(file, "w") as f:
        json.dump(header, f)


def test_partial_checkpoint_without_config_json(copy):
    os.remove(os.path.join(copy, "config.json"))
    with pytest.raises(ckpt.CheckpointError, match="no config.json.*partial"):
        ckpt.restore_model(copy)


def test_partial_checkpoint_missing_array(copy):
    shutil.rmtree(os.path.join(copy, "model", "lm_head"))
    with pytest.raises(ckpt.CheckpointError, match="partial or corrupt"):
        ckpt.restore_model(copy)


def test_partial_checkpoint_missing_orbax_tree(copy):
    shutil.rmtree(os.path.join(copy, "experts"))
    with pytest.raises(ckpt.CheckpointError, match="Orbax tree is missing or unreadable"):
        ckpt.restore_rank(copy, PLACEMENT, 0, jax.devices()[0])


def test_corrupt_config_json(copy):
    with open(os.path.join(copy, "config.json"), "w") as f:
        f.write('{"format": "dwdp_jax.orbax_model", "vers')
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        ckpt.load_config(copy)
    with open(os.path.join(copy, "config.json"), "w") as f:
        f.write("[1, 2]")
    with pytest.raises(ckpt.CheckpointError, match="config.json holds a JSON list, expected an object"):
        ckpt.load_config(copy)
    assert not ckpt.is_orbax_checkpoint(copy)


def test_corrupt_expert_row_is_named(copy):
    """Expert 5's chunk replaced by expert 6's: valid data, wrong numbers; the CRC names the row."""
    files = expert_chunk_files(copy)
    shutil.copyfile(files[("1.w_up_EDF", 6)], files[("1.w_up_EDF", 5)])
    with pytest.raises(ckpt.CheckpointError, match="expert 5 of array experts/1/w_up_EDF fails its CRC32"):
        ckpt.restore_model(copy)
    with pytest.raises(ckpt.CheckpointError, match="expert 5 of array experts/1/w_up_EDF fails its CRC32"):
        ckpt.restore_rank(copy, PLACEMENT, 2, jax.devices()[0])  # rank 2 owns [4, 8)
    ckpt.restore_rank(copy, PLACEMENT, 0, jax.devices()[0])  # rank 0 owns [0, 4): untouched


def garble(file):
    with open(file, "r+b") as f:
        f.write(b"\x00garbage" * 8)


def test_garbled_expert_file(copy):
    garble(expert_chunk_files(copy)[("0.w_gate_EDF", 1)])
    with pytest.raises(ckpt.CheckpointError, match="rows \\[0, 4\\) of expert array 0/w_gate_EDF failed"):
        ckpt.restore_rank(copy, PLACEMENT, 0, jax.devices()[0])


def test_failed_restore_drops_only_closed_loop_reports(copy, monkeypatch):
    """A failed Orbax restore leaves TensorStore reads in flight (how many depends on timing); each, completing,
    finds Orbax's event loop closed and reports 'Event loop is closed' as an unraisable exception. From the restore on
    those are dropped, and every other unraisable exception still reaches the hook that was there."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    garble(expert_chunk_files(copy)[("0.w_gate_EDF", 1)])
    with pytest.raises(ckpt.CheckpointError, match="partial or corrupt"):
        ckpt.restore_model(copy)
    closed, other = (types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError(text), exc_traceback=None,
                                           err_msg=None, object=None)
                     for text in ("Event loop is closed", "something else"))
    sys.unraisablehook(closed)
    sys.unraisablehook(other)
    # reads still in flight from the restore may add reports of their own at any time; these two are the probe
    assert other in reported and closed not in reported


def test_garbled_expert_file_fails_without_stray_tracebacks(copy):
    """The command's one-line error, with none of the 'Event loop is closed' tracebacks of reads left in flight."""
    chunk = expert_chunk_files(copy)[("0.w_gate_EDF", 1)]
    garble(chunk)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--checkpoint={copy}", "--num_windows=4"],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "reading the Orbax tree 'experts' failed" in done.stderr and chunk in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr, done.stderr[-2000:]


def test_corrupt_replicated_weight_is_named(copy):
    edit_header(copy, lambda h: h["arrays"]["model"]["norm/weight"].update(crc32=12345))
    with pytest.raises(ckpt.CheckpointError, match="model/norm/weight fails its CRC32"):
        ckpt.restore_rank(copy, PLACEMENT, 0, jax.devices()[0])


@pytest.mark.parametrize("field,value,expected", [
    ("hidden_size", 48, "embed_tokens is float32\\[64, 32\\] in the checkpoint but its config.json implies "
                        "float32\\[64, 48\\]"),
    ("num_hidden_layers", 5, "lacks .* array\\(s\\) the config needs"),
    ("first_k_dense_replace", 2, "lacks 3 array\\(s\\) the config needs: \\[.layers/1/mlp/down_proj"),
    ("dtype", "bfloat16", "config does not match"),
])
def test_config_mismatch_names_the_array(copy, field, value, expected):
    edit_header(copy, lambda h: h["model_config"].update({field: value}))
    with pytest.raises(ckpt.CheckpointError, match=expected):
        ckpt.restore_model(copy)


def test_invalid_config_fields_and_foreign_formats(copy, tmp_path):
    edit_header(copy, lambda h: h["model_config"].update(n_group=3))
    with pytest.raises(ckpt.CheckpointError, match="invalid model_config.*n_routed_experts"):
        ckpt.load_config(copy)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    assert not ckpt.is_orbax_checkpoint(str(hf))
    with pytest.raises(ckpt.CheckpointError, match="load_hf_checkpoint"):
        ckpt.load_config(str(hf))


def test_placement_of_another_model_is_refused(saved):
    with pytest.raises(ValueError, match="placement.num_experts \\(16\\) must equal the checkpoint's n_routed_experts"):
        ckpt.restore_rank(saved, Placement.for_group(16, 2), 0, jax.devices()[0])


def test_convert_command_turns_an_hf_checkpoint_into_orbax(tmp_path):
    from test_checkpoint import hf_config, hf_tensors, write_checkpoint

    params = Params(*M.init_model(CFG, seed=3))
    hf_dir = write_checkpoint(tmp_path / "hf", hf_config(CFG), hf_tensors(CFG, params))
    out = str(tmp_path / "orbax")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "experiments.convert_checkpoint", f"--hf_dir={hf_dir}", f"--out={out}"]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    hf_config_loaded, hf_params = ckpt.load_hf_checkpoint(hf_dir)
    config, restored = ckpt.restore_model(out)
    assert config == hf_config_loaded
    leaves_equal(hf_params, restored)
    again = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "never overwritten" in again.stderr
    bad_dtype = subprocess.run([*command[:-1], f"--out={out}_2", "--dtype=bogus"], cwd=repo, capture_output=True,
                               text=True, timeout=300)
    assert bad_dtype.returncode == 2 and "Traceback" not in bad_dtype.stderr
    assert bad_dtype.stderr.strip().splitlines()[-1] == ("convert_checkpoint: --dtype='bogus' is not one of float32, "
                                                         "bfloat16, float16")

"""Distributed checkpoints: resharding round trips, atomic commits, pruning, manifests, verify (tiers 0 and 1).

The oracle for resharding is the original run: the full (gathered) parameters and AdamW state at save time,
and the parameters after one more step on the original layout. Every rank trains on the same batch, so FSDP2
averages identical gradients, which is exact in fp32 at 1, 2 and 4 ranks; the continuation must therefore
match bitwise at every layout, and any difference is a resharding bug.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import sparsetron
from sparsetron.checkpoint import Checkpointer, CheckpointError, read_manifest, verify
from sparsetron.checkpoint import dcp as checkpoint_dcp

SEED = 1234
STEP = 2
LAYOUT = {"dp_shard": -1, "note": "test"}
CONFIG_YAML = "model:\n  preset: toy\n"
TRAINER_STATE = {"step": STEP, "loader": {"epoch": 0, "offset": 96}, "losses": [1.5, 1.25]}


def build(hidden: int = 12, extra_layer: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A seeded 3-layer MLP, FSDP2-sharded per layer and at the root over the world; 10 rows shard unevenly."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 10), nn.Tanh(), nn.Linear(10, 6))
    if extra_layer:
        model.extend([nn.Tanh(), nn.Linear(6, 6)])
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """One AdamW step on a batch that depends only on ``step`` (same on every rank; global RNG untouched)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 6, generator=gen)
    ((model(x) - y) ** 2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and AdamW state tensor, gathered, under the key DCP stores it at (collective)."""
    out = {}
    for name, param in model.named_parameters():
        out[f"model.{name}"] = full(param)
        for field, value in sorted(optimizer.state[param].items()):
            out[f"optimizer.state.{name}.{field}"] = full(value)
    return out


def checkpointer(directory: str, keep_last: int = 3) -> Checkpointer:
    return Checkpointer(directory, keep_last=keep_last, layout=LAYOUT, config_yaml=CONFIG_YAML)


def rng_states() -> dict[str, torch.Tensor]:
    """This process's torch RNG states, as the checkpoint stores them."""
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}
    return {"cpu": torch.get_rng_state(), **cuda}


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), what
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, f"{what}: {key}"
        assert torch.equal(got[key], want[key]), (
            f"{what}: {key} differs by {(got[key] - want[key]).abs().max()}"
        )


# -- workers (module level: they are pickled by reference into the rank pools) -----------------------


def w_train_and_save(directory: str) -> dict:
    """Train STEP steps, save, then take one more step; report the oracle state around the save."""
    model, optimizer = build()
    for step in range(STEP):
        train_step(model, optimizer, step)
    torch.manual_seed(100 + dist.get_rank())  # distinct RNG streams, to see whose is restored at another size
    before = full_state(model, optimizer)
    rng_at_save = rng_states()
    path = checkpointer(directory).save(STEP, model, optimizer, TRAINER_STATE)
    train_step(model, optimizer, STEP)
    after = {k: v for k, v in full_state(model, optimizer).items() if k.startswith("model.")}
    return {"path": str(path), "before": before, "after": after, "rng": rng_at_save}


def w_load_save_step(source: str, directory: str) -> dict:
    """Load ``source`` at this world size, re-save it into ``directory``, then take one more step."""
    model, optimizer = build()
    ckpt = checkpointer(directory)
    trainer_state = ckpt.load(Path(source), model, optimizer)
    rng_after_load = rng_states()
    loaded = full_state(model, optimizer)
    path = ckpt.save(STEP, model, optimizer, trainer_state)
    train_step(model, optimizer, STEP)
    after = {k: v for k, v in full_state(model, optimizer).items() if k.startswith("model.")}
    return {
        "path": str(path),
        "loaded": loaded,
        "after": after,
        "rng": rng_after_load,
        "trainer_state": trainer_state,
    }


#: (step, function that fails, the rank it fails on, whether the scratch directory then holds a manifest).
#: _hash_tensors: one rank fails while reading back; build_manifest: all files written and hashed, no manifest
#: yet; fsync_dir: the manifest is written inside the scratch directory, which is not yet renamed.
INJECTED_FAILURES = (
    (2, "_hash_tensors", 1, False),
    (3, "build_manifest", 0, False),
    (4, "fsync_dir", 0, True),
)


def snapshot(directory: str) -> dict[str, bool]:
    """Entry name -> whether it holds a manifest."""
    return {p.name: (p / "manifest.json").exists() for p in sorted(Path(directory).iterdir())}


def w_atomic_saves(directory: str) -> dict:
    """A good save; saves that fail before the rename; a load of a wreck; an out-of-order save; a good save."""
    model, optimizer = build()
    ckpt = checkpointer(directory, keep_last=5)
    train_step(model, optimizer, 0)
    out = {"first": ckpt.save(1, model, optimizer, {"step": 1})}
    for step, seam, failing_rank, _ in INJECTED_FAILURES:
        injected = OSError(f"injected failure in {seam}")
        with (
            mock.patch.object(checkpoint_dcp, seam, side_effect=injected)
            if dist.get_rank() == failing_rank
            else contextlib.nullcontext(),
            pytest.raises(CheckpointError) as failure,
        ):
            ckpt.save(step, model, optimizer, {"step": step})
        out[step] = {"error": str(failure.value), "listing": snapshot(directory), "latest": ckpt.latest()}
        dist.barrier()  # every rank looks before rank 0's next save cleans up
        if step == 3:
            with pytest.raises(CheckpointError) as incomplete:
                ckpt.load(next(Path(directory).glob(".step-00000003.tmp-*")), model, optimizer)
            out["incomplete"] = str(incomplete.value)
    with pytest.raises(CheckpointError) as stale_step:
        ckpt.save(1, model, optimizer, {"step": 1})
    out["stale_step"] = str(stale_step.value)
    out["last"] = ckpt.save(5, model, optimizer, {"step": 5})
    out["listing"], out["latest"] = snapshot(directory), ckpt.latest()
    return out


def w_keep_last(directory: str) -> list[str]:
    """Four saves with keep_last=2, then a trainer state JSON would silently change (refused, nothing written)."""
    model, optimizer = build()
    ckpt = checkpointer(directory, keep_last=2)
    for step in range(1, 5):
        train_step(model, optimizer, step)
        ckpt.save(step * 10, model, optimizer, {"step": step * 10})
    with pytest.raises(TypeError, match=r"trainer_state\['loader'\]\[0\] has the non-str key 3"):
        ckpt.save(50, model, optimizer, {"loader": [{3: "shard"}]})
    with pytest.raises(TypeError, match=r"trainer_state\['pos'\] is a tuple"):
        ckpt.save(50, model, optimizer, {"pos": (1, 2)})
    return sorted(p.name for p in Path(directory).iterdir())


def w_load_into_wrong_model(source: str, missing: str) -> dict:
    """Loading into a wider or deeper model, or from a missing directory, fails and leaves the model untouched."""
    ckpt = checkpointer(str(Path(source).parent))
    out = {}
    for name, kwargs in (("wider", {"hidden": 14}), ("deeper", {"extra_layer": True})):
        model, optimizer = build(**kwargs)
        train_step(model, optimizer, 0)
        before = full_state(model, optimizer)
        with pytest.raises(CheckpointError) as mismatch:
            ckpt.load(source, model, optimizer)
        out[name] = str(mismatch.value)
        out[f"{name}_unchanged"] = all(
            torch.equal(before[k], v) for k, v in full_state(model, optimizer).items()
        )
    with pytest.raises(CheckpointError) as absent:
        ckpt.load(missing, model, optimizer)
    out["absent"] = str(absent.value)
    return out


def w_rng_resume(directory: str) -> dict:
    """Per-rank RNG streams (CPU, and CUDA where there is one) continue exactly where the save left them."""
    model, optimizer = build()
    torch.manual_seed(77 + dist.get_rank())
    torch.rand(3)
    ckpt = checkpointer(directory)
    path = ckpt.save(1, model, optimizer, {"step": 1})
    states_at_save, draws_after_save = rng_states(), torch.rand(5)
    torch.manual_seed(5)
    ckpt.load(path, model, optimizer)
    return {"expected": (states_at_save, draws_after_save), "got": (rng_states(), torch.rand(5))}


# -- tier 1 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reshard_chain(ranks, tmp_path_factory):
    """Save at 4 ranks, then load+re-save at 2, at 1 and back at 4: each hop loads the previous hop's save."""
    root = tmp_path_factory.mktemp("reshard")
    origin = ranks.run(4, w_train_and_save, str(root / "w4"), timeout=60)
    hops, source = {}, origin[0]["path"]
    for world in (2, 1, 4):
        hops[world] = ranks.run(world, w_load_save_step, source, str(root / f"hop{world}"), timeout=60)
        source = hops[world][0]["path"]
    return origin, hops


def test_reshard_4_to_2_to_1_to_4_is_bitwise(reshard_chain):
    origin, hops = reshard_chain
    assert any(k.endswith(".exp_avg_sq") for k in origin[0]["before"]), "optimizer state must exist"
    for world, results in hops.items():
        for rank, result in enumerate(results):
            what = f"hop to {world} ranks, rank {rank}"
            assert_bitwise_equal(result["loaded"], origin[0]["before"], f"{what}: loaded state")
            assert_bitwise_equal(result["after"], origin[0]["after"], f"{what}: one more step")
            assert result["trainer_state"] == TRAINER_STATE


def test_other_world_size_restores_rank0_rng(reshard_chain):
    origin, hops = reshard_chain
    assert not torch.equal(origin[0]["rng"]["cpu"], origin[1]["rng"]["cpu"])
    for rank, result in enumerate(hops[2]):
        assert result["rng"].keys() == origin[0]["rng"].keys()
        for device, state in result["rng"].items():
            assert torch.equal(state, origin[0]["rng"][device]), f"{device} RNG of rank {rank} of 2"


def test_manifest_records_versions_layout_and_full_tensor_hashes(reshard_chain):
    origin, hops = reshard_chain
    manifest = read_manifest(origin[0]["path"])
    assert manifest["sparsetron_version"] == sparsetron.__version__
    assert manifest["torch_version"] == torch.__version__
    assert manifest["step"] == STEP and manifest["world_size"] == 4
    assert manifest["layout"] == LAYOUT and manifest["config_yaml"] == CONFIG_YAML
    assert manifest["git_sha"] is None or len(manifest["git_sha"]) == 40
    assert manifest["created_utc"].endswith("+00:00")
    expected = {
        key: {"shape": list(t.shape), "dtype": str(t.dtype), "sha256": sha256(t)}
        for key, t in origin[0]["before"].items()
    }
    for rank, result in enumerate(origin):
        for device, state in result["rng"].items():
            expected[f"rng.rank-{rank:05d}.{device}"] = {
                "shape": list(state.shape),
                "dtype": str(state.dtype),
                "sha256": sha256(state),
            }
    assert manifest["tensors"] == expected
    state_file = Path(origin[0]["path"]) / "trainer_state.json"
    assert json.loads(state_file.read_text()) == TRAINER_STATE
    files = sorted(p for p in Path(origin[0]["path"]).iterdir() if p.name != "manifest.json")
    assert [p.name for p in files] == [
        ".metadata",
        *(f"__{r}_0.distcp" for r in range(4)),
        "trainer_state.json",
    ]
    assert manifest["files"] == {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in files
    }
    # Hashes are of global tensors, so the same state saved at any world size hashes the same.
    for world, results in hops.items():
        other = read_manifest(results[0]["path"])["tensors"]
        assert {k: v for k, v in other.items() if not k.startswith("rng.")} == {
            k: v for k, v in expected.items() if not k.startswith("rng.")
        }, f"hashes after the hop to {world} ranks"


def flip_byte(pristine: Path, copy: Path, find_offset) -> None:
    """Copy the checkpoint and flip one bit of its (single) data file at ``find_offset(raw bytes)``."""
    shutil.copytree(pristine, copy)
    data_file = copy / "__0_0.distcp"
    raw = bytearray(data_file.read_bytes())
    raw[find_offset(bytes(raw))] ^= 0x01
    data_file.write_bytes(bytes(raw))


def test_verify_detects_flipped_bytes_and_missing_files(reshard_chain, tmp_path):
    _, hops = reshard_chain
    pristine = Path(hops[1][0]["path"])  # saved by one rank: one data file, each tensor one contiguous chunk
    verify(pristine)

    key = "optimizer.state.2.weight.exp_avg_sq"
    data = hops[1][0]["loaded"][key].numpy().tobytes()
    flip_byte(pristine, tmp_path / "in_tensor", lambda raw: raw.index(data) + 5)
    with pytest.raises(
        CheckpointError, match=rf"tensor '{key}' \(stored in \['__0_0.distcp'\]\) does not match"
    ):
        verify(tmp_path / "in_tensor")

    # Each tensor entry is a torch.save zip. Its first bytes are the zip signature: the entry becomes unreadable.
    metadata = FileSystemReader(pristine).read_metadata()
    first_key, first = min(
        (
            (index.fqn, info.offset)
            for index, info in metadata.storage_data.items()
            if index.offset is not None
        ),
        key=lambda entry: entry[1],
    )
    flip_byte(pristine, tmp_path / "in_signature", lambda raw: first)
    with pytest.raises(CheckpointError, match=rf"\['{first_key}'\] in \['__0_0.distcp'\] cannot be read"):
        verify(tmp_path / "in_signature")
    # Its zip local header then holds the entry's name, which torch.load never reads: tensors stay intact.
    flip_byte(pristine, tmp_path / "in_header", lambda raw: first + 34)
    with pytest.raises(CheckpointError, match="file __0_0.distcp does not match the manifest"):
        verify(tmp_path / "in_header")

    missing = tmp_path / "missing"
    shutil.copytree(pristine, missing)
    (missing / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"data file __0_0\.distcp is missing"):
        verify(missing)
    no_state = tmp_path / "no_state"
    shutil.copytree(pristine, no_state)
    (no_state / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing: \['trainer_state.json'\]"):
        verify(no_state)


def test_failed_save_leaves_previous_checkpoint_and_next_save_cleans(ranks, tmp_path):
    results = ranks.run(2, w_atomic_saves, str(tmp_path), timeout=60)
    first, last = tmp_path / "step-00000001", tmp_path / "step-00000005"
    for rank, result in enumerate(results):
        for step, seam, failing_rank, wreck_has_manifest in INJECTED_FAILURES:
            failed = result[step]
            assert f"injected failure in {seam}" in failed["error"], f"rank {rank}"
            if failing_rank != 0:
                assert f"failed on ranks [{failing_rank}]" in failed["error"], f"rank {rank}"
            assert failed["latest"] == first, f"rank {rank}, failed save {step}"
            # The previous wreck was removed by this save; its own stays hidden until the next save.
            (wreck, has_manifest), complete = failed["listing"].items()
            assert wreck.startswith(f".step-0000000{step}.tmp-") and has_manifest == wreck_has_manifest
            assert complete == ("step-00000001", True)
        assert "incomplete: it has no manifest.json" in result["incomplete"]
        assert ".step-00000003.tmp-" in result["incomplete"]
        assert f"already holds the checkpoint {first}" in result["stale_step"]
        assert result["first"] == first and result["last"] == last == result["latest"]
        assert result["listing"] == {"step-00000001": True, "step-00000005": True}


def test_keep_last_keeps_the_newest(ranks, tmp_path):
    (listing,) = set(map(tuple, ranks.run(2, w_keep_last, str(tmp_path), timeout=60)))
    assert listing == ("step-00000030", "step-00000040")


def test_loading_a_different_model_fails_cleanly(ranks, reshard_chain, tmp_path):
    origin, _ = reshard_chain
    results = ranks.run(2, w_load_into_wrong_model, origin[0]["path"], str(tmp_path / "no"))
    for rank, result in enumerate(results):
        assert (
            "'model.0.weight' is shape [12, 8] float32 in the checkpoint but shape [14, 8]" in result["wider"]
        )
        assert origin[0]["path"] in result["wider"] and origin[0]["path"] in result["deeper"]
        assert "'model.6.weight' shape [6, 6] float32 is not in the checkpoint" in result["deeper"]
        assert (
            "'optimizer.state.6.bias.exp_avg' shape [6] float32 is not in the checkpoint" in result["deeper"]
        )
        assert "does not exist" in result["absent"] and str(tmp_path / "no") in result["absent"]
        assert result["wider_unchanged"] and result["deeper_unchanged"], (
            f"rank {rank}: a failed load changed it"
        )


def test_same_world_resume_restores_each_ranks_rng(ranks, tmp_path):
    results = ranks.run(2, w_rng_resume, str(tmp_path), timeout=60)
    assert not torch.equal(results[0]["expected"][1], results[1]["expected"][1])
    for rank, result in enumerate(results):
        (want_states, want_draws), (got_states, got_draws) = result["expected"], result["got"]
        assert got_states.keys() == want_states.keys()
        for device, state in got_states.items():
            assert torch.equal(state, want_states[device]), f"{device} RNG of rank {rank}"
        assert torch.equal(got_draws, want_draws), f"rank {rank}"


# -- tier 0 -------------------------------------------------------------------------------------------


def test_latest_ignores_scratch_and_incomplete_dirs(tmp_path):
    ckpt = checkpointer(str(tmp_path / "absent"))
    assert ckpt.latest() is None
    for name, complete in (
        ("step-00000005", True),
        ("step-00000009", False),
        (".step-00000012.tmp-ab12", True),
        ("step-12", True),
    ):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "manifest.json").write_text("{}")
    assert checkpointer(str(tmp_path)).latest() == tmp_path / "step-00000005"


@pytest.mark.parametrize("keep_last", [0, -1, 1.5, True])
def test_keep_last_must_be_positive(keep_last, tmp_path):
    with pytest.raises(ValueError, match=f"keep_last={keep_last!r} must be an integer >= 1"):
        Checkpointer(tmp_path, keep_last=keep_last, layout={}, config_yaml="")


def test_spread_by_bytes_assigns_every_key_once_and_balances():
    sizes = {f"k{i}": (i * 7919) % 1000 + 1 for i in range(200)}
    shares = checkpoint_dcp._spread_by_bytes(sizes, 4)
    assert sorted(k for share in shares for k in share) == sorted(sizes)
    loads = [sum(sizes[k] for k in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes.values())
    assert checkpoint_dcp._spread_by_bytes(sizes, 4) == shares  # every rank computes the same split


def test_layout_must_be_json_native(tmp_path):
    with pytest.raises(TypeError, match=r"layout\['mesh'\] is a tuple"):
        Checkpointer(tmp_path, keep_last=1, layout={"mesh": (2, 2)}, config_yaml="")


def test_read_manifest_names_missing_and_incomplete_dirs(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "step-00000001").mkdir()
    with pytest.raises(CheckpointError, match="is incomplete: it has no manifest.json"):
        read_manifest(tmp_path / "step-00000001")

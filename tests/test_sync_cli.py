"""`sparsetron sync serve` over a directory of checkpoints and `sparsetron sync pull` into safetensors, as
real processes over loopback TCP: the first pull anchors, the next one applies the new checkpoint's delta."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed.checkpoint as dcp
from launch_env import clean_env
from safetensors.torch import load_file

SECRET = "a shared secret for the test run"


def _checkpoint(directory, step: int, state: dict[str, torch.Tensor]) -> None:
    """A DCP checkpoint laid out as the trainer writes them (model.* keys, a manifest marks it complete)."""
    path = directory / f"step-{step:08d}"
    dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    (path / "manifest.json").write_text("{}")


def _cli(*args: str, env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparsetron.cli", "sync", *args],
        env=env,
        capture_output=True,
        text=True,
        **kwargs,
    )


def _wait_for(stream, needle: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        line = stream.readline()
        seen += line
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not printed within {timeout}s; got:\n{seen}")


def test_serve_checkpoints_and_pull_into_safetensors(tmp_path):
    env = clean_env() | {"SPARSETRON_SYNC_SECRET": SECRET}
    generator = torch.Generator().manual_seed(0)
    state = {
        "layers.0.w": torch.randn(64, 64, generator=generator).bfloat16(),
        "norm.weight": torch.ones(64),
    }
    checkpoints, into = tmp_path / "checkpoints", tmp_path / "rollout"
    _checkpoint(checkpoints, 1, state)
    serve = subprocess.Popen(
        [sys.executable, "-m", "sparsetron.cli", "sync", "serve", str(checkpoints), "--port", "0",
         "--poll", "0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        address = _wait_for(serve.stdout, "as version 0 on").split()[-1]
        first = _cli("pull", address, "--into", str(into), env=env, timeout=120)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "(anchor)" in first.stdout
        pulled = load_file(into / "model.safetensors")
        assert all(torch.equal(pulled[k], v) for k, v in state.items())

        state["layers.0.w"][3, :5] += 1
        _checkpoint(checkpoints, 2, state)
        _wait_for(serve.stdout, "version 1 (step-00000002)")
        second = _cli("pull", address, "--into", str(into), env=env, timeout=120)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "version 0 -> 1" in second.stdout and "5 changed elements" in second.stdout
        pulled = load_file(into / "model.safetensors")
        assert all(torch.equal(pulled[k], v) for k, v in state.items())
    finally:
        serve.kill()


def test_pull_without_a_secret_says_how_to_set_one(tmp_path):
    env = {k: v for k, v in clean_env().items() if k != "SPARSETRON_SYNC_SECRET"}
    result = _cli("pull", "127.0.0.1:1", "--into", str(tmp_path), env=env, timeout=60)
    assert result.returncode == 2
    assert "SPARSETRON_SYNC_SECRET" in " ".join(result.stderr.split())


def test_pull_from_nowhere_fails_cleanly_and_keeps_the_directory(tmp_path):
    env = clean_env() | {"SPARSETRON_SYNC_SECRET": SECRET}
    result = _cli("pull", "127.0.0.1:9", "--into", str(tmp_path / "out"), env=env, timeout=120)
    assert result.returncode == 1
    assert "pull failed" in " ".join(result.stderr.split())
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_training_run_serves_its_weights_live(tmp_path):
    """`sparsetron train --nproc 2 sync.serve=true`: rank 0 publishes every step; a subscriber following it
    ends bit-identical to the run's final checkpoint."""
    from sparsetron.sync.checkpoints import read_checkpoint_model
    from sparsetron.sync.subscriber import DeltaSubscriber
    from sparsetron.sync.tcp import SyncClient

    env = clean_env() | {"SPARSETRON_SYNC_SECRET": SECRET}
    port = _free_port()
    run = subprocess.Popen(
        [sys.executable, "-m", "sparsetron.cli", "train", "--nproc", "2", "model.preset=tiny",
         "train.seq_len=128", "train.global_batch_tokens=1024", "train.steps=6", "train.warmup_steps=1",
         "data.source=corpus", "parallel.dp_replicate=1", "parallel.dp_shard=2", f"train.run_dir={tmp_path}",
         "sync.serve=true", f"sync.port={port}", "sync.linger=120"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_for(run.stdout, f"as version 0 on 127.0.0.1:{port}", timeout=300)
        subscriber = DeltaSubscriber({})
        client = SyncClient("127.0.0.1", port, secret=SECRET.encode())
        deadline = time.monotonic() + 300
        while subscriber.version != 5 and time.monotonic() < deadline:
            subscriber.pull(client)
            time.sleep(0.2)
        assert subscriber.version == 5  # versions 0..5 after steps 1..6
        final = tmp_path / "checkpoints" / "step-00000006"
        while not (final / "manifest.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        for name, tensor in read_checkpoint_model(final).items():
            assert torch.equal(subscriber.tensors[name], tensor), name
        records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [r.get("sync_version") for r in records] == [None, 1, 2, 3, 4, 5]
        assert all(r["sync_payload_bytes"] > 0 for r in records[1:])
    finally:
        run.kill()

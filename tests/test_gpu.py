"""The CUDA paths of the trainer (meta-device init, bf16 mixed precision, NCCL FSDP2): GPU machine only."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from launch_env import clean_env

from sparsetron.config import load_config
from sparsetron.dist.preflight import check_job

pytestmark = pytest.mark.gpu

QUICK = [
    "model.preset=demo",
    "train.seq_len=1024",
    "train.global_batch_tokens=16384",
    "train.micro_batch_size=4",
    "train.steps=20",
    "train.warmup_steps=3",
    "train.lr=3e-3",
    "train.log_every=5",
    "data.source=corpus",
    "parallel.dp_replicate=1",
    "parallel.cp=1",
    "parallel.ep=1",
    "checkpoint.interval=0",
]


def _train_in_process(overrides: list[str], device_type: str, port: int) -> list[float]:
    from sparsetron.dist.env import default_backend
    from sparsetron.train.trainer import train

    if device_type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(
        default_backend(device_type),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(minutes=5),
    )
    try:
        cfg = load_config(None, overrides)
        return train(cfg, check_job(cfg, 1).build_mesh(device_type), device_type).losses
    finally:
        dist.destroy_process_group()


def test_bf16_training_on_one_gpu(tmp_path):
    losses = _train_in_process([*QUICK, "parallel.dp_shard=1", f"train.run_dir={tmp_path}"], "cuda", 29611)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0, losses
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["mfu"] is not None and record["mfu"] > 0


def test_bf16_matches_fp32_from_the_same_cuda_init(tmp_path):
    """Both runs materialise the same weights from the CUDA generator; bf16 may only cost rounding."""
    common = [*QUICK, "parallel.dp_shard=1", "train.steps=3"]
    bf16 = _train_in_process(
        [*common, "train.dtype=bf16", f"train.run_dir={tmp_path / 'bf16'}"], "cuda", 29612
    )
    fp32 = _train_in_process(
        [*common, "train.dtype=fp32", f"train.run_dir={tmp_path / 'fp32'}"], "cuda", 29613
    )
    assert abs(bf16[0] - fp32[0]) / fp32[0] < 1e-2, (bf16, fp32)


def _cli_train_on_two_gpus(*overrides: str) -> subprocess.CompletedProcess:
    """``sparsetron train --nproc 2`` on the quick demo config plus ``overrides``, in a clean environment."""
    argv = [sys.executable, "-m", "sparsetron.cli", "train", *QUICK, "cluster.device=cuda", *overrides]
    return subprocess.run(
        [*argv, "--nproc", "2"], env=clean_env(), capture_output=True, text=True, timeout=600
    )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp2_over_nccl_on_two_gpus_with_resume(tmp_path):
    layout = ["parallel.dp_shard=2", f"train.run_dir={tmp_path}"]
    first = _cli_train_on_two_gpus(*layout, "train.steps=20", "checkpoint.interval=10")
    assert first.returncode == 0, first.stdout + first.stderr
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert (Path(tmp_path) / "checkpoints" / "step-00000020" / "manifest.json").exists()
    extend = _cli_train_on_two_gpus(*layout, "train.steps=24")
    assert extend.returncode == 0, extend.stdout + extend.stderr
    assert "resumed from" in extend.stdout


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_expert_parallel_training_on_two_gpus(tmp_path):
    """EP=2 over NCCL: meta-device init of DTensor experts, all-to-all dispatch, experts sharded over edp."""
    result = _cli_train_on_two_gpus(
        "parallel.dp_shard=2",
        "parallel.ep=2",
        "model.router=sigmoid_bias",
        "model.aux_loss=none",
        f"train.run_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert steps[-1]["comm_bytes"] > 0 and len(steps[-1]["expert_tokens"][0]) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sparseloco_compression_on_cuda_matches_the_cpu_reference():
    """Error feedback + top-k + quantise on the GPU picks the CPU's entries; the payload packs on the device."""
    from sparsetron.parallel.data import wire
    from sparsetron.parallel.data.compress import ErrorFeedback

    delta = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    on_cpu = ErrorFeedback(topk=64, bits=2).compress("w", delta)
    on_gpu = ErrorFeedback(topk=64, bits=2).compress("w", delta.cuda())
    assert torch.equal(on_gpu.indices_NK.cpu(), on_cpu.indices_NK)
    torch.testing.assert_close(on_gpu.dense().cpu(), on_cpu.dense(), rtol=1e-5, atol=1e-6)
    item = wire.CompressedTensor(
        "w", (512, 1024), 4096, on_gpu.indices_NK, on_gpu.codes_NK, on_gpu.codebook, 2
    )
    (decoded,) = wire.decode(wire.encode([item]))
    assert torch.equal(decoded.indices_NK, on_gpu.indices_NK.cpu())
    assert torch.equal(decoded.codes_NK, on_gpu.codes_NK.cpu())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_sparseloco_training_over_nccl_on_two_gpus(tmp_path):
    """Two replicas (one GPU each) with overlapped outer steps: payloads all-gathered over NCCL, the run ends
    with both replicas' weights bit-identical (manifest hashes)."""
    from test_local_sgd_training import replica_hashes

    result = _cli_train_on_two_gpus(
        "parallel.dp_replicate=2",
        "parallel.dp_shard=1",
        "train.dp.algorithm=sparseloco",
        "train.dp.inner_steps=5",
        "train.dp.overlap=true",
        f"train.run_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    outer = [s for s in steps if "outer_payload_bytes" in s]
    assert [s["step"] for s in outer] == [5, 10, 15, 20] and outer[-1]["outer_ratio_vs_bf16"] > 30
    by_replica = replica_hashes(tmp_path / "checkpoints" / "step-00000020")
    assert len(by_replica) == 2 and by_replica["replica-00000"] == by_replica["replica-00001"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_weight_sync_between_cuda_tensors_is_bit_exact():
    """Change detection, digests and apply on the GPU: one host sync for the counts, compaction on device."""
    from sparsetron.sync.codec import bits_view
    from sparsetron.sync.publisher import DeltaPublisher
    from sparsetron.sync.subscriber import DeltaSubscriber

    generator = torch.Generator(device="cuda").manual_seed(0)
    trainer = {f"w{i}": torch.randn(1 << 16, device="cuda", generator=generator).bfloat16() for i in range(3)}
    publisher = DeltaPublisher(trainer)
    rollout = DeltaSubscriber({k: torch.zeros_like(v) for k, v in trainer.items()})
    rollout.apply(publisher.payloads_for(None), publisher.id)
    for _ in range(3):
        for tensor in trainer.values():
            where = torch.randint(0, tensor.numel(), (600,), device="cuda", generator=generator)
            bits_view(tensor)[where] += 1
        publisher.publish()
        rollout.apply(publisher.payloads_for(rollout.version), publisher.id)
        assert all(torch.equal(bits_view(trainer[k]), bits_view(rollout.tensors[k])) for k in trainer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_weight_sync_digest_is_the_same_on_cpu_and_gpu():
    """Publisher (GPU) and subscriber (CPU) must agree on every dtype width's digest, updates included."""
    from sparsetron.sync.digest import tensor_digest, updated_digest

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        info = torch.iinfo(dtype)
        bits = torch.randint(info.min, info.max, (300_007,), generator=generator, dtype=dtype)
        indices = torch.randperm(bits.numel(), generator=generator)[:5_000].sort().values
        new = torch.randint(info.min, info.max, (indices.numel(),), generator=generator, dtype=dtype)
        on_cpu = (tensor_digest(bits), updated_digest(7, indices, bits[indices], new))
        cuda = bits.cuda()
        on_gpu = (tensor_digest(cuda), updated_digest(7, indices.cuda(), cuda[indices.cuda()], new.cuda()))
        assert on_cpu == on_gpu, dtype

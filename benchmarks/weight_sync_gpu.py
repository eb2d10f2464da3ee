"""Trainer-side cost of publishing one version of an 8B-parameter bf16 state with 1% of elements changed.

The state lives on the GPU as ``--tensors`` tensors of 2²⁸ elements (30 → 8.05 B); a version changes 1% of
elements at random positions by 1–3 ulps. Timed (CUDA-synchronised wall clock, median of ``--reps``):

- detection: :meth:`ChangeTracker.find_changes` — the two Triton passes of ``sparsetron.kernels.bit_diff``
  (count per block, one host sync for all tensors, compact sorted positions + gather new/old bits); GB/s
  counts the current weights scanned (2 bytes per element), the anchor being "bitwise diff + compaction
  measured 1145 GB/s";
- anchor: the same detection in plain torch (compare + ``nonzero`` + two gathers per tensor), same run;
- digests: the per-tensor digest updates from the changed elements only;
- encode: :func:`sparsetron.sync.codec.encode` of the device-resident changes (index and value streams built
  on the GPU, only the coded streams copied to the host, zstd on ``--threads`` host threads);
- apply: a :class:`~sparsetron.sync.subscriber.DeltaSubscriber` whose weights are a second GPU copy at the
  previous version (a rollout worker) applies the payload: decoding on the host, then the pause, in which
  the changes are swapped into the GPU tensors and every tensor's digest is checked; checked bit-exact.

    python3 benchmarks/weight_sync_gpu.py [--tensors 30] [--density 0.01]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch

from sparsetron.sync.codec import TensorUpdate, bits_view, encode, payload_stats
from sparsetron.sync.digest import updated_digest
from sparsetron.sync.subscriber import DeltaSubscriber
from sparsetron.sync.tracker import ChangeTracker

ELEMENTS = 1 << 28


def _timed(fn, *args):
    """(seconds, result) of ``fn(*args)``, the GPU synchronised before and after."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn(*args)
    torch.cuda.synchronize()
    return time.perf_counter() - started, result


def _mutate(state: dict[str, torch.Tensor], density: float, generator: torch.Generator) -> None:
    for tensor in state.values():
        bits = bits_view(tensor)
        count = int(density * bits.numel())
        where = torch.randint(0, bits.numel(), (count,), device="cuda", generator=generator)
        bits[where] += torch.randint(1, 4, (count,), device="cuda", generator=generator).to(torch.int16)


def _torch_detect(tracker: ChangeTracker, state: dict[str, torch.Tensor]) -> list[tuple]:
    """The anchor: plain torch per tensor (compare, nonzero — a host sync each — and two gathers)."""
    found = []
    for name, tensor in state.items():
        current, published = bits_view(tensor).reshape(-1), tracker.published[name].reshape(-1)
        indices = (current != published).nonzero().squeeze(1)
        found.append((name, indices, current[indices], published[indices]))
    return found


def _digests(tracker: ChangeTracker, found: list[tuple]) -> dict[str, int]:
    return {name: updated_digest(tracker.digests[name], i, old, new) for name, i, new, old in found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=30)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--level", type=int, default=3, help="zstd level")
    parser.add_argument(
        "--bucket-elements", type=int, default=1 << 22, help="changed elements per codec bucket"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="cProfile one more encode (main thread)")
    args = parser.parse_args()
    generator = torch.Generator(device="cuda").manual_seed(0)
    state = {
        f"layers.{i}.weight": (0.02 * torch.randn(ELEMENTS, device="cuda", generator=generator)).bfloat16()
        for i in range(args.tensors)
    }
    numel = args.tensors * ELEMENTS
    initial_digest_s, tracker = _timed(ChangeTracker, state)
    _mutate(state, args.density, generator)

    # The rollout worker: its own GPU copy of the weights at the version before, and that version's digests.
    rollout = {name: bits.view(torch.bfloat16).clone() for name, bits in tracker.published.items()}
    subscriber = DeltaSubscriber(rollout)
    detect_times, anchor_times, digest_times, encode_times, apply_reports = [], [], [], [], []
    for _ in range(args.reps):
        seconds, found = _timed(tracker.find_changes, state)
        detect_times.append(seconds)
        seconds, reference = _timed(_torch_detect, tracker, state)
        anchor_times.append(seconds)
        assert all(torch.equal(a[1], b[1]) for a, b in zip(found, reference, strict=True))
        seconds, digests = _timed(_digests, tracker, found)
        digest_times.append(seconds)
        started = time.perf_counter()
        updates = [
            TensorUpdate(name, torch.bfloat16, (ELEMENTS,), i, n, o, digests[name]) for name, i, n, o in found
        ]
        payload = encode(
            updates, version=1, base_version=0, threads=args.threads, level=args.level,
            bucket_elements=args.bucket_elements,
        )  # fmt: skip
        encode_times.append(time.perf_counter() - started)
        for name, bits in tracker.published.items():  # back to the version before
            bits_view(rollout[name]).copy_(bits)
        subscriber.version, subscriber.publisher, subscriber.digests = 0, "bench", dict(tracker.digests)
        torch.cuda.synchronize()
        apply_reports.append(subscriber.apply([payload], "bench"))
        torch.cuda.synchronize()
    exact = all(torch.equal(bits_view(rollout[name]), bits_view(t)) for name, t in state.items())
    detect_s, anchor_s, digest_s, encode_s = (
        sorted(t)[len(t) // 2] for t in (detect_times, anchor_times, digest_times, encode_times)
    )
    ready_s, pause_s = (
        sorted(getattr(r, key) for r in apply_reports)[len(apply_reports) // 2]
        for key in ("ready_s", "pause_s")
    )
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(
            encode, updates, version=1, base_version=0, threads=args.threads, level=args.level,
            bucket_elements=args.bucket_elements,
        )  # fmt: skip
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(15)
    stats = payload_stats(payload)
    changed = stats["changed_elements"]
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "params": numel,
        "level": args.level,
        "bucket_elements": args.bucket_elements,
        "changed": changed,
        "initial_digest_s": initial_digest_s,
        "detect_s": detect_s,
        "detect_GBps": 2 * numel / detect_s / 1e9,
        "torch_detect_s": anchor_s,
        "torch_detect_GBps": 2 * numel / anchor_s / 1e9,
        "digest_s": digest_s,
        "encode_s": encode_s,
        "apply_decode_s": ready_s,
        "apply_pause_s": pause_s,
        "apply_threads": subscriber.threads,
        "apply_exact": exact,
        "payload_bytes": len(payload),
        "bits_per_changed": 8 * len(payload) / changed,
        "ratio_vs_bf16": 2 * numel / len(payload),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(
        "| params | changed | detect | GB/s scanned | torch anchor GB/s | ratio | digests | encode | payload "
        "| bits/change | ×bf16 | apply: decode | apply: pause | exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {numel / 1e9:.2f} B | {changed / numel:.2%} | {detect_s * 1e3:.1f} ms | {result['detect_GBps']:.0f} | "
        f"{result['torch_detect_GBps']:.0f} | {anchor_s / detect_s:.2f}× | "
        f"{digest_s * 1e3:.0f} ms | {encode_s * 1e3:.0f} ms | {len(payload) / 2**20:.0f} MiB | "
        f"{result['bits_per_changed']:.1f} | {result['ratio_vs_bf16']:.0f} | {ready_s * 1e3:.0f} ms "
        f"({subscriber.threads} threads) | {pause_s * 1e3:.0f} ms | {exact} |"
    )


if __name__ == "__main__":
    main()

"""Weight sync over a gloo process group (trainer rank → rollout ranks) and over shared memory."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sparsetron.sync.channels import feed_shared_memory, follow_shared_memory, sync_over_group
from sparsetron.sync.codec import bits_view
from sparsetron.sync.publisher import DeltaPublisher
from sparsetron.sync.shm import ShmPublisher, ShmSubscriber
from sparsetron.sync.subscriber import DeltaSubscriber, VersionGap


def _weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(64, 48, generator=generator).bfloat16(),
        "b": torch.randn(48, generator=generator),
    }


def _step(weights: dict[str, torch.Tensor], step: int) -> None:
    """A deterministic sparse change every rank can reproduce (stands in for the trainer's optimizer step)."""
    generator = torch.Generator().manual_seed(100 + step)
    for tensor in weights.values():
        flat = tensor.view(-1)
        where = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=generator)
        flat[where] += 0.5


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(bits_view(a[k]), bits_view(b[k])) for k in b)


def _group_sync() -> list[tuple[int, bool]]:
    rank = dist.get_rank()
    expected = _weights()
    publisher = DeltaPublisher(_weights()) if rank == 0 else None

    def fresh() -> DeltaSubscriber:
        return DeltaSubscriber({k: torch.zeros_like(v) for k, v in expected.items()})

    subscriber = None if rank == 0 else fresh()
    seen = []
    for step in range(5):
        if step:
            _step(expected, step)
            if publisher is not None:
                _step(publisher.tensors, step)
                publisher.publish()
        if rank == 2 and step == 3:
            subscriber = fresh()  # a restarted rollout rank: the group now holds mixed versions
        report = sync_over_group(dist.group.WORLD, 0, publisher=publisher, subscriber=subscriber)
        if subscriber is not None:
            assert _same(subscriber.tensors, expected), (rank, step)
            seen.append((subscriber.version, bool(report and report.anchored)))
    return seen


def test_group_sync_keeps_rollout_ranks_bit_exact(ranks):
    results = ranks.run(3, _group_sync, timeout=120)
    assert results[0] == []
    for rollout in results[1:]:
        assert [v for v, _ in rollout] == [0, 1, 2, 3, 4]
        # Step 0 bootstraps from the anchor; step 3 re-anchors everyone (one member restarted).
        assert [a for _, a in rollout] == [True, False, False, True, False]


def test_shared_memory_follower_applies_each_version_and_refuses_a_gap(tmp_path):
    name = f"sparsetron-test-{tmp_path.name[-12:]}"
    publisher = DeltaPublisher(_weights(), keep=4)
    with ShmPublisher(f"{name}-d", keep=2) as deltas, ShmPublisher(f"{name}-a", keep=1) as anchors:
        feed_shared_memory(publisher, deltas, anchors, anchor_every=4)
        with ShmSubscriber(f"{name}-d") as delta_feed, ShmSubscriber(f"{name}-a") as anchor_feed:
            follower = DeltaSubscriber({k: torch.zeros_like(v) for k, v in publisher.tensors.items()})
            assert follow_shared_memory(follower, delta_feed, anchor_feed) is None  # anchor applied, no delta
            assert follower.version == 0 and _same(follower.tensors, publisher.tensors)
            for step in (1, 2):
                _step(publisher.tensors, step)
                publisher.publish()
                feed_shared_memory(publisher, deltas, anchors, anchor_every=4)
                report = follow_shared_memory(follower, delta_feed, anchor_feed)
                assert report.to_version == step and _same(follower.tensors, publisher.tensors)
            for step in (3, 4):  # the follower sleeps through two versions
                _step(publisher.tensors, step)
                publisher.publish()
                feed_shared_memory(publisher, deltas, anchors, anchor_every=4)
            before = {k: v.clone() for k, v in follower.tensors.items()}
            with pytest.raises(VersionGap, match="holds version 4's delta but the subscriber is at 2"):
                follow_shared_memory(follower, delta_feed, anchor_feed)
            assert follower.version == 2 and _same(follower.tensors, before)
            late = DeltaSubscriber({k: torch.zeros_like(v) for k, v in publisher.tensors.items()})
            follow_shared_memory(late, delta_feed, anchor_feed)  # version 4 was an anchor
            assert late.version == 4 and _same(late.tensors, publisher.tensors)

"""Publisher ↔ subscriber over the two non-TCP paths: a torch.distributed group and shared memory.

- :func:`sync_over_group` (in-cluster): one collective over a process group holding the trainer's publishing
  rank and rollout ranks. The members report the versions they hold; the publisher plans once for all of
  them (one version held by all: the delta or merge from it; mixed versions or a new member: the anchor
  path) and broadcasts the payloads (gloo on CPU, NCCL on GPUs).
- :func:`feed_shared_memory` / :func:`follow_shared_memory` (colocated processes): the publisher writes each
  version's delta, and a periodic snapshot, into two shared-memory channels; a follower applies the newest delta
  when it continues from its version, bootstraps from the newest anchor, and otherwise raises
  :class:`~sparsetron.sync.subscriber.VersionGap` (it fell more than a version behind: pull over TCP).
"""

from __future__ import annotations

import torch.distributed as dist

from sparsetron.sync.broadcast import broadcast_bytes
from sparsetron.sync.publisher import DeltaPublisher
from sparsetron.sync.shm import ShmPublisher, ShmSubscriber
from sparsetron.sync.subscriber import ApplyReport, DeltaSubscriber, VersionGap


def sync_over_group(
    group, src: int, *, publisher: DeltaPublisher | None = None, subscriber: DeltaSubscriber | None = None
) -> ApplyReport | None:
    """Bring every subscriber in ``group`` to the publisher's latest version; collective over ``group``.

    ``src`` (a global rank) passes ``publisher``, every other member its ``subscriber``. Returns the
    member's apply report (None on ``src`` and when nothing was sent). Payload bytes travel as uint8
    tensors (on the current CUDA device for NCCL groups).
    """
    is_src = dist.get_rank() == src
    if is_src == (publisher is None) or (not is_src and subscriber is None):
        raise ValueError(
            f"rank {dist.get_rank()}: the src rank passes publisher=, every other rank subscriber="
        )
    held = [None] * dist.get_world_size(group)
    mine = None if is_src else (subscriber.version, subscriber.publisher)
    dist.all_gather_object(held, mine, group=group)
    plan = [None, 0]
    if is_src:
        followers = {h for h in held if h is not None}
        (version, publisher_id) = next(iter(followers)) if len(followers) == 1 else (None, None)
        have = version if publisher_id == publisher.id else None
        payloads = publisher.payloads_for(have)
        plan = [publisher.id, len(payloads)]
    dist.broadcast_object_list(plan, src=src, group=group)
    publisher_id, count = plan
    received = [broadcast_bytes(payloads[i] if is_src else None, src, group) for i in range(count)]
    if is_src or not received:
        return None
    return subscriber.apply(received, publisher_id)


def feed_shared_memory(
    publisher: DeltaPublisher, deltas: ShmPublisher, anchors: ShmPublisher, *, anchor_every: int = 8
) -> None:
    """After :meth:`DeltaPublisher.publish`: put the latest version's delta, and every ``anchor_every``
    versions (and at the first version fed) a snapshot for followers that start late."""
    latest = publisher.version
    if latest % anchor_every == 0 or anchors.latest is None:
        (anchor,) = publisher.payloads_for(None)
        anchors.put(latest, anchor)
    if latest > 0:
        (delta,) = publisher.payloads_for(latest - 1)
        deltas.put(latest, delta)


def follow_shared_memory(
    subscriber: DeltaSubscriber, deltas: ShmSubscriber, anchors: ShmSubscriber
) -> ApplyReport | None:
    """Apply what the shared-memory channels hold beyond the subscriber's version (see the module doc)."""
    if subscriber.version is None:
        anchor = anchors.get()
        if anchor is None:
            return None
        subscriber.apply([anchor[1]])
    newest = deltas.latest()
    if newest is None or newest <= subscriber.version:
        return None
    if newest != subscriber.version + 1:
        raise VersionGap(
            f"shared memory holds version {newest}'s delta but the subscriber is at {subscriber.version}; "
            "pull the missing versions over TCP (DeltaSubscriber.pull)"
        )
    found = deltas.get(subscriber.version)
    return None if found is None else subscriber.apply([found[1]])

"""RL weight sync over a shaped link: a trainer publishes a sparse bf16 delta, a rollout worker pulls it.

Two network namespaces ("hosts", see ``netns_link.py``) are joined by a veth link shaped with ``tc tbf`` on
both ends. In ``h1`` a publisher process encodes version 1 of an N-parameter bf16 state in which a fraction
``--density`` of the elements changed by ±1..3 ulps at random positions, and serves it through
:class:`~sparsetron.sync.tcp.SyncServer`; in ``h2`` a :class:`~sparsetron.sync.subscriber.DeltaSubscriber`
holding version 0 pulls it over :class:`~sparsetron.sync.tcp.SyncClient`, verifies and applies it, then checks
the changed positions' bits. Reported: payload size, its ratio to dense bf16 (2·N bytes), bits per changed
element, the publisher's encode time and the subscriber's time split into transfer, decode, verify, apply
(the rollout pause) and total. The subscriber pulls ``--pulls`` times, putting the changed positions back to
version 0 between pulls: the first pull is a fresh process's (its decode buffers are mapped as it goes), the
last a long-running rollout worker's (buffers kept from the version before); both totals are reported, the
breakdown is the last pull's. Needs root::

    python benchmarks/weight_sync_wan.py --params 1e9 --rate 1gbit none --out /tmp/weight_sync_wan.json

Memory: version 0 is all-zero bits, so its digests are 0 and the publisher builds the delta from seeded
random positions and values without holding the state; only the subscriber holds the N-element state
(2·N bytes), split into tensors of ``--tensor-elements`` like layers. The subscriber checks exactness by
regenerating the same positions and values, so no second full state is ever materialised.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import resource
import secrets
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from netns_link import LinkError, ShapedLink, measure_throughput

from sparsetron.sync.codec import TensorUpdate, bits_view, encode, payload_stats
from sparsetron.sync.digest import updated_digest
from sparsetron.sync.subscriber import DeltaSubscriber
from sparsetron.sync.tcp import SECRET_ENV, SyncClient, SyncServer

_LENGTH = struct.Struct("<Q")
_GIB = 1 << 30
# zstd and torch threads on each side: every core of the machine (2 on the CI-sized CPU machine).
_THREADS = os.cpu_count() or 1
_SUBSCRIBER_TIMEOUT_S = 1800


# ------------------------------------------------------------------------------------ the synthetic delta


def tensor_sizes(params: int, tensor_elements: int) -> list[int]:
    """Element counts of the state's tensors: full ``tensor_elements`` blocks, then the remainder."""
    full, rest = divmod(params, tensor_elements)
    return [tensor_elements] * full + ([rest] if rest else [])


def tensor_name(index: int) -> str:
    return f"layer{index:04d}"


def tensor_changes(seed: int, index: int, numel: int, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique changed positions (int64) and their new bits (int16: 0 ± 1..3 ulps) of one tensor.

    Deterministic in (seed, index), so the subscriber regenerates exactly what the publisher sent.
    """
    rng = np.random.default_rng([seed, index])
    # Geometric gaps give sorted unique positions with per-element probability `density`, in O(changed)
    # memory; drawing 10σ more gaps than expected makes running short of the tensor's end negligible.
    expected = numel * density
    gaps = rng.geometric(density, size=int(expected + 10 * math.sqrt(expected) + 10))
    positions = np.cumsum(gaps) - 1
    positions = positions[positions < numel]
    steps = rng.integers(1, 4, size=positions.size, dtype=np.int16)
    signs = rng.choice(np.array([-1, 1], dtype=np.int16), size=positions.size)
    return torch.from_numpy(positions), torch.from_numpy(steps * signs)


def delta_updates(sizes: list[int], seed: int, density: float) -> list[TensorUpdate]:
    """Version 0 → 1 updates of an all-zero state: old bits are 0, so the digest after is from 0."""
    updates = []
    for index, numel in enumerate(sizes):
        indices, new = tensor_changes(seed, index, numel, density)
        old = torch.zeros_like(new)
        digest = updated_digest(0, indices, old_bits=old, new_bits=new)
        # `base` = the old bits, so values are diff-coded as on a real one-version delta.
        updates.append(TensorUpdate(tensor_name(index), torch.bfloat16, (numel,), indices, new, old, digest))
    return updates


def max_rss_gib() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


# -------------------------------------------------------------------------------------------- publisher


def pull_handler(publisher_id: str, payload: bytes):
    """A SyncServer handler serving the one delta 0 → 1 in DeltaPublisher.handler's stream format."""

    def handler(request: dict):
        if request.get("op") != "pull" or request.get("have") != 0:
            raise ValueError(f"this benchmark serves only a pull from version 0, got {request!r}")
        yield json.dumps({"publisher": publisher_id, "latest": 1, "payloads": 1}).encode() + b"\n"
        yield _LENGTH.pack(len(payload))
        yield payload

    return handler


def run_publisher(args: argparse.Namespace) -> None:
    """Encode the delta, serve it, print port and costs as one JSON line, serve until stdin closes."""
    sizes = tensor_sizes(args.params, args.tensor_elements)
    started = time.perf_counter()
    updates = delta_updates(sizes, args.seed, args.density)
    generated = time.perf_counter()
    payload = encode(updates, version=1, base_version=0, threads=_THREADS)
    encoded = time.perf_counter()
    del updates  # the publisher keeps only the payload while serving
    stats = payload_stats(payload)
    publisher_id = secrets.token_hex(8)
    secret = os.environ[SECRET_ENV].encode()
    with SyncServer(pull_handler(publisher_id, payload), secret=secret, host=args.host) as server:
        line = {
            "port": server.address[1],
            "publisher": publisher_id,
            "generate_digest_s": generated - started,
            "encode_s": encoded - generated,
            "payload_bytes": len(payload),
            "changed": stats["changed_elements"],
            "index_bytes": stats["index_bytes"],
            "value_bytes": stats["value_bytes"],
            "index_codings": stats["index_codings"],
            "max_rss_gib": max_rss_gib(),
        }
        print(json.dumps(line), flush=True)
        sys.stdin.read()  # the orchestrator closes stdin once the subscriber is done


# ------------------------------------------------------------------------------------------- subscriber


class TimedClient:
    """A SyncClient whose requests are timed: request sent until the END frame after the last byte."""

    def __init__(self, client: SyncClient) -> None:
        self.client = client
        self.seconds = 0.0

    def request(self, message: dict, sink=None):
        started = time.perf_counter()
        try:
            return self.client.request(message, sink)
        finally:
            self.seconds += time.perf_counter() - started


def reset_changed(tensors: dict[str, torch.Tensor], seed: int, density: float) -> None:
    """Put every changed position back to version 0's bits (zero), O(changed)."""
    for index, tensor in enumerate(tensors.values()):
        indices, _ = tensor_changes(seed, index, tensor.numel(), density)
        bits_view(tensor)[indices.to(tensor.device)] = 0


def changed_bits_match(tensors: dict[str, torch.Tensor], seed: int, density: float) -> bool:
    """Whether every changed position holds the expected new bits (O(changed), regenerated from the seed)."""
    for index, tensor in enumerate(tensors.values()):
        indices, new = tensor_changes(seed, index, tensor.numel(), density)
        if not torch.equal(bits_view(tensor)[indices.to(tensor.device)].cpu(), new):
            return False
    return True


def run_subscriber(args: argparse.Namespace) -> None:
    """Hold version 0, pull and apply version 1, check it, print the report and timings as JSON."""
    sizes = tensor_sizes(args.params, args.tensor_elements)
    # torch.zeros writes the pages, so the state is resident before the pull as a live model's would be.
    device = torch.device(args.device)
    tensors = {
        tensor_name(i): torch.zeros(n, dtype=torch.bfloat16, device=device) for i, n in enumerate(sizes)
    }
    subscriber = DeltaSubscriber(tensors, threads=args.threads)
    client = TimedClient(SyncClient(args.host, args.port, secret=os.environ[SECRET_ENV].encode()))
    totals, exact = [], True
    for pull in range(args.pulls):
        if pull:
            reset_changed(tensors, args.seed, args.density)
        # Version 0 is all-zero bits, whose digest is 0: set the state a previous pull would have left.
        subscriber.version, subscriber.publisher = 0, args.publisher
        subscriber.digests = dict.fromkeys(tensors, 0)
        client.seconds = 0.0
        last = pull == args.pulls - 1
        profiler = cProfile.Profile() if args.profile and last else None
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        report = subscriber.pull(client, retries=1)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        totals.append(time.perf_counter() - started)
        checked = time.perf_counter()
        exact &= subscriber.version == 1 and changed_bits_match(tensors, args.seed, args.density)
    client.client.close()
    total = totals[-1]
    line = {
        "first_total_s": totals[0],
        "pulls": args.pulls,
        "transfer_s": client.seconds,
        "decode_s": report.decode_s,
        "verify_s": report.verify_s,
        "ready_s": report.ready_s,
        "apply_s": report.pause_s,
        "total_s": total,
        "threads": subscriber.threads,
        "changed": report.changed,
        "payload_bytes": report.payload_bytes,
        "exact": exact,
        "check_s": time.perf_counter() - checked,
        "scratch_gib": subscriber.scratch.nbytes / _GIB,
        "max_rss_gib": max_rss_gib(),
        "device": args.device,
    }
    print(json.dumps(line), flush=True)


# ----------------------------------------------------------------------------------------- orchestrator


def side_command(args: argparse.Namespace, role: str, host: str, *extra: str) -> list[str]:
    """This script's command line for one side (run inside a namespace)."""
    return [
        sys.executable, str(Path(__file__).resolve()), "--role", role, "--host", host,
        "--params", str(args.params[0]), "--density", str(args.density), "--seed", str(args.seed),
        "--tensor-elements", str(args.tensor_elements), "--device", args.device,
        "--pulls", str(args.pulls), *(["--threads", str(args.threads)] if args.threads else []), *extra,
    ]  # fmt: skip


def run_once(args: argparse.Namespace, params: int, rate: str | None) -> dict:
    """One publish + pull of ``params`` elements over a fresh link shaped to ``rate`` (None: unshaped)."""
    side_args = argparse.Namespace(**{**vars(args), "params": [params]})
    env = os.environ | {SECRET_ENV: secrets.token_hex(16), "OMP_NUM_THREADS": str(_THREADS)}
    with ShapedLink(rate=rate) as link:
        h1, h2 = link.hosts
        mbit = measure_throughput(link)["h1->h2"]
        publisher = subprocess.Popen(
            h1.exec(*side_command(side_args, "publisher", h1.ip)),
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            pub = json.loads(publisher.stdout.readline())
            extra = ["--port", str(pub["port"]), "--publisher", pub["publisher"]]
            if args.profile:
                extra += ["--profile", args.profile]
            sub_proc = subprocess.run(
                h2.exec(*side_command(side_args, "subscriber", h1.ip, *extra)),
                env=env, stdout=subprocess.PIPE, text=True, check=True, timeout=_SUBSCRIBER_TIMEOUT_S,
            )  # fmt: skip
            sub = json.loads(sub_proc.stdout)
        finally:
            publisher.stdin.close()
            publisher.wait(timeout=60)
    return summarise(params, rate, mbit, pub, sub)


def summarise(params: int, rate: str | None, mbit: float, pub: dict, sub: dict) -> dict:
    payload = pub["payload_bytes"]
    # Decoding and verifying overlap the transfer; what is left after the last byte is `ready_s`.
    parts = sub["transfer_s"] + sub["ready_s"] + sub["apply_s"]
    return {
        "params": params,
        "link": rate or "none",
        "measured_mbit": mbit,
        "payload_bytes": payload,
        "ratio_vs_bf16": 2 * params / payload,
        "changed": pub["changed"],
        "bits_per_changed": 8 * payload / pub["changed"],
        "index_bytes": pub["index_bytes"],
        "value_bytes": pub["value_bytes"],
        "index_codings": pub["index_codings"],
        "generate_digest_s": pub["generate_digest_s"],
        "encode_s": pub["encode_s"],
        "device": f"{sub['device']}, {sub['threads']} threads",
        **{k: sub[k] for k in ("transfer_s", "decode_s", "verify_s", "ready_s", "apply_s", "total_s")},
        "first_total_s": sub["first_total_s"],
        "pulls": sub["pulls"],
        "subscriber_scratch_gib": sub["scratch_gib"],
        # Outside transfer, tail and apply: connecting, bookkeeping.
        "other_s": sub["total_s"] - parts,
        "exact": sub["exact"],
        "publisher_max_rss_gib": pub["max_rss_gib"],
        "subscriber_max_rss_gib": sub["max_rss_gib"],
    }


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| params | link | subscriber | payload MB | ratio vs bf16 | bits/changed | encode s | transfer s "
        "| decode s (Σ threads) | verify s (Σ) | after last byte s | apply s | total s | first pull s |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        params = f"{r['params']:.0e}".replace("e+0", "e")
        lines.append(
            f"| {params} | {r['link']} | {r['device']} | {r['payload_bytes'] / 1e6:.1f} "
            f"| {r['ratio_vs_bf16']:.0f}× | {r['bits_per_changed']:.2f} | {r['encode_s']:.2f} "
            f"| {r['transfer_s']:.2f} | {r['decode_s']:.2f} | {r['verify_s']:.2f} | {r['ready_s']:.2f} "
            f"| {r['apply_s']:.2f} | {r['total_s']:.2f} | {r['first_total_s']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[1e9], help="State sizes N to run.")
    parser.add_argument("--density", type=float, default=0.01, help="Fraction of elements changed.")
    parser.add_argument(
        "--rate", nargs="+", default=["1gbit"], help="tc rates of the link; 'none': unshaped."
    )
    parser.add_argument("--tensor-elements", type=int, default=1 << 28, help="Elements per tensor (layer).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cpu", help="Where the subscriber holds its state (a rollout worker: 'cuda')."
    )
    parser.add_argument("--threads", type=int, help="Subscriber decode threads (default: its own choice).")
    parser.add_argument(
        "--pulls", type=int, default=2, help="Pulls of the same version (the last one is the breakdown)."
    )
    parser.add_argument("--profile", help="Subscriber: write a cProfile of the last pull to this path.")
    parser.add_argument("--out", help="Write the rows as JSON here.")
    # Internal: how the orchestrator starts each side inside its namespace.
    parser.add_argument("--role", choices=("publisher", "subscriber"), help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--publisher", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.params = [int(p) for p in args.params]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(_THREADS)
    if args.role is not None:
        args.params = args.params[0]
        (run_publisher if args.role == "publisher" else run_subscriber)(args)
        return 0
    rows = []
    try:
        for params in args.params:
            for rate in args.rate:
                row = run_once(args, params, None if rate.lower() == "none" else rate)
                print(json.dumps(row), flush=True)
                rows.append(row)
    except LinkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

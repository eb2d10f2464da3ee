"""``sparsetron sync serve`` and ``sparsetron sync pull``: weight sync between processes and hosts.

``serve`` publishes the model of the newest checkpoint in a directory (a running ``sparsetron train`` with
``checkpoint.interval`` set writes them) and every newer one as the next version, over TCP with a shared
secret. ``pull`` keeps a safetensors directory at the newest version (``--follow`` keeps pulling).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sparsetron.sync.errors import SyncError

DEFAULT_PORT = 7731

sync_app = typer.Typer(
    help="Serve or pull lossless sparse weight deltas between a trainer and rollout workers.",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)

SecretFile = Annotated[
    Path | None,
    typer.Option(
        help="File holding the shared secret (default: the SPARSETRON_SYNC_SECRET environment variable)."
    ),
]


def read_secret(secret_file: Path | None) -> bytes:
    """:func:`~sparsetron.sync.tcp.load_secret`, exiting 2 with its message when there is none."""
    from sparsetron.sync.tcp import load_secret

    try:
        return load_secret(secret_file)
    except ValueError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}")
        raise typer.Exit(2) from exc


@sync_app.command("serve")
def serve(
    checkpoints: Annotated[
        Path, typer.Argument(help="Directory of step-* checkpoints (a run's checkpoints/).")
    ],
    host: Annotated[str, typer.Option(help="Address to bind; loopback unless you open it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = DEFAULT_PORT,
    secret_file: SecretFile = None,
    poll: Annotated[float, typer.Option(help="Seconds between looks for a newer checkpoint.")] = 2.0,
    keep: Annotated[int, typer.Option(help="Versions kept for lagging subscribers.")] = 8,
    versions: Annotated[
        int, typer.Option(help="Stop after publishing this many new versions (0: run on).")
    ] = 0,
) -> None:
    """Publish the newest checkpoint's model and every newer checkpoint as the next version."""
    from sparsetron.sync.checkpoints import latest_checkpoint, read_checkpoint_model
    from sparsetron.sync.publisher import DeltaPublisher
    from sparsetron.sync.tcp import SyncServer

    secret = read_secret(secret_file)
    current = latest_checkpoint(checkpoints)
    while current is None:
        out.print(f"waiting for a checkpoint in {checkpoints} ...")
        time.sleep(poll)
        current = latest_checkpoint(checkpoints)
    tensors = read_checkpoint_model(current)
    publisher = DeltaPublisher(tensors, keep=keep)
    with SyncServer(publisher.handler, secret=secret, host=host, port=port) as server:
        out.print(
            f"serving {current.name} as version 0 on {server.address[0]}:{server.address[1]}", highlight=False
        )
        while True:
            time.sleep(poll)
            newest = latest_checkpoint(checkpoints)
            if newest is None or newest == current:
                continue
            for name, tensor in read_checkpoint_model(newest).items():
                tensors[name].copy_(tensor)
            report = publisher.publish()
            current = newest
            out.print(
                f"version {report.version} ({newest.name}): {report.changed_fraction:.3%} changed, "
                f"{report.payload_bytes:,} bytes ({report.bits_per_changed:.1f} bits per change, "
                f"×{report.ratio_vs_bf16:,.0f} vs dense bf16), encode {report.encode_s * 1e3:.0f} ms",
                highlight=False,
            )


@sync_app.command("pull")
def pull(
    server: Annotated[str, typer.Argument(help="HOST:PORT of `sparsetron sync serve`.")],
    into: Annotated[Path, typer.Option(help="Directory kept at the newest version (model.safetensors).")],
    secret_file: SecretFile = None,
    follow: Annotated[bool, typer.Option(help="Keep pulling every --interval seconds.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between pulls with --follow.")] = 2.0,
) -> None:
    """Bring a safetensors directory to the publisher's newest version (verified, atomic)."""
    from sparsetron.sync.checkpoints import SafetensorsDir
    from sparsetron.sync.subscriber import DeltaSubscriber
    from sparsetron.sync.tcp import SyncClient

    secret = read_secret(secret_file)
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        err.print(
            f"[bold red]error:[/bold red] server={server!r} must be HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}"
        )
        raise typer.Exit(2)
    target = SafetensorsDir(into)
    tensors, state = target.load()
    subscriber = DeltaSubscriber(tensors)
    if state:
        subscriber.version, subscriber.publisher = state["version"], state["publisher"]
        subscriber.digests = {k: int(v) for k, v in state["digests"].items()}
    client = SyncClient(host, int(port), secret=secret)
    while True:
        try:
            report = subscriber.pull(client)
        except (SyncError, ValueError) as exc:
            err.print(
                f"[bold red]error:[/bold red] pull failed, {into} stays at version {subscriber.version}: {exc}"
            )
            raise typer.Exit(1) from exc
        if report is not None:
            target.save(
                subscriber.tensors,
                {
                    "version": subscriber.version,
                    "publisher": subscriber.publisher,
                    "digests": {k: str(v) for k, v in subscriber.digests.items()},
                },
            )
            out.print(
                f"version {report.from_version} -> {report.to_version}: {report.payload_bytes:,} bytes, "
                f"{report.changed:,} changed elements, transfer {report.transfer_s * 1e3:.0f} ms, "
                f"decode {report.decode_s * 1e3:.0f} ms, verify {report.verify_s * 1e3:.0f} ms, "
                f"apply {report.pause_s * 1e3:.0f} ms" + (" (anchor)" if report.anchored else ""),
                highlight=False,
            )
        elif not follow:
            out.print(f"{into} is at the newest version ({subscriber.version})", highlight=False)
        if not follow:
            return
        time.sleep(interval)

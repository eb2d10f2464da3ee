"""``sparsetron``: one entry point for training, launching, conversion, weight sync, benchmarks and configs.

Positional arguments of ``train`` and ``config`` are YAML files (merged left to right) and ``key=value``
overrides (applied last), e.g.::

    sparsetron train configs/train/demo.yaml configs/parallel/cp2-ring.yaml train.steps=20 --nproc 4
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from sparsetron.config import (
    ConfigError,
    default_run_config,
    field_docs,
    load_config,
    to_yaml,
    write_resolved,
)
from sparsetron.dist.errors import LayoutError
from sparsetron.parallel.context.sparse_report import (
    PATTERNS,
    SparseCPReport,
    SparseCPSpec,
    sparse_cp_report,
)
from sparsetron.sync.cli import sync_app

app = typer.Typer(
    name="sparsetron",
    help=(
        "Train Mixture-of-Experts language models on very long contexts across many processes: "
        "context, expert and communication parallelism. Start with `sparsetron train --nproc 4` "
        "(the CPU demo) or `sparsetron config show CONFIG`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Print, check and document job configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Prepare token stores for training.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(sync_app, name="sync")
bench_app = typer.Typer(
    help=(
        "Benchmarks that run from the installed package, on the CPU (`sparsetron bench` lists them). The GPU "
        "and multi-process benchmarks are scripts in the source repository (not installed): benchmarks/*.py, "
        "with their results in benchmarks/RESULTS.md."
    ),
)
app.add_typer(bench_app, name="bench")

stderr = Console(stderr=True)
stdout = Console()

ARGS_HELP = "YAML config files (merged left to right) and key=value overrides (applied last)."
ArgsT = Annotated[list[str] | None, typer.Argument(help=ARGS_HELP)]


def _split_args(args: list[str] | None, *, default_config: bool) -> tuple[list[str], list[str]]:
    files = [a for a in args or [] if "=" not in a]
    overrides = [a for a in args or [] if "=" in a]
    if not files and default_config:
        files = [str(default_run_config())]
    return files, overrides


def _fail(message: str, code: int = 2) -> typer.Exit:
    stderr.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load(args: list[str] | None, *, default_config: bool = False):
    files, overrides = _split_args(args, default_config=default_config)
    try:
        return load_config(files, overrides)
    except ConfigError as exc:
        raise _fail(str(exc)) from exc


@config_app.command("show")
def config_show(args: ArgsT = None) -> None:
    """Print the resolved config (defaults < model preset < files < overrides) as YAML."""
    stdout.print(to_yaml(_load(args)), end="", highlight=False)


@config_app.command("check")
def config_check(
    args: ArgsT = None,
    world_size: Annotated[
        int | None,
        typer.Option(
            "--world-size",
            "-n",
            help="Processes to check for (default: cluster.nodes × cluster.procs_per_node).",
        ),
    ] = None,
) -> None:
    """Validate a config for a world size, without starting anything; exit 2 with every problem and a fix."""
    from sparsetron.dist.preflight import check_job, cp_node_size

    cfg = _load(args)
    world = world_size if world_size is not None else cfg.cluster.nodes * cfg.cluster.procs_per_node
    try:
        dims = check_job(cfg, world)
    except LayoutError as exc:
        raise _fail(str(exc)) from exc
    ring = ""
    if cfg.parallel.cp_method.value == "sparse_ring" and dims.cp > 1:
        node_size = cp_node_size(cfg)
        hierarchy = (
            f"{dims.cp // node_size} nodes × {node_size}, hierarchical" if node_size < dims.cp else "flat"
        )
        ring = f", sparse ring: {hierarchy}"
    stdout.print(f"ok: {dims} (edp={dims.edp}, cp_ring={dims.cp_ring}{ring})")


@config_app.command("docs")
def config_docs(
    section: Annotated[
        str | None, typer.Argument(help="Only keys under this section, e.g. parallel or train.dp.")
    ] = None,
) -> None:
    """List every config key with its default and meaning."""
    from omegaconf import OmegaConf

    from sparsetron.config import Config

    defaults = OmegaConf.structured(Config)
    table = Table(title="sparsetron config keys")
    for column in ("key", "default", "meaning"):
        table.add_column(column)
    shown = 0
    for key, doc in field_docs().items():
        if section and not (key == section or key.startswith(section + ".")):
            continue
        value = OmegaConf.select(defaults, key)
        if OmegaConf.is_dict(value):
            continue
        table.add_row(key, str(value.value if hasattr(value, "value") else value), doc)
        shown += 1
    if not shown:
        raise _fail(
            f"no config keys under '{section}'; sections: model, parallel, train, train.dp, data, checkpoint, cluster"
        )
    stdout.print(table)


@app.command(context_settings={"allow_interspersed_args": True})
def train(
    args: Annotated[
        list[str] | None,
        typer.Argument(help=ARGS_HELP + " Without a file, the embedded demo (configs/train/demo.yaml)."),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc", "-n", help="Local processes to start with torchrun (default: cluster.procs_per_node)."
        ),
    ] = None,
) -> None:
    """Train. With --nproc N (or cluster.procs_per_node > 1) starts N local processes through torchrun;
    under an existing launcher (torchrun, srun, mpirun) runs this process's rank directly."""
    import os

    from sparsetron.dist.preflight import check_job

    cfg = _load(args, default_config=True)
    launched = any(
        v in os.environ for v in ("RANK", "SLURM_STEP_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    )
    if launched and nproc is not None:
        raise _fail(
            "--nproc starts local processes, but this process already runs under a launcher; drop --nproc."
        )
    from sparsetron.dist import discover

    world = (
        discover().world_size if launched else (nproc if nproc is not None else cfg.cluster.procs_per_node)
    )
    try:
        check_job(cfg, world)
    except LayoutError as exc:
        raise _fail(str(exc)) from exc
    from sparsetron.train import worker

    if launched:
        # Every rank resolved the same inputs to the same config; rank 0 records it.
        if discover().rank == 0:
            write_resolved(cfg, cfg.train.run_dir)
        raise typer.Exit(worker.run(cfg))
    resolved = write_resolved(cfg, cfg.train.run_dir)
    stdout.print(f"resolved config written to {resolved}; starting {world} process(es)")
    raise typer.Exit(_torchrun(world, ["-m", "sparsetron.train.worker", str(resolved)]))


def _torchrun(nproc: int, command: list[str]) -> int:
    """Run ``command`` on ``nproc`` local processes through torchrun's own machinery (``torch.distributed.run``)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    module = command[1] if command[:1] == ["-m"] else None
    script_args = command[2:] if module else command[1:]
    argv = ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0"]
    argv += ["--module", module, *script_args] if module else [command[0], *script_args]
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as exc:
        stderr.print(
            f"[bold red]error:[/bold red] {exc.get_first_failure()[1].message if exc.failures else exc}"
        )
        stderr.print(str(exc))
        return 1
    return 0


@data_app.command("prepare")
def data_prepare(
    inputs: Annotated[list[Path], typer.Argument(help="Text files; each is one document.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory of the zarr token store to create.")],
    tokenizer: Annotated[
        str, typer.Option(help="bytes (built in) or the name/path of an installed HF tokenizer.")
    ] = "bytes",
) -> None:
    """Tokenise text files into a zarr token store (tokens + document boundaries) for data.source=zarr."""
    from sparsetron.train.data import prepare_cli

    try:
        stats = prepare_cli([str(p) for p in inputs], str(out), tokenizer)
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    stdout.print(str(stats), highlight=False)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory holding metrics.jsonl.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write the PNGs (default RUN_DIR/report).")
    ] = None,
) -> None:
    """Plot a run: loss and lr, tokens/s, expert load per layer, grad norm (PNGs) plus a text summary."""
    from sparsetron.train.report import make_report

    try:
        result = make_report(run_dir, out)
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    stdout.print(result.summary, highlight=False)
    for png in result.pngs:
        stdout.print(f"wrote {png}", highlight=False)


PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=PASSTHROUGH)
def launch(
    ctx: typer.Context,
    cluster_yaml: Annotated[
        Path, typer.Argument(help="Cluster YAML (a `cluster:` section; configs/cluster/).")
    ],
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the resolved config, env and exact commands; run nothing."),
    ] = False,
) -> None:
    """Launch a job on local/torchrun/Slurm/MPI: `sparsetron launch CLUSTER.yaml [--dry-run] -- train CONFIG [k=v]`.

    Preflight first: the layout for nodes × procs_per_node, the model's fit and the cluster's network are
    checked, and any problem refuses the launch (exit 2) before anything runs or is submitted."""
    from sparsetron.launch import LaunchError, describe, execute, plan_launch

    try:
        plan = plan_launch(cluster_yaml, list(ctx.args))
        if dry_run:
            stdout.out(describe(plan), highlight=False)
            return
        code = execute(plan)
    except (LaunchError, ConfigError) as exc:
        raise _fail(str(exc)) from exc
    raise typer.Exit(code)


_SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def _parse_size(text: str) -> int:
    """``512MiB`` / ``2GiB`` / ``1048576`` → bytes."""
    import re

    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    unit = found.group(2) if found else None
    unit = {"k": "kib", "m": "mib", "g": "gib", "t": "tib"}.get(unit, unit)
    if not found or unit not in _SIZE_UNITS:
        raise typer.BadParameter(f"{text!r} is not a size; write e.g. 512MiB, 4GiB or a number of bytes")
    return int(float(found.group(1)) * _SIZE_UNITS[unit])


@app.command()
def convert(
    paths: Annotated[list[Path], typer.Argument(help="SRC OUT, or with --compare the two checkpoints A B.")],
    to: Annotated[str | None, typer.Option("--to", help="Output format: hf, dcp, zarr, deepspeed.")] = None,
    source_format: Annotated[
        str | None, typer.Option("--from", help="Input format (default: detected from the files).")
    ] = None,
    model_type: Annotated[
        str | None, typer.Option(help="--to hf: mixtral, qwen2_moe or qwen3_moe (default: from the source).")
    ] = None,
    replica: Annotated[
        int | None, typer.Option(help="--from dcp: which replica of a DiLoCo/SparseLoCo checkpoint to read.")
    ] = None,
    model_config: Annotated[
        Path | None,
        typer.Option(
            help="--from deepspeed: a sparsetron config YAML whose model: section the checkpoint holds."
        ),
    ] = None,
    max_memory: Annotated[
        str | None, typer.Option(help="Refuse to hold more than this per streamed layer, e.g. 4GiB.")
    ] = None,
    check_output: Annotated[
        bool, typer.Option("--check", help="Re-read the output and compare keys, shapes, dtypes and hashes.")
    ] = False,
    compare_paths: Annotated[
        bool, typer.Option("--compare", help="Print each tensor's max |A − B| for two checkpoints A B.")
    ] = False,
) -> None:
    """Convert checkpoints between HF safetensors, sparsetron DCP, DeepSpeed and zarr (model weights).

    `sparsetron convert hf-dir out --to dcp --check`; `sparsetron convert --compare A B`. Every output is
    written atomically and carries sparsetron-conversion.json (source, versions, mapping version, hashes)."""
    from sparsetron.checkpoint.convert.neutral import ConversionError
    from sparsetron.checkpoint.convert.run import check, compare, detect_format, reader_for, writer_for
    from sparsetron.checkpoint.convert.run import convert as run_conversion

    def read(path: Path, fmt: str | None, **options):
        fmt = fmt or detect_format(path)
        return reader_for(fmt, path, **{k: v for k, v in options.items() if v is not None})

    try:
        if compare_paths:
            if len(paths) != 2:
                raise _fail("--compare takes two checkpoints: sparsetron convert --compare A B")
            rows = compare(read(paths[0], source_format), read(paths[1], None))
            table = Table(title=f"max |A − B|: {paths[0]} vs {paths[1]}")
            table.add_column("tensor")
            table.add_column("max abs diff", justify="right")
            for key, diff in rows:
                table.add_row(key, f"{diff:.3g}")
            stdout.print(table)
            return
        if len(paths) != 2 or to is None:
            raise _fail("usage: sparsetron convert SRC OUT --to FORMAT [--check]  (or --compare A B)")
        source, out = paths
        options: dict = {"replica": replica} if replica is not None else {}
        if model_config is not None:
            options["model_cfg"] = _load([str(model_config)]).model
        reader = read(source, source_format, **options)
        writer_options = {}
        if to == "hf":
            writer_options["model_type"] = model_type or getattr(reader, "model_type", None)
            if writer_options["model_type"] is None:
                raise _fail("--to hf needs --model-type (mixtral, qwen2_moe or qwen3_moe) for this source")
        hashes = run_conversion(
            reader,
            writer_for(to, out, **writer_options),
            max_memory=_parse_size(max_memory) if max_memory else None,
        )
        stdout.print(f"wrote {len(hashes)} tensors to {out} ({to}); model weights only")
        if check_output:
            output_options = (
                {"model_cfg": options["model_cfg"]} if to == "deepspeed" and "model_cfg" in options else {}
            )
            problems = check(read(source, source_format, **options), read(out, to, **output_options))
            if problems:
                raise _fail("--check found differences:\n" + "\n".join(problems[:50]), code=1)
            stdout.print(f"--check: every tensor of {out} equals the source (keys, shapes, dtypes, bits)")
    except ConversionError as exc:
        raise _fail(str(exc)) from exc


@bench_app.callback(invoke_without_command=True)
def bench(ctx: typer.Context) -> None:
    """Without a benchmark name: list the benchmarks."""
    if ctx.invoked_subcommand is not None:
        return
    table = Table(title="sparsetron bench: benchmarks in the package (CPU)", title_justify="left")
    table.add_column("command", no_wrap=True)
    table.add_column("what")
    for name, command in sorted(ctx.command.commands.items()):
        table.add_row(f"sparsetron bench {name}", command.get_short_help_str(limit=200))
    stdout.print(table)
    stdout.print(
        "GPU and multi-process benchmarks: benchmarks/*.py in the source repository, results in "
        "benchmarks/RESULTS.md.",
        highlight=False,
    )


SPARSE_CP_DEFAULTS = SparseCPSpec()


@bench_app.command(
    "sparse-cp",
    short_help="Plan a sparse attention pattern on a context-parallel ring: work balance and K/V bytes per step.",
)
def bench_sparse_cp(
    pattern: Annotated[
        str, typer.Option(help=f"Pattern to plan: {', '.join(PATTERNS)}.")
    ] = SPARSE_CP_DEFAULTS.pattern,
    inputs: Annotated[
        str,
        typer.Option(
            help="topk, vertical_slash: seeded random q and k, or planted ones whose answer is known."
        ),
    ] = SPARSE_CP_DEFAULTS.inputs,
    seq: Annotated[int, typer.Option(help="Tokens; a multiple of block × world.")] = SPARSE_CP_DEFAULTS.seq,
    block: Annotated[int, typer.Option(help="Tokens per block.")] = SPARSE_CP_DEFAULTS.block,
    world: Annotated[int, typer.Option(help="Ranks W of the ring.")] = SPARSE_CP_DEFAULTS.world,
    node_size: Annotated[
        int | None,
        typer.Option(help="Ranks per node: also count the hierarchical ring's inter- and intra-node bytes."),
    ] = SPARSE_CP_DEFAULTS.node_size,
    batch: Annotated[int, typer.Option(help="Sequences.")] = SPARSE_CP_DEFAULTS.batch,
    heads: Annotated[int, typer.Option(help="Query heads Hq.")] = SPARSE_CP_DEFAULTS.heads,
    kv_heads: Annotated[int, typer.Option(help="Key/value heads Hkv.")] = SPARSE_CP_DEFAULTS.kv_heads,
    head_dim: Annotated[
        int, typer.Option(help="Head dimension D of the inputs and of the traffic (K and V in bf16).")
    ] = SPARSE_CP_DEFAULTS.head_dim,
    seed: Annotated[int, typer.Option(help="Seed of the inputs.")] = SPARSE_CP_DEFAULTS.seed,
    window_blocks: Annotated[
        int, typer.Option(help="window: recent blocks kept.")
    ] = SPARSE_CP_DEFAULTS.window_blocks,
    sink_blocks: Annotated[
        int, typer.Option(help="window, vertical_slash: first blocks kept.")
    ] = SPARSE_CP_DEFAULTS.sink_blocks,
    stride: Annotated[
        int, typer.Option(help="strided: KV head h keeps blocks ≡ h mod stride.")
    ] = SPARSE_CP_DEFAULTS.stride,
    local_blocks: Annotated[
        int, typer.Option(help="strided, topk: recent blocks kept.")
    ] = SPARSE_CP_DEFAULTS.local_blocks,
    k: Annotated[
        int, typer.Option("--k", help="topk: earlier blocks kept per query block.")
    ] = SPARSE_CP_DEFAULTS.k,
    verticals: Annotated[
        int | None, typer.Option(help="vertical_slash: key columns kept.")
    ] = SPARSE_CP_DEFAULTS.verticals,
    slashes: Annotated[
        int | None, typer.Option(help="vertical_slash: diagonals kept.")
    ] = SPARSE_CP_DEFAULTS.slashes,
    mass: Annotated[
        float | None,
        typer.Option(help="vertical_slash: attention share kept, (0, 1]; 0.9 without --verticals/--slashes."),
    ] = SPARSE_CP_DEFAULTS.mass,
    last_q: Annotated[
        int, typer.Option(help="vertical_slash: last queries estimated from.")
    ] = SPARSE_CP_DEFAULTS.last_q,
    kv_head: Annotated[int, typer.Option(help="The KV head --plot draws.")] = SPARSE_CP_DEFAULTS.kv_head,
    plot: Annotated[
        Path | None, typer.Option(help="Directory to write pattern.png and work.png into.")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="File to write every number (and the work matrix) to.")
    ] = None,
) -> None:
    """Plan a block-sparse pattern on a striped context-parallel ring (on the CPU, nothing distributed runs):
    density, per-step work max/mean, idle steps and the K/V bytes per step of the sparse ring vs a dense ring;
    with --node-size the hierarchical ring's inter- vs intra-node bytes."""
    spec = SparseCPSpec(
        pattern=pattern, inputs=inputs, seq=seq, block=block, world=world, node_size=node_size, batch=batch,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, seed=seed, window_blocks=window_blocks,
        sink_blocks=sink_blocks, stride=stride, local_blocks=local_blocks, k=k, verticals=verticals,
        slashes=slashes, mass=mass, last_q=last_q, kv_head=kv_head,
    )  # fmt: skip
    problems = spec.problems()
    if problems:
        raise _fail(problems[0] if len(problems) == 1 else "\n  - ".join(["bad arguments:", *problems]))
    try:
        block_pattern, plan, report = sparse_cp_report(spec)
    except ValueError as exc:  # the pattern builder's own checks
        raise _fail(str(exc)) from exc
    _print_sparse_cp(report)
    if plot is not None:
        from sparsetron.parallel.context.sparse_plot import plot_pattern, plot_work

        pattern_png = plot_pattern(block_pattern, plot / "pattern.png", kv_head=kv_head)
        work_png = plot_work(plan, plot / "work.png")
        stdout.print(f"wrote {pattern_png} and {work_png}", highlight=False, soft_wrap=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.as_dict(), indent=1))
        stdout.print(f"wrote {json_path}", highlight=False, soft_wrap=True)


def _size(n: int) -> str:
    """Bytes in binary units: ``0 B``, ``16.0 KiB``, ``8.00 MiB``, ``1.25 GiB``."""
    if n < 1 << 10:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / (1 << 10):.1f} KiB"
    if n < 1 << 30:
        return f"{n / (1 << 20):.2f} MiB"
    return f"{n / (1 << 30):.2f} GiB"


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def _print_sparse_cp(report: SparseCPReport) -> None:
    """The summary lines, the per-step table and, with a node size, the per-node-offset table."""
    worst, idle = report.worst_step, report.idle_steps
    lines = [
        report.spec.describe(),
        report.note,
        f"density             {report.density:.4f}",
        f"worst-step max/mean {report.imbalance_S[worst]:.3f} (step {worst})",
        f"idle steps          {', '.join(map(str, idle)) if idle else 'none'}",
        f"bytes sent          {_size(report.sparse_bytes)} vs dense ring {_size(report.dense_bytes)} "
        f"({_share(report.sparse_bytes, report.dense_bytes)})",
    ]
    hier = report.hierarchy
    if hier is not None:
        inter, intra = sum(hier.inter_T), sum(hier.intra_T)
        lines.append(
            f"hierarchical        {hier.nodes} nodes × {hier.node_size}: inter-node {_size(inter)} "
            f"({_share(inter, hier.flat_inter)} of the flat ring's {_size(hier.flat_inter)}), intra-node "
            f"{_size(intra)}"
        )
    for line in lines:
        stdout.print(line, highlight=False, soft_wrap=True)

    table = Table(
        title=f"per ring step (K+V block = {_size(report.block_bytes)})",
        title_justify="left",
        box=box.SIMPLE,
        pad_edge=False,
    )
    for column in ("step", "work max", "work mean", "max/mean", "sparse", "dense", "vs dense"):
        table.add_column(column, justify="right", no_wrap=True)
    for s, sparse in enumerate(report.sparse_bytes_S):
        dense = report.dense_step_bytes if s else 0
        note = " idle" if s in idle else " worst" if s == worst else ""
        table.add_row(
            f"{s}{note}",
            str(report.work_max_S[s]),
            f"{report.work_mean_S[s]:.1f}",
            f"{report.imbalance_S[s]:.3f}",
            _size(sparse),
            _size(dense),
            _share(sparse, dense),
        )
    stdout.print(table)
    if hier is not None:
        table = Table(title="hierarchical ring, per node offset", title_justify="left", box=box.SIMPLE)
        for column in ("offset", "inter-node", "intra-node"):
            table.add_column(column, justify="right", no_wrap=True)
        for t, (inter_t, intra_t) in enumerate(zip(hier.inter_T, hier.intra_T, strict=True)):
            table.add_row(str(t), _size(inter_t), _size(intra_t))
        stdout.print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())

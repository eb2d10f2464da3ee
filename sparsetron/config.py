"""Typed job configuration, loaded from YAML with omegaconf structured configs.

One dataclass per component. Every field carries its documentation in ``metadata["doc"]`` so that
``sparsetron config docs`` and error messages can show it. Loading is strict: an unknown key is an error
that names the key, the file it came from and the nearest valid key.

Merge order (later wins)::

    dataclass defaults < model preset < cluster YAML < run YAML < CLI ``key=value`` overrides

A model preset (``model.preset: tiny``) names ``configs/model/<preset>.yaml``; its values sit just above
the defaults, so any layer may still override single model fields.
"""

from __future__ import annotations

import difflib
import enum
import os
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration that cannot be loaded or does not validate; the message says what and how to fix it."""


def knob(default: Any = MISSING, doc: str = "", *, factory: Any = MISSING) -> Any:
    """A dataclass field with its documentation attached (read back by :func:`field_docs`)."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


class CPMethod(str, enum.Enum):
    ring = "ring"
    ulysses = "ulysses"
    hybrid = "hybrid"
    allgather = "allgather"
    sparse_ring = "sparse_ring"


class CPLayout(str, enum.Enum):
    zigzag = "zigzag"
    striped = "striped"
    contiguous = "contiguous"


class DPAlgorithm(str, enum.Enum):
    ddp = "ddp"
    diloco = "diloco"
    sparseloco = "sparseloco"


class Scheduler(str, enum.Enum):
    local = "local"
    torchrun = "torchrun"
    slurm = "slurm"
    mpi = "mpi"


class NetworkProfile(str, enum.Enum):
    loopback = "loopback"
    socket = "socket"
    ib = "ib"
    roce = "roce"
    efa = "efa"


class RouterName(str, enum.Enum):
    softmax_topk = "softmax_topk"
    sigmoid_bias = "sigmoid_bias"
    cosine = "cosine"
    sinkhorn = "sinkhorn"
    expert_choice = "expert_choice"
    quantile = "quantile"


class AuxLoss(str, enum.Enum):
    sequence = "sequence"
    switch = "switch"
    global_batch = "global"
    none = "none"


class DropPolicy(str, enum.Enum):
    score = "score"
    position = "position"


class TokenRounding(str, enum.Enum):
    off = "off"
    up = "up"
    down = "down"
    nearest = "nearest"


class ExpertBackend(str, enum.Enum):
    auto = "auto"
    torch = "torch"
    triton = "triton"
    loop = "loop"


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class ModelConfig:
    """Shape of the MoE decoder. Semantics follow HF Mixtral / Qwen2-MoE so checkpoints convert exactly."""

    preset: str | None = knob(
        None,
        "Name of a preset in configs/model/ (e.g. tiny, demo, mixtral-8x7b); its values sit under this section's explicit keys.",
    )
    vocab_size: int = knob(256, "Vocabulary size (256 = the built-in byte-level tokenizer).")
    dim: int = knob(128, "Hidden size of the residual stream.")
    n_layers: int = knob(2, "Number of decoder layers.")
    n_heads: int = knob(4, "Query heads per attention layer.")
    n_kv_heads: int = knob(2, "Key/value heads (GQA); must divide n_heads. 1 = MQA, n_heads = MHA.")
    head_dim: int | None = knob(None, "Per-head dimension; null means dim // n_heads.")
    num_experts: int = knob(4, "Routed experts per MoE layer.")
    top_k: int = knob(2, "Experts each token is routed to.")
    expert_ffn_dim: int = knob(256, "Hidden size of each SwiGLU expert.")
    shared_expert_ffn_dim: int = knob(0, "Hidden size of the always-on shared expert; 0 disables it.")
    router: RouterName = knob(
        RouterName.softmax_topk,
        "Router: softmax_topk (Mixtral/Qwen), sigmoid_bias (DeepSeek-V3 aux-loss-free bias), cosine, sinkhorn "
        "(Sinkhorn / Selective Sinkhorn Routing), expert_choice or quantile.",
    )
    router_groups: int = knob(
        1, "Expert groups for group-limited routing (e.g. = ep or nodes); experts are split contiguously."
    )
    router_topk_groups: int = knob(
        1, "Groups each token may use when router_groups > 1 (DeepSeek-V3 node-limited routing: M)."
    )
    router_bias_update_speed: float = knob(
        1e-3, "sigmoid_bias: speed γ of the per-step expert-bias update from the global load."
    )
    router_scaling: float = knob(
        1.0, "sigmoid_bias: factor on the normalised routed weights (DeepSeek-V3 routed_scaling_factor: 2.5)."
    )
    router_cosine_dim: int = knob(64, "cosine: dimension of the space tokens and expert centroids meet in.")
    router_sinkhorn_iters: int = knob(
        50, "sinkhorn: Sinkhorn-Knopp iterations per forward (stops early at convergence)."
    )
    router_ssr_prob: float = knob(
        1.0,
        "sinkhorn: probability a training step routes by the transport map (Selective Sinkhorn; 1 = always).",
    )
    router_capacity_factor: float = knob(
        1.0, "expert_choice: each expert takes ceil(T·top_k·factor/E) tokens."
    )
    normalize_topk: bool = knob(True, "Renormalise the top-k router weights to sum to one (Mixtral: true).")
    rope_theta: float = knob(10000.0, "RoPE base frequency.")
    norm_eps: float = knob(1e-6, "RMSNorm epsilon.")
    tie_embeddings: bool = knob(False, "Share the token embedding with the LM head.")
    attention_bias: bool = knob(
        False, "Bias on the q/k/v projections (Qwen2-MoE: true; Mixtral, Qwen3: false)."
    )
    qk_norm: bool = knob(False, "RMSNorm over each query and key head before RoPE (Qwen3-MoE: true).")
    shared_expert_gate: bool = knob(
        True,
        "Scale the shared expert by sigmoid(gate(x)) as Qwen2-MoE does; false adds it ungated (DeepSeek).",
    )
    aux_loss: AuxLoss = knob(
        AuxLoss.sequence,
        "Load-balancing loss: sequence (per-sequence switch loss), switch (per micro-batch), global (over all "
        "data- and context-parallel ranks) or none.",
    )
    aux_loss_coef: float = knob(0.01, "Weight of the load-balancing loss (0 disables it).")
    z_loss_coef: float = knob(0.0, "Weight of the router z-loss (ST-MoE; 0 disables it).")
    capacity_factor: float | None = knob(
        None, "Expert capacity as a multiple of the balanced share T·top_k/E per rank; null = dropless."
    )
    drop_policy: DropPolicy = knob(
        DropPolicy.score,
        "With a capacity: keep an over-full expert's highest-scoring (score) or earliest (position) tokens.",
    )
    token_rounding: TokenRounding = knob(
        TokenRounding.off,
        "Round each expert's token count to a multiple of rounding_tile (SonicMoE): off, up, down or nearest.",
    )
    rounding_tile: int = knob(128, "Row tile of the grouped GEMM that token rounding rounds to.")
    expert_backend: ExpertBackend = knob(
        ExpertBackend.auto,
        "Grouped GEMM for the experts: auto (torch._grouped_mm on CUDA, else Triton; loop on CPU), torch, triton, loop.",
    )
    attention_pattern: str = knob(
        "dense",
        "Attention pattern of the sparse layers: dense, window, strided, block_topk or vertical_slash "
        "(block-sparse; with cp > 1 it needs parallel.cp_method=sparse_ring).",
    )
    sparse_dense_layers: int = knob(0, "The first N decoder layers keep dense attention (sparse elsewhere).")
    sparse_block: int = knob(64, "Tokens per block of the sparse pattern (with cp: parallel.cp_block).")
    sparse_topk: int = knob(
        4, "block_topk: earlier key blocks each query block keeps, besides its local ones."
    )
    sparse_local_blocks: int = knob(1, "window/strided/block_topk: most recent key blocks always kept.")
    sparse_sink_blocks: int = knob(
        1, "window/vertical_slash: first key blocks always kept (attention sinks)."
    )
    sparse_stride: int = knob(4, "strided: KV head h keeps key blocks k ≡ h (mod stride).")
    sparse_verticals: int = knob(64, "vertical_slash: key columns kept.")
    sparse_slashes: int = knob(16, "vertical_slash: diagonals kept.")
    sparse_last_q: int = knob(64, "vertical_slash: last queries the pattern is estimated from.")
    init_std: float = knob(0.02, "Standard deviation of the normal initialisation of weight matrices.")
    max_seq_len: int = knob(
        4096, "Longest sequence (global, before context sharding) the model is built for."
    )

    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads


@dataclass
class ParallelConfig:
    """Parallel degrees. Their product (dp_replicate × dp_shard × cp) is the world size; ep folds over dp_shard × cp."""

    dp_replicate: int = knob(
        1, "Data-parallel replicas that synchronise by DDP all-reduce or the DiLoCo/SparseLoCo outer loop."
    )
    dp_shard: int = knob(-1, "FSDP2 shard degree inside a replica; -1 fills whatever the world size leaves.")
    cp: int = knob(1, "Context-parallel degree: ranks that split one sequence.")
    ep: int = knob(1, "Expert-parallel degree, folded over dp_shard × cp (must divide it).")
    ep_overlap_chunks: int = knob(
        1,
        "Token chunks per MoE layer with ep > 1: one chunk's all-to-alls overlap another chunk's expert GEMMs "
        "(forward and backward). 1 = no split, the fastest measured on 2× H200 NVLink (see RESULTS.md).",
    )
    cp_method: CPMethod = knob(
        CPMethod.ring, "Context-parallel attention: ring, ulysses, hybrid, allgather or sparse_ring."
    )
    cp_layout: CPLayout = knob(
        CPLayout.zigzag, "How a sequence is split over the cp ranks: zigzag, striped or contiguous."
    )
    cp_block: int = knob(128, "Block size (tokens) of the striped layout.")
    cp_node_size: int = knob(
        0,
        "For cp_method=sparse_ring: cp ranks per node of the hierarchical sparse ring (an inner ring inside each "
        "node, an outer one across nodes that carries each referenced block once per node pair); must divide cp, "
        "and cp itself is the flat ring. 0: from the launch, cluster.procs_per_node when the cp group spans "
        "several of cluster.nodes (procs_per_node < cp, dividing it), else the flat ring.",
    )
    ulysses_degree: int = knob(
        1,
        "For cp_method=hybrid: ranks of the inner Ulysses all-to-all (node-local); the ring spans cp / ulysses_degree.",
    )


@dataclass
class DPConfig:
    """How data-parallel replicas (dp_replicate) synchronise."""

    algorithm: DPAlgorithm = knob(
        DPAlgorithm.ddp, "ddp (all-reduce every step), diloco or sparseloco (outer loop every inner_steps)."
    )
    inner_steps: int = knob(30, "Inner optimizer steps between outer synchronisations (DiLoCo/SparseLoCo H).")
    topk: int = knob(64, "SparseLoCo: values kept per chunk.")
    chunk: int = knob(4096, "SparseLoCo: elements per chunk (64×64 tiles for 2-D tensors).")
    bits: int = knob(
        2,
        "SparseLoCo: bits per transmitted value: 1–8 quantised against a per-tensor codebook, 16/32 raw bf16/fp32.",
    )
    error_decay: float = knob(0.95, "SparseLoCo: error-feedback decay β.")
    outer_lr: float | None = knob(
        None, "Outer SGD learning rate; null = algorithm default (DiLoCo 0.7, SparseLoCo 1.0)."
    )
    outer_momentum: float | None = knob(
        None, "Outer Nesterov momentum; null = algorithm default (DiLoCo 0.9, SparseLoCo 0)."
    )
    index_coding: str = knob(
        "packed12",
        "SparseLoCo wire coding of in-chunk indices: packed12 (12 bits, packed on the device) or rice "
        "(entropy-coded gaps, ~7.5 bits at k=64 of 4096, encoded on the host).",
    )
    dense_below: int = knob(4096, "SparseLoCo: tensors with fewer elements are sent dense (fp32).")
    overlap: bool = knob(
        False,
        "Exchange each outer step's pseudo-gradients in the background during the next inner phase and apply "
        "them one phase late (replicas continue from θ plus their own progress).",
    )


@dataclass
class TrainConfig:
    """Optimisation loop."""

    steps: int = knob(100, "Optimizer steps to run.")
    seed: int = knob(
        0, "Seed for parameters, data order and dropout-free sampling; same seed, same run on every layout."
    )
    lr: float = knob(3e-4, "Peak AdamW learning rate.")
    min_lr_ratio: float = knob(0.1, "Cosine schedule floor as a fraction of lr.")
    warmup_steps: int = knob(10, "Linear warm-up steps.")
    weight_decay: float = knob(0.1, "AdamW weight decay.")
    grad_clip: float = knob(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    seq_len: int = knob(2048, "Tokens per sequence (global, before context sharding).")
    global_batch_tokens: int = knob(16384, "Tokens per optimizer step over all data-parallel ranks.")
    micro_batch_size: int = knob(
        1, "Sequences per rank per forward/backward; the rest is gradient accumulation."
    )
    run_dir: str = knob("runs/default", "Where config.yaml, metrics.jsonl and checkpoints/ are written.")
    log_every: int = knob(1, "Print a progress line every this many steps.")
    eval_every: int = knob(
        0, "Evaluate the synthetic task's accuracy every this many steps (0: only at the end)."
    )
    eval_samples: int = knob(64, "Held-out samples per evaluation of the synthetic task.")
    activation_checkpointing: bool = knob(
        False, "Recompute each decoder layer's activations in the backward pass."
    )
    dtype: str = knob("auto", "Compute dtype: auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16.")
    dp: DPConfig = knob(factory=DPConfig, doc="Data-parallel synchronisation.")


@dataclass
class DataConfig:
    """Where tokens come from."""

    source: str = knob(
        "synthetic",
        "synthetic (generated long-context tasks), corpus (the shipped text corpus) or zarr (a prepared store).",
    )
    path: str | None = knob(None, "Path of the zarr token store when source=zarr.")
    task: str = knob("passkey", "Synthetic task: passkey or associative_recall.")
    tokenizer: str = knob("bytes", "bytes (built in) or the name/path of an installed HF tokenizer.")
    passkey_digits: int = knob(5, "Digits of the passkey to retrieve.")
    recall_pairs: int = knob(8, "Key/value pairs per associative-recall sample.")
    heldout_windows: int = knob(
        0,
        "zarr/corpus: the last N windows are held out of training and scored by evaluation (eval_loss); "
        "0 trains on every window.",
    )


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (torch.distributed.checkpoint)."""

    interval: int = knob(0, "Save every this many steps; 0 saves only at the end.")
    keep_last: int = knob(2, "Complete checkpoints to keep; older ones are deleted.")
    resume: bool = knob(True, "Resume from the newest complete checkpoint in the run dir when there is one.")
    dir: str | None = knob(None, "Checkpoint directory; null means <run_dir>/checkpoints.")
    init_from: str | None = knob(
        None,
        "Start from this checkpoint's model weights when there is nothing to resume: a sparsetron DCP "
        "checkpoint (step-<step>/, or `sparsetron convert` output, e.g. from HF), at any layout; the "
        "optimizer starts fresh.",
    )


@dataclass
class ClusterConfig:
    """Where and how processes are started."""

    scheduler: Scheduler = knob(
        Scheduler.local, "local (this machine), torchrun (multi-node rendezvous), slurm or mpi."
    )
    nodes: int = knob(1, "Nodes (hosts) in the job.")
    procs_per_node: int = knob(1, "Processes per node: one per GPU, or CPU processes.")
    device: Device = knob(Device.auto, "auto (cuda when available, else cpu), cpu or cuda.")
    partition: str | None = knob(None, "Slurm partition.")
    account: str | None = knob(None, "Slurm account.")
    time: str | None = knob(None, "Slurm time limit, e.g. 04:00:00.")
    qos: str | None = knob(None, "Slurm quality of service (--qos).")
    constraint: str | None = knob(None, "Slurm node constraint.")
    container_image: str | None = knob(None, "Container image for pyxis/enroot (srun --container-image).")
    venv: str | None = knob(None, "Virtual environment to activate on every node.")
    env: dict[str, str] = knob(factory=dict, doc="Extra environment variables for every rank.")
    network_profile: NetworkProfile = knob(
        NetworkProfile.loopback, "NCCL/Gloo network profile: loopback, socket, ib, roce, efa."
    )
    network_interface: str | None = knob(
        None,
        "NIC the nodes reach each other on (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME), e.g. eth0 or ib0; "
        "null: the profile's default. `ip -br addr` lists them.",
    )
    ib_hca: str | None = knob(
        None, "InfiniBand/RoCE adapters for NCCL_IB_HCA, e.g. mlx5_0,mlx5_1; null: mlx5."
    )
    flight_recorder_dir: str | None = knob(
        None, "Where the NCCL flight recorder dumps each rank's last collectives on a timeout; null: off."
    )
    hosts: list[str] = knob(
        factory=list,
        doc="torchrun/mpi without Slurm: the nodes' hostnames or addresses, the first hosting the rendezvous.",
    )
    rdzv_port: int = knob(
        29500,
        "Rendezvous TCP port on the first node; 0 under Slurm: 20000 + job id mod 20000 (jobs sharing a node).",
    )
    max_restarts: int = knob(0, "Times a failed job is restarted from its last checkpoint.")
    job_name: str = knob("sparsetron", "Slurm job name.")
    slurm_tasks: str = knob(
        "node",
        "node: one Slurm task per node running torchrun; process: one task per process, ranks from "
        "SLURM_PROCID (no torchrun).",
    )
    mpi: str = knob("openmpi", "MPI flavour of mpirun's options: openmpi or mpich.")
    python: str | None = knob(
        None, "Python on the nodes; null: the one running `sparsetron launch` (with venv: the venv's python)."
    )


@dataclass
class SyncConfig:
    """Publishing the trained weights to RL rollout workers while training (``sparsetron sync``)."""

    serve: bool = knob(
        False,
        "Serve versions of the weights over TCP from rank 0 (secret: $SPARSETRON_SYNC_SECRET); rollout workers "
        "pull with `sparsetron sync pull` or DeltaSubscriber.pull.",
    )
    every: int = knob(1, "Publish a version every this many optimizer steps (and after the last one).")
    host: str = knob("127.0.0.1", "Address rank 0 binds; loopback unless you open it.")
    port: int = knob(7731, "TCP port (0: any free port, printed at start).")
    keep: int = knob(8, "Versions kept for lagging subscribers.")
    linger: float = knob(
        0.0, "Seconds rank 0 keeps serving after the last step, so workers fetch the last version."
    )


@dataclass
class Config:
    """A whole job."""

    model: ModelConfig = knob(factory=ModelConfig, doc="Model shape.")
    parallel: ParallelConfig = knob(factory=ParallelConfig, doc="Parallel degrees and methods.")
    train: TrainConfig = knob(factory=TrainConfig, doc="Optimisation loop.")
    data: DataConfig = knob(factory=DataConfig, doc="Token source.")
    checkpoint: CheckpointConfig = knob(factory=CheckpointConfig, doc="Checkpointing.")
    cluster: ClusterConfig = knob(factory=ClusterConfig, doc="Process placement.")
    sync: SyncConfig = knob(factory=SyncConfig, doc="Weight sync to rollout workers.")


def config_root() -> Path:
    """Directory of the shipped YAML configs: ``$SPARSETRON_CONFIGS`` or the repo's ``configs/``."""
    env = os.environ.get("SPARSETRON_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "configs"


def default_run_config() -> Path:
    """The embedded default job (``configs/train/demo.yaml``) that ``make run`` trains."""
    return config_root() / "train" / "demo.yaml"


def field_docs(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Flatten the per-field documentation of a config dataclass into ``{"train.lr": "Peak AdamW ..."}``."""
    docs: dict[str, str] = {}
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        docs[key] = f.metadata.get("doc", "")
        sub = f.default_factory if f.default_factory is not MISSING else None
        if sub is not None and is_dataclass(sub):
            docs.update(field_docs(sub, key + "."))
    return docs


def _suggest(bad_key: str, valid: list[str], parent: str) -> str:
    close = difflib.get_close_matches(bad_key, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{parent + '.' if parent else ''}{close[0]}'?"
    return "valid keys here: " + ", ".join(sorted(valid))


def _valid_keys_at(parent_path: str) -> list[str]:
    """Valid keys of the config section at dotted ``parent_path`` ('' for the root)."""
    prefix = f"{parent_path}." if parent_path else ""
    depth = prefix.count(".")
    return [k[len(prefix) :] for k in field_docs() if k.startswith(prefix) and k.count(".") == depth]


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an omegaconf error into one that names the source, the key, the rule and a fix."""
    full_key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) and full_key:
        parent, _, leaf = full_key.rpartition(".")
        valid = _valid_keys_at(parent)
        where = f"section '{parent}'" if parent else "the top level"
        return ConfigError(
            f"{source}: unknown key '{full_key}' in {where}; {_suggest(leaf, valid, parent)} "
            f"(run `sparsetron config docs` to list every key)."
        )
    if isinstance(err, ValidationError) and full_key:
        doc = field_docs().get(full_key, "")
        reason = str(err.msg).splitlines()[0]
        return ConfigError(f"{source}: bad value for '{full_key}': {reason}. {full_key}: {doc}")
    return ConfigError(f"{source}: {err}")


def _load_yaml(path: Path, what: str) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist; pass the path of a YAML file (see configs/).")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: the parser's message says where
        raise ConfigError(f"{what} '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(
            f"{what} '{path}' must hold a mapping of sections (model:, parallel:, ...), not a list."
        )
    return loaded


def _merge(base: DictConfig, layer: DictConfig | dict, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        raise _explain(exc, source) from exc
    assert isinstance(merged, DictConfig)
    return merged


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"override '{item}' is not of the form key=value; write e.g. parallel.cp=2 or train.lr=1e-4."
            )
    return OmegaConf.from_dotlist(list(overrides))


def preset_path(name: str) -> Path:
    """Path of model preset ``name`` (``configs/model/<name>.yaml``); errors list the available ones."""
    root = config_root() / "model"
    path = root / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in root.glob("*.yaml")) if root.is_dir() else []
        raise ConfigError(
            f"model.preset '{name}' not found in {root}; available presets: {', '.join(available) or 'none'}"
            " (or set SPARSETRON_CONFIGS to a directory with model/<name>.yaml)."
        )
    return path


def load_config(
    run_yaml: str | Path | Sequence[str | Path] | None = None,
    overrides: Sequence[str] = (),
    cluster_yaml: str | Path | None = None,
) -> Config:
    """Load a job config: defaults < model preset < cluster YAML < run YAML(s) < ``key=value`` overrides.

    ``run_yaml`` may be several files (e.g. ``configs/train/demo.yaml configs/parallel/cp2-ring.yaml``), merged
    left to right. Raises :class:`ConfigError` naming the file and key for unknown keys, bad types and missing
    files. Returns the typed :class:`Config` dataclass (enums are enum members, nested sections dataclasses).
    """
    if run_yaml is None:
        run_yamls: list[str | Path] = []
    elif isinstance(run_yaml, (str, Path)):
        run_yamls = [run_yaml]
    else:
        run_yamls = list(run_yaml)
    layers: list[tuple[str, DictConfig]] = []
    if cluster_yaml is not None:
        layers.append((f"cluster config {cluster_yaml}", _load_yaml(Path(cluster_yaml), "cluster config")))
    for path in run_yamls:
        layers.append((f"run config {path}", _load_yaml(Path(path), "run config")))
    if overrides:
        layers.append(("command-line overrides", _parse_overrides(list(overrides))))

    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema, True)
    # Free-form maps (environment variables) take any key; everything else is strict.
    OmegaConf.set_struct(schema.cluster.env, False)
    merged = schema
    for source, layer in layers:
        merged = _merge(merged, layer, source)

    # The preset is chosen by the layers above but must sit beneath them, so merge again in order.
    if merged.model.preset:
        preset = _load_yaml(preset_path(merged.model.preset), "model preset")
        if set(preset.keys()) != {"model"}:
            raise ConfigError(
                f"model preset '{merged.model.preset}' must contain only a 'model:' section, found {sorted(preset.keys())}."
            )
        merged = _merge(schema, preset, f"model preset {merged.model.preset}")
        for source, layer in layers:
            merged = _merge(merged, layer, source)

    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc, "resolved config") from exc
    assert isinstance(cfg, Config)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (enums written by value), loadable again by :func:`load_config`."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def write_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Write ``<run_dir>/config.yaml`` atomically (temp file + rename) and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / "config.yaml"
    tmp = run_dir / f".config.yaml.tmp-{os.getpid()}"
    tmp.write_text(to_yaml(cfg))
    tmp.replace(final)
    return final

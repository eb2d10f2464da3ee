"""Job preflight: model, sequence and batch rules against the layout; suggested fixes are valid (tier 0)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetron.config import load_config
from sparsetron.dist import LayoutError, ParallelDims
from sparsetron.dist.preflight import check_job, cp_node_size

# A fixed job, independent of what the shipped demo config happens to say: 8 experts, 8/4 heads,
# 2048-token sequences, 4 sequences per step, FSDP2 2 × CP 2 with experts folded as ep 2.
JOB = [
    "model.preset=demo",
    "parallel.dp_replicate=1",
    "parallel.dp_shard=2",
    "parallel.cp=2",
    "parallel.ep=2",
    "train.seq_len=2048",
    "train.global_batch_tokens=8192",
]


def demo(*overrides: str):
    return load_config(None, [*JOB, *overrides])


def suggested_overrides(message: str) -> list[list[str]]:
    return [line.split() for line in message.splitlines() if line.strip().startswith("parallel.")]


def test_demo_fits_four_processes():
    assert check_job(demo(), 4) == ParallelDims(4, dp_shard=2, cp=2, ep=2)


def test_world_six_with_cp_four_names_everything_and_offers_a_valid_layout():
    cfg = demo(
        "parallel.cp=4", "parallel.dp_shard=-1", "train.seq_len=3072", "train.global_batch_tokens=36864"
    )
    with pytest.raises(LayoutError) as info:
        check_job(cfg, 6)
    message = str(info.value)
    assert "world_size=6" in message
    for degree in ("dp_replicate=1", "dp_shard=-1", "cp=4", "ep=2", "cp_method=ring", "cp_layout=zigzag"):
        assert degree in message
    assert "world_size=6 is not divisible by dp_replicate × cp = 1 × 4 = 4" in message
    alternatives = suggested_overrides(message)
    assert alternatives
    for alt in alternatives:
        check_job(demo(*cfg_overrides(cfg), "parallel.cp=4", "parallel.dp_shard=-1", *alt), 6)


def cfg_overrides(cfg) -> list[str]:
    t = cfg.train
    return [f"train.seq_len={t.seq_len}", f"train.global_batch_tokens={t.global_batch_tokens}"]


@pytest.mark.parametrize(
    ("overrides", "world", "fragment"),
    [
        (
            ["parallel.ep=4", "parallel.dp_shard=2", "model.num_experts=6"],
            4,
            "model.num_experts=6 must be divisible by ep=4",
        ),
        (
            [
                "parallel.cp_method=ulysses",
                "parallel.cp=4",
                "parallel.dp_shard=1",
                "model.n_heads=6",
                "model.n_kv_heads=2",
                "model.dim=192",
            ],
            4,
            "model.n_heads=6 is not divisible by the Ulysses degree 4",
        ),
        (
            [
                "parallel.cp_method=ulysses",
                "parallel.cp=4",
                "parallel.dp_shard=1",
                "model.n_kv_heads=8",
                "model.n_heads=24",
                "model.dim=192",
            ],
            4,
            None,
        ),
        (
            [
                "parallel.cp_method=ulysses",
                "parallel.cp=4",
                "parallel.dp_shard=1",
                "model.n_kv_heads=3",
                "model.n_heads=12",
                "model.dim=192",
            ],
            4,
            "model.n_kv_heads=3 and the Ulysses degree 4 must divide one another",
        ),
        (
            ["train.seq_len=2050", "model.max_seq_len=8192"],
            4,
            "train.seq_len=2050 must be divisible by 2 × cp = 4",
        ),
        (
            [
                "parallel.cp_layout=striped",
                "parallel.cp_block=512",
                "train.seq_len=1536",
                "train.global_batch_tokens=6144",
            ],
            4,
            "train.seq_len=1536 must be divisible by cp × cp_block = 2 × 512",
        ),
        (
            ["train.global_batch_tokens=6144"],
            4,
            "3 sequences must be divisible by dp_replicate × dp_shard × micro_batch_size = 1 × 2 × 1 = 2",
        ),
        (
            ["train.global_batch_tokens=5000"],
            4,
            "train.global_batch_tokens=5000 is not a multiple of train.seq_len=2048",
        ),
        (
            ["parallel.cp_method=hybrid", "parallel.ulysses_degree=2"],
            4,
            "cp_method=hybrid needs 1 < parallel.ulysses_degree < parallel.cp",
        ),
        (["parallel.ulysses_degree=2"], 4, "parallel.ulysses_degree=2 only applies to cp_method=hybrid"),
        (
            ["parallel.cp_method=sparse_ring"],
            4,
            "sparse_ring balances work per ring step only on the striped layout",
        ),
        (
            ["parallel.cp_method=sparse_ring"],
            4,
            "parallel.cp_method=sparse_ring needs a sparse model.attention_pattern",
        ),
        (
            ["model.attention_pattern=block_topk", "parallel.cp=2", "parallel.dp_shard=2"],
            4,
            "model.attention_pattern=block_topk with parallel.cp=2 needs parallel.cp_method=sparse_ring",
        ),
        (
            [
                "model.attention_pattern=window",
                "parallel.cp_method=sparse_ring",
                "parallel.cp_layout=striped",
                "parallel.cp_block=32",
                "model.sparse_block=64",
            ],
            4,
            "parallel.cp_block=32 must equal model.sparse_block=64",
        ),
        (["model.top_k=9"], 4, "model.top_k=9 must be between 1 and model.num_experts=8"),
        (["model.n_kv_heads=3"], 4, "model.n_heads=8 must be a multiple of model.n_kv_heads=3"),
        (
            ["train.seq_len=16384", "train.global_batch_tokens=32768"],
            4,
            "train.seq_len=16384 exceeds model.max_seq_len=8192",
        ),
    ],
)
def test_each_rule_fails_with_its_values(overrides, world, fragment):
    cfg = demo(*overrides)
    if fragment is None:
        check_job(cfg, world)
        return
    with pytest.raises(LayoutError) as info:
        check_job(cfg, world)
    assert fragment in str(info.value)


#: A window-sparse job on the sparse ring: cp = 4 of 8 ranks, blocks of 64 tokens (2048 = 4 × 64 × 8).
SPARSE_RING = [
    "model.attention_pattern=window",
    "model.sparse_block=64",
    "parallel.cp_method=sparse_ring",
    "parallel.cp_layout=striped",
    "parallel.cp_block=64",
    "parallel.cp=4",
]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            ["parallel.cp_node_size=3"],
            "parallel.cp_node_size=3 must divide parallel.cp=4 (every node of the hierarchical sparse ring holds "
            "the same number of cp ranks); use one of 1, 2, 4 (4: the flat ring)",
        ),
        (
            ["parallel.cp_node_size=-1"],
            "parallel.cp_node_size=-1 must be ≥ 0: n > 0 puts n cp ranks on each node of the hierarchical "
            "sparse ring, 0 takes cluster.procs_per_node from the launch",
        ),
        (
            ["parallel.cp_node_size=2", "parallel.cp_method=ring", "model.attention_pattern=dense"],
            "parallel.cp_node_size=2 only applies to cp_method=sparse_ring (cp_method=ring); remove it or set "
            "parallel.cp_method=sparse_ring",
        ),
    ],
)
def test_node_size_rules_name_value_rule_and_fix(overrides, fragment):
    with pytest.raises(LayoutError) as info:
        check_job(demo(*SPARSE_RING, *overrides), 8)
    assert fragment in str(info.value)


@pytest.mark.parametrize("node_size", [1, 2, 4])
def test_node_sizes_dividing_cp_pass(node_size):
    cfg = demo(*SPARSE_RING, f"parallel.cp_node_size={node_size}")
    assert check_job(cfg, 8).cp == 4 and cp_node_size(cfg) == node_size


@pytest.mark.parametrize(
    ("launch", "expected"),
    [
        (["cluster.nodes=2", "cluster.procs_per_node=4"], 4),  # cp = 4 inside a node: the flat ring
        (["cluster.nodes=4", "cluster.procs_per_node=2"], 2),  # each cp group spans 2 nodes × 2
        (["cluster.nodes=8", "cluster.procs_per_node=1"], 1),  # one rank per node: the outer ring alone
        (["cluster.nodes=1", "cluster.procs_per_node=8"], 4),  # one node
        (["cluster.nodes=2", "cluster.procs_per_node=3"], 4),  # groups would straddle nodes unevenly: flat
        (["cluster.nodes=4", "cluster.procs_per_node=2", "parallel.cp_node_size=4"], 4),  # set: kept
    ],
)
def test_node_size_zero_comes_from_the_launch_layout(launch, expected):
    assert cp_node_size(demo(*SPARSE_RING, *launch)) == expected


def test_node_size_from_the_launch_only_for_the_sparse_ring():
    cfg = demo("parallel.cp=4", "cluster.nodes=4", "cluster.procs_per_node=2")
    assert cfg.parallel.cp_node_size == 0 and cp_node_size(cfg) == 4


def test_hybrid_four_by_two():
    dims = check_job(
        demo(
            "parallel.cp=4",
            "parallel.dp_shard=2",
            "parallel.cp_method=hybrid",
            "parallel.ulysses_degree=2",
            "train.global_batch_tokens=8192",
        ),
        8,
    )
    assert (dims.cp_ulysses, dims.cp_ring, dims.ep) == (2, 2, 2)


@settings(max_examples=120, deadline=None)
@given(
    world=st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]),
    cp=st.sampled_from([1, 2, 3, 4, 8]),
    ep=st.sampled_from([1, 2, 4, 8]),
    dp_replicate=st.sampled_from([1, 2]),
    seqs=st.sampled_from([1, 2, 4, 6, 8, 12, 24]),
    seq_len=st.sampled_from([1024, 1536, 2048, 3072]),
)
def test_suggested_layouts_always_pass(world, cp, ep, dp_replicate, seqs, seq_len):
    overrides = [
        f"parallel.cp={cp}",
        f"parallel.ep={ep}",
        f"parallel.dp_replicate={dp_replicate}",
        "parallel.dp_shard=-1",
        f"train.seq_len={seq_len}",
        f"train.global_batch_tokens={seqs * seq_len}",
    ]
    cfg = demo(*overrides)
    try:
        check_job(cfg, world)
        return
    except LayoutError as exc:
        message = str(exc)
    assert f"world_size={world}" in message
    if "closest to this one" in message:
        for alt in suggested_overrides(message):
            check_job(demo(*overrides, *alt), world)

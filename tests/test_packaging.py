"""Packaging and set-up: the install lines agree, torch stays a range, every shipped config loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from sparsetron.config import Scheduler, load_config
from sparsetron.dist.preflight import check_job

REPO = Path(__file__).resolve().parents[1]


def make_var(name: str) -> str:
    match = re.search(rf"^{name}\s*:=\s*(.+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, f"Makefile has no {name} := ..."
    return match.group(1).strip()


def test_dockerfile_installs_the_makefile_cluster_extras_the_same_way():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    installs = re.findall(r"pip install [^\n]*?-c (\S+) -e '\.\[([^\]]+)\]'", dockerfile)
    assert len(installs) == 1, dockerfile
    constraint, extras = installs[0]
    assert extras == make_var("CLUSTER_EXTRAS")
    assert constraint == "/tmp/torch-pin.txt" and "torch=={torch.__version__}" in dockerfile
    assert (
        re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.M)
        and "ARG BASE_IMAGE=pytorch/pytorch:" in dockerfile
    )
    # The Makefile installs the same extras (plus dev) editable, under its constraints file.
    assert make_var("TEST_EXTRAS") == "dev,$(CLUSTER_EXTRAS)"
    assert "-c constraints.txt" in make_var("PIP_INSTALL")
    assert "$(PIP_INSTALL) -e '.[$(TEST_EXTRAS)]'" in (REPO / "Makefile").read_text()


def test_torch_is_a_range_for_users_and_a_pin_for_this_machine():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_dep = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert ">=" in torch_dep and "==" not in torch_dep
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text().splitlines()
    assert set(project["optional-dependencies"]) >= {"megatron", "deepspeed", "mpi", "dev"}
    assert any(d.startswith("mpich") for d in project["optional-dependencies"]["mpi"])
    assert any(d.startswith("transformers") for d in project["optional-dependencies"]["dev"])
    assert project["scripts"]["sparsetron"] == "sparsetron.cli:main"


def test_ci_runs_make_test_and_readme_opens_with_the_two_commands():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "make run" in first_block and "make test" in first_block


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml")))
def test_every_model_preset_loads(preset):
    cfg = load_config(None, [f"model.preset={preset}"])
    assert cfg.model.preset == preset
    assert cfg.model.n_heads % cfg.model.n_kv_heads == 0


@pytest.mark.parametrize("fragment", sorted(p.name for p in (REPO / "configs" / "parallel").glob("*.yaml")))
def test_every_parallel_fragment_fits_the_demo(fragment):
    cfg = load_config([REPO / "configs" / "train" / "demo.yaml", REPO / "configs" / "parallel" / fragment])
    world = {"cp2-ring.yaml": 4, "cp4-hybrid.yaml": 4, "fsdp2-cp2-ep2.yaml": 4}[fragment]
    check_job(cfg, world)


#: A layout of the demo that fits each example cluster's world size (4 fits the demo's own).
CLUSTER_LAYOUTS = {
    "gpu-node.yaml": ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.cp=2"],
    "slurm-multinode.yaml": ["parallel.dp_replicate=4", "parallel.dp_shard=2", "parallel.cp=4"],
}


@pytest.mark.parametrize("cluster", sorted(p.name for p in (REPO / "configs" / "cluster").glob("*.yaml")))
def test_every_cluster_config_loads(cluster):
    # As `sparsetron launch` merges them: the cluster file outranks the run config's own cluster section.
    cfg = load_config(
        [REPO / "configs" / "train" / "demo.yaml", REPO / "configs" / "cluster" / cluster],
        CLUSTER_LAYOUTS.get(cluster, []),
    )
    assert isinstance(cfg.cluster.scheduler, Scheduler)
    check_job(cfg, cfg.cluster.nodes * cfg.cluster.procs_per_node)


def test_demo_is_the_default_run_config_and_fits_its_cluster():
    cfg = load_config(REPO / "configs" / "train" / "demo.yaml")
    check_job(cfg, cfg.cluster.nodes * cfg.cluster.procs_per_node)

"""The environment for subprocess launches in tests: the checkout importable, no inherited launcher variables."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Variables that would make a subprocess discover the wrong launcher (inherited from a cluster shell or CI).
_LAUNCHER_PREFIXES = (
    "SLURM_",
    "OMPI_",
    "PMI_",
    "PMIX_",
    "MV2_",
    "MPI_LOCAL",
    "HYDI_",
    "HYDRA_",
    "TORCHELASTIC_",
)
_LAUNCHER_NAMES = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
}


def is_launcher_var(name: str) -> bool:
    """Whether ``name`` is a variable by which a launcher tells a process its rank or rendezvous."""
    return name.startswith(_LAUNCHER_PREFIXES) or name in _LAUNCHER_NAMES


def clean_env() -> dict[str, str]:
    """os.environ without launcher variables, one OpenMP thread per rank, and this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not is_launcher_var(k)}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env

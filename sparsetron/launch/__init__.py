"""Launching jobs from cluster YAML: preflight, dry runs, torchrun / Slurm / MPI commands, network profiles."""

from sparsetron.launch.plan import LaunchError, LaunchPlan, describe, execute, plan_launch

__all__ = ["LaunchError", "LaunchPlan", "describe", "execute", "plan_launch"]

"""Errors raised while discovering processes and validating layouts."""


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message names every degree, the broken rules and alternatives."""


class DistEnvError(RuntimeError):
    """The launcher's environment is missing or inconsistent; the message names the variables and the fix."""

"""The engine's public face, for the CLI, the daemon and the tests: the operations that
change the tree, recovery, and the options and outcome they share (see engine/)."""

from __future__ import annotations

from .engine.operations import (
    apply_plan,
    forget_kernel,
    observation_shortfall,
    protected_modules,
    restore_modules,
    rollback,
)
from .engine.recovery import recover
from .engine.transition import FAULT_STEPS, Options, Outcome, Progress, fault_point

__all__ = [
    "FAULT_STEPS", "Options", "Outcome", "Progress", "apply_plan", "fault_point",
    "forget_kernel", "observation_shortfall", "protected_modules", "recover",
    "restore_modules", "rollback",
]

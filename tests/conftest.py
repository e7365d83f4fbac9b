"""Shared fixtures: real Debian kernels (tests/kernels.py) and gcc-built modules (modbuild)."""

from __future__ import annotations

from kernels import *  # noqa: F403  (session fixtures: cloud_kernel, generic_kernel)

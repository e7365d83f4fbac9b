"""The one subprocess wrapper: scrubbed environment, debug log of each command, one error."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import CommandError

log = logging.getLogger("kmodtrim.run")

# Only what tools need to behave predictably; everything else is dropped.
_KEPT_ENV = ("PATH", "TMPDIR", "SOURCE_DATE_EPOCH", "SYSTEMD_LOG_LEVEL")
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Completed:
    """A finished command: its argv, exit status and decoded output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def scrubbed_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: PATH and a few harmless variables, C locale, plus ``extra``."""
    env = {key: os.environ[key] for key in _KEPT_ENV if key in os.environ}
    env.setdefault("PATH", _DEFAULT_PATH)
    env["LC_ALL"] = "C"
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str | Path],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input: str | None = None,
    timeout: float | None = None,
) -> Completed:
    """Run a command and capture its output.

    Raises CommandError (with the tail of stderr) when it cannot start, times out, or — with
    ``check`` — exits non-zero.
    """
    args = tuple(str(a) for a in argv)
    log.debug("+ %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            env=scrubbed_env(env),
            cwd=cwd,
            input=input,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise CommandError(f"{args[0]}: command not found", hint="install it") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(f"{shlex.join(args)}: timed out after {timeout} s") from exc
    done = Completed(args, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise CommandError(f"{shlex.join(args)} failed with exit status {proc.returncode}:\n{tail}")
    return done

"""How the CLI talks to a person: warnings and notes on stderr, colour only on a terminal
(never with NO_COLOR), quiet and verbose, progress for long steps (a live line on a
terminal, one line per step otherwise, so a log is never silent), and confirmation."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from ..errors import InputError


def _colour_wanted(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and \
        os.environ.get("TERM") != "dumb"


class Console:
    """Where and how much the CLI says. ``out`` carries what was asked for (a document or
    its human rendering); everything else goes to ``err``. (A plain class: making a
    dataclass costs every verb's start-up.)"""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, *,
                 quiet: bool = False, verbose: bool = False, json: bool = False) -> None:
        self.out: TextIO = sys.stdout if out is None else out
        self.err: TextIO = sys.stderr if err is None else err
        self.quiet = quiet
        self.verbose = verbose
        self.json = json
        self._step: str | None = None
        self._step_started = 0.0

    def bold(self, text: str) -> str:
        return f"\033[1m{text}\033[0m" if _colour_wanted(self.out) else text

    def _paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if _colour_wanted(self.err) else text

    def warn(self, message: str) -> None:
        print(self._paint("kmodtrim: warning:", "33") + f" {message}", file=self.err)

    def error(self, message: str, hint: str | None = None) -> None:
        print(self._paint("kmodtrim: error:", "31") + f" {message}", file=self.err)
        if hint:
            print(f"kmodtrim: hint: {hint}", file=self.err)

    def note(self, message: str) -> None:
        """Something worth saying that is not the answer (suppressed by -q)."""
        if not self.quiet:
            print(f"kmodtrim: {message}", file=self.err)

    def detail(self, message: str) -> None:
        """Only with -v."""
        if self.verbose:
            print(f"kmodtrim: {message}", file=self.err)

    def progress(self, step: str, done: int, total: int) -> None:
        """A long step's progress: a live line on a terminal, else one line when a step
        starts and one when it ends (never with -q or --json)."""
        if self.quiet or self.json:
            return
        if self.err.isatty():
            if total >= 20 and (done == total or done % max(total // 50, 1) == 0):
                print(f"\r  {step}: {done}/{total}", end="\n" if done == total else "",
                      file=self.err, flush=True)
            return
        if step != self._step:
            self._step, self._step_started = step, time.monotonic()
            print(f"kmodtrim: {step}: {total} to do", file=self.err, flush=True)
        if done == total:
            print(f"kmodtrim: {step}: done in {time.monotonic() - self._step_started:.1f} s",
                  file=self.err, flush=True)

    def fraction(self, phase: str, value: float) -> None:
        """A daemon job's progress (phase, 0..1)."""
        if self.quiet or self.json:
            return
        if self.err.isatty():
            print(f"\r  {phase}: {100 * value:3.0f}%", end="\n" if value >= 1 else "",
                  file=self.err, flush=True)
        elif phase != self._step:
            self._step = phase
            print(f"kmodtrim: {phase}", file=self.err, flush=True)

    def confirm(self, question: str, *, yes: bool, dry_run: bool) -> bool:
        """Ask ``question`` (it names the change and its target). Raises InputError when
        there is no terminal to ask on and neither --yes nor --dry-run was given."""
        if yes or dry_run:
            return True
        if not sys.stdin.isatty():
            raise InputError(f"{question} — refusing without --yes when not on a terminal",
                             hint="review with --dry-run, then pass --yes")
        answer = input(f"{question} [y/N] ").strip().lower()
        return answer in ("y", "yes")

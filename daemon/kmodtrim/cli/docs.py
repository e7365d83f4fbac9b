"""Man pages and shell completion, generated — never written by hand:

- ``kmodtrim(8)`` and ``kmodtrimd(8)`` from the one parser of each program, with
  argparse-manpage;
- bash and zsh completion from ``kmodtrim``'s parser, with shtab;
- ``kmodtrim-policy(5)`` from the default policy file (config/policy.toml, which is
  documented line by line), so the page says what the shipped file says.

The packages run it at build time; a test runs it too:

    python3 -m kmodtrim.cli.docs OUTDIR [--policy config/policy.toml]

Both libraries are build-time tools only (Debian: python3-argparse-manpage,
python3-shtab); kmodtrim never imports this module at run time.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from .. import __version__
from .parser import build_parser

MANUAL = "kmodtrim manual"


def _roff_escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def man_page(parser: argparse.ArgumentParser, section: int, description: str) -> str:
    """The man page of ``parser`` (argparse-manpage)."""
    try:
        from argparse_manpage.manpage import Manpage
    except ImportError:  # argparse-manpage 1.x (Debian 12) names its module build_manpages
        from build_manpages.manpage import Manpage

    data = {"manual_section": str(section), "version": __version__,
            "project_name": "kmodtrim", "manual_title": MANUAL,
            "description": description, "date": time.strftime("%Y-%m-%d")}
    try:
        return str(Manpage(parser, _data=data))
    except TypeError:  # argparse-manpage before 2 takes the parser alone: the same header
        page = str(Manpage(parser))  # and NAME line as 2 writes (lintian: bad-whatis-entry)
        name = parser.prog
        header = (f'.TH {name.upper()} "{section}" "{data["date"]}" "kmodtrim {__version__}" '
                  f'"{MANUAL}"')
        page = re.sub(r"^\.TH .*$", lambda _: header, page, count=1, flags=re.MULTILINE)
        return re.sub(r"^\.SH NAME\n.*$", lambda _: f".SH NAME\n{name} \\- "
                      f"{_roff_escape(description)}", page, count=1, flags=re.MULTILINE)


def completion(parser: argparse.ArgumentParser, shell: str) -> str:
    """``shell`` completion of ``parser`` (shtab)."""
    import shtab

    return str(shtab.complete(parser, shell=shell))


def policy_page(policy_toml: str) -> str:
    """kmodtrim-policy(5) from the commented default policy: each comment block becomes
    the description of the setting that follows it."""
    out = [f'.TH KMODTRIM-POLICY 5 "{time.strftime("%Y-%m-%d")}" "kmodtrim {__version__}" '
           f'"{MANUAL}"',
           ".SH NAME", "kmodtrim-policy \\- what kmodtrim keeps, and how it trims",
           ".SH SYNOPSIS",
           "/etc/kmodtrim/policy.toml, /etc/kmodtrim/policy.d/*.toml",
           ".SH DESCRIPTION",
           "The policy is TOML. Drop-ins in policy.d are applied after the main file in "
           "lexical order; a file linked to /dev/null is masked. The settings, as the "
           "default policy documents them:"]
    comment: list[str] = []
    for line in policy_toml.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        if not stripped:
            if comment and not out[-1].startswith(".TP"):
                out += [".PP", _roff_escape(" ".join(c for c in comment if c))]
            comment = []
            continue
        if stripped.startswith("["):
            out += [".SS " + _roff_escape(stripped.strip("[]"))]
        else:
            out += [".TP", "\\fB" + _roff_escape(stripped) + "\\fR"]
        if comment:
            out.append(_roff_escape(" ".join(c for c in comment if c)))
        comment = []
    out += [".SH SEE ALSO", "\\fBkmodtrim\\fR(8), \\fBkmodtrimd\\fR(8)"]
    return "\n".join(out) + "\n"


def generate(outdir: Path, policy: Path | None) -> list[Path]:
    """Write every page and completion under ``outdir``; returns what was written."""
    from ..daemon import build_parser as daemon_parser

    outdir.mkdir(parents=True, exist_ok=True)
    kmodtrim = build_parser()
    files = {
        "kmodtrim.8": man_page(kmodtrim, 8, "Keep a machine's installed kernel modules down "
                               "to what it uses: plan, explain, apply, roll back, restore."),
        "kmodtrimd.8": man_page(daemon_parser(), 8, "The kmodtrim daemon: observes module "
                                "loads, restores trimmed drivers on demand, serves D-Bus."),
        "kmodtrim.bash": completion(kmodtrim, "bash"),
        "_kmodtrim": completion(kmodtrim, "zsh"),
    }
    if policy is not None:
        files["kmodtrim-policy.5"] = policy_page(policy.read_text(encoding="utf-8"))
    written = []
    for name, text in files.items():
        path = outdir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="generate kmodtrim's man pages and "
                                     "shell completion")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--policy", type=Path, help="the default policy (config/policy.toml)")
    args = parser.parse_args(argv)
    for path in generate(args.outdir, args.policy):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

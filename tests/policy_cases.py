"""Policy files, good and malformed, loaded the way kmodtrim loads them; prints what each
gave (the settings, or the one-line error) as JSON, with the pydantic version.

Run by other interpreters than the test's own, with only kmodtrim importable: under a
pydantic 1.10 virtualenv (tests/test_policy_pydantic1.py) and inside debootstrapped
Debian 12 and 13 roots with the installed package (tests/test_install_roots.py). The
outputs must be equal, whatever the pydantic:

    python3 policy_cases.py [--shipped /etc/kmodtrim/policy.toml]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

MAIN = "etc/kmodtrim/policy.toml"
DROPIN = "etc/kmodtrim/policy.d/50-site.toml"

# case name -> {relative path: text}
CASES: dict[str, dict[str, str]] = {
    "empty": {MAIN: ""},
    "every key": {MAIN: """
mode = "auto"
presets = ["cloud-boot", "filesystems"]
rules = ["virtio*", "-snd_*", "alias:pci:v00001AF4*", "kernel/fs/*"]
firmware = "keep"
backend = "dpkg"
remove_packages = false
initramfs = "dracut"
stash_compression = "zstd"
[min_observation]
boots = 5
days = 3
[stash]
keep = "all"
budget_mib = 0
"""},
    "drop-ins": {MAIN: 'presets = ["cloud-boot", "filesystems"]\nrules = ["a"]\n',
                 DROPIN: 'presets = ["-filesystems", "container-host"]\nrules = ["b"]\n'
                         "[min_observation]\ndays = 1.5\n"},
    "unknown key": {MAIN: 'mode = "manual"\nmdoe = "auto"\n'},
    "unknown key in a table": {DROPIN: "[min_observation]\nboot = 2\n"},
    "unknown key in [stash]": {MAIN: "[stash]\nkeeep = 'all'\n"},
    "bad types": {MAIN: '[min_observation]\nboots = "three"\ndays = -1\n'},
    "float for a whole number": {MAIN: "[min_observation]\nboots = 3.0\ndays = true\n"},
    "string for a number": {MAIN: '[min_observation]\ndays = "7"\n'},
    "not finite": {MAIN: "[min_observation]\ndays = nan\n"},
    "infinite": {MAIN: "[min_observation]\ndays = inf\n"},
    "bad choice": {MAIN: 'initramfs = "mkinitcpio"\n'},
    "number for a choice": {MAIN: "mode = 1\n"},
    "list for a choice": {MAIN: 'firmware = ["trim"]\n'},
    "unknown preset": {DROPIN: 'presets = [\n  "filesystems",\n  "cloud-bot",\n]\n'},
    "preset removed in the main file": {MAIN: 'presets = ["-cloud-boot"]\n'},
    "non-string preset": {MAIN: "presets = [1]\n"},
    "bad rules": {MAIN: 'rules = [\n  "ok",\n  42,\n  "two words",\n  "-",\n]\n'},
    "not a list, not a table": {MAIN: 'rules = "virtio*"\nmin_observation = 3\n'},
    "number for a flag": {MAIN: "remove_packages = 1\n"},
    "string for a flag": {MAIN: 'remove_packages = "yes"\n'},
    "unimplemented compression": {MAIN: 'stash_compression = "xz"\n'},
    "bad [stash]": {MAIN: '[stash]\nkeep = "some"\nbudget_mib = -1\n'},
    "fractional budget": {MAIN: "[stash]\nbudget_mib = 1.5\n"},
    "several errors in one file": {MAIN: 'mode = "x"\nfirmware = 2\nbogus = 1\n'
                                         'rules = ["a b"]\n[min_observation]\nboots = -3\n'},
}


def run_case(files: dict[str, str]) -> dict[str, object]:
    from kmodtrim.errors import PolicyError
    from kmodtrim.policy import load_policy
    from kmodtrim.policy.compat import dump

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for relpath, text in files.items():
            (root / relpath).parent.mkdir(parents=True, exist_ok=True)
            (root / relpath).write_text(text)
        try:
            loaded = load_policy(root)
        except PolicyError as e:
            return {"error": str(e).replace(str(root), "ROOT")}
        return {"settings": dump(loaded.settings), "rules": [r.text for r in loaded.rules],
                "sources": list(loaded.sources)}


def frozen() -> bool:
    """Whether the settings refuse assignment (pydantic 2 raises a ValueError, 1.10 a
    TypeError)."""
    from kmodtrim.policy import default_policy

    settings = default_policy().settings
    try:
        settings.mode = "auto"
    except (TypeError, ValueError):
        return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shipped", type=Path, help="also load this policy file")
    args = parser.parse_args()
    import pydantic

    cases = dict(CASES)
    if args.shipped:
        cases["shipped"] = {MAIN: args.shipped.read_text()}
    results = {name: run_case(files) for name, files in cases.items()}
    json.dump({"pydantic": pydantic.VERSION, "frozen": frozen(), "results": results},
              sys.stdout, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

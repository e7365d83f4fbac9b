"""Ansible module: kmodtrim plan, apply, rollback and restore — check mode and diff,
idempotent (what would change is asked first with --dry-run)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: kmodtrim
short_description: Plan, apply, roll back or restore a kmodtrim trim
description:
  - C(plan) returns the plan (C(kmodtrim plan --json)) and never changes anything.
  - C(apply), C(rollback) and C(restore) first ask kmodtrim what they would do
    (C(--dry-run --json)); when nothing would move the task reports C(changed=false) and
    runs nothing, so a second run is a no-op. In check mode only that question is asked.
  - With C(--diff), the files that would leave the tree are the diff's "before" lines and
    the files that would come back its "after" lines.
options:
  action:
    description: What to do.
    type: str
    choices: [plan, apply, rollback, restore]
    default: plan
  root:
    description: The root to work on (an image root, or / for the host itself).
    type: path
    default: /
  kernel:
    description: The kernel version (default the running kernel, else the newest).
    type: str
  observed:
    description: Observation files (names, an observation export or a fleet merge).
    type: list
    elements: path
    default: []
  policy:
    description: Policy file to use instead of ROOT/etc/kmodtrim/policy.toml.
    type: path
  names:
    description: Modules to restore (C(action=restore)).
    type: list
    elements: str
    default: []
  generation:
    description: The generation to return to (C(action=rollback); required there, so a
      second run finds the root already there).
    type: int
  force:
    description: Trim before the minimum observation is met (C(action=apply)).
    type: bool
    default: false
  initramfs:
    description: Initramfs generator (auto, skip, dracut, update-initramfs, kernel-install).
    type: str
  backend:
    description: Package-manager backend (auto, stash, dpkg, rpm).
    type: str
  offline:
    description: Never ask a running kmodtrimd.
    type: bool
    default: false
  kmodtrim_bin:
    description: The kmodtrim command (may be several words).
    type: str
    default: kmodtrim
"""

EXAMPLES = r"""
- name: Trim an image root to what the fleet used
  kmodtrim.fleet.kmodtrim:
    action: apply
    root: /srv/images/cloud
    observed: [/srv/fleet/merged.json]
    initramfs: skip
- name: Put every module back
  kmodtrim.fleet.kmodtrim:
    action: rollback
    generation: 0
"""

RETURN = r"""
document:
  description: What kmodtrim printed (the plan, or the outcome of the change or dry run).
  returned: always
  type: dict
taken_out:
  description: In-root paths taken (or that would be taken) out of the tree.
  returned: unless action is plan
  type: list
put_back:
  description: In-root paths put (or that would be put) back.
  returned: unless action is plan
  type: list
"""

from typing import Any  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.kmodtrim.fleet.plugins.module_utils.kmodtrim_cli import (  # noqa: E402
    COMMON_ARGS,
    command,
    run_json,
)


def _argv(params: dict[str, Any], dry_run: bool) -> list[str]:
    action = params["action"]
    args: list[str] = [action]
    if action == "rollback":
        args.append(str(params["generation"]))
    elif action == "restore":
        args.extend(params["names"])
    if action != "plan":
        args += ["--yes"] + (["--dry-run"] if dry_run else [])
        for key in ("initramfs", "backend"):
            if params[key]:
                args += [f"--{key}", params[key]]
    if action in ("plan", "apply"):
        for path in params["observed"]:
            args += ["--observed", path]
        if params["policy"]:
            args += ["--policy", params["policy"]]
    if action == "apply" and params["force"]:
        args.append("--force")
    if params["kernel"]:
        args += ["--kernel", params["kernel"]]
    if params["offline"]:
        args.append("--offline")
    return command(params, *args, "--json")


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **COMMON_ARGS,
            "action": {"type": "str", "default": "plan",
                       "choices": ["plan", "apply", "rollback", "restore"]},
            "kernel": {"type": "str"},
            "observed": {"type": "list", "elements": "path", "default": []},
            "policy": {"type": "path"},
            "names": {"type": "list", "elements": "str", "default": []},
            "generation": {"type": "int"},
            "force": {"type": "bool", "default": False},
            "initramfs": {"type": "str"},
            "backend": {"type": "str"},
            "offline": {"type": "bool", "default": False},
        },
        required_if=[("action", "rollback", ("generation",)),
                     ("action", "restore", ("names",))],
        supports_check_mode=True,
    )
    params = module.params
    if params["action"] == "plan":
        module.exit_json(changed=False, document=run_json(module, _argv(params, False)))
    would = run_json(module, _argv(params, True))
    taken_out = sorted(would.get("taken_out", []))
    put_back = sorted(would.get("put_back", []))
    changed = bool(taken_out or put_back)
    diff = {"before_header": f"{params['root']} (files in the tree that go)",
            "after_header": f"{params['root']} (files that come back)",
            "before": "".join(f"{p}\n" for p in taken_out),
            "after": "".join(f"{p}\n" for p in put_back)}
    if not changed or module.check_mode:
        module.exit_json(changed=changed, document=would, taken_out=taken_out,
                         put_back=put_back, diff=diff)
    done = run_json(module, _argv(params, False))
    module.exit_json(changed=True, document=done, taken_out=sorted(done.get("taken_out", [])),
                     put_back=sorted(done.get("put_back", [])), diff=diff)


if __name__ == "__main__":
    main()

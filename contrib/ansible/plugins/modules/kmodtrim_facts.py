"""Ansible facts module: the host's kmodtrim observation export."""

from __future__ import annotations

DOCUMENTATION = r"""
module: kmodtrim_facts
short_description: The host's kmodtrim observation export, as facts
description:
  - Runs C(kmodtrim observe --export) and returns its document as the fact
    C(kmodtrim_export) - image identity (os-release IMAGE_ID, IMAGE_VERSION, VERSION_ID),
    a sha256 (or, with I(salt), HMAC-SHA256) of /etc/machine-id, platform, kernels and,
    per module, first and last seen, boots seen and how.
  - Changes nothing; supports check mode.
options:
  root:
    description: The root to read (an image root, or / for the host itself).
    type: path
    default: /
  salt:
    description: Key the machine-id hash with this fleet-wide secret.
    type: str
  kmodtrim_bin:
    description: The kmodtrim command (may be several words).
    type: str
    default: kmodtrim
"""

EXAMPLES = r"""
- name: Read the observation export
  kmodtrim.fleet.kmodtrim_facts:
- ansible.builtin.debug:
    var: ansible_facts.kmodtrim_export.modules | length
"""

RETURN = r"""
ansible_facts:
  description: C(kmodtrim_export), the export document (schema 1).
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.kmodtrim.fleet.plugins.module_utils.kmodtrim_cli import (  # noqa: E402
    COMMON_ARGS,
    command,
    run_json,
)


def main() -> None:
    module = AnsibleModule(argument_spec={**COMMON_ARGS, "salt": {"type": "str",
                                                                  "no_log": True}},
                           supports_check_mode=True)
    argv = command(module.params, "observe", "--export")
    if module.params["salt"]:
        argv += ["--salt", module.params["salt"]]
    export = run_json(module, argv)
    module.exit_json(changed=False, ansible_facts={"kmodtrim_export": export})


if __name__ == "__main__":
    main()

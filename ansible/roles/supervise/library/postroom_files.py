#!/usr/bin/python
"""Ansible module: several directories and small files in one module run.

Shared by the etcd and postroom roles (both depend on the supervise role,
whose library/ this is).  Each ``file`` or ``copy`` task costs a module run
on the host (~0.5-0.9 s of CPU: the AnsiballZ start-up), most of it spent
even when nothing changes; a role's directories, certificates and credential
files are one run of this module instead.
"""

from __future__ import annotations

import os
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: postroom_files
short_description: Directories and small files (owner, group, mode) in one run
description:
  - Creates each directory when missing, writes each file whose content
    differs (a temporary file in the same directory, fsynced, its owner,
    group and mode set, then renamed over the old one), and sets owner,
    group and mode when they differ. Reports every changed path.
options:
  directories:
    description: "Directories: C(path), C(mode), C(owner), C(group) (empty: unchanged)."
    type: list
    elements: dict
    default: []
  files:
    description: "Files: C(dest), C(content) (text), C(mode), C(owner), C(group)."
    type: list
    elements: dict
    default: []
  links:
    description: "Symbolic links: C(dest) pointing at C(src) (replaced atomically when it points elsewhere)."
    type: list
    elements: dict
    default: []
  probe:
    description: Paths to look for (nothing is changed); those that exist come back in C(existing).
    type: list
    elements: path
    default: []
author: postroom
"""

RETURN = r"""
changed_paths:
  description: Directories, files and links created or changed, in order.
  type: list
  returned: always
changed_files:
  description: The files among them (content or attributes changed).
  type: list
  returned: always
existing:
  description: The paths of C(probe) that exist.
  type: list
  returned: always
"""


def _file_args(module: AnsibleModule, path: str, spec: dict) -> dict:
    """The file attributes as AnsibleModule wants them (empty owner/group: unchanged)."""
    return module.load_file_common_arguments(
        {"mode": spec["mode"], "owner": spec.get("owner") or None,
         "group": spec.get("group") or None}, path=path)


def _directory(module: AnsibleModule, spec: dict) -> bool:
    """Ensure one directory; True when something changed."""
    path = spec["path"]
    changed = False
    if not os.path.isdir(path):
        changed = True
        if module.check_mode:
            return True
        os.makedirs(path)
    return module.set_fs_attributes_if_different(_file_args(module, path, spec), changed)


def _write(module: AnsibleModule, spec: dict, data: bytes) -> None:
    """Replace dest with data atomically, attributes set before the rename."""
    dest = spec["dest"]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".postroom_files.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        module.set_fs_attributes_if_different(_file_args(module, tmp, spec), False)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _file(module: AnsibleModule, spec: dict) -> bool:
    """Ensure one file's content and attributes; True when something changed."""
    dest = spec["dest"]
    data = spec["content"].encode("utf-8")
    try:
        with open(dest, "rb") as f:
            same = f.read() == data
    except FileNotFoundError:
        same = False
    if not same:
        if not module.check_mode:
            _write(module, spec, data)
        return True
    return module.set_fs_attributes_if_different(_file_args(module, dest, spec), False)


def _link(module: AnsibleModule, spec: dict) -> bool:
    """Point dest at src (a new link renamed over the old); True when it changed."""
    dest, src = spec["dest"], spec["src"]
    if os.path.islink(dest) and os.readlink(dest) == src:
        return False
    if not module.check_mode:
        tmp = os.path.join(os.path.dirname(dest), f".postroom_files.{os.getpid()}.link")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(src, tmp)
        os.replace(tmp, dest)
    return True


def main() -> None:
    attrs = {"mode": {"type": "raw", "required": True}, "owner": {"type": "str", "default": ""},
             "group": {"type": "str", "default": ""}}
    module = AnsibleModule(
        argument_spec={
            "directories": {"type": "list", "elements": "dict", "default": [],
                            "options": {"path": {"type": "path", "required": True}, **attrs}},
            "files": {"type": "list", "elements": "dict", "default": [],
                      "options": {"dest": {"type": "path", "required": True},
                                  "content": {"type": "str", "required": True, "no_log": True},
                                  **attrs}},
            "links": {"type": "list", "elements": "dict", "default": [],
                      "options": {"src": {"type": "str", "required": True},
                                  "dest": {"type": "path", "required": True}}},
            "probe": {"type": "list", "elements": "path", "default": []},
        },
        supports_check_mode=True,
    )
    changed_paths, changed_files = [], []
    for spec in module.params["directories"]:
        if _directory(module, spec):
            changed_paths.append(spec["path"])
    for spec in module.params["files"]:
        if _file(module, spec):
            changed_paths.append(spec["dest"])
            changed_files.append(spec["dest"])
    for spec in module.params["links"]:
        if _link(module, spec):
            changed_paths.append(spec["dest"])
    existing = [path for path in module.params["probe"] if os.path.lexists(path)]
    module.exit_json(changed=bool(changed_paths), changed_paths=changed_paths,
                     changed_files=changed_files, existing=existing)


if __name__ == "__main__":
    main()

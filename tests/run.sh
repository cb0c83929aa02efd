#!/usr/bin/env bash
# The whole test suite: installs what the tests need, then runs pytest.
# Extra arguments go to pytest (e.g. tests/run.sh tests/unit -x).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
POSTROOM_APT="etcd-server swaks isync fetchmail curl ca-certificates postfix opendkim-tools dovecot-imapd" \
POSTROOM_EXTRAS="[test]" bash "$here/setup-env.sh"
cd "$here/.."
.venv/bin/ruff check .
# The suite starts ~250 Python processes (nodes, CLI commands, etcd helpers);
# with PYTHONDONTWRITEBYTECODE set (as in some CI images) each recompiled
# postroom's modules (~0.3 s of CPU per start).  Cache the bytecode.
unset PYTHONDONTWRITEBYTECODE
.venv/bin/python -m compileall -q node storage cluster tests > /dev/null
exec .venv/bin/python -m pytest "$@"

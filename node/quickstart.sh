#!/usr/bin/env bash
# The README's first command: install postroom in .venv and start one demo
# node (embedded etcd, data in ./postroom-data, demo domain and account).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
POSTROOM_APT="etcd-server" bash "$repo/tests/setup-env.sh"
exec "$repo/.venv/bin/postroom" quickstart --data-dir "${POSTROOM_DATA:-$repo/postroom-data}"

#!/usr/bin/env bash
# The test command (the README's second command; CI runs exactly this): set-up if needed, then lint and tests.
# Usage: bash test.sh [extra pytest args]      Time: ~10 min on 2 CPU cores after set-up.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$REPO/setup.sh"
cd "$REPO"
echo "== ruff check"
.venv/bin/ruff check .
echo "== pytest"
.venv/bin/python -m pytest -q "$@"

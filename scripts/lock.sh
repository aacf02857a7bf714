#!/usr/bin/env bash
# Refreshes constraints.txt: the exact version of every package the tests run with (the project's
# runtime dependencies, its test tools, the code generator, and what they pull in), so that
# scripts/test.sh installs the same set on every machine and every day.
#
#   scripts/lock.sh          # resolve pyproject.toml's ranges anew (newest allowed) and rewrite constraints.txt
#
# pyproject.toml keeps ranges for users (`pip install neoplasma` takes any allowed release);
# constraints.txt pins one tested set for the tests. Commit the new constraints.txt with the
# test run that passed on it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)"
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -e '.[test]'
# aiohttp and redis also pull in async-timeout on Python < 3.11.3 (Debian 12's python3 is 3.11.2): pinned
# too, whatever Python this runs with, so a fresh Debian machine installs the locked set.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir async-timeout
{
    echo "# The exact versions scripts/test.sh installs (pip install -c constraints.txt)."
    echo "# Made by scripts/lock.sh with $("$venv/bin/python" --version) on $(date -u +%Y-%m-%d); do not edit by hand."
    "$venv/bin/python" -m pip freeze --exclude-editable --all | LC_ALL=C sort -f
} > constraints.txt
echo "scripts/lock.sh: wrote constraints.txt ($(grep -c '==' constraints.txt) packages)" >&2

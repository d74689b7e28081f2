#!/usr/bin/env bash
# Create the project virtualenv (.venv, Python 3.12) and install everything the job and the
# tests need. Idempotent: a complete environment is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
                   /usr/local/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "No Python 3.12 found (megatron-core 0.19.2 needs it): set PYTHON=/path/to/python3.12" >&2
  return 1
}

# Whether the packages are installed, not an import of them: importing megatron.core (and torch)
# would add ~9 s to every test command.
if [ -x .venv/bin/python ] && .venv/bin/python -c '
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(name) is None
             for name in ("megatron_dsv3", "megatron.core", "transformers", "wandb", "trl")))
' 2>/dev/null; then
  exit 0
fi
PY=$(find_python)
echo "Creating .venv with $PY (first time: ~3 min, the registry's torch is a CUDA build)" >&2
"$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .

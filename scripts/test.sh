#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
export TORCHDYNAMO_DISABLE=1 WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# The main job: sets up .venv if needed, then trains the tiny DeepSeek-V3 model end to end
# (CPU by default, the GPU when there is one). Extra arguments go to megatron_dsv3.train.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec .venv/bin/python -m megatron_dsv3.train "$@"

#!/usr/bin/env bash
# Fills .trl/ (git-ignored, carried to the GPU machine beside .whl/) with the wheels that TRL's
# GRPOTrainer needs there and the machine lacks: trl and accelerate, pure Python, no
# dependencies, the versions .venv has (tests/test_grpo_*.py compare our loss with this TRL).
# The machine has torch, transformers, tokenizers, numpy, pyyaml, safetensors,
# huggingface_hub and jinja2; psutil and packaging travel in .whl/. TRL's other imports
# (datasets -> pyarrow, pandas: ~70 MB, more than a device call carries) are answered by the
# stand-ins in benchmarks/trl_stub/, which benchmarks/grpo_gpu.sh puts on PYTHONPATH.
#
#   bash benchmarks/trl_wheels.sh                      # .trl/, ~1.3 MB
#   bash benchmarks/trl_wheels.sh --cpu-env /tmp/trlenv
#       also a throwaway venv for grpo_gpu.sh's CPU rehearsal: .venv's torch, transformers,
#       tokenizers, tqdm, matplotlib and their dependencies linked in, nothing else (no
#       datasets, pandas, pyarrow, accelerate, trl, psutil, megatron-core: what the GPU
#       machine lacks)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
pins=()
for dist in trl accelerate; do
  pins+=("$dist==$("$PY" -c "import importlib.metadata as m; print(m.version('$dist'))")")
done
mkdir -p .trl
"$PY" -m pip download -q --no-deps --only-binary=:all: --dest .trl "${pins[@]}"
ls -l .trl

if [ "${1:-}" = "--cpu-env" ]; then
  env_dir=${2:?--cpu-env DIR}
  rm -rf "$env_dir"
  "$("$PY" -c "import sys; print(sys._base_executable)")" -m venv "$env_dir"
  "$PY" - "$env_dir" <<'PY'
import importlib.metadata as md
import os
import sys
import sysconfig

from packaging.requirements import Requirement

source = sysconfig.get_paths()["purelib"]
target = os.path.join(sys.argv[1], os.path.relpath(source, sys.prefix))
seen, todo, tops = set(), ["torch", "transformers", "tokenizers", "tqdm", "matplotlib"], set()
while todo:
    name = todo.pop()
    if name.lower().replace("_", "-") in seen:
        continue
    seen.add(name.lower().replace("_", "-"))
    dist = md.distribution(name)
    tops.update(f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__"))
    for line in dist.requires or []:
        req = Requirement(line)
        if not req.marker or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
for top in sorted(tops):
    if os.path.exists(os.path.join(source, top)) and not os.path.exists(os.path.join(target, top)):
        os.symlink(os.path.join(source, top), os.path.join(target, top))
print(f"{sys.argv[1]}: {len(seen)} distributions linked from {source}")
PY
  "$env_dir/bin/python" -c "
for name in ('datasets', 'pandas', 'pyarrow', 'accelerate', 'trl', 'megatron'):
    try:
        __import__(name)
        raise SystemExit(f'{name} imports in the rehearsal environment')
    except ImportError:
        pass
print('none of datasets, pandas, pyarrow, accelerate, trl, megatron imports there')"
fi

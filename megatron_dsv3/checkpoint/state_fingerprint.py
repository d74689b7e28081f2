"""A resume checked: the optimizer state Megatron's loader restores equals the state it saved.

Megatron's distributed optimizer saves its fp32 main weights and each parameter's optimizer
state through several layers of resharding code, and loads them back the same way; the
digest manifest (checkpoint/digest.py) shows the files are intact, not that every tensor came
back where it was. So at each save every rank writes a fingerprint of its optimizer state
beside the checkpoint's files, and after a load compares the restored state with it:

  per torch optimizer inside Megatron's (a ChainedOptimizer holds several), per parameter in
  its param groups' order: the float64 sum and sum of absolute values of the parameter (the
  fp32 main weights) and of each state tensor or number (exp_avg, exp_avg_sq, step)

`fingerprint(optimizers)` computes it, `write_fingerprint(folder, rank, optimizers, layout)`
stores it as state_fingerprint.rank<r>.json with the parallel layout (world size, TP, PP, EP,
...; a resume under another layout is resharded and not compared),
`fingerprint_differences(saved, loaded)` names what differs: which state, of how many
parameters, and the first of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

FILE = "state_fingerprint.rank{rank}.json"


def fingerprint(optimizers: list) -> dict[str, list]:
    """{"optimizer <i> <state>": [[sum, sum of |x|] per parameter]} over the torch optimizers
    given, parameters in param-group order."""
    names, pairs = [], []
    for i, optimizer in enumerate(optimizers):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for j, param in enumerate(params):
            state = optimizer.state.get(param, {})
            items = [("param", param)] + sorted(
                (k, torch.tensor(float(v)) if isinstance(v, (int, float)) else v)
                for k, v in state.items() if isinstance(v, (torch.Tensor, int, float)))
            for name, tensor in items:
                values = tensor.detach().float()
                names.append((f"optimizer {i} {name}", j))
                pairs.append(torch.stack([values.sum(dtype=torch.float64),
                                          values.abs().sum(dtype=torch.float64)]))
    # one host sync per device (the main weights and moments on the GPU, the steps on the CPU)
    by_device: dict[torch.device, list[int]] = {}
    for k, pair in enumerate(pairs):
        by_device.setdefault(pair.device, []).append(k)
    flat: list = [None] * len(pairs)
    for indices in by_device.values():
        for k, pair in zip(indices, torch.stack([pairs[k] for k in indices]).tolist()):
            flat[k] = pair
    result: dict[str, list] = {}
    for (name, index), pair in zip(names, flat):
        entries = result.setdefault(name, [])
        entries.extend([None] * (index - len(entries)))  # parameters without this state
        entries.append(pair)
    return result


def write_fingerprint(folder: Path, rank: int, optimizers: list, layout: dict) -> None:
    """`rank`'s fingerprint into `folder`, with the parallel `layout` it was taken under."""
    (Path(folder) / FILE.format(rank=rank)).write_text(
        json.dumps({"layout": layout, "state": fingerprint(optimizers)}))


def read_fingerprint(folder: Path, rank: int, layout: dict) -> Optional[dict]:
    """The fingerprint `rank` wrote at the save of `folder` under the same parallel `layout`;
    None where there is none, or where the layout differs (the loader resharded the state:
    its per-rank sums are not comparable)."""
    path = Path(folder) / FILE.format(rank=rank)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["state"] if saved.get("layout") == layout else None


def fingerprint_differences(saved: dict, loaded: dict) -> list[str]:
    """What differs between two fingerprints, one line per state: '<state>: n of m parameters
    (first: parameter j)'; [] when equal."""
    problems = []
    for name in sorted(set(saved) | set(loaded)):
        a, b = saved.get(name), loaded.get(name)
        if a is None or b is None:
            problems.append(f"{name}: {'not saved' if a is None else 'not restored'}")
            continue
        if len(a) != len(b):
            problems.append(f"{name}: {len(a)} parameters saved, {len(b)} restored")
            continue
        differ = [j for j, (x, y) in enumerate(zip(a, b)) if x != y]
        if differ:
            problems.append(f"{name}: {len(differ)} of {len(a)} parameters (first: parameter "
                            f"{differ[0]}, sum {a[differ[0]][0]!r} saved, {b[differ[0]][0]!r} "
                            "restored)")
    return problems

"""Checks shared by the schedules: the stage modules a rank passes, and how layers split.

  check_stage_modules(modules, expected_stages, schedule)   two distinct nn.Modules; a module
        that declares `stage_index` must declare the stage the schedule places there
  split_layers(num_layers, num_stages)                       equal contiguous layer ranges
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn


def check_stage_modules(modules: Sequence[nn.Module], expected_stages: tuple[int, int],
                        schedule: str, rank: int) -> None:
    if len(modules) != 2 or not all(isinstance(m, nn.Module) for m in modules):
        raise ValueError(f"{schedule} takes two stage modules per rank (stages "
                         f"{expected_stages} on rank {rank}), got {len(modules)} objects: "
                         f"{[type(m).__name__ for m in modules]}")
    if modules[0] is modules[1]:
        raise ValueError(f"{schedule}: rank {rank} passed the same module object for stages "
                         f"{expected_stages}; each stage needs its own module"
                         + (" (DualPipe's mirrored copy is a second module with the same "
                            "parameters: see DualPipe.sync_mirrored_parameters)"
                            if schedule == "DualPipe" else ""))
    for chunk, (module, stage) in enumerate(zip(modules, expected_stages)):
        declared = getattr(module, "stage_index", None)
        if declared is not None and declared != stage:
            raise ValueError(f"{schedule}: rank {rank} chunk {chunk} must hold stage {stage}, "
                             f"but its module declares stage_index={declared}; on rank r pass "
                             f"the stages {schedule} places there, here {expected_stages}")


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Layer indices of each stage: `num_stages` equal contiguous ranges."""
    if num_stages <= 0 or num_layers < num_stages or num_layers % num_stages:
        raise ValueError(f"num_layers={num_layers} does not split into {num_stages} pipeline "
                         f"stages of equal size; use a layer count that is a multiple of "
                         f"{num_stages} (DualPipeV has 2 stages per rank, DualPipe 1 per rank), "
                         "or change the pipeline size")
    per_stage = num_layers // num_stages
    return [range(s * per_stage, (s + 1) * per_stage) for s in range(num_stages)]

"""Our full-model state-dict files: what `convert hf-to-dsv3` writes and what reads them back.

  write_state_file(state_dict, cfg, out, source)
        {"format": STATE_DICT_FORMAT, "model": the full TP=1 state dict, "model_config":
        asdict(ModelConfig), "source"} as one torch file, written to a temporary name and
        renamed (never a half-written file under the final name)
  read_state_file(path, flag=..., mmap=...)
        (state dict, model_config dict) of such a file or of a training-job rank file (a
        step_<N>/ folder is read through its rank_00000.pt), refusing one that holds only a
        rank's slice of the model (a run with TP, EP or PP > 1)

Both the converter (`convert.py`, `dsv3-to-hf`, which also verifies a step folder's digests
first) and the training job (`--init-from`: its model config when the arguments are parsed,
its weights at set-up) read through `read_state_file`; it lives here, below both, because the
job's argument parser must not import the converter (which imports the job's checkpoints).
`flag` names the option the path came from in every error, so the message says what to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Union

import torch

from ..config import ModelConfig
from .hf import ConversionError
from .hf_files import model_config_dict

STATE_DICT_FORMAT = "megatron_dsv3.state_dict/1"
RANK0_FILE = "rank_00000.pt"  # the training job's file of rank 0 in a step_<N>/ folder
_SLICING_FLAGS = ("tensor_parallel_size", "expert_parallel_size", "pipeline_parallel_size")


def write_state_file(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, out: Path,
                     source: str) -> dict:
    """Write `state_dict` (the full TP=1 model of `cfg`) with its config to `out`; returns the
    payload written."""
    payload = {"format": STATE_DICT_FORMAT, "model": dict(state_dict),
               "model_config": model_config_dict(cfg), "source": str(source)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(payload, partial)
    partial.replace(out)
    return payload


def read_state_file(path: Union[str, Path], *, flag: str = "--checkpoint",
                    mmap: bool = False) -> tuple[dict, dict]:
    """(our full state dict, its model_config dict) of a file of `hf-to-dsv3` or a training-job
    rank file (a step folder: its rank_00000.pt, not verified here), refusing what holds only a
    slice of the model. `mmap`: the tensors stay in the file until used (torch.load's mmap), so
    that reading only the config of a large file costs its index, not its size."""
    path = Path(path)
    if path.is_dir():
        if not (path / RANK0_FILE).is_file():
            raise ConversionError(f"{flag} {path}: a folder must be a training-job step "
                                  f"folder (checkpoints/step_<N>/ with {RANK0_FILE})")
        path = path / RANK0_FILE
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError as err:
        raise ConversionError(f"{flag} {path} does not exist") from err
    except Exception as err:  # noqa: BLE001 -- a damaged file fails in many ways
        raise ConversionError(f"{flag} {path} cannot be loaded ({type(err).__name__}: "
                              f"{err})") from err
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise ConversionError(f"{flag} {path}: neither a file of hf-to-dsv3 nor a "
                              "training-job rank file (no 'model' and 'model_config')")
    train_args = payload.get("train_args") or {}
    sliced = {name: train_args.get(name, 1) for name in _SLICING_FLAGS}
    if any(size != 1 for size in sliced.values()):
        raise ConversionError(
            f"{flag} {path} holds one rank's slice of the model ("
            + ", ".join(f"{k}={v}" for k, v in sliced.items())
            + "): only checkpoints of runs without tensor, expert or pipeline parallelism "
            "convert; gather a full state dict first (parallel.gather_state_dict)")
    return payload["model"], payload["model_config"]


__all__ = ["STATE_DICT_FORMAT", "RANK0_FILE", "write_state_file", "read_state_file"]

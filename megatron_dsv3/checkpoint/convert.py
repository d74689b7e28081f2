"""`python -m megatron_dsv3.checkpoint.convert`: Hugging Face DeepSeek-V3 folders <-> our weights.

  hf-to-dsv3 --hf-dir D --out F      a Hugging Face folder (BF16, FP32 or DeepSeek's FP8
                                     release) -> one torch file: {"format", "model": our full
                                     TP=1 state dict, "model_config": asdict(ModelConfig),
                                     "source"}
  dsv3-to-hf --checkpoint F --out D  such a file, or a training-job checkpoint (a step_<N>
                                     folder or its rank_00000.pt, written without tensor,
                                     expert or pipeline parallelism) -> a Hugging Face folder

The training job (`python -m megatron_dsv3.train`) has no option to start from given weights:
its `--resume` continues one of its own runs (optimizer, RNG and data position included) and
its model comes from `--preset`. The file written here is therefore a plain state dict with
its config: load it with `hf.load_dsv3_state_dict(build_model(model_config_from_dict(
payload["model_config"])), payload["model"])`. Its keys are those of the job's checkpoints
("model", "model_config"), so `dsv3-to-hf` reads both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError
from .hf import ConversionError
from .hf_files import (load_hf_checkpoint, model_config_dict, model_config_from_dict,
                       save_hf_checkpoint)

STATE_DICT_FORMAT = "megatron_dsv3.state_dict/1"
_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
_RANK0 = "rank_00000.pt"


def hf_to_dsv3(hf_dir: Path, out: Path, *, dtype=None, mtp_layers=None,
               progress: bool = True) -> dict:
    """Convert the folder and write the torch file; returns the payload written."""
    cfg, state_dict = load_hf_checkpoint(hf_dir, dtype=dtype, mtp_layers=mtp_layers,
                                         progress=progress)
    payload = {"format": STATE_DICT_FORMAT, "model": state_dict,
               "model_config": model_config_dict(cfg), "source": str(hf_dir)}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(payload, partial)
    partial.replace(out)  # never a half-written file under the final name
    return payload


def read_dsv3_checkpoint(path: Path) -> tuple[dict, dict]:
    """(our state dict, its model_config dict) from a file of `hf-to-dsv3` or a training-job
    checkpoint (step folder or rank file), refusing what holds only a slice of the model."""
    if path.is_dir():
        if not (path / _RANK0).is_file():
            raise ConversionError(f"--checkpoint {path}: a folder must be a training-job step "
                                  f"folder (checkpoints/step_<N>/ with {_RANK0})")
        from ..train.checkpoint import verify_checkpoint

        problems = verify_checkpoint(path, rank=0)
        if problems:
            raise ConversionError(f"--checkpoint {path} is damaged: " + "; ".join(problems)
                                  + "; convert another step folder")
        path = path / _RANK0
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError as err:
        raise ConversionError(f"--checkpoint {path} does not exist") from err
    except Exception as err:  # noqa: BLE001 -- a damaged file fails in many ways
        raise ConversionError(f"--checkpoint {path} cannot be loaded ({type(err).__name__}: "
                              f"{err})") from err
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise ConversionError(f"--checkpoint {path}: neither a file of hf-to-dsv3 nor a "
                              "training-job rank file (no 'model' and 'model_config')")
    train_args = payload.get("train_args") or {}
    sliced = {flag: train_args.get(flag, 1) for flag in
              ("tensor_parallel_size", "expert_parallel_size", "pipeline_parallel_size")}
    if any(size != 1 for size in sliced.values()):
        raise ConversionError(
            f"--checkpoint {path} holds one rank's slice of the model ("
            + ", ".join(f"{k}={v}" for k, v in sliced.items())
            + "): only checkpoints of runs without tensor, expert or pipeline parallelism "
            "convert; gather a full state dict first (parallel.gather_state_dict)")
    return payload["model"], payload["model_config"]


def dsv3_to_hf(checkpoint: Path, out: Path, *, max_shard_size: str = "5GB", dtype=None,
               progress: bool = True) -> dict:
    """Write the checkpoint's weights as a Hugging Face folder; returns its index."""
    state_dict, config = read_dsv3_checkpoint(checkpoint)
    return save_hf_checkpoint(state_dict, model_config_from_dict(config), out,
                              max_shard_size=max_shard_size, dtype=dtype, progress=progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dsv3.checkpoint.convert",
        description="Hugging Face DeepSeek-V3 checkpoints <-> megatron_dsv3 weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_ours = commands.add_parser(
        "hf-to-dsv3", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="a Hugging Face folder -> one torch file of our state dict and ModelConfig")
    to_ours.add_argument("--hf-dir", type=Path, required=True,
                         help="folder with config.json and safetensors shards (BF16, FP32, or "
                              "DeepSeek's FP8 release with *_scale_inv)")
    to_ours.add_argument("--out", type=Path, required=True, help="torch file to write")
    to_ours.add_argument("--dtype", default="auto", choices=sorted(_DTYPES),
                         help="auto: each tensor as stored, FP8 weights dequantized to "
                              "config.json's dtype (bf16 for DeepSeek's release)")
    to_ours.add_argument("--mtp-layers", type=int, default=None,
                         help="convert only the first N MTP layers (0 for a folder written by "
                              "transformers' save_pretrained, which saves none); default: "
                              "config.json's num_nextn_predict_layers")
    to_ours.add_argument("--no-progress", action="store_true", help="no progress bar")
    to_hf = commands.add_parser(
        "dsv3-to-hf", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="our weights -> a Hugging Face folder (config.json, shards, index)")
    to_hf.add_argument("--checkpoint", type=Path, required=True,
                       help="a file of hf-to-dsv3, or a training-job step folder / rank file "
                            "(run without TP, EP or PP)")
    to_hf.add_argument("--out", type=Path, required=True, help="new folder to write")
    to_hf.add_argument("--max-shard-size", default="5GB",
                       help="largest shard, e.g. 5GB (10^9 bytes, as Hugging Face counts) "
                            "or 4GiB")
    to_hf.add_argument("--dtype", default="auto", choices=sorted(_DTYPES),
                       help="auto: as the checkpoint holds them (the job's: fp32)")
    to_hf.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the command; conversion problems exit with status 2 and the message, no
    traceback. Returns the payload (hf-to-dsv3) or the index (dsv3-to-hf)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = not args.no_progress
    try:
        if args.command == "hf-to-dsv3":
            payload = hf_to_dsv3(args.hf_dir, args.out, dtype=_DTYPES[args.dtype],
                                 mtp_layers=args.mtp_layers, progress=progress)
            count = sum(t.numel() for t in payload["model"].values())
            print(f"{args.hf_dir} -> {args.out}: {len(payload['model'])} tensors, "
                  f"{count:,} parameters (config {payload['model_config']['name']!r})")
            return payload
        index = dsv3_to_hf(args.checkpoint, args.out, max_shard_size=args.max_shard_size,
                           dtype=_DTYPES[args.dtype], progress=progress)
        shards = len(set(index["weight_map"].values()))
        print(f"{args.checkpoint} -> {args.out}: {len(index['weight_map'])} tensors in "
              f"{shards} shard(s), {index['metadata']['total_size']:,} bytes")
        return index
    except (ConversionError, ConfigError, ValueError, OSError, json.JSONDecodeError) as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()

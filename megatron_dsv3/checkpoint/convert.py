"""`python -m megatron_dsv3.checkpoint.convert`: Hugging Face DeepSeek-V3 folders <-> our weights.

  hf-to-dsv3 --hf-dir D --out F      a Hugging Face folder (BF16, FP32 or DeepSeek's FP8
                                     release) -> one torch file: {"format", "model": our full
                                     TP=1 state dict, "model_config": asdict(ModelConfig),
                                     "source"}
  dsv3-to-hf --checkpoint F --out D  such a file, or a training-job checkpoint (a step_<N>
                                     folder or its rank_00000.pt, written without tensor,
                                     expert or pipeline parallelism) -> a Hugging Face folder
  hf-to-megatron --hf-dir D --out M  a Hugging Face folder -> a Megatron distributed checkpoint
                                     (torch_dist, a `release` folder) that Megatron's loop
                                     (`python -m megatron_dsv3.pretrain --load M`) loads at any
                                     tensor / expert / pipeline parallel layout
  megatron-to-hf --load M --out D    a checkpoint Megatron's loop saved (--save M), at any
                                     layout, -> a Hugging Face folder; the model config from
                                     its saved arguments, or --preset (checked against them)

(megatron_files.py does the last two, streaming: one tensor in memory at a time.)

The file written here is a plain state dict with its config (`state_file.py` writes and reads
it): the training job starts from it with `python -m megatron_dsv3.train --init-from F` (the
model built from its config, fresh AdamW, step 0), and elsewhere it loads with
`hf.load_dsv3_state_dict(build_model(model_config_from_dict(payload["model_config"])),
payload["model"])`. Its keys are those of the job's checkpoints ("model", "model_config"), so
`dsv3-to-hf` and `--init-from` read both (`read_dsv3_checkpoint`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError
from .hf import ConversionError
from .hf_files import load_hf_checkpoint, model_config_from_dict, save_hf_checkpoint
from .megatron_files import hf_to_megatron, megatron_to_hf
from .state_file import RANK0_FILE as _RANK0
from .state_file import STATE_DICT_FORMAT  # noqa: F401 -- the file's format, re-exported
from .state_file import read_state_file, write_state_file

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_to_dsv3(hf_dir: Path, out: Path, *, dtype=None, mtp_layers=None,
               progress: bool = True) -> dict:
    """Convert the folder and write the torch file; returns the payload written."""
    cfg, state_dict = load_hf_checkpoint(hf_dir, dtype=dtype, mtp_layers=mtp_layers,
                                         progress=progress)
    return write_state_file(state_dict, cfg, out, str(hf_dir))


def read_dsv3_checkpoint(path: Path, *, flag: str = "--checkpoint", mmap: bool = False
                         ) -> tuple[dict, dict]:
    """(our state dict, its model_config dict) from a file of `hf-to-dsv3` or a training-job
    checkpoint (step folder or rank file), refusing what holds only a slice of the model; a
    step folder's digests are verified first. `flag`: the option `path` came from, named in
    every error; `mmap`: state_file.read_state_file's."""
    path = Path(path)
    if path.is_dir() and (path / _RANK0).is_file():
        from ..train.checkpoint import verify_checkpoint

        problems = verify_checkpoint(path, rank=0)
        if problems:
            raise ConversionError(f"{flag} {path} is damaged: " + "; ".join(problems)
                                  + "; use another step folder")
    return read_state_file(path, flag=flag, mmap=mmap)


def dsv3_to_hf(checkpoint: Path, out: Path, *, max_shard_size: str = "5GB", dtype=None,
               progress: bool = True) -> dict:
    """Write the checkpoint's weights as a Hugging Face folder; returns its index."""
    state_dict, config = read_dsv3_checkpoint(checkpoint)
    return save_hf_checkpoint(state_dict, model_config_from_dict(config), out,
                              max_shard_size=max_shard_size, dtype=dtype, progress=progress)


def _reading_hf(command, out_help: str) -> None:
    """The options of a command that reads a Hugging Face folder."""
    command.add_argument("--hf-dir", type=Path, required=True,
                         help="folder with config.json and safetensors shards (BF16, FP32, or "
                              "DeepSeek's FP8 release with *_scale_inv)")
    command.add_argument("--out", type=Path, required=True, help=out_help)
    command.add_argument("--dtype", default="auto", choices=sorted(_DTYPES),
                         help="auto: each tensor as stored, FP8 weights dequantized to "
                              "config.json's dtype (bf16 for DeepSeek's release)")
    command.add_argument("--mtp-layers", type=int, default=None,
                         help="convert only the first N MTP layers (0 for a folder written by "
                              "transformers' save_pretrained, which saves none); default: "
                              "config.json's num_nextn_predict_layers")


def _writing_hf(command, dtype_help: str) -> None:
    """The options of a command that writes a Hugging Face folder."""
    command.add_argument("--out", type=Path, required=True, help="new folder to write")
    command.add_argument("--max-shard-size", default="5GB",
                         help="largest shard, e.g. 5GB (10^9 bytes, as Hugging Face counts) "
                              "or 4GiB")
    command.add_argument("--dtype", default="auto", choices=sorted(_DTYPES), help=dtype_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dsv3.checkpoint.convert",
        description="Hugging Face DeepSeek-V3 checkpoints <-> megatron_dsv3 weights and "
                    "Megatron distributed checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str):
        return commands.add_parser(name, help=summary,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    _reading_hf(command("hf-to-dsv3", "a Hugging Face folder -> one torch file of our state "
                                      "dict and ModelConfig"), "torch file to write")
    to_hf = command("dsv3-to-hf", "our weights -> a Hugging Face folder (config.json, shards, "
                                  "index)")
    to_hf.add_argument("--checkpoint", type=Path, required=True,
                       help="a file of hf-to-dsv3, or a training-job step folder / rank file "
                            "(run without TP, EP or PP)")
    _writing_hf(to_hf, "auto: as the checkpoint holds them (the job's: fp32)")
    _reading_hf(command("hf-to-megatron", "a Hugging Face folder -> a Megatron torch_dist "
                                          "checkpoint (release) for --load"),
                "new folder: Megatron's --load folder (tracker + release/)")
    from_megatron = command("megatron-to-hf", "a Megatron torch_dist checkpoint (any TP/EP/PP) "
                                              "-> a Hugging Face folder")
    from_megatron.add_argument("--load", type=Path, required=True,
                               help="the folder Megatron's loop saved into (--save), or one of "
                                    "its iter_NNNNNNN folders")
    from_megatron.add_argument("--iteration", type=int, default=None,
                               help="the iteration to read; default: the tracker file's")
    from_megatron.add_argument("--preset", default=None,
                               help="the model config to convert with (checked against the "
                                    "checkpoint's saved arguments); default: those arguments")
    _writing_hf(from_megatron, "auto: as the checkpoint holds them (--bf16 runs: bf16)")
    for sub in commands.choices.values():
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the command; conversion problems exit with status 2 and the message, no
    traceback. Returns the payload (hf-to-dsv3), the index (dsv3-to-hf), the common state
    written (hf-to-megatron) or megatron_files.megatron_to_hf's result (megatron-to-hf)."""
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
        if args.command == "hf-to-megatron":
            common = hf_to_megatron(args.hf_dir, args.out, dtype=_DTYPES[args.dtype],
                                    mtp_layers=args.mtp_layers, progress=progress)
            config = common["dsv3_model_config"]
            print(f"{args.hf_dir} -> {args.out}: a Megatron release checkpoint of "
                  f"{config['num_layers']} layers (+{config['mtp']['num_layers']} MTP); load it "
                  f"with --load {args.out} (padded vocabulary {config['vocab_size']})")
            return common
        if args.command == "megatron-to-hf":
            result = megatron_to_hf(args.load, args.out, iteration=args.iteration,
                                    preset=args.preset, max_shard_size=args.max_shard_size,
                                    dtype=_DTYPES[args.dtype], progress=progress)
            index = result["index"]
            print(f"{result['folder']} -> {args.out}: {len(index['weight_map'])} tensors, "
                  f"{index['metadata']['total_size']:,} bytes (model config from "
                  f"{result['config_source']})")
            return result
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

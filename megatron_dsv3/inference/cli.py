"""`python -m megatron_dsv3.inference`: text in, text out, from one of our checkpoint files.

  generate --checkpoint F --prompt "..." [--max-new-tokens N --temperature T --top-p P
           --seed S --speculative]      one completion printed to stdout (with --speculative
                                        the MTP drafts' statistics go to stderr)
  chat --checkpoint F                   a read-eval loop: each line typed is appended to the
                                        conversation (plain text, one turn a line), the whole
                                        conversation is the prompt, the reply is printed and
                                        appended too; an empty line or EOF ends it

--checkpoint is a file written by `python -m megatron_dsv3.checkpoint.convert hf-to-dsv3`, or
a training-job checkpoint (a step_<N> folder or its rank_00000.pt) made without tensor, expert
or pipeline parallelism: both are read by convert.py's `read_dsv3_checkpoint`, which refuses a
rank's slice of a model. The text is tokenized with our byte-level BPE (data.Tokenizer, the
tokenizer.json the training job reads from its --data-dir; examples/data's by default,
`--tokenizer` for another); generation stops at its end-of-text token. The model runs at TP=1
in one process, on a GPU when there is one (`--device`), in the checkpoint's parameter dtype.
Problems with the arguments or the checkpoint exit with status 2 and one line, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, TextIO

import torch

from ..config import ConfigError
from ..data import DEFAULT_DATA_DIR, TOKENIZER_FILE, DataError, Tokenizer


class InferenceCLIError(ValueError):
    """A problem with the command line or its files; the message names the option and fix."""


def load_model(checkpoint: Path, device: Optional[str] = None):
    """The whole model of a checkpoint file (convert.read_dsv3_checkpoint's formats) built at
    TP=1 in eval mode on `device` (default: cuda when available, else cpu)."""
    from ..checkpoint.convert import read_dsv3_checkpoint
    from ..checkpoint.hf import load_dsv3_state_dict
    from ..checkpoint.hf_files import model_config_from_dict
    from ..config import to_megatron_config
    from ..model import build_model
    from ..parallel import init_distributed

    state_dict, config = read_dsv3_checkpoint(Path(checkpoint))
    cfg = model_config_from_dict(config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pg = init_distributed(tensor_parallel_size=1)
    model = build_model(cfg, pg_collection=pg,
                        megatron_config=to_megatron_config(cfg, use_cpu_initialization=True))
    load_dsv3_state_dict(model, state_dict)
    return model.to(device).eval()


def load_tokenizer(path: Optional[Path], vocab_size: int) -> Tokenizer:
    """Our tokenizer (data.Tokenizer) from `path` (default: examples/data's), checked to fit
    the model's vocabulary."""
    path = Path(path) if path is not None else DEFAULT_DATA_DIR / TOKENIZER_FILE
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > vocab_size:
        raise InferenceCLIError(
            f"--tokenizer {path} has {tokenizer.vocab_size} tokens, more than the checkpoint's "
            f"vocab_size={vocab_size}: pass the tokenizer.json the model was trained with "
            "(the training job's --data-dir holds it)")
    return tokenizer


def complete(model, tokenizer: Tokenizer, prompt_ids: list[int], args,
             err: TextIO) -> list[int]:
    """The new token ids after `prompt_ids` as the options ask (greedy, sampled, or greedy
    with MTP drafts), stopping at end-of-text."""
    from .generate import generate
    from .speculative import generate_speculative

    if args.speculative:
        ids, stats = generate_speculative(model, [prompt_ids], max_new_tokens=args.max_new_tokens,
                                          stop_tokens=[tokenizer.eos_id])
        print(stats.summary(), file=err)
        return ids[0]
    generator = torch.Generator().manual_seed(args.seed)
    return generate(model, [prompt_ids], max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, generator=generator,
                    stop_tokens=[tokenizer.eos_id])[0]


def _text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Decoded new tokens, without the end-of-text token that ended them."""
    if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def _check_options(args) -> None:
    if args.max_new_tokens < 1:
        raise InferenceCLIError(f"--max-new-tokens {args.max_new_tokens} is invalid: it must "
                                "be >= 1")
    if args.speculative and args.temperature != 0:
        raise InferenceCLIError(
            f"--speculative with --temperature {args.temperature}: speculative decoding is "
            "greedy only (its drafts are checked against the main model's argmax); drop "
            "--temperature or --speculative")
    if args.command == "generate" and not args.prompt.strip():
        raise InferenceCLIError("--prompt is empty: give the text to continue, e.g. --prompt "
                                "\"ROMEO:\"")


def run_generate(args, out: TextIO, err: TextIO) -> str:
    model = load_model(args.checkpoint, args.device)
    tokenizer = load_tokenizer(args.tokenizer, model.config.dsv3.vocab_size)
    prompt_ids = tokenizer.encode(args.prompt)
    text = _text(tokenizer, complete(model, tokenizer, prompt_ids, args, err))
    print(text, file=out)
    return text


def run_chat(args, inp: TextIO, out: TextIO, err: TextIO) -> str:
    """The loop; returns the whole conversation. The prompt is cut to its last
    max_seq_len - max_new_tokens tokens when it grows longer (said on stderr)."""
    model = load_model(args.checkpoint, args.device)
    tokenizer = load_tokenizer(args.tokenizer, model.config.dsv3.vocab_size)
    room = model.config.dsv3.max_seq_len - args.max_new_tokens
    if room < 1:
        raise InferenceCLIError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a "
                                f"prompt in max_seq_len={model.config.dsv3.max_seq_len}: "
                                "lower it")
    conversation = ""
    print("(an empty line or EOF ends the chat)", file=err)
    while True:
        print("> ", end="", file=err, flush=True)
        line = inp.readline()
        if not line.strip():
            return conversation
        conversation += line.rstrip("\n") + "\n"
        prompt_ids = tokenizer.encode(conversation)
        if len(prompt_ids) > room:
            print(f"(the conversation is {len(prompt_ids)} tokens; the model sees its last "
                  f"{room})", file=err)
            prompt_ids = prompt_ids[-room:]
        reply = _text(tokenizer, complete(model, tokenizer, prompt_ids, args, err))
        print(reply, file=out, flush=True)
        conversation += reply.rstrip("\n") + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dsv3.inference",
        description="Generate text with a megatron_dsv3 checkpoint (latent KV cache, TP=1).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("generate", "continue one prompt"),
                            ("chat", "a read-eval loop over a growing conversation")):
        sub = commands.add_parser(name, help=help_text,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("--checkpoint", type=Path, required=True,
                         help="a file of `convert hf-to-dsv3`, or a training-job step folder "
                              "/ rank file (run without TP, EP or PP)")
        if name == "generate":
            sub.add_argument("--prompt", required=True, help="the text to continue")
        sub.add_argument("--max-new-tokens", type=int, default=64)
        sub.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        sub.add_argument("--top-p", type=float, default=1.0)
        sub.add_argument("--seed", type=int, default=0, help="the sampling generator's seed")
        sub.add_argument("--speculative", action="store_true",
                         help="greedy decoding with the MTP layer's drafts (same tokens, "
                              "fewer main-model forwards when drafts are accepted)")
        sub.add_argument("--tokenizer", type=Path, default=None,
                         help=f"tokenizer.json (default: {DEFAULT_DATA_DIR / TOKENIZER_FILE})")
        sub.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser


def main(argv: Optional[list[str]] = None, *, stdin: TextIO = None, stdout: TextIO = None,
         stderr: TextIO = None) -> str:
    """Run the command; returns the generated text (generate) or the conversation (chat).
    Problems with the options, the checkpoint or the tokenizer exit with status 2."""
    from ..checkpoint.hf import ConversionError

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_options(args)
        if args.command == "generate":
            return run_generate(args, stdout, stderr)
        return run_chat(args, stdin, stdout, stderr)
    except (InferenceCLIError, ConversionError, ConfigError, DataError, FileNotFoundError,
            ValueError) as err:
        parser.exit(2, f"error: {err}\n")

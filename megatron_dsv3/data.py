"""The training data: a byte-level BPE tokenizer, a tokenized corpus split into train/val, batches.

  Tokenizer.load(path)        a `tokenizers` tokenizer.json; EOS is the special token <|endoftext|>
  load_corpus(data_dir)       every *.txt in data_dir (sorted, joined by EOS) -> train/val token ids
  get_batch(tokens, ...)      input_ids, labels [b, s]: windows of s + 1 tokens at random starts
  DataError                   a data file that cannot be used (a ValueError): names the file and
                              what is wrong (a binary .txt, a broken tokenizer.json, ...)

Design. The corpus is small (examples/data: ~2 MB of Shakespeare, ~0.75 M tokens), so it is
tokenized in memory at start-up (about a second) instead of being pre-tokenized to disk. Documents
are separated by EOS, and the literal "<|endoftext|>" inside a .txt file is read as EOS too, which
is how shakespeare.txt marks where one play ends. Validation is the contiguous tail of the
corpus, so train and val never share a window.

A batch is a pure function of (seed, step, micro_batch, rank): its window starts come from a
private torch.Generator seeded with a hash of those four numbers, never from the global RNG. A run
resumed from a checkpoint at step k therefore sees exactly the batches an uninterrupted run sees,
and each data-parallel rank and micro-batch draws its own windows. Windows are sampled with
replacement (no epochs), as nanoGPT does; on a corpus this small, epochs would buy nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "examples" / "data"
EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"

_HOW_TO_FIX = ("pass --data-dir pointing at a folder with tokenizer.json and *.txt files, or "
               f"rebuild {DEFAULT_DATA_DIR} with its make_corpus.py (see its README.md)")


class DataError(ValueError):
    """A data file or folder that cannot be used; the message names it, what is wrong and the
    fix. (A missing file or folder raises FileNotFoundError, with the same kind of message.)"""


class Tokenizer:
    """A byte-level BPE: decode(encode(text)) == text for any text."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, path: Path):
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise DataError(f"{path} has no {EOS_TOKEN!r} token; the loader needs it as EOS: "
                            f"train the tokenizer with special_tokens=[{EOS_TOKEN!r}]")
        self._tokenizer = tokenizer
        self.path = path
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id: int = eos_id

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist: {_HOW_TO_FIX}")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - `tokenizers` raises a bare Exception
            raise DataError(f"tokenizer file {path} cannot be read as a `tokenizers` "
                            f"tokenizer.json ({err}): replace it with a tokenizer saved by "
                            f"tokenizers' Tokenizer.save(), or {_HOW_TO_FIX}") from err
        return cls(tokenizer, path)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, in parallel threads."""
        return [e.ids for e in self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._tokenizer.decode(ids, skip_special_tokens=False)


@dataclass
class TokenCorpus:
    train: torch.Tensor  # [n_train] int64 token ids
    val: torch.Tensor    # [n_val] int64, the tail of the corpus


def load_corpus(data_dir: str | Path = DEFAULT_DATA_DIR, *,
                val_fraction: float = 0.05) -> tuple[Tokenizer, TokenCorpus]:
    """Tokenize every *.txt in `data_dir` (sorted by name, joined by EOS) with its tokenizer.json;
    the last `val_fraction` of the tokens is the validation split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1 "
                         f"(e.g. 0.05 keeps the last 5% of tokens for validation)")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist: {_HOW_TO_FIX}")
    tokenizer = Tokenizer.load(data_dir / TOKENIZER_FILE)
    text_paths = sorted(data_dir.glob("*.txt"))
    if not text_paths:
        raise FileNotFoundError(f"data folder {data_dir} holds no *.txt file: {_HOW_TO_FIX}")

    # Split at EOS (which the tokenizer splits at anyway) so the documents encode in parallel.
    texts = [read_utf8(path) for path in text_paths]
    documents = [doc for text in texts for doc in text.split(EOS_TOKEN)]
    if not any(doc.strip() for doc in documents):
        raise DataError(f"the corpus in {data_dir} ({', '.join(p.name for p in text_paths)}) is "
                        f"empty: put text in it or {_HOW_TO_FIX}")
    eos = [tokenizer.eos_id]
    ids_with_eos = [t for ids in tokenizer.encode_batch(documents) for t in ids + eos]
    tokens = torch.from_numpy(np.array(ids_with_eos[:-1], dtype=np.int64))  # no EOS after the last

    num_val = int(tokens.numel() * val_fraction)
    if num_val == 0 or num_val == tokens.numel():
        raise DataError(f"val_fraction={val_fraction} of {tokens.numel()} tokens in {data_dir} "
                        f"leaves an empty {'val' if num_val == 0 else 'train'} split: choose a "
                        f"val_fraction that leaves tokens in both, or use a bigger corpus")
    return tokenizer, TokenCorpus(train=tokens[:-num_val], val=tokens[-num_val:])


def read_utf8(path: Path) -> str:
    """The text of a corpus file; DataError naming the file unless it is UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"corpus file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} "
                        f"at offset {err.start}): every *.txt in the data folder is read as "
                        "training text; convert it to UTF-8, or move it out of the folder (or "
                        "rename it to another extension)") from err


def get_batch(tokens: torch.Tensor, *, batch_size: int, seq_len: int, seed: int, step: int,
              micro_batch: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, labels [batch_size, seq_len] int64 on tokens' device, labels[:, i] =
    input_ids[:, i + 1]: `batch_size` windows of seq_len + 1 tokens at random starts, drawn from a
    generator keyed by (seed, step, micro_batch, rank) alone."""
    if tokens.dim() != 1 or tokens.dtype != torch.int64:
        raise ValueError(f"tokens must be a 1-D int64 tensor (a TokenCorpus split), got "
                         f"shape {tuple(tokens.shape)} dtype {tokens.dtype}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"{batch_size=} and {seq_len=} must both be at least 1")
    if min(step, micro_batch, rank) < 0:
        raise ValueError(f"{step=}, {micro_batch=} and {rank=} must be non-negative")
    num_starts = tokens.numel() - seq_len  # a window [start, start + seq_len] must fit
    if num_starts < 1:
        raise ValueError(f"the split has {tokens.numel()} tokens, too few for one window of "
                         f"seq_len + 1 = {seq_len + 1}: lower --seq-len, raise --val-fraction "
                         f"(for the val split), or pass --data-dir with a bigger corpus")

    generator = torch.Generator().manual_seed(_batch_seed(seed, step, micro_batch, rank))
    starts_B = torch.randint(num_starts, (batch_size,), generator=generator)
    positions_BS = starts_B[:, None] + torch.arange(seq_len + 1)  # [b, s + 1]
    windows_BS = tokens[positions_BS.to(tokens.device)]
    return windows_BS[:, :-1].contiguous(), windows_BS[:, 1:].contiguous()


def _batch_seed(seed: int, step: int, micro_batch: int, rank: int) -> int:
    """A 64-bit seed that is the same in every process (unlike hash()) and mixes all four keys."""
    key = f"{seed}/{step}/{micro_batch}/{rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")

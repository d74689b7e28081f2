"""Text or JSONL into Megatron's indexed dataset (`<prefix>.bin` / `<prefix>.idx`), tokenized
with our tokenizer: what Megatron-LM's `tools/preprocess_data.py` does with `--append-eod`,
for Megatron's own training loop (`--data-path <prefix>`).

  python -m megatron_dsv3.indexed_data --input examples/data --output-prefix data/plays
  python -m megatron_dsv3.indexed_data --input corpus.jsonl --json-key text \\
      --tokenizer examples/data/tokenizer.json --output-prefix data/corpus

Documents: each line of a `.jsonl` file (the string under `--json-key`); each part of a `.txt`
file between end-of-text tokens (the bundled corpus joins its plays with them; a file without
one is one document). A folder means its `*.txt` and `*.jsonl` files, sorted by name. Every
document is its tokens followed by the tokenizer's end-of-text id; the token dtype is the
smallest that holds the vocabulary (uint16 for the bundled 2,048 tokens), as Megatron picks it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .data import (DEFAULT_DATA_DIR, EOS_TOKEN, TOKENIZER_FILE, DataError, Tokenizer,
                   read_utf8)

_BATCH = 1024  # documents encoded together (tokenizers' thread pool)


def input_files(path: Path) -> list[Path]:
    """The files `--input` names: the file itself, or a folder's *.txt and *.jsonl files."""
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist: pass a .txt or .jsonl file, or "
                                "a folder holding some")
    if path.is_file():
        if path.suffix not in (".txt", ".jsonl"):
            raise DataError(f"--input {path} is neither .txt nor .jsonl: rename it, or convert "
                            "it to one document per JSON line")
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
    if not files:
        raise FileNotFoundError(f"--input {path} holds no .txt or .jsonl file")
    return files


def documents(path: Path, json_key: str) -> Iterator[str]:
    """The documents of one input file (module docstring); DataError naming the file and line
    for a line that is not a JSON object with a string under `json_key`."""
    if path.suffix == ".txt":
        yield from (doc for doc in read_utf8(path).split(EOS_TOKEN) if doc.strip())
        return
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number} is not JSON ({err.msg}): a .jsonl file holds "
                                "one JSON object per line") from err
            text = record.get(json_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{number} has no string under --json-key {json_key!r} "
                                f"(it has {keys}): pass the key that holds the text")
            yield text


def build_indexed_dataset(inputs: list[Path], tokenizer: Tokenizer, output_prefix: Path,
                          json_key: str = "text") -> dict:
    """Write `<output_prefix>.bin` / `.idx` from the documents of `inputs`; returns counts.
    Both files are written under `<output_prefix>.partial.*` and renamed at the end, so a
    failure leaves any earlier dataset of that name as it was."""
    from megatron.core.datasets.indexed_dataset import DType

    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(f"{output_prefix}.partial")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    try:
        counts = _write(inputs, tokenizer, partial, json_key, dtype)
    except BaseException:
        for suffix in (".bin", ".idx"):
            Path(f"{partial}{suffix}").unlink(missing_ok=True)
        raise
    for suffix in (".bin", ".idx"):
        Path(f"{partial}{suffix}").replace(f"{output_prefix}{suffix}")
    return {**counts, "dtype": np.dtype(dtype).name, "prefix": str(output_prefix)}


def _write(inputs: list[Path], tokenizer: Tokenizer, prefix: Path, json_key: str,
           dtype) -> dict:
    from megatron.core.datasets.indexed_dataset import (IndexedDatasetBuilder, get_bin_path,
                                                        get_idx_path)

    builder = IndexedDatasetBuilder(get_bin_path(str(prefix)), dtype=dtype)
    counts = {"documents": 0, "tokens": 0}

    def write(batch: list[str]) -> None:
        for ids in tokenizer.encode_batch(batch):
            ids.append(tokenizer.eos_id)
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            counts["documents"] += 1
            counts["tokens"] += len(ids)

    batch: list[str] = []
    for path in inputs:
        for doc in documents(path, json_key):
            batch.append(doc)
            if len(batch) == _BATCH:
                write(batch)
                batch = []
    write(batch)
    if counts["documents"] == 0:
        raise DataError(f"--input {', '.join(map(str, inputs))} holds no document (empty files "
                        "or blank lines only): nothing was written")
    builder.finalize(get_idx_path(str(prefix)))
    return counts


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m megatron_dsv3.indexed_data",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", type=Path, default=DEFAULT_DATA_DIR,
                        help=".txt or .jsonl file, or a folder of them")
    parser.add_argument("--output-prefix", type=Path, required=True,
                        help="writes <prefix>.bin and <prefix>.idx (Megatron's --data-path)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_DATA_DIR / TOKENIZER_FILE,
                        help="a tokenizers tokenizer.json with an end-of-text token")
    parser.add_argument("--json-key", default="text", help="the key of a JSONL line's text")
    args = parser.parse_args(argv)
    try:
        inputs = input_files(args.input)
        tokenizer = Tokenizer.load(args.tokenizer)
        summary = build_indexed_dataset(inputs, tokenizer, args.output_prefix, args.json_key)
    except (DataError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{summary['documents']} documents, {summary['tokens']} tokens ({summary['dtype']}) "
          f"-> {summary['prefix']}.bin / .idx")
    return summary


if __name__ == "__main__":
    main()

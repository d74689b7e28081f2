"""Text and JSONL into Megatron's indexed dataset (megatron_dsv3/indexed_data.py), read back
with Megatron's own `IndexedDataset`: every document is our tokenizer's ids plus end-of-text,
in input order; bad inputs are errors naming the file, line and flag, and write nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_dsv3.data import DEFAULT_DATA_DIR, EOS_TOKEN, TOKENIZER_FILE, Tokenizer
from megatron_dsv3.indexed_data import main


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(DEFAULT_DATA_DIR / TOKENIZER_FILE)


def _read(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_txt_and_jsonl_documents_come_back_as_token_ids_plus_eos_in_order(tmp_path, tokenizer):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text(f"First play.\nAct I.{EOS_TOKEN}Second play, scene 2.",
                                  encoding="utf-8")
    (folder / "b.jsonl").write_text(json.dumps({"text": "Ünïcode line", "id": 1}) + "\n\n"
                                    + json.dumps({"text": "last one"}) + "\n", encoding="utf-8")
    (folder / "notes.md").write_text("not read")
    summary = main(["--input", str(folder), "--output-prefix", str(tmp_path / "out" / "ds")])
    expected = [tokenizer.encode(doc) + [tokenizer.eos_id] for doc in
                ("First play.\nAct I.", "Second play, scene 2.", "Ünïcode line", "last one")]
    assert _read(tmp_path / "out" / "ds") == expected
    assert summary["documents"] == 4 and summary["tokens"] == sum(map(len, expected))
    assert summary["dtype"] == "uint16"  # the bundled vocabulary: 2,048 ids


def test_the_bundled_corpus_is_its_plays(tmp_path, tokenizer):
    summary = main(["--output-prefix", str(tmp_path / "plays")])
    docs = _read(tmp_path / "plays")
    assert summary["documents"] == len(docs) == 15  # the 15 plays of examples/data
    assert all(doc[-1] == tokenizer.eos_id and tokenizer.eos_id not in doc[:-1] for doc in docs)
    text = next(DEFAULT_DATA_DIR.glob("*.txt")).read_text(encoding="utf-8")
    assert tokenizer.decode(np.concatenate(docs)) == EOS_TOKEN.join(
        d for d in text.split(EOS_TOKEN) if d.strip()) + EOS_TOKEN


@pytest.mark.parametrize("content, expected", [
    ('{"text": "ok"}\n{"body": "x"}\n', "x.jsonl:2 has no string under --json-key 'text' "
                                         "(it has ['body'])"),
    ('{"text": "ok"}\nnot json\n', "x.jsonl:2 is not JSON"),
    ("\n\n", "holds no document"),
])
def test_bad_jsonl_is_an_error_naming_file_line_and_flag_and_changes_no_file(content, expected,
                                                                            tmp_path, capsys):
    source = tmp_path / "x.jsonl"
    source.write_text(content)
    (tmp_path / "ds.bin").write_bytes(b"an earlier dataset")
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(source), "--output-prefix", str(tmp_path / "ds")])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "x.jsonl"]
    assert (tmp_path / "ds.bin").read_bytes() == b"an earlier dataset", "left as it was"

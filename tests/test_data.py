"""The corpus, tokenizer and batch sampler of megatron_dsv3.data.

Everything here is deterministic, so every comparison is exact.
"""

import importlib.util
import re
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_dsv3.config import tiny
from megatron_dsv3.data import (DEFAULT_DATA_DIR, EOS_TOKEN, Tokenizer, get_batch, load_corpus)

CORPUS_FILE = DEFAULT_DATA_DIR / "shakespeare.txt"
TOKENIZER_FILE = DEFAULT_DATA_DIR / "tokenizer.json"
NUM_PLAYS = 15


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def corpus_text():
    return CORPUS_FILE.read_text(encoding="utf-8")


def _data_dir(tmp_path, **texts):
    """A data folder with our tokenizer and the given {file stem: text} .txt files."""
    shutil.copy(TOKENIZER_FILE, tmp_path / "tokenizer.json")
    for stem, text in texts.items():
        (tmp_path / f"{stem}.txt").write_text(text, encoding="utf-8")
    return tmp_path


# --- corpus file --------------------------------------------------------------------------------

def test_corpus_file_is_plays_joined_by_eos_without_gutenberg_boilerplate(corpus_text):
    raw = CORPUS_FILE.read_bytes()
    assert 1_500_000 <= len(raw) <= 2_500_000, f"{len(raw)=}"
    assert b"\r" not in raw
    plays = corpus_text.split(EOS_TOKEN)
    assert len(plays) == NUM_PLAYS
    assert all("by William Shakespeare" in play[:300] for play in plays)
    boilerplate = re.compile(r"gutenberg|\be-?texts?\b|\be-?books?\b|transcriber|copyright|"
                             r"trademark|https?:|www\.", re.I)
    assert boilerplate.search(corpus_text) is None


def _load_make_corpus():
    path = DEFAULT_DATA_DIR / "make_corpus.py"
    spec = importlib.util.spec_from_file_location("make_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_corpus_strips_gutenberg_header_footer_and_crlf():
    clean_play = _load_make_corpus().clean_play
    play = "HAMLET\r\n\r\nby William Shakespeare\r\n\r\nHAMLET.\r\nTo be, or not to be.  \r\n"
    header = ("The Project Gutenberg EBook of Hamlet\r\n\r\n"
              "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n")
    footer = ("\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
              "This file should be named 2265.txt (Gutenberg trademark).\r\n")
    wrapped = header + play + footer
    assert clean_play(wrapped, "hamlet") == ("HAMLET\n\nby William Shakespeare\n\nHAMLET.\n"
                                             "To be, or not to be.\n")


def test_make_corpus_refuses_text_with_leftover_transcriber_note():
    clean_play = _load_make_corpus().clean_play
    with pytest.raises(ValueError, match=r"hamlet: line 3 .*Transcriber"):
        clean_play("HAMLET\n\n[Transcriber's note: typos fixed.]\n", "hamlet")


# --- tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_vocab_is_2048_like_tiny_preset_and_eos_is_one_special_token(corpus):
    tokenizer, _ = corpus
    assert tokenizer.vocab_size == 2048 == tiny().vocab_size
    assert 0 <= tokenizer.eos_id < tokenizer.vocab_size
    assert tokenizer.encode(EOS_TOKEN) == [tokenizer.eos_id]
    assert tokenizer.decode([tokenizer.eos_id]) == EOS_TOKEN


def test_tokenizer_round_trips_corpus_samples_and_non_ascii_exactly(corpus, corpus_text):
    tokenizer, _ = corpus
    sample_len = 3000
    starts = range(0, len(corpus_text) - sample_len, len(corpus_text) // 37)  # incl. EOS crossings
    samples = [corpus_text[s:s + sample_len] for s in starts]
    samples += ["  leading spaces, tabs\tand\r\nCRLF ", "naïve café — 日本語 🎭", ""]
    for text in samples:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(torch.tensor(ids)) == text


def test_tokenizer_compresses_the_corpus_better_than_bytes(corpus, corpus_text):
    # A trained BPE must merge: about 2.8 bytes per token on this corpus, so 2 is a safe floor.
    _, split = corpus
    num_tokens = split.train.numel() + split.val.numel()
    assert len(corpus_text.encode()) / num_tokens > 2.0


def test_tokenizer_load_of_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json.*--data-dir"):
        Tokenizer.load(tmp_path / "nope.json")


def test_tokenizer_without_eos_token_is_refused(tmp_path):
    import tokenizers

    bare = tokenizers.Tokenizer(tokenizers.models.BPE())
    bare.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=re.escape(EOS_TOKEN)):
        Tokenizer.load(tmp_path / "tokenizer.json")


# --- load_corpus --------------------------------------------------------------------------------

def test_load_corpus_ids_are_int64_and_below_vocab_size(corpus):
    tokenizer, split = corpus
    for tokens in (split.train, split.val):
        assert tokens.dtype == torch.int64 and tokens.dim() == 1
        assert 0 <= int(tokens.min()) and int(tokens.max()) < tokenizer.vocab_size


def test_load_corpus_is_the_encoded_file_and_val_is_its_last_5_percent(corpus, corpus_text):
    tokenizer, split = corpus
    expected = torch.tensor(tokenizer.encode(corpus_text))
    num_val = int(expected.numel() * 0.05)
    assert split.val.numel() == num_val and split.train.numel() == expected.numel() - num_val
    assert torch.equal(torch.cat([split.train, split.val]), expected)
    assert torch.equal(split.val, expected[-num_val:])
    assert int((expected == tokenizer.eos_id).sum()) == NUM_PLAYS - 1


def test_load_corpus_val_fraction_sets_the_tail_length(tmp_path, corpus):
    tokenizer, _ = corpus
    text = "To be, or not to be, that is the question. " * 40
    data_dir = _data_dir(tmp_path, play=text)
    num_tokens = len(tokenizer.encode(text))
    for val_fraction in (0.1, 0.5, 0.9):
        _, split = load_corpus(data_dir, val_fraction=val_fraction)
        assert split.val.numel() == int(num_tokens * val_fraction)
        assert split.train.numel() + split.val.numel() == num_tokens


def test_load_corpus_joins_txt_files_in_name_order_with_eos(tmp_path, corpus):
    tokenizer, _ = corpus
    first, second = "First play. " * 30, "Second play. " * 30
    data_dir = _data_dir(tmp_path, b_second=second, a_first=first)
    _, split = load_corpus(data_dir, val_fraction=0.25)
    expected = tokenizer.encode(first) + [tokenizer.eos_id] + tokenizer.encode(second)
    assert torch.cat([split.train, split.val]).tolist() == expected


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5])
def test_load_corpus_refuses_val_fraction_outside_open_unit_interval(val_fraction):
    with pytest.raises(ValueError, match=r"val_fraction=.*between 0 and 1"):
        load_corpus(val_fraction=val_fraction)


def test_load_corpus_refuses_val_fraction_that_leaves_val_empty(tmp_path):
    data_dir = _data_dir(tmp_path, play="A short play.")
    with pytest.raises(ValueError, match=r"val_fraction=0\.01 .* empty val split"):
        load_corpus(data_dir, val_fraction=0.01)


def test_load_corpus_missing_folder_names_path_and_fix(tmp_path):
    missing = tmp_path / "no_such_dir"
    expected = rf"{re.escape(str(missing))} does not exist.*--data-dir"
    with pytest.raises(FileNotFoundError, match=expected):
        load_corpus(missing)


def test_load_corpus_missing_tokenizer_names_path_and_fix(tmp_path):
    (tmp_path / "play.txt").write_text("Some text.")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json does not exist.*--data-dir"):
        load_corpus(tmp_path)


def test_load_corpus_folder_without_txt_names_path_and_fix(tmp_path):
    data_dir = _data_dir(tmp_path)
    expected = rf"{re.escape(str(data_dir))} holds no \*\.txt.*--data-dir"
    with pytest.raises(FileNotFoundError, match=expected):
        load_corpus(data_dir)


@pytest.mark.parametrize("text", ["", " \n\n ", f"{EOS_TOKEN}\n{EOS_TOKEN}"])
def test_load_corpus_refuses_empty_corpus(tmp_path, text):
    data_dir = _data_dir(tmp_path, play=text)
    with pytest.raises(ValueError, match=r"play\.txt\) is empty"):
        load_corpus(data_dir)


# --- get_batch ----------------------------------------------------------------------------------

KEYS = dict(seed=1234, step=7, micro_batch=2, rank=3)


def test_get_batch_labels_are_the_next_corpus_tokens(corpus):
    # The window starts depend only on (len(tokens), keys), so sampling arange(n) with the same
    # keys returns each sampled token's corpus position.
    _, split = corpus
    tokens = split.train
    input_ids, labels = get_batch(tokens, batch_size=8, seq_len=64, **KEYS)
    positions, label_positions = get_batch(torch.arange(tokens.numel()), batch_size=8, seq_len=64,
                                           **KEYS)
    assert input_ids.shape == labels.shape == (8, 64)
    assert input_ids.dtype == labels.dtype == torch.int64
    assert input_ids.is_contiguous() and labels.is_contiguous()
    assert torch.equal(positions, positions[:, :1] + torch.arange(64))  # contiguous windows
    assert torch.equal(label_positions, positions + 1)
    assert torch.equal(input_ids, tokens[positions])
    assert torch.equal(labels, tokens[label_positions])


def test_get_batch_windows_cover_exactly_the_corpus_extent():
    # 12 tokens, windows of 5: the 8 starts 0..7 must all occur and nothing may run past the end.
    tokens, seq_len = torch.arange(12), 4
    starts = set()
    for step in range(100):
        input_ids, labels = get_batch(tokens, batch_size=4, seq_len=seq_len, seed=0, step=step)
        assert int(labels.max()) <= 11
        starts.update(input_ids[:, 0].tolist())
    assert starts == set(range(12 - seq_len))


def test_get_batch_takes_the_whole_corpus_when_it_is_exactly_one_window():
    input_ids, labels = get_batch(torch.arange(9), batch_size=2, seq_len=8, seed=0, step=0)
    assert input_ids.tolist() == [list(range(8))] * 2 and labels.tolist() == [list(range(1, 9))] * 2


def test_get_batch_equal_keys_give_equal_batches_regardless_of_global_rng(corpus):
    _, split = corpus
    torch.manual_seed(0)
    first = get_batch(split.train, batch_size=4, seq_len=32, **KEYS)
    rng_state = torch.get_rng_state()
    torch.manual_seed(99)
    second = get_batch(split.train, batch_size=4, seq_len=32, **KEYS)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    torch.manual_seed(0)
    get_batch(split.train, batch_size=4, seq_len=32, **KEYS)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is not consumed


def test_get_batch_equal_keys_give_equal_batches_in_a_fresh_process():
    # What a restarted run sees: a new interpreter, same keys.
    code = ("import torch; from megatron_dsv3.data import get_batch; "
            f"x, _ = get_batch(torch.arange(100_000), batch_size=4, seq_len=16, **{KEYS!r}); "
            "print(x[:, 0].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here, _ = get_batch(torch.arange(100_000), batch_size=4, seq_len=16, **KEYS)
    assert out.stdout.strip() == str(here[:, 0].tolist())


def test_get_batch_different_step_micro_batch_or_rank_give_different_windows(corpus):
    _, split = corpus
    batches = {}
    for step in range(3):
        for micro_batch in range(3):
            for rank in range(3):
                input_ids, _ = get_batch(split.train, batch_size=4, seq_len=32, seed=1234,
                                         step=step, micro_batch=micro_batch, rank=rank)
                batches[(step, micro_batch, rank)] = input_ids
    keys = list(batches)
    for i, key in enumerate(keys):
        for other in keys[i + 1:]:
            assert not torch.equal(batches[key], batches[other]), f"{key=} {other=}"
    other_seed, _ = get_batch(split.train, batch_size=4, seq_len=32, seed=1235, step=0)
    assert not torch.equal(other_seed, batches[(0, 0, 0)])


def test_get_batch_refuses_corpus_shorter_than_one_window():
    with pytest.raises(ValueError, match=r"8 tokens, too few .* seq_len \+ 1 = 9: lower --seq-len"):
        get_batch(torch.arange(8), batch_size=2, seq_len=8, seed=0, step=0)


@pytest.mark.parametrize("kwargs, field", [(dict(batch_size=0), "batch_size"),
                                           (dict(seq_len=0), "seq_len"),
                                           (dict(step=-1), "step"), (dict(rank=-1), "rank")])
def test_get_batch_refuses_non_positive_sizes_and_negative_keys(kwargs, field):
    args = dict(batch_size=2, seq_len=4, seed=0, step=0) | kwargs
    with pytest.raises(ValueError, match=rf"{field}=-?\d"):
        get_batch(torch.arange(100), **args)


def test_get_batch_refuses_tokens_that_are_not_1d_int64():
    with pytest.raises(ValueError, match=r"1-D int64.*shape \(2, 50\)"):
        get_batch(torch.zeros(2, 50, dtype=torch.int64), batch_size=2, seq_len=4, seed=0, step=0)
    with pytest.raises(ValueError, match=r"1-D int64.*torch\.float32"):
        get_batch(torch.zeros(100), batch_size=2, seq_len=4, seed=0, step=0)

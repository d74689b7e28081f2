"""Shared fixtures: a single-process gloo world with Megatron's parallel state (TP=1).

Test helpers live in tests/helpers (tests/ is on sys.path, pytest's default import mode):
`helpers.tolerance` (the tolerance policy) and `helpers.gloo.run_gloo` (multi-rank tests).
"""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron's jit_fuser compiles C++ on CPU
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

# One torch thread here, as in every gloo rank (helpers.gloo). The single-process references
# computed in this process are compared bit for bit with runs in those ranks ("same ops, same
# order"), and a CPU GEMM or reduction split over two threads may block its sums differently
# than over one: with two threads test_pipeline_model's PP=2 and PP=4 cases fail, their MTP
# and next-token losses 7e-8 away from the ranks'. It costs no time: the in-process tests take
# 23 s with one thread or two (their tensors are too small to split), and the multi-rank ones
# spend their time in the ranks, one thread each, which share the cores anyway.
torch.set_num_threads(1)


def pytest_sessionstart(session):
    """Start the gloo ranks' fork server now: its imports (~6 s of one core) overlap with
    collection instead of delaying the first multi-rank test."""
    from helpers.gloo import start_server

    start_server()


@pytest.fixture(scope="session")
def dist_single():
    """torch.distributed world of one (gloo) + Megatron groups; the ProcessGroupCollection."""
    from megatron_dsv3.parallel import init_distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    return init_distributed(tensor_parallel_size=1, backend="gloo")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A data folder for the training-job tests: the bundled tokenizer and the first 100 kB of
    the bundled text (~30k tokens; 5% held out is ~1.5k validation tokens; far more than the
    few steps of 32-64-token sequences those tests draw)."""
    import shutil

    from megatron_dsv3.data import DEFAULT_DATA_DIR, TOKENIZER_FILE

    folder = tmp_path_factory.mktemp("corpus")
    for name in (TOKENIZER_FILE, "tokenizer_config.json"):
        shutil.copy(DEFAULT_DATA_DIR / name, folder / name)
    (text,) = sorted(DEFAULT_DATA_DIR.glob("*.txt"))
    (folder / text.name).write_text(text.read_text(encoding="utf-8")[:100_000],
                                    encoding="utf-8")
    return folder


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    return 1234

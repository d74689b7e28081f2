"""Our model in Megatron's distributed checkpoint (sharded_checkpoint.py), the format Megatron's
loop saves with --save: on 2 gloo ranks at TP=2 and at EP=2 a model is saved with
`dist_checkpointing.save`, a model of other weights loads it, and the full weights (every rank's
slices gathered) and the routers' expert biases equal the saved model's, a TP=2 checkpoint
loaded at EP=2 and an EP=2 one at TP=2 (LAYOUTS; with -m extended also the same-layout round
trips and EP=2 -> EP=1; the default run crosses TP=2 -> EP=2). Before
sharded_checkpoint.py Megatron could not save the model at all (MTPLayer had no
sharded_state_dict) and would have saved the EP ranks' different experts under one key."""

from __future__ import annotations

import pytest
import torch

from helpers.dist_save import results_queue_by_fork
from helpers.gloo import run_gloo
from helpers.small_model import small_config

pytestmark = pytest.mark.multiprocess


def _model(pg, seed: int):
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model

    cfg = small_config()
    torch.manual_seed(seed)
    return build_model(cfg, pg_collection=pg, megatron_config=to_megatron_config(
        cfg, use_cpu_initialization=True))


def _biases(model) -> dict:
    from megatron_dsv3.moe.router import Router

    return {name: m.expert_bias.clone() for name, m in model.named_modules()
            if isinstance(m, Router)}


def _save_and_load(rank: int, world_size: int, folder: str, save_layout, load_layout):
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_dsv3.parallel import gather_state_dict, init_distributed

    if not torch.cuda.is_available():  # Megatron's torch_dist writer assumes CUDA: it syncs
        # after its copies and agrees on failures through a tensor on the current CUDA device
        torch.cuda.synchronize = lambda *args, **kwargs: None  # (this process only)
        torch.cuda.current_device = lambda: "cpu"
    pg = init_distributed(tensor_parallel_size=save_layout[0], expert_parallel_size=save_layout[1],
                          backend="gloo")
    results_queue_by_fork()
    saved = _model(pg, seed=1)
    with torch.no_grad():  # biases that differ per layer and expert
        for i, (name, module) in enumerate(saved.named_modules()):
            if hasattr(module, "expert_bias"):
                module.expert_bias.copy_(torch.arange(8.0) * 0.01 + i)
    dist_checkpointing.save(saved.sharded_state_dict(), folder)
    expected = gather_state_dict(saved, pg.tp, ep_group=pg.ep)
    expected_biases = _biases(saved)
    parallel_state.destroy_model_parallel()

    pg = init_distributed(tensor_parallel_size=load_layout[0], expert_parallel_size=load_layout[1],
                          backend="gloo")
    loaded = _model(pg, seed=2)
    before = gather_state_dict(loaded, pg.tp, ep_group=pg.ep)
    state = dist_checkpointing.load(loaded.sharded_state_dict(), folder)
    loaded.load_state_dict(state)
    return (expected, expected_biases, before, gather_state_dict(loaded, pg.tp, ep_group=pg.ep),
            _biases(loaded))


def _check(results):
    for rank, (expected, expected_biases, before, after, biases) in enumerate(results):
        assert set(after) == set(expected)
        assert any(not torch.equal(before[k], expected[k]) for k in expected), "other weights"
        for key in expected:
            assert torch.equal(after[key], expected[key]), f"rank {rank}: {key}"
        assert set(biases) == set(expected_biases) and biases
        for key in biases:
            assert torch.equal(biases[key], expected_biases[key]), f"rank {rank}: {key}"


def _folder(tmp_path, name: str) -> str:
    (tmp_path / name).mkdir()  # dist_checkpointing.save wants an empty folder
    return str(tmp_path / name)


# (TP, EP) saved -> loaded. The default case crosses the layouts: saved in TP's split (SwiGLU's
# fused [gate; up] included), loaded in EP's (each rank's experts by their global keys); the
# other direction and the same-layout round trips repeat it (-m extended).
LAYOUTS = [pytest.param((2, 1), (1, 2), id="tp2-to-ep2"),
           pytest.param((1, 2), (2, 1), id="ep2-to-tp2", marks=pytest.mark.extended),
           pytest.param((2, 1), (2, 1), id="tp2-round-trip", marks=pytest.mark.extended),
           pytest.param((1, 2), (1, 2), id="ep2-round-trip", marks=pytest.mark.extended),
           pytest.param((1, 2), (1, 1), id="ep2-to-ep1", marks=pytest.mark.extended)]


@pytest.mark.parametrize("saved,loaded", LAYOUTS)
def test_a_checkpoint_loads_exactly_at_another_layout(tmp_path, saved, loaded):
    _check(run_gloo(_save_and_load, 2, _folder(tmp_path, "ckpt"), saved, loaded))

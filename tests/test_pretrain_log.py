"""pretrain_log.PretrainLog: what Megatron's loop logs of our model beside its own metrics.

  * one process: around Megatron's own bias update (its `_update_router_expert_bias` and
    `reset_model_temporary_tensors`, what its finalize_model_grads does with our routers), the
    logged per-layer metrics equal ExpertLoads.metrics of the counts before the update and the
    biases after it, under the global layer labels; steps Megatron does not log log nothing;
    tokens/s and TFLOP/s from the iterations between two logged steps; the heatmap image at
    its interval; installed once on a config;
  * PP=2 over gloo: each stage's routers under Megatron's global layer numbers, all of them
    logged by the last rank (without MTP: Megatron's GPTModel shares the embedding with an MTP
    stage through CUDA).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers.gloo import run_gloo
from helpers.small_model import small_config
from megatron_dsv3.config import to_megatron_config
from megatron_dsv3.flops import training_flops_per_token
from megatron_dsv3.moe.balance import ExpertLoads
from megatron_dsv3.pretrain_log import PretrainLog, global_routers

SEQ, BATCH = 8, 2


class FakeWandb:
    """Megatron's W&B writer is the wandb module: log(metrics, step) and Image(path)."""

    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    @staticmethod
    def Image(path):  # noqa: N802 (wandb's name)
        with open(path, "rb") as f:
            return ("image", f.read(8))


class FakeTensorBoard:
    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))


def _megatron_update(group):
    """What Megatron's finalize_model_grads does with the routers (the rest needs DDP)."""
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias, reset_model_temporary_tensors)

    config = SimpleNamespace(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01,
                             moe_router_load_balancing_type="seq_aux_loss")

    def finalize(model_chunks, *args, **kwargs):
        _update_router_expert_bias(model_chunks, config, tp_dp_cp_group=group)
        reset_model_temporary_tensors(config, model_chunks)
        return "finalized"

    return finalize


def _args(**changes):
    fields = dict(curr_iteration=0, tensorboard_log_interval=2, expert_load_image_interval=4,
                  global_batch_size=BATCH, seq_length=SEQ, world_size=1)
    fields.update(changes)
    return SimpleNamespace(**fields)


def _train_forward(model, seed):
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(0, 64, (BATCH, SEQ + 1), generator=g)
    model.train()
    with torch.no_grad():
        model(full[:, :SEQ], torch.arange(SEQ).expand(BATCH, SEQ), None, labels=full[:, 1:])


def test_logged_metrics_are_the_loads_before_and_biases_after_megatrons_update(dist_single):
    from megatron_dsv3.model import build_model

    cfg = small_config()
    torch.manual_seed(0)
    model = build_model(cfg, pg_collection=dist_single, megatron_config=to_megatron_config(
        cfg, use_cpu_initialization=True))
    routers = global_routers([model])
    assert [name for name, _ in routers] == [
        "decoder.layers.1.mlp.router", "decoder.layers.2.mlp.router",
        "mtp.layers.0.transformer_layer.mlp.router"]
    wandb, tensorboard = FakeWandb(), FakeTensorBoard()
    times = iter([10.0, 12.0])
    args = _args()
    log = PretrainLog(_megatron_update(dist_single.dp), args, cfg, wandb_writer=wandb,
                      tensorboard_writer=tensorboard, tp_dp_cp_group=dist_single.dp,
                      tp_group=dist_single.tp, pp_group=dist_single.pp,
                      clock=lambda: next(times))

    # iteration 1: not a logged step; Megatron's update still runs (biases move, counts reset)
    _train_forward(model, seed=1)
    assert log([model]) == "finalized"
    assert wandb.logged == [] and tensorboard.scalars == []
    assert not any(r.local_tokens_per_expert.any() for _, r in routers)
    assert any(r.expert_bias.any() for _, r in routers)

    # iteration 2: logged
    _train_forward(model, seed=2)
    counts = torch.stack([r.local_tokens_per_expert for _, r in routers]).clone()
    assert counts.sum() > 0
    args.curr_iteration = 1
    log([model])
    expected = ExpertLoads([n for n, _ in routers], counts, True,
                           torch.stack([r.expert_bias for _, r in routers])).metrics()
    assert wandb.logged == [(2, expected)]
    assert set(expected) == {f"moe/{label}/{key}" for label in ("L1", "L2", "mtp0")
                             for key in ("imbalance", "max_over_min", "bias_spread",
                                         "bias_norm")}
    assert tensorboard.scalars == [(key, value, 2) for key, value in expected.items()]

    # iterations 3 (not logged) and 4 (logged, with the image and the throughput since 2)
    for iteration in (3, 4):
        _train_forward(model, seed=iteration)
        args.curr_iteration = iteration - 1
        log([model])
    step, metrics = wandb.logged[-1]
    assert step == 4 and len(wandb.logged) == 2
    tokens_per_s = 2 * BATCH * SEQ / (12.0 - 10.0)
    assert metrics["tokens_per_s"] == tokens_per_s
    assert metrics["model_tflops_per_gpu"] == (tokens_per_s * training_flops_per_token(cfg, SEQ)
                                               / 1e12)
    assert metrics["moe/expert_load"] == ("image", b"\x89PNG\r\n\x1a\n")


def test_installed_once_around_megatrons_finalize():
    from megatron.core.distributed import finalize_model_grads

    config = SimpleNamespace(finalize_model_grads_func=None, dsv3=small_config())
    PretrainLog.install(config, _args())
    wrapper = config.finalize_model_grads_func
    assert isinstance(wrapper, PretrainLog) and wrapper.finalize is finalize_model_grads
    PretrainLog.install(config, _args())
    assert config.finalize_model_grads_func is wrapper  # not wrapped twice


def _pipeline_rank(rank: int, world_size: int):
    from megatron_dsv3.model import build_model
    from megatron_dsv3.parallel import init_distributed

    pg = init_distributed(pipeline_parallel_size=2, backend="gloo")
    # no MTP: with PP, Megatron's GPTModel copies the embedding to the MTP stage through CUDA
    cfg = small_config(num_layers=4, mtp__num_layers=0)
    model = build_model(cfg, pg_collection=pg, megatron_config=to_megatron_config(
        cfg, pipeline_parallel_size=2, use_cpu_initialization=True),
        pre_process=rank == 0, post_process=rank == 1)
    routers = global_routers([model])
    for name, router in routers:  # loads and biases that name their layer
        layer = int(name.split(".")[2])
        router.local_tokens_per_expert.copy_(torch.arange(8) + 10 * layer)
        router.expert_bias.fill_(0.5 * layer)
    wandb = FakeWandb() if rank == 1 else None
    log = PretrainLog(lambda chunks, *a, **k: None, _args(curr_iteration=1, world_size=2), cfg,
                      wandb_writer=wandb, tensorboard_writer=None, pp_group=pg.pp)
    log([model])
    return [name for name, _ in routers], wandb.logged if wandb is not None else None


@pytest.mark.multiprocess
def test_pipeline_stages_routers_are_logged_by_the_last_rank_under_global_numbers():
    (names0, logged0), (names1, logged1) = run_gloo(_pipeline_rank, 2)
    assert names0 == ["decoder.layers.1.mlp.router"]  # layer 0 is dense
    assert names1 == ["decoder.layers.2.mlp.router", "decoder.layers.3.mlp.router"]
    assert logged0 is None
    ((step, metrics),) = logged1
    rows = [(1, "L1"), (2, "L2"), (3, "L3")]
    expected = ExpertLoads([label for _, label in rows],
                           torch.stack([torch.arange(8) + 10 * layer for layer, _ in rows]),
                           True, torch.stack([torch.full((8,), 0.5 * layer) for layer, _ in rows])
                           ).metrics()
    assert step == 2 and metrics == expected

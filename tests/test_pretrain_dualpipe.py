"""DualPipeV in Megatron's own loop (pretrain_dualpipe.py), its pieces on the CPU: Megatron's
`pretrain` itself needs CUDA (README), so what it would call is called here as it calls it.

  * the stages' distributed checkpoint: the four DualPipeV stages of PP=2 name their tensors
    exactly as the whole model's sharded_state_dict does (key, global shape and offset,
    replica, values), and each stage's dictionary keys are its own state-dict names (what
    Megatron's load fills), so a checkpoint saved in stages loads at PP=1 and back;
  * one step on 2 gloo ranks: the chunks Megatron's get_model would receive from the provider
    (vp_stage 0 and 1), each in Megatron's DDP, Megatron-format micro-batches, pretrain's
    forward_step, and the forward_backward_func installed in Megatron's loop: the loss reports
    reach the last pipeline rank (where Megatron's loop reads them) and equal, with every
    gradient in DDP's buffer, a single-process run of the same weights through the same
    forward_step;
  * the command line: two chunks per rank added, and each impossible setting refused naming
    the flag.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch

from helpers.gloo import run_gloo
from helpers.small_model import small_config
from helpers.tolerance import FP32_REORDER, assert_close
from megatron_dsv3.config import ConfigError

LAYERS, PP, MICROBATCHES, BATCH, SEQ = 4, 2, 4, 2, 8
WHY = "fp32 sums over the same terms in another order (stages, micro-batch interleaving)"


def _args(**changes) -> SimpleNamespace:
    from megatron_dsv3.pretrain import V3_MTP_LOSS_WEIGHTS

    fields = dict(pipeline_model_parallel_size=PP, num_layers=LAYERS, micro_batch_size=BATCH,
                  seq_length=SEQ, consumed_train_samples=0, mtp_loss_weights=V3_MTP_LOSS_WEIGHTS,
                  bias_update_stop_tokens=None, load=None, iteration=0,
                  decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None)
    fields.update(changes)
    return SimpleNamespace(**fields)


def _whole_model(pg):
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model

    cfg = small_config(num_layers=LAYERS)
    torch.manual_seed(0)
    return build_model(cfg, pg_collection=pg, megatron_config=to_megatron_config(
        cfg, use_cpu_initialization=True))


def _batches(seed: int = 1) -> list[dict]:
    from helpers.small_model import VOCAB

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(MICROBATCHES):
        full = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        mask = (torch.rand(BATCH, SEQ, generator=g) > 0.2).float()
        out.append({"tokens": full[:, :SEQ], "labels": full[:, 1:], "loss_mask": mask,
                    "position_ids": torch.arange(SEQ).expand(BATCH, SEQ)})
    return out


def _summary(sharded: dict) -> dict:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor):
            out[value.key] = (tuple(value.global_shape), tuple(value.global_offset),
                              value.replica_id, value.data.detach().clone())
        else:
            out[value.key] = type(value).__name__
    return out


def test_the_stages_checkpoint_under_the_whole_models_keys(dist_single):
    from megatron_dsv3.pipeline.stages import StagePlan, stages_from_model

    whole = _summary(_whole_model(dist_single).sharded_state_dict(metadata={}))
    plan = StagePlan("dualpipev", PP, LAYERS)
    staged: dict = {}
    for rank in range(PP):
        for stage in stages_from_model(_whole_model(dist_single), plan, rank):
            sharded = stage.sharded_state_dict(metadata={})
            assert set(sharded) == {k for k in stage.state_dict() if not k.endswith("_extra_state")
                                    } | {k for k in sharded if k.endswith("_extra_state")}
            mine = _summary(sharded)
            assert not set(mine) & set(staged), "a tensor saved by two stages"
            staged.update(mine)
    assert sorted(staged) == sorted(whole)
    for key, value in whole.items():
        if isinstance(value, tuple):
            assert staged[key][:3] == value[:3], key
            assert torch.equal(staged[key][3], value[3]), key
        else:
            assert staged[key] == value, key


def _step(batches):
    """forward_step over the micro-batches of one step on the whole model, Megatron's
    normalisation (sum / tokens / M) and backward: the reference."""
    from megatron_dsv3.pretrain import forward_step

    reports = []
    return reports, lambda model, args, tp: [
        reports.append(_one(model, args, tp, batch, forward_step)) for batch in batches]


def _one(model, args, tp_group, batch, forward_step):
    output, loss_func = forward_step(iter([batch]), model, args=args, tp_group=tp_group)
    loss, tokens, report = loss_func(output)
    (loss / tokens.clamp(min=1) / MICROBATCHES).backward()
    return {key: value.detach() for key, value in report.items()}


def _dualpipev_rank(rank: int, world_size: int, batches):
    from megatron.core import num_microbatches_calculator as calculator

    from megatron_dsv3 import pretrain_dualpipe as dualpipe
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.parallel import init_distributed
    from megatron_dsv3.pretrain import forward_step

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    calculator.get_num_microbatches = lambda: MICROBATCHES
    torch.cuda.current_device = lambda: "cpu"  # Megatron's DDP buffers (this process only)
    pg = init_distributed(pipeline_parallel_size=PP, backend="gloo")
    cfg = small_config(num_layers=LAYERS)
    args = _args()
    config = to_megatron_config(cfg, use_cpu_initialization=True)
    torch.manual_seed(0)  # the whole model of the reference
    stages = [dualpipe.provide_stage(
        args, lambda whole, groups: build_model(cfg, pg_collection=groups, megatron_config=whole),
        vp_stage=c, pg_collection=pg, config=config) for c in range(2)]
    # as Megatron's get_model hands them to its loop: each chunk in Megatron's DDP, whose hooks
    # put the gradients into its buffer (main_grad)
    chunks = [DistributedDataParallel(stage.config, DistributedDataParallelConfig(), stage,
                                      disable_bucketing=c > 0, pg_collection=pg)
              for c, stage in enumerate(stages)]
    reads = [dualpipe.reads_data(dualpipe.stage_plan(args), rank, c) for c in range(2)]
    schedule = dualpipe.LoopDualPipeV(pg.pp)
    reports = schedule(forward_step_func=partial(forward_step, args=args, tp_group=pg.tp),
                       data_iterator=[iter(batches) if r else None for r in reads], model=chunks,
                       num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=BATCH,
                       forward_only=False, force_all_reduce=False, pg_collection=pg)
    grads = {stage.full_name(name): p.main_grad.clone() for stage in stages
             for name, p in stage.named_parameters() if p.requires_grad}
    return reads, reports, grads


@pytest.mark.multiprocess
def test_a_dualpipev_step_in_megatrons_loop_matches_one_process(dist_single, monkeypatch):
    from megatron.core import num_microbatches_calculator as calculator

    from megatron_dsv3.moe.balance import set_balance_loss_scale

    batches = _batches()
    results = run_gloo(_dualpipev_rank, PP, batches)
    assert [reads for reads, _, _ in results] == [[True, True], [False, False]]
    assert results[0][1] == [], "Megatron reads the reports on the last pipeline rank only"
    reports = results[-1][1]

    monkeypatch.setattr(calculator, "get_num_microbatches", lambda: MICROBATCHES)
    model = _whole_model(dist_single)
    set_balance_loss_scale(model, 1.0 / MICROBATCHES)
    expected, run = _step(batches)
    run(model, _args(pipeline_model_parallel_size=1), dist_single.tp)
    assert len(reports) == MICROBATCHES and [sorted(r) for r in reports] == [
        sorted(r) for r in expected]
    for got, want in zip(reports, expected):
        for key in want:
            assert_close(got[key], want[key], FP32_REORDER, WHY, name=key)
    grads = {**results[0][2], **results[1][2]}
    named = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(named)
    for name, grad in named.items():
        assert_close(grads[name], grad, FP32_REORDER, WHY, name=name)


def test_the_command_line_gets_two_chunks_per_rank_and_bad_settings_name_the_flag():
    from megatron_dsv3 import pretrain_dualpipe as dualpipe

    argv = ["--pipeline-schedule", "dualpipev", "--pipeline-model-parallel-size", "2"]
    assert dualpipe.with_two_chunks_per_rank(argv) == [
        *argv, "--num-virtual-stages-per-pipeline-rank", "2"]
    assert dualpipe.with_two_chunks_per_rank(argv + ["--pipeline-schedule=1f1b"]) == [
        *argv, "--pipeline-schedule=1f1b"]  # the last one given counts: Megatron's 1F1B
    assert dualpipe.with_two_chunks_per_rank(["--num-layers", "4"]) == ["--num-layers", "4"]
    with pytest.raises(ConfigError, match="--num-virtual-stages-per-pipeline-rank 4 is invalid"):
        dualpipe.with_two_chunks_per_rank(argv + ["--num-virtual-stages-per-pipeline-rank", "4"])
    with pytest.raises(ConfigError, match="--num-layers-per-virtual-pipeline-stage is invalid"):
        dualpipe.with_two_chunks_per_rank(argv + ["--num-layers-per-virtual-pipeline-stage=1"])
    with pytest.raises(ConfigError, match="needs --pipeline-model-parallel-size 2 or more"):
        dualpipe.stage_plan(_args(pipeline_model_parallel_size=1))
    with pytest.raises(ConfigError, match="--num-layers 6 / --pipeline-model-parallel-size 2: "
                                          "num_layers=6 does not split into the 4 stages"):
        dualpipe.stage_plan(_args(num_layers=6))
    with pytest.raises(ConfigError, match="--decoder-first-pipeline-num-layers is invalid"):
        dualpipe.stage_plan(_args(decoder_first_pipeline_num_layers=1))
    with pytest.raises(ConfigError, match="give 3 micro-batches .* DualPipeV needs "
                                          "num_microbatches >= 2"):
        dualpipe.check_microbatches(dualpipe.stage_plan(_args()), 3)

"""DualPipeV in Megatron-LM's own training loop: `python -m megatron_dsv3.pretrain
--pipeline-schedule dualpipev --pipeline-model-parallel-size P ...`.

DualPipeV runs 2P stages, rank r holding stages r and 2P-1-r, so rank 0 holds both ends (the
V). Megatron's loop knows pipelines whose rank r holds stages r and P+r (its interleaved
order), so each piece of the loop that depends on the layout is given ours:

  * model chunks: `--num-virtual-stages-per-pipeline-rank 2` (added to the command line) makes
    Megatron's get_model ask the model provider for two chunks per rank (vp_stage 0 and 1);
    `provide_stage` builds the whole model once per rank (its TP/EP shard, no pipeline split:
    parallel.whole_model_groups), cuts the rank's two DualPipeV stages from it
    (pipeline.stages.stages_from_model) and answers chunk c with the rank's c-th stage.
    Megatron's own pre/post-process flags (its order) are not used; each stage tells
    Megatron what it holds (DeepSeekV3Stage.pre_process / post_process).
  * data: chunk c reads its micro-batches from Megatron's c-th data iterator. Only the chunks
    holding stage 0 or the last stage read (`reads_data`: both chunks of rank 0), so the
    datasets are built there only; the rest get none.
  * the schedule: Megatron's training and evaluation loops take their forward_backward_func
    from megatron.training.training.get_forward_backward_func, replaced
    (megatron_compat.use_forward_backward_func) by `LoopDualPipeV`: our DualPipeV
    (pipeline.megatron_adapter), then each micro-batch's loss report moved from rank 0, which
    computed them, to the last pipeline rank, where Megatron's loop reads them.
  * checkpoints: each stage saves its tensors under the whole model's keys
    (DeepSeekV3Stage.sharded_state_dict), so a DualPipeV checkpoint loads at another pipeline
    layout and back.
DualPipe (two mirrored copies of every stage) stays with the training job
(`python -m megatron_dsv3.train`): Megatron's distributed optimizer would keep the two copies'
states apart.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .config import ConfigError
from .megatron_cli import take_flag

SCHEDULE = "dualpipev"
CHUNKS = 2  # model chunks per pipeline rank: Megatron's virtual pipeline size
_CHUNKS_FLAG = "--num-virtual-stages-per-pipeline-rank"


def schedule_of(argv: list[str]) -> Optional[str]:
    """The value of --pipeline-schedule on a command line (the last one given), or None."""
    values = [v for v in take_flag(argv, "--pipeline-schedule")[0] if v is not None]
    return values[-1] if values else None


def with_two_chunks_per_rank(argv: list[str]) -> list[str]:
    """`argv` with Megatron's virtual pipeline of two chunks per rank when it asks for
    DualPipeV (on the command line: Megatron's pretrain parses it again); a chunk count or a
    layers-per-chunk flag given otherwise is refused."""
    if schedule_of(argv) != SCHEDULE:
        return list(argv)
    if take_flag(argv, "--num-layers-per-virtual-pipeline-stage")[0]:
        raise ConfigError(f"--num-layers-per-virtual-pipeline-stage is invalid with "
                          f"--pipeline-schedule {SCHEDULE}: the stages are cut evenly "
                          "from --num-layers; drop the flag")
    chunks = take_flag(argv, _CHUNKS_FLAG)[0]
    for value in chunks:
        if value != str(CHUNKS):
            raise ConfigError(f"{_CHUNKS_FLAG} {value} is invalid with --pipeline-schedule "
                              f"{SCHEDULE}: a DualPipeV rank holds {CHUNKS} stages; drop "
                              "the flag")
    return list(argv) if chunks else [*argv, _CHUNKS_FLAG, str(CHUNKS)]


def stage_plan(args):
    """The DualPipeV StagePlan of these arguments; ConfigError naming the flag and the fix."""
    from .pipeline.stages import StagePlan

    pp = args.pipeline_model_parallel_size
    if pp < 2:
        raise ConfigError(f"--pipeline-schedule {SCHEDULE} needs --pipeline-model-parallel-"
                          f"size 2 or more (given {pp}); with one pipeline rank drop the flag")
    for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
        if getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} is invalid with --pipeline-schedule {SCHEDULE}: its "
                              "stages are even; drop the flag")
    try:
        return StagePlan(SCHEDULE, pp, args.num_layers)
    except ValueError as err:
        raise ConfigError(f"--num-layers {args.num_layers} / --pipeline-model-parallel-size "
                          f"{pp}: {err}") from None


def check_microbatches(plan, num_microbatches: int) -> None:
    try:
        plan.schedule_class.validate(plan.num_ranks, num_microbatches)
    except ValueError as err:
        raise ConfigError(f"--global-batch-size / --micro-batch-size give {num_microbatches} "
                          f"micro-batches per data-parallel rank: {err}") from None


def reads_data(plan, pp_rank: int, vp_stage: Optional[int]) -> bool:
    """Whether chunk `vp_stage` of pipeline rank `pp_rank` holds stage 0 or the last stage."""
    if vp_stage is None:
        return any(reads_data(plan, pp_rank, c) for c in range(CHUNKS))
    stage = plan.stages_of_rank(pp_rank)[vp_stage]
    return stage in (0, plan.num_stages - 1)


# ----------------------------------------------------------------------------------------------
# Model chunks
# ----------------------------------------------------------------------------------------------
_stages_built: dict = {}  # pipeline rank -> its stages, between the provider's two calls


def provide_stage(args, build_whole_model, *, vp_stage: Optional[int], pg_collection,
                  config=None):
    """Megatron's model provider for chunk `vp_stage` of this rank: the rank's stages are cut
    from one whole model on the first call, `build_whole_model(config, groups)` with Megatron's
    config (from its arguments when None) less the pipeline, inside whole_model_groups; each
    call returns its chunk, holding Megatron's process groups (its pipeline included)."""
    import copy

    from .parallel import whole_model_groups
    from .pipeline.stages import stages_from_model

    if vp_stage not in range(CHUNKS):
        raise ValueError(f"provide_stage: vp_stage={vp_stage!r}; Megatron asks for chunks 0 and "
                         f"1 with {_CHUNKS_FLAG} {CHUNKS}")
    if pg_collection is None or pg_collection.pp is None:
        raise ValueError("provide_stage: pass Megatron's pg_collection (its get_model does)")
    rank = pg_collection.pp.rank()
    if rank not in _stages_built:
        plan = stage_plan(args)
        if config is None:
            from megatron.core.transformer.transformer_config import MLATransformerConfig
            from megatron.training.arguments import core_transformer_config_from_args

            config = core_transformer_config_from_args(args, MLATransformerConfig)
        whole = copy.copy(config)
        whole.pipeline_model_parallel_size = 1
        whole.virtual_pipeline_model_parallel_size = None
        with whole_model_groups(pg_collection) as groups:
            model = build_whole_model(whole, groups)
        _stages_built[rank] = stages_from_model(model, plan, rank)
    stages = _stages_built[rank]
    if vp_stage == CHUNKS - 1:
        del _stages_built[rank]
    stage = stages[vp_stage]
    stage.pg_collection = pg_collection
    return stage


# ----------------------------------------------------------------------------------------------
# The schedule in Megatron's loop
# ----------------------------------------------------------------------------------------------
class LoopDualPipeV:
    """Megatron's forward_backward_func for its training and evaluation loops: DualPipeV over
    `group`, with the loss reports where Megatron reads them (the last pipeline rank)."""

    def __init__(self, group) -> None:
        from .pipeline.megatron_adapter import get_dualpipe_forward_backward_func

        self.group = group
        self.schedule = get_dualpipe_forward_backward_func(SCHEDULE, group=group)

    def __call__(self, **kwargs) -> list:
        return reports_to_last_rank(self.schedule(**kwargs), self.group)


def reports_to_last_rank(reports: list, group) -> list:
    """Move the micro-batches' loss reports from pipeline rank 0 (DualPipeV's last stage) to
    the last pipeline rank; [] on the others. One object broadcast per step."""
    size = group.size()
    if size == 1:
        return reports
    sent = [[{key: value.detach().cpu() for key, value in report.items()}
             for report in reports] if group.rank() == 0 else None]
    dist.broadcast_object_list(sent, src=dist.get_global_rank(group, 0), group=group)
    if group.rank() != size - 1:
        return []
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    return [{key: value.to(device) for key, value in report.items()} for report in sent[0]]


def install() -> None:
    """Megatron's loop runs DualPipeV over its pipeline group from now on (the group is looked
    up when the loop first asks: Megatron makes it after this is called)."""
    from megatron.core import parallel_state

    from .megatron_compat import use_forward_backward_func

    made: list = []

    def schedule() -> LoopDualPipeV:
        if not made:
            made.append(LoopDualPipeV(parallel_state.get_pipeline_model_parallel_group()))
        return made[0]

    use_forward_backward_func(schedule)

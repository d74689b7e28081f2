"""Pipeline parallelism in the training job: this rank's two stages and their schedule.

`--pipeline-parallel-size PP --pipeline-schedule dualpipev|dualpipe`, composed with TP and EP:
WORLD = PP x DP x TP in Megatron's own layout (`parallel.init_distributed`: rank = tp_rank +
TP * (dp_rank + DP * pp_rank), EP carved out of each stage's DP ranks). Every rank builds the
full model from the seed (its TP/EP shard of it) and keeps the two stages its schedule places
there (`megatron_dsv3.pipeline.stages`). In the optimizer step (step.py), step 1 is one
call of the schedule's Megatron-style `forward_backward_func`
(`megatron_dsv3.pipeline.megatron_adapter`) over the `--grad-accum` micro-batches, the MoE
all-to-alls over the stage's EP group (DualPipe then adds its mirrored copies' gradients and
router loads); steps 2 and 5 use the groups of the ranks holding the same stages (`dp`,
`expt_dp`); the gradient norm sums every stage once over the pipeline; losses are summed over
the pipeline ranks. `--num-layers` makes a preset's layers split evenly.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist

from .losses import step_sums


@dataclasses.dataclass
class Pipeline:
    """This rank's two stages and the schedule's Megatron-style forward_backward_func."""

    plan: object                 # pipeline.stages.StagePlan
    stages: tuple                # (chunk 0, chunk 1) DeepSeekV3Stage
    forward_backward: object     # megatron_adapter.DualPipeForwardBackward
    group: object                # the pipeline process group

    @classmethod
    def create(cls, model: torch.nn.Module, args, pg) -> "Pipeline":
        from ..pipeline.megatron_adapter import PipelineConfig, get_forward_backward_func
        from ..pipeline.stages import StagePlan, stages_from_model

        plan = StagePlan(args.pipeline_schedule, args.pipeline_parallel_size,
                         len(model.decoder.layers))
        stages = stages_from_model(model, plan, pg.pp.rank())
        config = PipelineConfig(args.pipeline_schedule, args.pipeline_parallel_size)
        return cls(plan, stages, get_forward_backward_func(config, group=pg.pp), pg.pp)

    def run(self, run, num_microbatches: int, mtp_lambda: float, batch_of,
            forward_only: bool = False) -> torch.Tensor:
        """One schedule step over micro-batches batch_of(0..M-1) for the job's `run`
        (step.Run: device, autocast, sequence and micro-batch sizes). Returns the sums over the
        micro-batches of step.step_sums (the losses, then each MTP depth's CE), summed over
        the pipeline."""
        from ..pipeline.megatron_adapter import forward_step

        iterators = []
        for chunk, stage in enumerate(self.stages):
            stage.pop_balance_loss()  # start the step's sum from zero
            needs_data = stage.is_first or stage.is_last
            microbatches = self.plan.microbatches_of_chunk(chunk, num_microbatches)
            iterators.append((batch_of(m) for m in microbatches) if needs_data else None)
        with run.autocast():
            loss_dicts = self.forward_backward(
                forward_step_func=functools.partial(forward_step, mtp_lambda=mtp_lambda),
                data_iterator=iterators, model=list(self.stages),
                num_microbatches=num_microbatches, seq_length=run.args.seq_len,
                micro_batch_size=run.args.micro_batch_size, forward_only=forward_only)
        depths = run.cfg.mtp.num_layers
        sums = torch.zeros(5 + depths, device=run.device)  # the stages without a loss add 0
        for losses in loss_dicts:  # the micro-batches whose loss this rank computed
            lm, mtp = losses["lm loss"], losses["mtp loss"]
            sums += step_sums(lm + mtp, lm, mtp, losses["mtp ce"], torch.zeros_like(lm))
        balance = sum(stage.pop_balance_loss().to(run.device) for stage in self.stages)
        sums[0] += balance
        sums[4] += balance
        dist.all_reduce(sums, group=self.group)
        return sums

    def norm_params(self) -> list[torch.Tensor]:
        """The gradients the norm counts: every stage once (not DualPipe's mirror copies)."""
        return [p for stage in self.stages if not stage.is_mirror for p in stage.parameters()
                if p.grad is not None]

    def add_mirrored_router_loads(self) -> None:
        """DualPipe's two copies of a stage: both get the step's full router loads."""
        from ..pipeline.stages import reduce_mirrored_router_loads

        reduce_mirrored_router_loads(self.forward_backward.pipe, self.stages)

    def gather_expert_loads(self, loads):
        """Every stage's routers (full-model names, model order) with their loads and biases,
        on every pipeline rank (ExpertLoads)."""
        from ..moe.balance import gather_expert_loads, routers

        rows = []
        container = torch.nn.ModuleList(self.stages)
        for (name, router), load in zip(routers(container), loads.loads):
            chunk, _, local = name.partition(".")
            stage = self.stages[int(chunk)]
            if not stage.is_mirror:
                rows.append((stage.full_name(local), load, router.expert_bias.cpu()))
        return gather_expert_loads(rows, loads.updated, self.group)

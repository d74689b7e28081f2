"""DeepSeek-V3 cut into the stage modules of DualPipe / DualPipeV (DESIGN.md section 5).

  StagePlan(schedule, num_ranks, num_layers)   how many stages, which layers each holds, which
        two stages a rank holds; invalid settings raise with the field and the fix
  DeepSeekV3Stage          one stage: a slice of a full DeepSeekV3Model's modules
        stage(x) -> hidden [s, b, d]; x = token ids [b, s] on stage 0, hidden [s, b, d] after
        stage.loss_fn(M) on the last stage: the schedules' loss_fn(outputs, labels) with
        labels = (input_ids, labels), both [b, s]; stage.mtp_lambda is set by the caller
  stages_from_model(model, plan, rank)          the rank's two stages, taken from a full model
  build_rank_stages(cfg, plan, rank, full_state_dict, pg_collection)
        the same from a full TP=1, EP=1 state dict: the rank's TP/EP shards of the weights
        (parallel.shard_state_dict over pg_collection.tp / .ep); the MoE layers' all-to-alls,
        the overlap hook's included, run over pg_collection.ep
  weighted_lm_loss(out, mtp_lambda)             the training loss of one micro-batch (LMOutput)
  local_state / gather_stage_state              stage parameters (or gradients) under the full
        model's names, this rank's shards or the whole model's (gathered over TP, EP and PP)
  reduce_mirrored_router_loads(pipe, stages)   DualPipe: add the routers' token counts of the
        two copies of each stage (their gradients: `DualPipe.reduce_mirrored_grads`)

Layout (L decoder layers, S stages: DualPipeV S = 2 PP, DualPipe S = PP; S must divide L):
    stage 0       embedding, layers [0, L/S)
    stage s       layers [s L/S, (s+1) L/S)
    stage S-1     layers [L - L/S, L), final norm; its `loss` runs the output head, the MTP
                  block and the cross-entropies, i.e. the model's own `_postprocess`
An uneven split is refused (StagePlan names the layer count to use): an even one keeps every
stage's work equal, which the schedules' bubble formulas assume.

Design notes
  * A stage owns a slice of a full model's modules: the same objects Megatron built from our
    specs (`build_model` -> `layer_spec`), so a stage computes exactly what the model computes.
    Each rank builds the full model (as the TP/EP code does: a seed gives the same weights at
    every parallel size), keeps its stages' modules and drops the decoder layers of the other
    stages. Building only the rank's layers (meta device) is not done. With TP/EP the model
    is this rank's TP/EP shard of the full model (`parallel.whole_model_groups`: Megatron's
    pipeline groups set aside while it is built), so a stage holds the same shards a
    non-pipelined TP/EP rank would; the pipeline adds no parallel dimension inside a stage.
  * The input ids travel in `labels`, not as a second stage output: in both schedules the last
    stage sits on a rank that also holds stage 0 (DualPipeV: rank 0 holds stages 0 and 2PP-1;
    DualPipe: ranks 0 and PP-1 hold stages 0 and PP-1), which has the batch anyway, so nothing
    extra crosses the pipeline and the p2p message stays one [s, b, d] tensor.
  * For the same reason the MTP's embedding lookup uses the embedding of the stage 0 on the
    same rank: one parameter, registered in stage 0 only, whose gradient collects both uses
    (Megatron's PP keeps a second copy on the last stage and all-reduces the two). DualPipe's
    mirrored copies stay right: a rank's stage-0 copy collects its direction's input lookups
    and the other direction's MTP lookups, and `reduce_mirrored_grads` adds the two copies.
  * Loss: per micro-batch `(lm_loss.mean() + mtp_loss(CE_k, lambda)) / num_microbatches`, the
    training job's normalisation, so a step's gradients are those of the mean over
    micro-batches. The routers' balance loss enters through its injected gradient
    (`DeepSeekMoE.aux_loss_scale`, set by the caller to 1 / num_microbatches); each stage
    collects its MoE layers' balance-loss values for logging (`pop_balance_loss`).
  * The F&B overlap (DESIGN.md section 5): with `overlap_moe=True` a stage runs its decoder
    layers through moe_overlap.PiecewiseLayers and is a MoEOverlapStage, so the schedules' F&B
    steps interleave one micro-batch's MoE pieces (attention, dispatch, experts, combine) with
    another's backward pieces. Same arithmetic as the plain layer loop (`overlap_moe=False`,
    the reference; test_pipeline_model runs both against one process). The default (None) is
    on exactly when a MoE layer of the stage exchanges rows over an EP group of more than one
    rank: without an all-to-all there is nothing to hide and the pieces only cost (measured on
    two H200s, PP=2 without EP: DualPipeV 15% slower with the pieces than with the plain loop,
    benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from . import SCHEDULES as SCHEDULE_CLASSES
from .dualpipe import DualPipe, validate_dualpipe
from .dualpipev import DualPipeV, validate_dualpipev
from .moe_overlap import MoEOverlapStage, PiecewiseLayers
from .overlap import BackwardWork, ForwardWork, run_backward, run_forward
from .stages import split_layers


@dataclass(frozen=True)
class StagePlan:
    """Which stages exist and which layers and ranks hold them.

    stage_layers: decoder layers per stage, in stage order (default: equal). Stage 0 also runs
    the embedding and the last stage the final norm, output head, MTP and loss, so a balanced
    pipeline gives them fewer layers (the DeepSeek-V3 report balances its stages this way);
    with DualPipeV a rank holds stages r and 2PP-1-r, so the first rank holds both ends."""
    schedule: str        # "dualpipev" | "dualpipe"
    num_ranks: int       # pipeline-parallel size PP
    num_layers: int      # decoder layers of the model (MTP layers ride on the last stage)
    stage_layers: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", self.schedule.lower())
        if self.schedule not in SCHEDULE_CLASSES:
            raise ValueError(f"schedule={self.schedule!r} is invalid: use one of "
                             f"{sorted(SCHEDULE_CLASSES)}")
        if self.schedule == "dualpipev":
            validate_dualpipev(self.num_ranks, None)
        else:
            validate_dualpipe(self.num_ranks, None)
        if self.stage_layers is not None:
            sizes = tuple(self.stage_layers)
            object.__setattr__(self, "stage_layers", sizes)
            if (len(sizes) != self.num_stages or any(not isinstance(n, int) or n < 1
                                                     for n in sizes)
                    or sum(sizes) != self.num_layers):
                raise ValueError(
                    f"stage_layers={list(sizes)} is invalid: {self.schedule} with PP="
                    f"{self.num_ranks} has {self.num_stages} stages; give {self.num_stages} "
                    f"positive layer counts summing to num_layers={self.num_layers}")
            return
        if self.num_layers % self.num_stages or self.num_layers < self.num_stages:
            per_rank = self.num_stages // self.num_ranks
            raise ValueError(
                f"num_layers={self.num_layers} does not split into the {self.num_stages} "
                f"stages of {self.schedule} with PP={self.num_ranks} ({per_rank} per rank); use "
                f"a multiple of {self.num_stages} layers (e.g. "
                f"{max(self.num_stages, self.num_layers // self.num_stages * self.num_stages)}),"
                " or another pipeline size, or stage_layers")

    @property
    def schedule_class(self) -> type:
        return SCHEDULE_CLASSES[self.schedule]

    @property
    def num_stages(self) -> int:
        return 2 * self.num_ranks if self.schedule == "dualpipev" else self.num_ranks

    @property
    def layer_ranges(self) -> list[range]:
        if self.stage_layers is None:
            return split_layers(self.num_layers, self.num_stages)
        ends = [sum(self.stage_layers[:s + 1]) for s in range(self.num_stages)]
        return [range(end - n, end) for end, n in zip(ends, self.stage_layers)]

    def stages_of_rank(self, rank: int) -> tuple[int, int]:
        return self.schedule_class.stages_of_rank(rank, self.num_ranks)

    def is_mirror(self, chunk: int) -> bool:
        """DualPipe's chunk 1 is the second copy of a stage whose first copy (chunk 0) lives
        on the mirror rank; DualPipeV holds every stage once."""
        return self.schedule == "dualpipe" and chunk == 1

    def microbatches_of_chunk(self, chunk: int, num_microbatches: int) -> range:
        """The micro-batches a rank's chunk runs, in its order (DualPipe: half per direction)."""
        if self.schedule == "dualpipev":
            return range(num_microbatches)
        half = num_microbatches // 2
        return range(half) if chunk == 0 else range(half, num_microbatches)


class DeepSeekV3Stage(MoEOverlapStage, nn.Module):
    """Stage `stage_index` of `num_stages`: a slice of a full DeepSeekV3Model's modules.

    overlap_moe: run the decoder layers piecewise, so that the schedules' F&B steps overlap
    one micro-batch's MoE communication with another's compute (moe_overlap.py); False: the
    plain layer loop, and F&B runs F then B; None: piecewise when there is expert-parallel
    communication to hide (`exchanges_rows`)."""

    def __init__(self, model: nn.Module, stage_index: int, num_stages: int, layers: range, *,
                 chunk: int, mirror: bool = False, overlap_moe: Optional[bool] = None) -> None:
        super().__init__()
        self.stage_index, self.num_stages, self.layer_range = stage_index, num_stages, layers
        self.chunk, self.is_mirror = chunk, mirror
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.config = model.config
        self.embedding = model.embedding if self.is_first else None
        self.layers = nn.ModuleList(model.decoder.layers[i] for i in layers)
        if overlap_moe is None:
            overlap_moe = exchanges_rows(self.layers)
        self.piecewise_layers = PiecewiseLayers(self.layers) if overlap_moe else None
        self.final_layernorm = model.decoder.final_layernorm if self.is_last else None
        self.mtp = model.mtp if self.is_last and model.mtp_process else None
        self.output_layer = model.output_layer if self.is_last else None
        # The last stage runs the model's own `_postprocess` (output head, MTP, CE); the model
        # object is held outside nn.Module registration: its embedding belongs to stage 0.
        self._model = (model,) if self.is_last else ()
        # The MTP loss weight lambda(tokens seen), set by the training step before each step.
        self.mtp_lambda: Optional[float] = None
        self._balance_loss: Optional[torch.Tensor] = None  # running sum, see pop_balance_loss
        self._input_tensor: Optional[torch.Tensor] = None

    # ---- forward ----------------------------------------------------------------------------

    def set_input_tensor(self, tensor: torch.Tensor) -> None:
        """Megatron's convention: the next `forward()` without arguments starts from this."""
        self._input_tensor = tensor

    def forward(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: token ids [b, s] on stage 0, hidden states [s, b, d] on the others (None: the
        tensor given to `set_input_tensor`). Returns hidden states [s, b, d] (after the final
        norm on the last stage)."""
        if x is None:
            x, self._input_tensor = self._input_tensor, None
            if x is None:
                raise ValueError(f"stage {self.stage_index}: forward() without an input; pass "
                                 "the token ids (stage 0) or hidden states, or call "
                                 "set_input_tensor() first")
        hidden = self.embedding(input_ids=x, position_ids=None) if self.is_first else x
        if self.piecewise_layers is not None:
            hidden = self.piecewise_layers(hidden, attention_mask=None)
        else:
            for layer in self.layers:
                hidden, _ = layer(hidden_states=hidden, attention_mask=None)
        if self.is_last:
            hidden = self.final_layernorm(hidden)
        self._collect_balance_losses(self.layers)
        return hidden

    def overlapped_forward_backward(self, fwd: ForwardWork, bwd: BackwardWork):
        """The schedules' F&B hook (overlap.py): MoE pieces interleaved, or, with
        overlap_moe=False, the forward then the backward."""
        if self.piecewise_layers is None:
            outputs, loss = run_forward(fwd)
            run_backward(bwd)
            return outputs, loss
        return super().overlapped_forward_backward(fwd, bwd)

    # ---- loss (last stage) ------------------------------------------------------------------

    def lm_output(self, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor):
        """The model's LMOutput (per-token CE of the next token and of each MTP depth) from
        the final-norm hidden states [s, b, d] and the micro-batch's ids and labels [b, s]."""
        if not self.is_last:
            raise RuntimeError(f"stage {self.stage_index} of {self.num_stages} has no output "
                               "head; the loss runs on the last stage")
        out = self._model[0]._postprocess(
            hidden_states=hidden, input_ids=input_ids, position_ids=None, labels=labels,
            rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
            mtp_in_postprocess=self.mtp is not None)
        self._collect_balance_losses([self.mtp] if self.mtp is not None else [])
        return out

    def unscaled_loss(self, outputs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
                      ) -> tuple[torch.Tensor, ...]:
        """(loss, lm, mtp, mtp_ce) of one micro-batch, before the 1 / num_microbatches."""
        if self.mtp_lambda is None:
            raise ValueError("DeepSeekV3Stage.mtp_lambda is not set: set it on the last stage "
                             "before each step (MTPConfig.loss_weight(tokens_seen))")
        (hidden,) = outputs
        input_ids, targets = labels
        return weighted_lm_loss(self.lm_output(hidden, input_ids, targets), self.mtp_lambda)

    def loss_fn(self, num_microbatches: int) -> "StageLoss":
        """The schedules' `loss_fn` for a step of `num_microbatches` micro-batches."""
        return StageLoss(self, num_microbatches)

    # ---- bookkeeping --------------------------------------------------------------------------

    def _collect_balance_losses(self, modules) -> None:
        from ..moe.layer import DeepSeekMoE

        for module in modules:
            for moe in module.modules():
                if isinstance(moe, DeepSeekMoE) and moe.last_aux_loss is not None:
                    value = moe.last_aux_loss.float()
                    self._balance_loss = (value if self._balance_loss is None
                                          else self._balance_loss + value)
                    moe.last_aux_loss = None

    def pop_balance_loss(self) -> torch.Tensor:
        """Sum of the balance-loss values (what the routers' injected gradient minimises) of
        this stage's forwards since the last call, 0-dim fp32; zero if none (eval mode)."""
        total, self._balance_loss = self._balance_loss, None
        return total if total is not None else torch.zeros(())

    def full_name(self, local_name: str) -> str:
        """This stage's parameter/buffer name -> the full model's name."""
        head, _, rest = local_name.partition(".")
        if head == "layers":
            index, _, rest = rest.partition(".")
            return f"decoder.layers.{self.layer_range[int(index)]}.{rest}"
        if head == "final_layernorm":
            return f"decoder.{local_name}"
        return local_name  # embedding, mtp, output_layer: the same names

    def extra_repr(self) -> str:
        return (f"stage {self.stage_index}/{self.num_stages}, layers [{self.layer_range.start}, "
                f"{self.layer_range.stop}), chunk {self.chunk}"
                + (", mirror copy" if self.is_mirror else ""))


class StageLoss:
    """The last stage's `loss_fn` for one step: each micro-batch's loss / num_microbatches.

    `records` keeps each call's detached (loss, lm, mtp, mtp_ce), unscaled, in call order,
    which is the micro-batch order of the chunk (StepResult.microbatches)."""

    def __init__(self, stage: DeepSeekV3Stage, num_microbatches: int) -> None:
        if not stage.is_last:
            raise ValueError(f"stage {stage.stage_index} of {stage.num_stages} has no loss: "
                             "pass loss_fn only for the last stage")
        self.stage, self.num_microbatches = stage, num_microbatches
        self.records: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, outputs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
                 ) -> torch.Tensor:
        parts = self.stage.unscaled_loss(outputs, labels)
        self.records.append(tuple(p.detach() for p in parts))
        return parts[0] / self.num_microbatches


def exchanges_rows(layers) -> bool:
    """Whether a MoE layer among `layers` sends rows to other ranks (an EP group of size > 1)."""
    for layer in layers:
        group = getattr(getattr(getattr(layer, "mlp", None), "dispatcher", None), "ep_group",
                        None)
        if group is not None and group.size() > 1:
            return True
    return False


def stages_from_model(model: nn.Module, plan: StagePlan, rank: int, *,
                      overlap_moe: Optional[bool] = None
                      ) -> tuple[DeepSeekV3Stage, DeepSeekV3Stage]:
    """The two stages `rank` holds, made of `model`'s modules. Takes the model apart: its
    decoder keeps no layers afterwards (the other stages' layers are freed with it)."""
    if len(model.decoder.layers) != plan.num_layers:
        raise ValueError(f"the model has {len(model.decoder.layers)} decoder layers but the "
                         f"plan says num_layers={plan.num_layers}; build the full model (no "
                         "Megatron pipeline split) and a plan with its layer count")
    if model.config.mtp_num_layers and not model.mtp_process:
        raise ValueError("the model was built without its MTP block (Megatron's global "
                         "pipeline groups placed it on another stage); build the full model "
                         "while Megatron's parallel state has pipeline size 1")
    if not (model.pre_process and model.post_process):
        raise ValueError("stages are cut from a full model: build it with pre_process=True "
                         "and post_process=True")
    ranges = plan.layer_ranges
    if overlap_moe is None:  # one answer for both chunks (the F&B hook pairs them)
        overlap_moe = exchanges_rows(model.decoder.layers)
    stages = tuple(DeepSeekV3Stage(model, s, plan.num_stages, ranges[s], chunk=chunk,
                                   mirror=plan.is_mirror(chunk), overlap_moe=overlap_moe)
                   for chunk, s in enumerate(plan.stages_of_rank(rank)))
    if any(s.is_last for s in stages) and not any(s.is_first for s in stages):
        raise AssertionError(f"{plan}: rank {rank} holds the last stage without stage 0, whose "
                             "embedding the MTP uses")
    model.decoder.layers = nn.ModuleList()
    return stages


def build_rank_stages(cfg, plan: StagePlan, rank: int, full_state_dict: dict, *,
                      pg_collection=None, overlap_moe: Optional[bool] = None
                      ) -> tuple[DeepSeekV3Stage, DeepSeekV3Stage]:
    """The rank's two stages holding the weights of `full_state_dict` (a full TP=1, EP=1
    model's state dict, e.g. `build_model(cfg).state_dict()` of a seeded single process),
    sharded over `pg_collection.tp` and `.ep` (default: Megatron's groups). `rank` is the
    pipeline rank (`pg_collection.pp.rank()` when Megatron's groups include the pipeline)."""
    from ..config import to_megatron_config
    from ..model import build_model
    from ..parallel import shard_state_dict, whole_model_groups

    if pg_collection is None:
        from megatron.core.process_groups_config import ProcessGroupCollection

        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    tp, ep = pg_collection.tp.size(), pg_collection.ep.size()
    with whole_model_groups(pg_collection) as groups:
        model = build_model(cfg, pg_collection=groups, megatron_config=to_megatron_config(
            cfg, tensor_parallel_size=tp, expert_parallel_size=ep, use_cpu_initialization=True,
            perform_initialization=False))
    missing, unexpected = model.load_state_dict(
        shard_state_dict(full_state_dict, model, pg_collection.tp, pg_collection.ep),
        strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"full_state_dict does not fit the model of this config: "
                         f"{missing=}, {unexpected=}")
    return stages_from_model(model, plan, rank, overlap_moe=overlap_moe)


def weighted_lm_loss(out, mtp_lambda: float) -> tuple[torch.Tensor, ...]:
    """(loss to backpropagate, next-token CE, weighted MTP loss, unweighted MTP CE) of one
    micro-batch's LMOutput: loss = mean CE + (lambda / D) sum_k CE_k (mtp.mtp_loss)."""
    from ..mtp import mtp_loss

    lm = out.lm_loss.float().mean()
    if out.mtp_losses is None:
        zero = torch.zeros((), device=lm.device)
        return lm, lm, zero, zero
    mtp = mtp_loss(out.mtp_losses.float(), out.mtp_valid, mtp_lambda)
    with torch.no_grad():
        mtp_ce = mtp_loss(out.mtp_losses.float(), out.mtp_valid, 1.0)
    return lm + mtp, lm, mtp, mtp_ce


# ---- weights and gradients under the full model's names ------------------------------------

def local_state(stages: Sequence[DeepSeekV3Stage], *, grads: bool = False,
                include_mirrors: bool = False) -> dict[str, torch.Tensor]:
    """{full-model name: tensor} of this rank's stage parameters (grads=True: their gradients,
    parameters without one left out). DualPipe's mirror copies are skipped unless asked for:
    each stage is reported by the rank holding its chunk-0 copy."""
    out = {}
    for stage in stages:
        if stage.is_mirror and not include_mirrors:
            continue
        for name, param in stage.named_parameters():
            tensor = param.grad if grads else param.data
            if tensor is not None:
                out[stage.full_name(name)] = tensor.detach().clone()
    return out


def gather_stage_state(stages: Sequence[DeepSeekV3Stage], group, *, grads: bool = False,
                       tp_group=None, ep_group=None) -> dict[str, torch.Tensor]:
    """The whole model's parameters (or gradients) under full names, on every rank: each stage's
    TP-split tensors assembled over `tp_group`, its routed-expert shards over `ep_group`
    (parallel.gather_state_dict; None: not split), then the stages of the pipeline `group`
    (DualPipe's mirror copies left out). A CPU copy; every rank of the three groups must call.
    Parameters without a gradient are left out (grads=True): that must agree across TP/EP."""
    from ..parallel import gather_state_dict

    local = {}
    for stage in stages:
        if stage.is_mirror:
            continue
        full = gather_state_dict(stage, tp_group, grads=grads, ep_group=ep_group)
        local.update({stage.full_name(name): t.cpu() for name, t in full.items()})
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    whole: dict[str, torch.Tensor] = {}
    for part in parts:
        whole.update(part)
    return whole


# ---- DualPipe: the two copies of each stage -------------------------------------------------

def reduce_mirrored_router_loads(pipe: DualPipe, stages: Sequence[DeepSeekV3Stage]) -> None:
    """DualPipe: each copy of a stage routed its own direction's tokens; add the mirror copy's
    counts so both copies see the step's loads (and take the same bias step)."""
    from ..moe.balance import routers

    counts = [[r.tokens_per_expert for _, r in routers(stage)] for stage in stages]
    theirs0, theirs1 = pipe.exchange_with_mirror(counts[0], counts[1])
    for mine, other in zip(counts[0] + counts[1], theirs0 + theirs1):
        mine.add_(other)

"""DeepSeek-V3 cut into the stage modules of DualPipe / DualPipeV.

  StagePlan(schedule, num_ranks, num_layers)   how many stages, which layers each holds, which
        two stages a rank holds (the schedule class's rules); invalid settings raise with the
        field and the fix
  DeepSeekV3Stage          one stage: a slice of a full DeepSeekV3Model's modules
        stage(x) -> hidden [s, b, d]; x = token ids [b, s] on stage 0, hidden [s, b, d] after
        stage.loss_fn(M, mtp_lambda) on the last stage: the schedules' loss_fn(outputs, labels)
        with labels = (input_ids, labels), both [b, s]
  stages_from_model(model, plan, rank)          the rank's two stages, taken from a full model
  reduce_mirrored_router_loads(pipe, stages)   a mirrored schedule (DualPipe): add the routers'
        token counts of the two copies of each stage (their gradients:
        `reduce_mirrored_grads`)

Layout (L decoder layers, S stages: DualPipeV S = 2 PP, DualPipe S = PP; S must divide L
unless `stage_layers` says otherwise):
    stage 0       embedding, layers [0, L/S)
    stage s       layers [s L/S, (s+1) L/S)
    stage S-1     layers [L - L/S, L), final norm; its loss runs the output head, the MTP
                  block and the cross-entropies: the model's own `postprocess`
An uneven split is refused (StagePlan names the layer count to use): an even one keeps every
stage's work equal, which the schedules' bubble formulas assume.

Design notes
  * A stage owns a slice of a full model's modules: the same objects Megatron built from our
    specs (`build_model` -> `layer_spec`), so a stage computes exactly what the model computes.
    Each rank builds the full model (a seed gives the same weights at every parallel size),
    keeps its stages' modules and drops the decoder layers of the other stages. Building only
    the rank's layers (meta device) is not done. With TP/EP the model is this rank's TP/EP
    shard of the full model (`parallel.whole_model_groups`), so a stage holds the same shards
    a non-pipelined TP/EP rank would; the pipeline adds no parallel dimension inside a stage.
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
    micro-batches; lambda is an argument of `loss_fn`. The routers' balance loss enters
    through its injected gradient, scaled by `moe.balance.set_balance_loss_scale` (1 /
    num_microbatches); each stage collects its MoE layers' balance-loss values for logging
    (`pop_balance_loss`).
  * The F&B overlap (fb_overlap.py): with `overlap_moe=True` a stage runs its decoder layers
    through a PiecewiseLayers, so the schedules' F&B steps interleave one micro-batch's MoE
    pieces (attention, dispatch, experts, combine) with another's backward pieces. Same
    arithmetic as the plain layer loop (`overlap_moe=False`, the reference; the CPU tests run
    both against one process). The default (None) is on exactly when a MoE layer of the stage
    exchanges rows over an EP group of more than one rank: without an all-to-all there is
    nothing to hide and the pieces only cost (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..moe.balance import routers
from ..moe.layer import DeepSeekMoE
from ..mtp import weighted_lm_loss
from .bidirectional import BidirectionalSchedule
from .fb_overlap import PiecewiseLayers
from .schedules import schedule_class


@dataclass(frozen=True)
class StagePlan:
    """Which stages exist and which layers and ranks hold them.

    stage_layers: decoder layers per stage, in stage order (default: equal). Stage 0 also runs
    the embedding and the last stage the final norm, output head, MTP and loss, so a balanced
    pipeline gives them fewer layers (the DeepSeek-V3 report balances its stages this way);
    with DualPipeV a rank holds stages r and 2PP-1-r, so the first rank holds both ends."""
    schedule: str        # a name in pipeline.schedules.SCHEDULES
    num_ranks: int       # pipeline-parallel size PP
    num_layers: int      # decoder layers of the model (MTP layers ride on the last stage)
    stage_layers: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", self.schedule.lower())
        self.schedule_class.validate(self.num_ranks)
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
    def schedule_class(self) -> type[BidirectionalSchedule]:
        return schedule_class(self.schedule)

    @property
    def num_stages(self) -> int:
        return self.schedule_class.num_stages(self.num_ranks)

    @property
    def layer_ranges(self) -> list[range]:
        sizes = self.stage_layers or (self.num_layers // self.num_stages,) * self.num_stages
        ends = [sum(sizes[:s + 1]) for s in range(self.num_stages)]
        return [range(end - n, end) for end, n in zip(ends, sizes)]

    def stages_of_rank(self, rank: int) -> tuple[int, int]:
        return self.schedule_class.stages_of_rank(rank, self.num_ranks)

    def is_mirror(self, chunk: int) -> bool:
        return self.schedule_class.is_mirror(chunk)

    def microbatches_of_chunk(self, chunk: int, num_microbatches: int) -> range:
        return self.schedule_class.microbatches_of_chunk(chunk, num_microbatches)


class DeepSeekV3Stage(nn.Module):
    """Stage `stage_index` of `num_stages`: a slice of a full DeepSeekV3Model's modules.

    overlap_moe: run the decoder layers through a PiecewiseLayers, so that the schedules' F&B
    steps overlap one micro-batch's MoE communication with another's compute (fb_overlap.py);
    False: the plain layer loop, and F&B runs F then B; None: piecewise when there is
    expert-parallel communication to hide (`exchanges_rows`)."""

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
        # The last stage runs the model's own `postprocess` (output head, MTP, CE); the model
        # object is held outside nn.Module registration: its embedding belongs to stage 0.
        self._model = (model,) if self.is_last else ()
        self._balance_loss: Optional[torch.Tensor] = None  # running sum, see pop_balance_loss
        self._input_tensor: Optional[torch.Tensor] = None
        # What Megatron's loop reads of each model chunk (pretrain_dualpipe.py)
        self.pre_process, self.post_process = self.is_first, self.is_last
        self.share_embeddings_and_output_weights = False
        self.pg_collection = getattr(model, "pg_collection", None)

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

    # ---- loss (last stage) ------------------------------------------------------------------

    def lm_output(self, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                  position_ids: Optional[torch.Tensor] = None,
                  loss_mask: Optional[torch.Tensor] = None):
        """The model's LMOutput (per-token CE of the next token and of each MTP depth) from
        the final-norm hidden states [s, b, d] and the micro-batch's ids and labels [b, s];
        position_ids and loss_mask [b, s] as the whole model's forward takes them (the MTP
        depths shift both)."""
        if not self.is_last:
            raise RuntimeError(f"stage {self.stage_index} of {self.num_stages} has no output "
                               "head; the loss runs on the last stage")
        out = self._model[0].postprocess(hidden, input_ids=input_ids, position_ids=position_ids,
                                         labels=labels, loss_mask=loss_mask,
                                         run_mtp=self.mtp is not None)
        self._collect_balance_losses([self.mtp] if self.mtp is not None else [])
        return out

    def unscaled_loss(self, outputs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                      mtp_lambda: float) -> tuple[torch.Tensor, ...]:
        """(loss, lm, mtp, each depth's MTP CE [D]) of one micro-batch, before the
        1 / num_microbatches (mtp.weighted_lm_loss)."""
        (hidden,) = outputs
        input_ids, targets = labels
        return weighted_lm_loss(self.lm_output(hidden, input_ids, targets), mtp_lambda)

    def loss_fn(self, num_microbatches: int, mtp_lambda: float) -> "StageLoss":
        """The schedules' `loss_fn` for a step of `num_microbatches` micro-batches with the MTP
        loss weight `mtp_lambda` (MTPConfig.loss_weight(tokens_seen))."""
        return StageLoss(self, num_microbatches, mtp_lambda)

    # ---- bookkeeping --------------------------------------------------------------------------

    def _collect_balance_losses(self, modules) -> None:
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

    def shared_embedding_or_output_weight(self) -> None:
        """Megatron all-reduces the gradient of a word embedding held by the first and the last
        stage; here the last stage's MTP uses the embedding of the stage 0 on its own rank
        (module note), so nothing is duplicated across ranks: None."""
        return None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """Megatron's distributed checkpoint of this stage: its tensors under the whole
        model's keys (`full_name`), as the whole model's own sharded_state_dict names them
        (decoder layers by their global index, Megatron's non-homogeneous layout), so that a
        checkpoint saved in stages loads into the whole model, or other stages, and back.
        The dictionary's own keys stay this module's state-dict names (what the load fills)."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import sharded_state_dict_default

        out: dict = {}
        for name, child in self.named_children():
            if child is self.layers:
                parts = [(f"layers.{i}.", layer, []) for i, layer in enumerate(self.layers)]
            else:
                parts = [(f"{name}.", child, sharded_offsets)]
            for local, module, offsets in parts:
                part = sharded_state_dict_default(module, prefix + local, offsets, metadata)
                if self.full_name(local) != local:
                    replace_prefix_for_sharding(part, prefix + local,
                                                prefix + self.full_name(local))
                out.update(part)
        out.pop(f"{prefix}output_layer._extra_state", None)  # GPTModel drops it (always empty)
        return out

    def full_name(self, local_name: str) -> str:
        """This stage's parameter/buffer name (or a prefix of names, ending in '.') -> the
        full model's."""
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

    `records` keeps each call's detached (loss, lm, mtp, depth CE), unscaled, in call order,
    which is the micro-batch order of the chunk (StepResult.microbatches)."""

    def __init__(self, stage: DeepSeekV3Stage, num_microbatches: int, mtp_lambda: float) -> None:
        if not stage.is_last:
            raise ValueError(f"stage {stage.stage_index} of {stage.num_stages} has no loss: "
                             "pass loss_fn only for the last stage")
        self.stage, self.num_microbatches, self.mtp_lambda = stage, num_microbatches, mtp_lambda
        self.records: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, outputs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
                 ) -> torch.Tensor:
        parts = self.stage.unscaled_loss(outputs, labels, self.mtp_lambda)
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
                         "inside parallel.whole_model_groups")
    if not (model.pre_process and model.post_process):
        raise ValueError("stages are cut from a full model: build it with pre_process=True "
                         "and post_process=True")
    ranges = plan.layer_ranges
    if overlap_moe is None:  # one answer for both chunks (the F&B step pairs them)
        overlap_moe = exchanges_rows(model.decoder.layers)
    stages = tuple(DeepSeekV3Stage(model, s, plan.num_stages, ranges[s], chunk=chunk,
                                   mirror=plan.is_mirror(chunk), overlap_moe=overlap_moe)
                   for chunk, s in enumerate(plan.stages_of_rank(rank)))
    if any(s.is_last for s in stages) and not any(s.is_first for s in stages):
        raise AssertionError(f"{plan}: rank {rank} holds the last stage without stage 0, whose "
                             "embedding the MTP uses")
    model.decoder.layers = nn.ModuleList()
    return stages


def reduce_mirrored_router_loads(pipe: BidirectionalSchedule,
                                 stages: Sequence[DeepSeekV3Stage]) -> None:
    """A mirrored schedule (DualPipe): each copy of a stage routed its own direction's tokens;
    add the mirror copy's counts so both copies see the step's loads (and take the same bias
    step). Nothing to do when every stage is held once."""
    if not pipe.mirrored:
        return
    counts = [[r.tokens_per_expert for _, r in routers(stage)] for stage in stages]
    theirs0, theirs1 = pipe.exchange_with_mirror(counts[0], counts[1])
    for mine, other in zip(counts[0] + counts[1], theirs0 + theirs1):
        mine.add_(other)

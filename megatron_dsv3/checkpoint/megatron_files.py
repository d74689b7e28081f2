"""Hugging Face DeepSeek-V3 folders <-> Megatron's distributed checkpoint of our model, any layout.

  hf_to_megatron(hf_dir, out)        a Hugging Face folder -> OUT/latest_checkpointed_iteration.txt
                                     ("release") + OUT/release/: the torch_dist checkpoint that
                                     Megatron's loop loads with `--load OUT` at any TP / EP / PP
  megatron_to_hf(load, out)          a torch_dist checkpoint Megatron's loop saved (`--save`), at
                                     whatever layout, -> a Hugging Face folder

Why one file serves every layout: Megatron's torch_dist format (torch.distributed.checkpoint,
DCP) stores GLOBAL tensors under global keys; each rank of a run says which slice of which key
it holds (sharded_checkpoint.py) and DCP reads the overlap with whatever chunks were written.
Our keys are the model's own state-dict names: our decoder layers are not homogeneous (dense
layers first: `moe_layer_freq` is a list), so Megatron's TransformerBlock keys each layer by its
GLOBAL index (`decoder.layers.{i}.`, i over the whole model, whichever pipeline stage holds it)
rather than stacking them along a first axis; MTP depth k is `mtp.layers.{k}.` on the last
stage. So a checkpoint written once, as the whole TP=1 model, loads at TP=2 x EP=2 x PP=2
(tests/test_megatron_conversion.py), and any checkpoint reads back as that whole model.

What is written (what Megatron-Core 0.19.2's `dist_checkpointing.save` writes, `megatron_compat`
owns the two details that are Megatron's: the common state's key and how an object is encoded):
  * `.metadata` + `__0_0.distcp`: DCP's files. Each tensor in the dtype the Hugging Face folder
    stores (FP8 weights dequantized, hf_files.py), or `dtype`; the routed experts [E, ., .] one
    chunk per expert, so that neither side holds more than one expert's slice of them;
  * the common state (`args`: Megatron's arguments for the model, as `megatron_cli` writes its
    flags, with padded_vocab_size = the folder's vocab_size; `checkpoint_version` 3.0;
    `iteration` 0; and `dsv3_model_config`, our whole ModelConfig);
  * `_extra_state` = None of every linear (Megatron's and Transformer Engine's linears save
    one; None is what Megatron's local linears hold and what TE accepts from a checkpoint);
  * metadata.json (backend torch_dist), a digest manifest (checkpoint/digest.py, which
    pretrain.py verifies before loading) and the tracker file naming `release`.
A release checkpoint is what Megatron's loader expects of converted weights: it starts at
iteration 0 with a fresh optimizer, learning-rate schedule and RNG (no --finetune needed), and
still checks the saved arguments against the run's (num_layers, hidden_size, heads;
pretrain.check_resume_matches all of MODEL_ARGS, padded_vocab_size included: the tokenizer's
size rounded up to a multiple of --make-vocab-size-divisible-by x TP must be the folder's
vocab_size).

Memory: one of our tensors at a time, not the model.
  * hf-to-megatron streams. DCP's FileSystemWriter asks the planner for each item's data just
    before writing it (`resolve_data`); `_StreamingPlanner` plans from shapes alone and builds
    each item then, from the few Hugging Face tensors it needs (safetensors reads one tensor,
    or one expert of a fused one). torch 2.14's writer keeps every tensor of a file until the
    file is closed (for its safetensors output, in the torch.save format too): the planner
    frees each item's storage when the writer asks for the next, and the writer runs with no
    copy-ahead so that the next is asked for only once this one is written. In memory: one
    item (a whole non-expert tensor or one expert; DeepSeek-V3's largest is the 129280 x 7168
    embedding, 1.9 GB in bf16) and the pages of the two shards being read (mapped by
    safetensors, reclaimable).
  * megatron-to-hf reads tensor by tensor: DCP loads one key at a time into a tensor of its
    global shape (reading only the bytes of its chunks, from every rank's file), without a
    process group or a model; `hf_files.save_hf_checkpoint` materialises one output shard at a
    time and asks for each source tensor as it needs it, the last one kept (a fused experts
    tensor is sliced into 3E Hugging Face tensors in a row).
  Measured on a 100M-parameter model (401 MB in fp32, ten 50 MB shards; peak RSS over the
  717 MB of the imports): hf-to-megatron +143 MB (+451 MB before the planner freed what the
  writer kept), megatron-to-hf +152 MB; hf-to-dsv3, which holds the whole model, +689 MB.

Errors are ConversionErrors naming the file or field and the fix: not a Megatron checkpoint
(no tracker, no metadata.json, another --ckpt-format), a partial shard set (a .distcp file
missing or shorter than .metadata says), missing tensors and shapes against the config (with
the config field), another model's layout, a --preset that contradicts the saved arguments.
Both directions write into `<out>.partial` and rename it at the end: an error leaves nothing
under `out`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Union

import torch

from ..config import DTYPES, ConfigError, ModelConfig
from ..config import preset as preset_config
from .hf import ConversionError, _rules
from .hf_files import (
    SCALE_SUFFIX,
    dequantize_fp8_blocks,
    read_plan,
    model_config_from_dict,
    save_hf_checkpoint,
)

PathLike = Union[str, Path]
TRACKER_FILE = "latest_checkpointed_iteration.txt"   # Megatron's name for it
RELEASE = "release"
DCP_METADATA = ".metadata"
MODEL_CONFIG_KEY = "dsv3_model_config"   # our whole ModelConfig in the common state
CHECKPOINT_VERSION = 3.0                 # what Megatron's save writes (its loader reads it)
EXTRA_STATE = "_extra_state"
# keys of a Megatron checkpoint that are not model weights: left alone when reading
_NOT_WEIGHTS = re.compile(r"^(optimizer|rng_state|rerun_state_machine|common_state|"
                          r"content_metadata|opt_param_scheduler)\b|\._extra_state(/|$)")


# ----------------------------------------------------------------------------------------------
# The folder: tracker, iteration folders
# ----------------------------------------------------------------------------------------------
def checkpoint_folder(load: PathLike, iteration: Optional[int] = None) -> Path:
    """The torch_dist folder Megatron's loader would read under `load` (iter_<iteration>, or
    what the tracker names); `load` may also be that folder itself."""
    load = Path(load)
    if not load.is_dir():
        raise ConversionError(f"--load {load} is not a folder: pass the --save folder of a "
                              "Megatron run (the one holding latest_checkpointed_iteration.txt)")
    if iteration is not None:
        folder = load / f"iter_{iteration:07d}"
        if not folder.is_dir():
            held = sorted(p.name for p in load.glob("iter_*"))[-4:] or ["none"]
            raise ConversionError(f"--iteration {iteration}: {folder} does not exist; "
                                  f"{load} holds {', '.join(held)}")
    elif (load / "metadata.json").is_file():
        folder = load  # an iteration folder given directly
    else:
        tracker = load / TRACKER_FILE
        if not tracker.is_file():
            raise ConversionError(
                f"--load {load} is not a Megatron checkpoint folder: it has no {TRACKER_FILE} "
                "(nor metadata.json of an iteration folder); pass the folder given to "
                "Megatron's --save, or an iter_NNNNNNN folder in it, or --iteration N")
        named = tracker.read_text().strip()
        if named != RELEASE and not named.isdigit():
            raise ConversionError(f"{tracker} holds {named!r}: Megatron writes an iteration "
                                  "number or 'release' there; pass --iteration N instead")
        folder = load / (RELEASE if named == RELEASE else f"iter_{int(named):07d}")
        if not folder.is_dir():
            raise ConversionError(f"{tracker} names {folder.name}, which is missing: the save "
                                  "was interrupted or the folder moved; pass --iteration N")
    _check_torch_dist(folder)
    return folder


def _check_torch_dist(folder: Path) -> None:
    from ..megatron_compat import TORCH_DIST_BACKEND

    config = folder / "metadata.json"
    if not config.is_file():
        torch_format = any(folder.glob("mp_rank_*"))
        raise ConversionError(
            f"{folder} is not a torch_dist checkpoint (no metadata.json): "
            + ("it holds mp_rank_* folders, Megatron's legacy --ckpt-format torch; convert "
               "it by resuming a run with --ckpt-format torch_dist and saving"
               if torch_format else "pass the folder of a Megatron --save with the default "
               "--ckpt-format torch_dist"))
    try:
        backend = json.loads(config.read_text()).get("sharded_backend")
    except ValueError as err:
        raise ConversionError(f"{config} is not valid JSON ({err}): the save was interrupted; "
                              "use another iteration") from err
    if backend != TORCH_DIST_BACKEND:
        raise ConversionError(f"{config}: sharded_backend {backend!r}, only "
                              f"{TORCH_DIST_BACKEND!r} (Megatron's default) is read here")
    if not (folder / DCP_METADATA).is_file():
        raise ConversionError(f"{folder} has no {DCP_METADATA} (torch.distributed.checkpoint's "
                              "index of the tensors): the save did not finish or the folder "
                              "was copied in part; copy it again or use another iteration")


# ----------------------------------------------------------------------------------------------
# Megatron's arguments for a model (the common state's `args`)
# ----------------------------------------------------------------------------------------------
def megatron_args(cfg: ModelConfig) -> argparse.Namespace:
    """Megatron's parsed arguments for `cfg`'s model (megatron_cli's flags), with what its
    validation would add that the loader and pretrain.check_resume_matches compare."""
    from megatron.training.arguments import add_megatron_arguments

    from ..megatron_cli import megatron_flags
    from ..pretrain import add_arguments

    parser = add_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    try:
        args = parser.parse_args(megatron_flags(cfg))
    except ConfigError as err:
        raise ConversionError(f"the model cannot be described by Megatron's arguments: {err}"
                              ) from err
    args.padded_vocab_size = cfg.vocab_size
    args.params_dtype = cfg.torch_dtype
    args.consumed_train_samples = args.consumed_valid_samples = args.skipped_train_samples = 0
    return args


def model_config_from_args(args) -> ModelConfig:
    """The ModelConfig Megatron's saved arguments describe (as model_provider builds it)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig
    from megatron.training.arguments import core_transformer_config_from_args

    from ..config import from_megatron_config

    try:
        config = core_transformer_config_from_args(args, MLATransformerConfig)
        return from_megatron_config(config, vocab_size=args.padded_vocab_size,
                                    max_seq_len=args.max_position_embeddings)
    except (ConfigError, AttributeError, TypeError, ValueError, AssertionError) as err:
        raise ConversionError(f"the checkpoint's saved arguments do not describe a megatron_dsv3 "
                              f"model ({type(err).__name__}: {err}); pass --preset NAME if it "
                              "was trained with one") from err


def resolve_model_config(common: Mapping, preset: Optional[str], where: str
                         ) -> tuple[ModelConfig, str]:
    """(the config to convert with, where it came from): our ModelConfig saved by
    hf-to-megatron, else Megatron's saved arguments, else --preset; with --preset the preset,
    refused where it describes another model than the checkpoint's own record."""
    from ..train.args import architecture_differences

    saved, source = None, None
    if common.get(MODEL_CONFIG_KEY):
        saved, source = (model_config_from_dict(common[MODEL_CONFIG_KEY]),
                         "the model config hf-to-megatron saved")
    elif common.get("args") is not None:
        saved, source = model_config_from_args(common["args"]), "Megatron's saved arguments"
    if preset is None:
        if saved is None:
            raise ConversionError(f"{where} records neither Megatron's arguments nor a model "
                                  "config: pass --preset NAME (the model it was trained as)")
        return saved, f"{source} in {where}"
    try:
        chosen = preset_config(preset)
    except ConfigError as err:
        raise ConversionError(f"--preset {preset}: {err}") from err
    if saved is not None:
        differences = architecture_differences(chosen, saved)
        if differences:
            raise ConversionError(
                f"--preset {preset} describes another model than {where} ({source}); preset "
                "and checkpoint differ in " + "; ".join(differences[:6])
                + ("; ..." if len(differences) > 6 else "")
                + ". Drop --preset to convert with the checkpoint's own, or pass the preset it "
                  "was trained with")
    return chosen, f"--preset {preset}"


# ----------------------------------------------------------------------------------------------
# Writing: a streaming DCP save
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Chunk:
    """One write item: rows `offsets` / `sizes` of global tensor `key`, built by `build()`."""

    key: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    build: Callable[[], torch.Tensor]


def _causes(err) -> list[BaseException]:
    """The exceptions inside DCP's CheckpointException ({rank: (exception, its stack)})."""
    return [failure[0] if isinstance(failure, tuple) else failure
            for failure in err.failures.values()]


def _streaming_planner(chunks: list[_Chunk], objects: Mapping[str, io.BytesIO]):
    """A DCP SavePlanner that plans from `chunks`' shapes and builds each chunk's data only
    when the writer asks for it (the module docstring's streaming)."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                       TensorProperties)
    from torch.distributed.checkpoint.planner import (SavePlan, TensorWriteData, WriteItem,
                                                      WriteItemType)

    by_index = {MetadataIndex(c.key, torch.Size(c.offsets)): c for c in chunks}

    class _StreamingPlanner(DefaultSavePlanner):
        def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
            self.state_dict, self.is_coordinator = dict(objects), is_coordinator
            self.written: Optional[torch.Tensor] = None

        def release_written(self) -> None:
            """Free the storage of the last chunk handed out. torch 2.14's FileSystemWriter
            keeps every tensor of a file until the file is closed (for its safetensors
            output, also in the torch.save format used here): without this the conversion of
            a 401 MB model added 451 MB to the peak RSS (with it 143 MB). Called when the next
            item is asked for: the serial loader (per_thread_copy_ahead=0) has written this
            one by then."""
            if self.written is not None:
                self.written.untyped_storage().resize_(0)
                self.written = None

        def create_local_plan(self) -> SavePlan:
            items = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO)
                     for key in objects]
            for index, chunk in by_index.items():
                items.append(WriteItem(index=index, type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(
                                           chunk=ChunkStorageMetadata(
                                               offsets=torch.Size(chunk.offsets),
                                               sizes=torch.Size(chunk.sizes)),
                                           properties=TensorProperties(dtype=chunk.dtype),
                                           size=torch.Size(chunk.global_shape))))
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item):
            self.release_written()
            if write_item.type == WriteItemType.BYTE_IO:
                buffer = objects[write_item.index.fqn]
                buffer.seek(0)
                return buffer
            chunk = by_index[MetadataIndex(write_item.index.fqn, write_item.index.offset)]
            tensor = chunk.build()
            if tuple(tensor.shape) != chunk.sizes or tensor.dtype != chunk.dtype:
                raise ConversionError(f"{chunk.key} at {chunk.offsets}: built "
                                      f"{tuple(tensor.shape)} {tensor.dtype}, planned "
                                      f"{chunk.sizes} {chunk.dtype} (a bug: please report)")
            tensor = tensor.contiguous()
            storage = tensor.untyped_storage()
            if storage.nbytes() != tensor.nbytes or not storage.resizable():
                tensor = tensor.clone()  # e.g. safetensors' mmap-backed tensors: one of our own
            self.written = tensor
            return tensor

    return _StreamingPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def write_torch_dist(folder: Path, chunks: list[_Chunk], common: dict,
                     extra_states: list[str] = ()) -> None:
    """Megatron's torch_dist checkpoint in `folder` (new): the tensors of `chunks`, the common
    state `common`, a None `_extra_state` object per key in `extra_states`, metadata.json."""
    import torch.distributed.checkpoint as dcp

    from ..megatron_compat import COMMON_STATE_KEY, sharded_object_entry, write_torch_dist_config

    objects = dict(sharded_object_entry(key, None) for key in extra_states)
    objects.update([sharded_object_entry(COMMON_STATE_KEY, common)])
    folder.mkdir(parents=True)
    # one file, one writer thread, no copy-ahead: the items are built in the writer's loop one
    # at a time, each when the one before it is written (_StreamingPlanner.release_written)
    writer = dcp.FileSystemWriter(str(folder), single_file_per_rank=True, thread_count=1,
                                  per_thread_copy_ahead=0)
    planner = _streaming_planner(chunks, objects)
    try:
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    except dcp.CheckpointException as err:  # DCP wraps what a chunk's build raised
        for cause in _causes(err):
            if isinstance(cause, ConversionError):
                raise cause from None
        raise
    finally:
        planner.release_written()
    write_torch_dist_config(folder)


class _HfTensors:
    """Reads single Hugging Face tensors (or one expert of a fused one) from a folder's
    shards, FP8 weights dequantized; the last few shards stay open."""

    def __init__(self, hf_dir: Path, shard_of: Mapping[str, str], block, fp8_dtype,
                 keep_open: int = 2):
        self.hf_dir, self.shard_of, self.block, self.fp8_dtype = hf_dir, shard_of, block, fp8_dtype
        self.keep_open = keep_open
        self._open: dict[str, tuple] = {}   # shard -> (ExitStack, handle), oldest first

    def _handle(self, shard: str):
        if shard not in self._open:
            from safetensors import safe_open

            if len(self._open) >= self.keep_open:
                oldest = next(iter(self._open))
                self._open.pop(oldest)[0].close()
            stack = contextlib.ExitStack()
            handle = stack.enter_context(safe_open(self.hf_dir / shard, framework="pt"))
            self._open[shard] = (stack, handle)
        return self._open[shard][1]

    def read(self, key: str, expert: Optional[int] = None,
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        handle = self._handle(self.shard_of[key])
        if expert is not None:
            tensor = handle.get_slice(key)[expert: expert + 1][0]
        else:
            tensor = handle.get_tensor(key)
        if tensor.dtype == torch.float8_e4m3fn:
            scale = self._handle(self.shard_of[key + SCALE_SUFFIX]).get_tensor(key + SCALE_SUFFIX)
            tensor = dequantize_fp8_blocks(tensor, scale, dtype or self.fp8_dtype, self.block, key)
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def close(self) -> None:
        for stack, _ in self._open.values():
            stack.close()
        self._open.clear()


def _hf_chunks(cfg: ModelConfig, plan, reader: _HfTensors) -> list[_Chunk]:
    """Our tensors as write items (the routed experts one per expert), each built from its
    Hugging Face pieces when written; the MTP copies of the embedding / head are checked equal
    to the main tensors as those are built."""
    pieces: dict[str, list] = {}
    for hf_key, target in plan.targets.items():
        pieces.setdefault(target.ours, []).append((hf_key, target))
    copies_of: dict[str, list[str]] = {}
    for copy, main in plan.copies.items():
        copies_of.setdefault(main, []).append(copy)

    def build(ours: str, expert: Optional[int]) -> torch.Tensor:
        """Our tensor `ours`, or with `expert` its slice [1, ...] of the experts [E, ...]."""
        out = plan.outputs[ours]
        shape = out.shape if expert is None else out.shape[1:]
        relevant = [(k, t) for k, t in pieces[ours] if expert is None or t.expert in (None, expert)]
        result = None
        for hf_key, target in relevant:
            # per-expert HF tensors (target.expert set) are read whole, a fused HF experts
            # tensor [E, 2F, D] / [E, D, F] (target.expert None) only at this expert
            value = reader.read(hf_key, expert if target.expert is None else None, out.dtype)
            for copy in copies_of.get(hf_key, ()):
                if not torch.equal(reader.read(copy, None, out.dtype), value):
                    raise ConversionError(
                        f"{copy} differs from {hf_key}: our MTP shares the main model's "
                        "embedding and output head, so the checkpoint's MTP copy must equal the "
                        "main tensor; drop the copy to use the main one, or convert another "
                        "checkpoint")
            if len(relevant) == 1 and target.rows is None:
                result = value
                break
            if result is None:
                result = torch.empty(shape, dtype=out.dtype)
            dest = result if expert is not None or target.expert is None else result[target.expert]
            if target.rows is not None:
                dest = dest[target.rows[0]: target.rows[1]]
            dest.copy_(value)
            del value
        return result if expert is None else result.unsqueeze(0)

    chunks = []
    for rule in _rules(cfg):
        out = plan.outputs[rule.ours]
        shape = tuple(out.shape)
        per_expert = rule.ours.endswith(("experts.fc1", "experts.fc2"))
        for expert in (range(shape[0]) if per_expert else (None,)):
            offsets = (expert,) + (0,) * (len(shape) - 1) if per_expert else (0,) * len(shape)
            sizes = (1,) + shape[1:] if per_expert else shape
            chunks.append(_Chunk(rule.ours, shape, out.dtype, offsets, sizes,
                                 lambda ours=rule.ours, e=expert: build(ours, e)))
    return chunks


def _extra_state_keys(cfg: ModelConfig) -> list[str]:
    """`_extra_state` keys of our model's linears under either backend (module docstring):
    every weight's module but the norms, the router, the embedding and the output head (whose
    extra state Megatron's GPTModel does not save)."""
    skip = re.compile(r"(norm|router|word_embeddings|output_layer)\.weight$")
    return [rule.ours[: -len("weight")] + EXTRA_STATE for rule in _rules(cfg)
            if rule.ours.endswith(".weight") and not skip.search(rule.ours)]


@contextlib.contextmanager
def _output_folder(out: Path) -> Iterator[Path]:
    """`<out>.partial` (emptied) to write into, renamed to `out` when the block succeeds and
    removed when it fails, after refusing an `out` that holds something: nothing half written
    is left under either name."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--out {out} already exists and is not empty: write to a new "
                              "folder, or remove this one first")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # what an earlier, interrupted conversion left
    try:
        yield partial
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def hf_to_megatron(hf_dir: PathLike, out: PathLike, *, dtype: Optional[torch.dtype] = None,
                   mtp_layers: Optional[int] = None, progress: bool = True) -> dict:
    """Write the Hugging Face folder as a Megatron release checkpoint under `out` (module
    docstring). `dtype` / `mtp_layers`: as hf_files.load_hf_checkpoint's. Returns the common
    state written (args, model config, ...)."""
    from tqdm import tqdm

    from ..megatron_compat import INSTALLED_VERSION
    from .digest import write_folder_manifest

    hf_dir, out = Path(hf_dir), Path(out)
    cfg, plan, block, fp8_dtype, shard_keys = read_plan(hf_dir, dtype, mtp_layers,
                                                        "--mtp-layers")
    if dtype is not None:
        cfg = cfg.replace(params_dtype=next(k for k, v in DTYPES.items() if v == dtype))
    shard_of = {key: shard for shard, keys in shard_keys.items() for key in keys}
    reader = _HfTensors(hf_dir, shard_of, block, fp8_dtype)
    chunks = _hf_chunks(cfg, plan, reader)
    bar = tqdm(total=len(chunks), desc=f"converting {hf_dir.name}", unit="tensor",
               disable=not progress)

    def counted(chunk: _Chunk) -> _Chunk:
        def build():
            tensor = chunk.build()
            bar.update(1)
            return tensor
        return dataclasses.replace(chunk, build=build)

    common = {"args": megatron_args(cfg), "checkpoint_version": CHECKPOINT_VERSION,
              "iteration": 0, MODEL_CONFIG_KEY: dataclasses.asdict(cfg),
              "dsv3_source": f"{hf_dir.resolve()} (megatron_dsv3 hf-to-megatron, "
                             f"megatron-core {INSTALLED_VERSION})"}
    try:
        with _output_folder(out) as partial:
            write_torch_dist(partial / RELEASE, [counted(c) for c in chunks], common,
                             _extra_state_keys(cfg))
            write_folder_manifest(partial / RELEASE)
            (partial / TRACKER_FILE).write_text(RELEASE)
    finally:
        reader.close()
        bar.close()
    return common


# ----------------------------------------------------------------------------------------------
# Reading: tensor by tensor
# ----------------------------------------------------------------------------------------------
class _DistCheckpoint:
    """A torch_dist folder read without a process group: its tensors' global shapes and dtypes
    (DCP's .metadata), its common state, and one tensor at a time."""

    def __init__(self, folder: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.folder = folder
        metadata_path = folder / DCP_METADATA
        try:
            self._reader = FileSystemReader(str(folder))
            self.metadata = self._reader.read_metadata()
        except Exception as err:  # noqa: BLE001 -- a damaged pickle fails in many ways
            raise ConversionError(f"{metadata_path} cannot be read ({type(err).__name__}: "
                                  f"{err}): the save was interrupted or the file damaged; use "
                                  "another iteration") from err
        self._reader.read_metadata = lambda *a, **k: self.metadata  # read once, not per tensor
        self._check_files()
        self._last: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)

    def _check_files(self) -> None:
        """Every .distcp file the index points into exists and is long enough."""
        needed: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                             info.offset + info.length)
        problems = []
        for name, end in sorted(needed.items()):
            path = self.folder / name
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif path.stat().st_size < end:
                problems.append(f"{name} has {path.stat().st_size} bytes, {end} are indexed")
        if problems:
            raise ConversionError(
                f"{self.folder}: a partial shard set: {'; '.join(problems[:4])}"
                + ("; ..." if len(problems) > 4 else "")
                + f" ({len(needed)} files in all). Every rank of the save wrote one: copy the "
                  "whole folder again, or use another iteration")

    def tensors(self) -> dict:
        """{key: TensorStorageMetadata} of the tensors (not the objects)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {key: md for key, md in self.metadata.state_dict_metadata.items()
                if isinstance(md, TensorStorageMetadata)}

    def common_state(self) -> dict:
        from megatron.core import dist_checkpointing

        try:
            return dist_checkpointing.load_common_state_dict(str(self.folder))
        except Exception as err:  # noqa: BLE001 -- Megatron raises several kinds here
            raise ConversionError(f"{self.folder}: its common state (Megatron's arguments, "
                                  f"iteration) cannot be read ({type(err).__name__}: {err}); "
                                  "the save was interrupted: use another iteration") from err

    def load(self, key: str) -> torch.Tensor:
        """The global tensor `key`; the last one loaded is kept (save_hf_checkpoint asks for a
        fused experts tensor once per expert and projection, in a row)."""
        if self._last[0] == key:
            return self._last[1]
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        md = self.metadata.state_dict_metadata[key]
        self._last = (None, None)  # drop the previous one before allocating
        tensor = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        try:
            dcp.load({key: tensor}, storage_reader=self._reader,
                     planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
        except dcp.CheckpointException as err:
            causes = "; ".join(f"{type(c).__name__}: {c}" for c in _causes(err))
            raise ConversionError(f"{self.folder}: {key} cannot be read ({causes}): its .distcp "
                                  "files are damaged; copy the folder again or use another "
                                  "iteration") from None
        self._last = (key, tensor)
        return tensor


class _LazyTensor:
    """A checkpoint tensor as hf_files.save_hf_checkpoint uses its inputs: `shape` and `dtype`
    for its checks and plan, `detach()` for the values (loaded then)."""

    def __init__(self, checkpoint: _DistCheckpoint, key: str, shape, dtype):
        self.checkpoint, self.key = checkpoint, key
        self.shape, self.dtype = torch.Size(shape), dtype

    def detach(self) -> torch.Tensor:
        return self.checkpoint.load(self.key)


def _check_layout(tensors: Mapping, cfg: ModelConfig, where: str, source: str) -> None:
    """Every tensor of `cfg`'s model present with its global shape, no other model weights."""
    rules = _rules(cfg)
    ours = {rule.ours for rule in rules}
    missing = [rule for rule in rules if rule.ours not in tensors]
    unexpected = sorted(k for k in tensors if k not in ours and not _NOT_WEIGHTS.search(k))
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"{len(missing)} tensor(s) of the model missing: "
                         + ", ".join(r.ours for r in missing[:5])
                         + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            lines.append(f"{len(unexpected)} other tensor(s): " + ", ".join(unexpected[:5])
                         + (" ..." if len(unexpected) > 5 else ""))
        stacked = any(re.match(r"^decoder\.layers\.[a-z_]", k) for k in unexpected)
        hint = ("its layers are stacked along a first axis (Megatron's homogeneous-layer "
                "layout): not a megatron_dsv3 model, whose layers are keyed by global index"
                if stacked else
                f"it holds another model than the one of {source}: convert it with that "
                "model's config (--preset), or check that it was saved by megatron_dsv3")
        raise ConversionError(f"{where}: " + "; ".join(lines) + f". {hint}")
    for rule in rules:
        shape = tuple(tensors[rule.ours].size)
        if shape != rule.our_shape:
            raise ConversionError(
                f"{where}: {rule.ours} has the global shape {shape}, the config of {source} "
                f"gives {rule.our_shape} = {rule.our_dims}; convert with the config the model "
                "was trained with (--preset), or check the run's --vocab-size / "
                "--make-vocab-size-divisible-by if it is the vocabulary")


def megatron_to_hf(load: PathLike, out: PathLike, *, iteration: Optional[int] = None,
                   preset: Optional[str] = None, max_shard_size: Union[int, str] = "5GB",
                   dtype: Optional[torch.dtype] = None, progress: bool = True) -> dict:
    """Write the weights of a torch_dist checkpoint (module docstring) as a Hugging Face folder
    `out`. Returns {"index": save_hf_checkpoint's index, "config_source": where the model
    config came from, "folder": the iteration folder read}."""
    out = Path(out)
    folder = checkpoint_folder(load, iteration)
    checkpoint = _DistCheckpoint(folder)
    common = checkpoint.common_state()
    cfg, source = resolve_model_config(common, preset, str(folder))
    tensors = checkpoint.tensors()
    _check_layout(tensors, cfg, str(folder), source)
    lazy = {rule.ours: _LazyTensor(checkpoint, rule.ours, tensors[rule.ours].size,
                                   tensors[rule.ours].properties.dtype) for rule in _rules(cfg)}
    with _output_folder(out) as partial:
        index = save_hf_checkpoint(lazy, cfg, partial, max_shard_size=max_shard_size,
                                   dtype=dtype, progress=progress)
    return {"index": index, "config_source": source, "folder": str(folder)}


__all__ = ["hf_to_megatron", "megatron_to_hf", "checkpoint_folder", "megatron_args",
           "model_config_from_args", "resolve_model_config", "write_torch_dist",
           "TRACKER_FILE", "RELEASE", "MODEL_CONFIG_KEY"]

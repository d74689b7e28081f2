"""Hugging Face DeepSeek-V3 checkpoint folders <-> our state dicts, streamed shard by shard.

What: the file layer on top of `checkpoint.hf` (which converts whole in-memory state dicts):

  load_hf_checkpoint(dir)            config.json -> our ModelConfig, safetensors shards (with
                                     model.safetensors.index.json, or one model.safetensors)
                                     -> our full (TP=1) state dict; FP8 weights dequantized
  save_hf_checkpoint(sd, cfg, dir)   our state dict -> config.json, shards of at most
                                     `max_shard_size` bytes, model.safetensors.index.json
  model_config_from_hf_config(json)  the inverse of `hf.hf_config_from_model_config`
  dequantize_fp8_blocks(...)         DeepSeek's FP8 release format -> bf16/fp32, exactly

Both directions use `hf.py`'s rule table, so names, shapes and the MTP layout (MTP depth k is
HF layer num_layers + k) are the in-memory converter's, and its errors (missing / unexpected
key with the config field to change, shape with its meaning in config fields) come out here
too, prefixed with the folder.

Why streamed: DeepSeek-V3 is some 160 shards and ~690 GB in FP8. Everything that can be checked
from the names and the safetensors headers (the index against the shards present, truncated shards,
missing / unexpected tensors, every shape, every FP8 weight's scale) is checked before one
tensor is read, so a wrong folder or config fails in seconds. The tensors are then read shard
by shard (tqdm bar over shards) and each is placed into its output as it arrives: a renamed
tensor is the output; fused outputs (our SwiGLU [gate; up], the routed experts [E, 2F, D] from
DeepSeek's per-expert tensors) are allocated once and each piece copied in and dropped; an FP8
weight waits (as FP8) only until its `_scale_inv` arrives. Besides the result, the memory in
use is the tensors in flight: one tensor read, the fused outputs not complete yet, and FP8
weights whose scales lie in a later shard (none in DeepSeek's release). Writing plans the
shards from shapes alone and materialises one shard at a time.

FP8 (DeepSeek's release, `quantization_config` {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [128, 128]}): a weight W [N, K] is stored as `name` in float8_e4m3fn and
`name + "_scale_inv"` fp32 [ceil(N/128), ceil(K/128)], one per 128x128 block (the blocks at
the bottom and right edges partial), meaning W ~= fp8 * scale_inv per block. Dequantization
(`dequantize_fp8_blocks`) returns

    W[i, j] = round_to_dtype( float64(fp8[i, j]) * float64(scale_inv[i // 128, j // 128]) )

with ONE round-to-nearest-even into the target dtype. The fp64 product is exact (an E4M3 value
has 4 significant bits, an fp32 scale 24: 28 <= 53). For fp32 this equals the fp32 product
(IEEE multiplication is correctly rounded); for bf16/fp16 it is computed as the fp32 product
rounded to odd, then rounded to nearest-even into the target: with at least 2 more bits in the
intermediate, round-to-odd followed by round-to-nearest makes exactly one correct rounding.
DeepSeek's own `fp8_cast_bf16.py` (fp32 product, then bf16) and torch's fp64 -> bf16 cast
(which goes through fp32) round twice, and differ from the exact result in about 1 of 10^5
elements (a tie created by the first rounding).

What this does not do: Megatron distributed checkpoints (torch_dist) or our job's checkpoints
at TP/EP/PP > 1 (convert a full TP=1 state dict: `parallel.gather_state_dict`); writing FP8.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from ..config import DTYPES, ConfigError, MLAConfig, ModelConfig, MoEConfig, MTPConfig, YarnConfig
from .hf import (
    EXTRA_STATE_SUFFIX,
    ConversionError,
    _check_keys,
    _empty_shared_experts,
    _hint,
    _mtp_copies,
    _our_hint,
    _PER_EXPERT,
    _rules,
    hf_config_from_model_config,
)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
SCALE_SUFFIX = "_scale_inv"
FP8_BLOCK = (128, 128)  # DeepSeek's weight_block_size

PathLike = Union[str, Path]

# safetensors dtype names (header) -> torch
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
              "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


# ----------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ----------------------------------------------------------------------------------------------
def _unsupported(field_name: str, value, fix: str) -> ConversionError:
    return ConversionError(f"{CONFIG_FILE}: {field_name}={value!r} is not supported: {fix}")


def _require(hf: Mapping, field_name: str, allowed, fix: str, default=None) -> None:
    value = hf.get(field_name, default)
    if value not in allowed:
        raise _unsupported(field_name, value, fix)


def _yarn_from_rope(rope: Mapping) -> Optional[YarnConfig]:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise _unsupported("rope_scaling.rope_type", kind,
                           "DeepSeek-V3 uses plain rope ('default') or 'yarn'; convert a model "
                           "trained with one of those")
    if "mscale" not in rope or "mscale_all_dim" not in rope:
        raise _unsupported("rope_scaling", dict(rope),
                           "YaRN needs mscale and mscale_all_dim given and equal (DeepSeek's "
                           "setting: the softmax scaled by mscale**2, cos/sin unscaled); "
                           "without them Hugging Face scales cos/sin instead, which we do not")
    try:
        return YarnConfig(factor=float(rope["factor"]),
                          original_max_position_embeddings=int(
                              rope["original_max_position_embeddings"]),
                          beta_fast=float(rope.get("beta_fast", 32.0)),
                          beta_slow=float(rope.get("beta_slow", 1.0)),
                          mscale=float(rope["mscale"]),
                          mscale_all_dim=float(rope["mscale_all_dim"]))
    except KeyError as err:
        raise _unsupported("rope_scaling", dict(rope), f"YaRN needs the field {err}") from err
    except ConfigError as err:
        raise ConversionError(f"{CONFIG_FILE}: rope_scaling: {err}") from err


def model_config_from_hf_config(hf: Mapping[str, Any], *, name: str = "hf") -> ModelConfig:
    """Our ModelConfig for a Hugging Face DeepSeek-V3 `config.json` (a dict): the inverse of
    `hf.hf_config_from_model_config` on every field Hugging Face carries.

    Reads both transformers 5's `rope_parameters` and the `rope_theta` + `rope_scaling` of
    DeepSeek's release (transformers 4). Settings our model cannot compute raise
    ConversionError naming the field (another architecture, softmax routing, untied key/value
    heads, non-interleaved rope, biases, tied embeddings, other activations). Training-only
    settings HF does not carry (balance-loss coefficient, bias update rate, MTP loss weights)
    keep ModelConfig's defaults: set them with `cfg.replace(...)`.
    """
    architectures = hf.get("architectures") or [HF_ARCHITECTURE]
    if HF_ARCHITECTURE not in architectures:
        raise _unsupported("architectures", architectures,
                           f"only {HF_ARCHITECTURE} checkpoints convert (DeepSeek-V2 routes by "
                           "softmax without the selection bias); use a DeepSeek-V3 checkpoint, "
                           f"or set architectures to [\"{HF_ARCHITECTURE}\"] if it is one")
    _require(hf, "model_type", ("deepseek_v3", None), "only deepseek_v3 converts")
    _require(hf, "hidden_act", ("silu",), "our experts are SwiGLU (silu)", default="silu")
    _require(hf, "attention_bias", (False,), "our MLA projections have no bias",
             default=False)
    _require(hf, "tie_word_embeddings", (False,),
             "our output head is separate from the embedding", default=False)
    _require(hf, "rope_interleave", (True,),
             "our rope rotates interleaved pairs (DeepSeek's layout); a de-interleaved "
             "checkpoint would need its rope rows permuted", default=True)
    _require(hf, "scoring_func", ("sigmoid",), "DeepSeek-V3 routes by sigmoid scores",
             default="sigmoid")
    _require(hf, "topk_method", ("noaux_tc",),
             "DeepSeek-V3's aux-loss-free top-k with group limit (topk_method 'noaux_tc') is "
             "the only routing we compute", default="noaux_tc")
    _require(hf, "moe_layer_freq", (1,), "every layer from first_k_dense_replace on is MoE",
             default=1)
    heads = hf["num_attention_heads"]
    _require(hf, "num_key_value_heads", (heads, None),
             f"MLA has one key/value per head: num_key_value_heads must equal "
             f"num_attention_heads={heads}", default=heads)

    rope = hf.get("rope_parameters") or dict(hf.get("rope_scaling") or {})
    rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    first_k_dense = int(hf.get("first_k_dense_replace") or 0)
    dtype = hf.get("dtype", hf.get("torch_dtype"))
    try:
        return ModelConfig(
            name=name,
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], max_seq_len=hf["max_position_embeddings"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            init_std=float(hf.get("initializer_range", 0.02)),
            params_dtype=dtype if dtype in DTYPES else "float32",
            mla=MLAConfig(num_heads=heads, q_lora_rank=hf.get("q_lora_rank") or 0,
                          kv_lora_rank=hf["kv_lora_rank"],
                          qk_nope_head_dim=hf["qk_nope_head_dim"],
                          qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                          rope_theta=rope_theta, yarn=_yarn_from_rope(rope)),
            moe=MoEConfig(num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
                          expert_ffn_size=hf["moe_intermediate_size"],
                          num_shared_experts=hf.get("n_shared_experts") or 0,
                          first_k_dense=first_k_dense,
                          dense_ffn_size=hf["intermediate_size"],
                          num_groups=hf.get("n_group") or 1,
                          topk_groups=hf.get("topk_group") or 1,
                          route_scale=float(hf.get("routed_scaling_factor", 1.0)),
                          normalize_gates=bool(hf.get("norm_topk_prob", True))),
            mtp=MTPConfig(num_layers=int(hf.get("num_nextn_predict_layers") or 0)))
    except KeyError as err:
        raise ConversionError(f"{CONFIG_FILE}: the field {err} is missing; a DeepSeek-V3 "
                              "config.json has it (compare with the released one)") from err
    except ConfigError as err:
        raise ConversionError(f"{CONFIG_FILE}: {err}") from err


def model_config_from_dict(saved: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig of `dataclasses.asdict(cfg)` (as checkpoints store it under
    'model_config'); JSON's lists become the tuples the dataclasses hold."""
    saved = dict(saved)
    mla = dict(saved.pop("mla"))
    yarn = mla.pop("yarn", None)
    mtp = dict(saved.pop("mtp"))
    mtp["loss_weight_schedule"] = tuple(tuple(entry) for entry in mtp["loss_weight_schedule"])
    if "fp8_layers" in saved:
        saved["fp8_layers"] = tuple(saved["fp8_layers"])
    return ModelConfig(mla=MLAConfig(**mla, yarn=YarnConfig(**yarn) if yarn else None),
                       moe=MoEConfig(**saved.pop("moe")), mtp=MTPConfig(**mtp), **saved)


def read_hf_config(hf_dir: PathLike) -> dict:
    """config.json of a Hugging Face checkpoint folder, as a dict."""
    path = Path(hf_dir) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConversionError(f"{path} is missing: a Hugging Face checkpoint folder holds "
                              "config.json beside its safetensors files") from err
    except ValueError as err:
        raise ConversionError(f"{path} is not valid JSON ({err})") from err


def _fp8_block(hf: Mapping) -> tuple[int, int]:
    """The FP8 block shape of a checkpoint's quantization_config (DeepSeek's 128x128 when it
    has none, e.g. a config.json edited by hand)."""
    quant = hf.get("quantization_config")
    if not quant:
        return FP8_BLOCK
    if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise _unsupported("quantization_config", quant,
                           "only DeepSeek's block FP8 (quant_method 'fp8', fmt 'e4m3') is read; "
                           "dequantize the checkpoint to bf16 with its own tools first")
    block = tuple(quant.get("weight_block_size") or FP8_BLOCK)
    if len(block) != 2 or min(block) <= 0:
        raise _unsupported("quantization_config.weight_block_size", list(block),
                           "give two positive block sides, e.g. [128, 128]")
    return block


# ----------------------------------------------------------------------------------------------
# FP8 blocks -> bf16 / fp32, one rounding
# ----------------------------------------------------------------------------------------------
def round_fp64_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp64 `x` rounded ONCE to nearest-even in `dtype` (fp32, bf16 or fp16).

    torch's fp64 -> bf16 cast rounds to fp32 first and then to bf16 (twice). Here the fp32
    step rounds to odd instead (truncate, then set the last bit if anything was dropped),
    which keeps the information a second round-to-nearest needs: with fp32's 24 bits >= the
    target's + 2, the result is the correctly rounded one (Boldo & Melquiond, "When double
    rounding is odd")."""
    if x.dtype != torch.float64:
        raise ValueError(f"x: fp64 is needed, got {x.dtype}")
    if dtype == torch.float64:
        return x.clone()
    nearest = x.to(torch.float32)
    if dtype == torch.float32:
        return nearest
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype}: round to float32, bfloat16 or float16")
    back = nearest.to(torch.float64)
    # toward zero: one step down in magnitude where rounding went up (the int32 view of a
    # float is sign and magnitude, so -1 shrinks the magnitude for either sign)
    bits = nearest.view(torch.int32) - (back.abs() > x.abs()).to(torch.int32)
    bits = bits | (back != x).to(torch.int32)  # inexact: make the last bit odd
    return bits.view(torch.float32).to(dtype)


def dequantize_fp8_blocks(data: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype,
                          block: tuple[int, int] = FP8_BLOCK, name: str = "weight"
                          ) -> torch.Tensor:
    """DeepSeek's FP8 weight -> `dtype`: round_to_dtype(fp64(data) * fp64(scale_inv of the
    block)), one correct rounding (module docstring). `data` float8_e4m3fn [N, K], `scale_inv`
    fp32 [ceil(N/bn), ceil(K/bk)]; the edge blocks may be partial."""
    if data.dtype != torch.float8_e4m3fn or data.dim() != 2:
        raise ConversionError(f"{name}: an FP8 weight must be a 2-D float8_e4m3fn tensor, got "
                              f"{data.dtype} of shape {tuple(data.shape)}")
    rows, cols = data.shape
    expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ConversionError(
            f"{name}{SCALE_SUFFIX}: shape {tuple(scale_inv.shape)}, but {name} {tuple(data.shape)} "
            f"in {block[0]}x{block[1]} blocks needs {expected}; check quantization_config."
            "weight_block_size in config.json, or re-export the pair")
    scales = (scale_inv.to(torch.float64).repeat_interleave(block[0], 0)[:rows]
              .repeat_interleave(block[1], 1)[:, :cols])
    return round_fp64_to(data.to(torch.float64) * scales, dtype)


# ----------------------------------------------------------------------------------------------
# The folder: shards, headers, index
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Header:
    dtype: torch.dtype
    shape: tuple[int, ...]


def _read_header(path: Path) -> dict[str, _Header]:
    """The tensors a safetensors file says it holds, from its header alone; a file shorter
    than its header says (an interrupted download or copy) is an error naming it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise ConversionError(f"{path}: not a readable safetensors file ({err}); download or "
                              "copy it again") from err
    header.pop("__metadata__", None)
    out, end = {}, 0
    for key, entry in header.items():
        if entry["dtype"] not in _ST_DTYPES:
            raise ConversionError(f"{path}: {key} has dtype {entry['dtype']}, which is not read "
                                  f"here (readable: {', '.join(_ST_DTYPES)})")
        out[key] = _Header(_ST_DTYPES[entry["dtype"]], tuple(entry["shape"]))
        end = max(end, entry["data_offsets"][1])
    if 8 + length + end > size:
        raise ConversionError(f"{path} is truncated: its header places tensors up to byte "
                              f"{8 + length + end}, the file has {size}; download or copy "
                              "it again")
    return out


def _shards(hf_dir: Path) -> tuple[dict[str, list[str]], dict[str, _Header]]:
    """(shard file -> its tensor names, name -> header entry), the index checked against the
    shards present: each shard it names exists and holds what it says, and nothing more."""
    index_path = hf_dir / INDEX_FILE
    if not index_path.is_file():
        if not (hf_dir / SINGLE_FILE).is_file():
            raise ConversionError(f"{hf_dir} holds neither {INDEX_FILE} nor {SINGLE_FILE}: "
                                  "pass the folder of a Hugging Face safetensors checkpoint")
        headers = _read_header(hf_dir / SINGLE_FILE)
        return {SINGLE_FILE: list(headers)}, headers
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConversionError(f"{index_path}: unreadable or without 'weight_map' ({err})") from err
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    absent = sorted(shard for shard in by_shard if not (hf_dir / shard).is_file())
    if absent:
        tensors = sum(len(by_shard[shard]) for shard in absent)
        raise ConversionError(
            f"{hf_dir}: {len(absent)} of the {len(by_shard)} shards {INDEX_FILE} names are "
            f"missing ({', '.join(absent[:4])}{', ...' if len(absent) > 4 else ''}; "
            f"{tensors} tensors): the shard set is incomplete, download or copy the missing "
            "files")
    headers: dict[str, _Header] = {}
    for shard in sorted(by_shard):
        held = _read_header(hf_dir / shard)
        listed = set(by_shard[shard])
        if set(held) != listed:
            lost, extra = sorted(listed - set(held)), sorted(set(held) - listed)
            raise ConversionError(
                f"{hf_dir / shard} does not hold what {INDEX_FILE} says: "
                + (f"missing {lost[:4]}" if lost else "")
                + ("; " if lost and extra else "")
                + (f"not in the index {extra[:4]}" if extra else "")
                + "; the index and the shards come from different saves: take both from one")
        headers.update(held)
    return {shard: by_shard[shard] for shard in sorted(by_shard)}, headers


# ----------------------------------------------------------------------------------------------
# Reading: where each HF tensor goes
# ----------------------------------------------------------------------------------------------
@dataclass
class _Output:
    """One of our tensors being assembled from `pieces` HF tensors."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: int
    tensor: Optional[torch.Tensor] = None
    arrived: int = 0


@dataclass(frozen=True)
class _Target:
    """Where one HF tensor goes: rows `rows` (None: all) of expert `expert` (None: not an
    experts tensor) of our tensor `ours`."""

    ours: str
    expert: Optional[int] = None
    rows: Optional[tuple[int, int]] = None


@dataclass
class _Plan:
    cfg: ModelConfig
    targets: dict[str, _Target] = field(default_factory=dict)
    outputs: dict[str, _Output] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)    # MTP copy -> main HF key
    ignored: set[str] = field(default_factory=set)           # zero-width / dropped MTP layers


def _plan(cfg: ModelConfig, headers: Mapping[str, _Header], dtype: Optional[torch.dtype],
          fp8_dtype: torch.dtype, block: tuple[int, int], where: str,
          drop_from_layer: Optional[int]) -> _Plan:
    """Every check that names and headers allow, and where each tensor goes."""
    plan = _Plan(cfg)
    names = set(headers)
    if drop_from_layer is not None:  # MTP layers the caller chose not to convert
        for key in names:
            match = re.match(r"^model\.layers\.(\d+)\.", key)
            if match and int(match[1]) >= drop_from_layer:
                plan.ignored.add(key)
        names -= plan.ignored
    scales = {key for key in names if key.endswith(SCALE_SUFFIX)}
    names -= scales
    for scale in sorted(scales):
        weight = scale[: -len(SCALE_SUFFIX)]
        if headers.get(weight, _Header(None, ())).dtype != torch.float8_e4m3fn:
            raise ConversionError(f"{where}: {scale} scales {weight}, which is "
                                  + ("absent" if weight not in headers else
                                     f"{headers[weight].dtype}, not float8_e4m3fn")
                                  + ": drop the stray scale or restore the FP8 weight")
    for key in sorted(names):
        if headers[key].dtype == torch.float8_e4m3fn and key + SCALE_SUFFIX not in scales:
            raise ConversionError(f"{where}: {key} is FP8 without its {key + SCALE_SUFFIX} "
                                  "(fp32 block scales): the shard set is incomplete or the "
                                  "scales were renamed; restore them")

    def out_dtype(keys) -> torch.dtype:
        if dtype is not None:
            return dtype
        found = [fp8_dtype if headers[k].dtype == torch.float8_e4m3fn else headers[k].dtype
                 for k in keys]
        result = found[0]
        for other in found[1:]:
            result = torch.promote_types(result, other)
        return result

    # Per-expert tensors (DeepSeek's layout) stand for the fused ones in the key check.
    per_expert: dict[str, dict[tuple[int, str], str]] = {}
    folded = set()
    for key in names:
        match = _PER_EXPERT.match(key)
        if match is None:
            folded.add(key)
        else:
            per_expert.setdefault(match["prefix"], {})[(int(match["expert"]), match["proj"])] = key
    E, F = cfg.moe.num_experts, cfg.moe.expert_ffn_size
    for prefix, parts in per_expert.items():
        wanted = {(e, p) for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")}
        if set(parts) != wanted:
            raise ConversionError(
                f"{where}: {prefix}.{{j}}.*: per-expert weights must cover experts 0..{E - 1} "
                f"with gate_proj, up_proj and down_proj each (n_routed_experts={E}); absent "
                f"{sorted(wanted - set(parts))[:3]}, beyond {sorted(set(parts) - wanted)[:3]}: "
                "fix n_routed_experts in config.json or complete the checkpoint")
        for fused in (prefix + ".gate_up_proj", prefix + ".down_proj"):
            if fused in folded:
                raise ConversionError(f"{where}: {fused}: the checkpoint holds both fused and "
                                      f"per-expert weights for {prefix}; keep one of the two")
            folded.add(fused)

    rules, copies, empty = _rules(cfg), _mtp_copies(cfg), _empty_shared_experts(cfg)
    try:
        _check_keys(folded, {k for rule in rules for k in rule.hf}, set(copies) | set(empty),
                    "Hugging Face", cfg, _hint)
    except ConversionError as err:
        raise ConversionError(f"{where}: {err}") from None

    def check_shape(key: str, shape: tuple[int, ...], dims: str) -> None:
        if headers[key].shape != tuple(shape):
            raise ConversionError(
                f"{where}: {key}: shape {headers[key].shape} does not match config.json, which "
                f"implies {tuple(shape)} = {dims}; the config and the shards disagree: take "
                "both from the same checkpoint")

    for key, shape in empty.items():
        if key in names:
            check_shape(key, shape, "zero-width (n_shared_experts=0)")
            plan.ignored.add(key)
    for copy_key, main_key in copies.items():
        if copy_key in names:
            check_shape(copy_key, headers[main_key].shape, f"the shape of {main_key}")
            plan.copies[copy_key] = main_key
    for scale in scales:
        weight = scale[: -len(SCALE_SUFFIX)]
        if weight in names and len(headers[weight].shape) == 2:
            rows, cols = headers[weight].shape
            blocks = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
            if headers[scale].shape != blocks or headers[scale].dtype != torch.float32:
                raise ConversionError(
                    f"{where}: {scale}: {headers[scale].dtype} of shape {headers[scale].shape}, "
                    f"but {weight} {headers[weight].shape} in {block[0]}x{block[1]} blocks "
                    f"needs float32 of shape {blocks}; check quantization_config."
                    "weight_block_size in config.json, or take the pair from one checkpoint")
    for rule in rules:
        if rule.hf[0].endswith("experts.gate_up_proj") and rule.hf[0] not in names:
            prefix = rule.hf[0][: -len(".gate_up_proj")]
            for e in range(E):
                for j, proj in enumerate(("gate_proj", "up_proj")):
                    key = f"{prefix}.{e}.{proj}.weight"
                    check_shape(key, (F, cfg.hidden_size),
                                f"[expert_ffn_size, hidden_size] of expert {e}")
                    plan.targets[key] = _Target(rule.ours, e, (j * F, (j + 1) * F))
            keys = [f"{prefix}.{e}.{p}.weight" for e in range(E) for p in ("gate_proj",
                                                                           "up_proj")]
            plan.outputs[rule.ours] = _Output(rule.our_shape, out_dtype(keys), 2 * E)
            continue
        if rule.hf[0].endswith("experts.down_proj") and rule.hf[0] not in names:
            prefix = rule.hf[0][: -len(".down_proj")]
            for e in range(E):
                key = f"{prefix}.{e}.down_proj.weight"
                check_shape(key, (cfg.hidden_size, F),
                            f"[hidden_size, expert_ffn_size] of expert {e}")
                plan.targets[key] = _Target(rule.ours, e, None)
            keys = [f"{prefix}.{e}.down_proj.weight" for e in range(E)]
            plan.outputs[rule.ours] = _Output(rule.our_shape, out_dtype(keys), E)
            continue
        rows = rule.hf_shape[0]
        for j, key in enumerate(rule.hf):
            check_shape(key, rule.hf_shape, rule.dims)
            plan.targets[key] = _Target(rule.ours, None,
                                        None if len(rule.hf) == 1 else (j * rows, (j + 1) * rows))
        plan.outputs[rule.ours] = _Output(rule.our_shape, out_dtype(rule.hf), len(rule.hf))
    return plan


class _Assembler:
    """Receives HF tensors in any order and completes our tensors (module docstring)."""

    def __init__(self, plan: _Plan, block: tuple[int, int], fp8_dtype: torch.dtype,
                 dtype: Optional[torch.dtype]):
        self.plan, self.block, self.fp8_dtype, self.dtype = plan, block, fp8_dtype, dtype
        self.done: dict[str, torch.Tensor] = {}
        self.waiting_fp8: dict[str, torch.Tensor] = {}    # weight (or scale) name -> tensor
        self.main_of_copy = {main: copy for copy, main in plan.copies.items()}
        self.main_values: dict[str, torch.Tensor] = {}    # main HF tensors that have copies
        self.copy_values: dict[str, torch.Tensor] = {}    # copies that came before the main

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.plan.ignored:
            return
        if key.endswith(SCALE_SUFFIX) or tensor.dtype == torch.float8_e4m3fn:
            weight = key[: -len(SCALE_SUFFIX)] if key.endswith(SCALE_SUFFIX) else key
            other = self.waiting_fp8.pop(weight + SCALE_SUFFIX if weight == key else weight, None)
            if other is None:
                self.waiting_fp8[key] = tensor
                return
            data, scale = (tensor, other) if weight == key else (other, tensor)
            target = self.dtype or self.fp8_dtype
            key, tensor = weight, dequantize_fp8_blocks(data, scale, target, self.block, weight)
        if key in self.plan.copies:
            self._check_copy(key, tensor)
            return
        if key in self.main_of_copy:
            self.main_values[key] = tensor
            copy = self.main_of_copy[key]
            if copy in self.copy_values:
                self._check_copy(copy, self.copy_values.pop(copy))
        self._place(key, tensor)

    def _check_copy(self, copy: str, tensor: torch.Tensor) -> None:
        main = self.plan.copies[copy]
        if main not in self.main_values:
            self.copy_values[copy] = tensor
            return
        expected = self.main_values[main]
        if not torch.equal(tensor.to(expected.dtype), expected):
            raise ConversionError(
                f"{copy} differs from {main}: our MTP shares the main model's embedding and "
                "output head, so the checkpoint's MTP copy must equal the main tensor; drop the "
                "copy to use the main one, or convert another checkpoint")

    def _place(self, key: str, tensor: torch.Tensor) -> None:
        target = self.plan.targets[key]
        out = self.plan.outputs[target.ours]
        if out.pieces == 1:
            out.tensor = tensor if tensor.dtype == out.dtype else tensor.to(out.dtype)
        else:
            if out.tensor is None:
                out.tensor = torch.empty(out.shape, dtype=out.dtype)
            dest = out.tensor if target.expert is None else out.tensor[target.expert]
            if target.rows is not None:
                dest = dest[target.rows[0]: target.rows[1]]
            dest.copy_(tensor)
        out.arrived += 1
        if out.arrived == out.pieces:
            self.done[target.ours] = out.tensor
            out.tensor = None

    def finish(self) -> None:
        left = sorted(self.waiting_fp8) + sorted(self.copy_values)
        if left:  # the up-front checks make this unreachable for a consistent folder
            raise ConversionError(f"tensors never completed: {left[:4]}; the shards changed "
                                  "while they were read?")


def read_plan(hf_dir: Path, dtype: Optional[torch.dtype], mtp_layers: Optional[int],
              option: str = "mtp_layers"):
    """What reading a folder takes, from its config.json and shard headers alone (no tensor
    read): (our ModelConfig, the plan of every tensor, the FP8 block size, the dtype FP8
    weights dequantize to, {shard: its keys}). mtp_layers: as load_hf_checkpoint's, refused
    outside 0..num_nextn_predict_layers naming `option` (the caller's name for it)."""
    hf_config = read_hf_config(hf_dir)
    cfg = model_config_from_hf_config(hf_config, name=f"hf:{hf_dir.resolve().name}")
    drop_from = None
    if mtp_layers is not None:
        if not 0 <= mtp_layers <= cfg.mtp.num_layers:
            raise ConversionError(f"{option}={mtp_layers}: {hf_dir / CONFIG_FILE} has "
                                  f"num_nextn_predict_layers={cfg.mtp.num_layers}; pass 0.."
                                  f"{cfg.mtp.num_layers}")
        cfg = cfg.replace(mtp__num_layers=mtp_layers)
        drop_from = cfg.num_layers + mtp_layers
    stored = hf_config.get("dtype", hf_config.get("torch_dtype"))
    fp8_dtype = DTYPES.get(stored, torch.bfloat16)
    block = _fp8_block(hf_config)
    shard_keys, headers = _shards(hf_dir)
    plan = _plan(cfg, headers, dtype, fp8_dtype, block, str(hf_dir), drop_from)
    return cfg, plan, block, fp8_dtype, shard_keys


def load_hf_checkpoint(hf_dir: PathLike, *, dtype: Optional[torch.dtype] = None,
                       mtp_layers: Optional[int] = None, progress: bool = True
                       ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(our ModelConfig, our full TP=1 state dict) of a Hugging Face DeepSeek-V3 folder.

    dtype: None keeps each tensor's stored dtype and dequantizes FP8 weights to config.json's
    `dtype`/`torch_dtype` (bf16 for DeepSeek's release); a dtype casts everything to it (FP8
    with one rounding, module docstring). mtp_layers: convert only the first N MTP layers
    (e.g. 0 for a folder saved by transformers' save_pretrained, which writes none although
    config.json keeps num_nextn_predict_layers); None: config.json's number. Load the result
    with `hf.load_dsv3_state_dict(build_model(cfg), sd)`.
    """
    hf_dir = Path(hf_dir)
    cfg, plan, block, fp8_dtype, shard_keys = read_plan(hf_dir, dtype, mtp_layers)
    assembler = _Assembler(plan, block, fp8_dtype, dtype)

    from safetensors import safe_open
    from tqdm import tqdm

    for shard in tqdm(shard_keys, desc=f"reading {hf_dir.name}", unit="shard",
                      disable=not progress):
        with safe_open(hf_dir / shard, framework="pt") as handle:
            for key in shard_keys[shard]:
                if key not in plan.ignored:
                    assembler.add(key, handle.get_tensor(key))
    assembler.finish()
    return cfg, {rule.ours: assembler.done[rule.ours] for rule in _rules(cfg)}


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: Union[int, str]) -> int:
    """Bytes of "5GB" (10^9, as Hugging Face counts), "500MiB" (2^20) or an int."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(size)
        if match is None:
            raise ValueError(f"max_shard_size={size!r}: give bytes or a size like '5GB', "
                             "'500MB', '2GiB'")
        value = int(float(match[1]) * _UNITS[(match[2] or "B").upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r}: must be positive")
    return value


@dataclass(frozen=True)
class _Item:
    """One HF tensor to write: `source` (our key) rows of expert / row range, or zeros."""

    key: str
    source: Optional[str]
    shape: tuple[int, ...]
    expert: Optional[int] = None
    rows: Optional[tuple[int, int]] = None


def _items(cfg: ModelConfig) -> list[_Item]:
    """The HF tensors of our model in state-dict order, experts one by one (DeepSeek's
    layout, what transformers' save_pretrained writes), MTP copies after their layer."""
    items: list[_Item] = []
    E, F, d = cfg.moe.num_experts, cfg.moe.expert_ffn_size, cfg.hidden_size
    for rule in _rules(cfg):
        hf = rule.hf[0]
        if hf.endswith("experts.gate_up_proj"):
            prefix = hf[: -len("gate_up_proj")]
            for e in range(E):
                items += [_Item(f"{prefix}{e}.gate_proj.weight", rule.ours, (F, d), e, (0, F)),
                          _Item(f"{prefix}{e}.up_proj.weight", rule.ours, (F, d), e, (F, 2 * F))]
        elif hf.endswith("experts.down_proj"):
            prefix = hf[: -len("down_proj")]
            items += [_Item(f"{prefix}{e}.down_proj.weight", rule.ours, (d, F), e)
                      for e in range(E)]
        elif len(rule.hf) == 1:
            items.append(_Item(hf, rule.ours, rule.hf_shape))
        else:
            rows = rule.hf_shape[0]
            items += [_Item(key, rule.ours, rule.hf_shape, None, (j * rows, (j + 1) * rows))
                      for j, key in enumerate(rule.hf)]
    main_source = {"model.embed_tokens.weight": "embedding.word_embeddings.weight",
                   "lm_head.weight": "output_layer.weight"}
    V = cfg.vocab_size
    items += [_Item(copy, main_source[main], (V, d)) for copy, main in _mtp_copies(cfg).items()]
    items += [_Item(key, None, shape) for key, shape in _empty_shared_experts(cfg).items()]
    return items


def _materialise(item: _Item, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype
                 ) -> torch.Tensor:
    if item.source is None:
        return torch.zeros(item.shape, dtype=dtype)
    tensor = state_dict[item.source].detach()
    if item.expert is not None:
        tensor = tensor[item.expert]
    if item.rows is not None:
        tensor = tensor[item.rows[0]: item.rows[1]]
    # a copy of its own: safetensors refuses tensors sharing memory
    return tensor.to("cpu", dtype, copy=True).contiguous()


def save_hf_checkpoint(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig,
                       out_dir: PathLike, *, max_shard_size: Union[int, str] = "5GB",
                       dtype: Optional[torch.dtype] = None, progress: bool = True) -> dict:
    """Write our full (TP=1) state dict as a Hugging Face DeepSeek-V3 folder: config.json,
    `model-0000i-of-0000n.safetensors` shards of at most `max_shard_size` bytes (a tensor
    larger than that gets a shard of its own; one shard is `model.safetensors`), and
    model.safetensors.index.json (weight_map, metadata.total_size) when there are several.

    Tensors keep the state dict's dtype (bf16/fp32) unless `dtype` is given; experts are
    written one by one and the MTP layers in DeepSeek's layout (`checkpoint.hf`). `out_dir`
    must hold no safetensors files yet (stale shards would mix with these). Returns the index
    (also for one shard, though then it is not written)."""
    out_dir = Path(out_dir)
    ours = {k: v for k, v in state_dict.items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    rules = _rules(cfg)
    _check_keys(set(ours), {rule.ours for rule in rules}, set(), "megatron_dsv3", cfg, _our_hint)
    for rule in rules:
        if tuple(ours[rule.ours].shape) != rule.our_shape:
            raise ConversionError(
                f"{rule.ours}: shape {tuple(ours[rule.ours].shape)} does not match ModelConfig "
                f"{cfg.name!r}, which expects {rule.our_shape} = {rule.our_dims}; export with "
                "the config the model was built from")
    stale = sorted(p.name for p in out_dir.glob("*.safetensors")) if out_dir.is_dir() else []
    if stale or (out_dir / INDEX_FILE).exists():
        held = ", ".join(stale[:3]) or INDEX_FILE
        raise ConversionError(f"{out_dir} already holds a checkpoint ({held}): write to a new "
                              "folder, or empty this one first")
    limit = parse_size(max_shard_size)
    default_dtype = dtype or ours["embedding.word_embeddings.weight"].dtype

    def item_dtype(item: _Item) -> torch.dtype:
        return dtype or (ours[item.source].dtype if item.source else default_dtype)

    shards: list[list[_Item]] = [[]]
    used = 0
    for item in _items(cfg):
        nbytes = math.prod(item.shape) * item_dtype(item).itemsize
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += nbytes
    count = len(shards)
    names = ([SINGLE_FILE] if count == 1 else
             [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])

    from safetensors.torch import save_file
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map, total_size, total_parameters = {}, 0, 0
    for name, items in tqdm(list(zip(names, shards)), desc=f"writing {out_dir.name}",
                            unit="shard", disable=not progress):
        tensors = {item.key: _materialise(item, ours, item_dtype(item)) for item in items}
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total_size += tensor.nbytes
            total_parameters += tensor.numel()
        del tensors
    index = {"metadata": {"total_size": total_size, "total_parameters": total_parameters},
             "weight_map": dict(sorted(weight_map.items()))}
    if count > 1:
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    dtype_name = next(k for k, v in DTYPES.items() if v == default_dtype) \
        if default_dtype in DTYPES.values() else "float32"
    hf_config_from_model_config(cfg, architectures=[HF_ARCHITECTURE],
                                dtype=dtype_name).save_pretrained(out_dir)
    return index


def model_config_dict(cfg: ModelConfig) -> dict:
    """`dataclasses.asdict(cfg)`: how checkpoints store a ModelConfig (model_config_from_dict
    reads it back)."""
    return dataclasses.asdict(cfg)


__all__ = ["CONFIG_FILE", "INDEX_FILE", "SINGLE_FILE", "FP8_BLOCK", "load_hf_checkpoint",
           "save_hf_checkpoint", "model_config_from_hf_config", "model_config_from_dict",
           "model_config_dict", "read_hf_config", "dequantize_fp8_blocks", "round_fp64_to",
           "parse_size"]

"""Hugging Face checkpoint folders <-> our weights (checkpoint/hf_files.py, checkpoint/convert.py).

Ground truth is transformers' own `save_pretrained` of a random `DeepseekV3ForCausalLM` (the
parity test's tiny q-LoRA / YaRN / group-routing model), written in several shards. Our reader
must give exactly what the in-memory converter gives for that model, our writer must write
back the same tensors under the same names, HF must load our folder, and our model built from
the folder must compute transformers' logits. FP8: the same folder quantized to E4M3 with
fp32 128x128 `_scale_inv` blocks, as DeepSeek releases V3, must import to the correctly
rounded value of fp64(fp8) * fp64(scale_inv), checked against an fp64 computation and a
rounding reference that shares no code with the converter. Every folder problem (missing,
misshapen or unknown tensor, a shard missing or truncated, an index that disagrees with its
shards, an unsupported config.json) is an error naming the file or tensor and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_dsv3.checkpoint import convert
from megatron_dsv3.checkpoint.hf import (ConversionError, _rules, hf_config_from_model_config,
                                         hf_to_dsv3, load_dsv3_state_dict)
from megatron_dsv3.checkpoint.hf_files import (INDEX_FILE, dequantize_fp8_blocks,
                                               load_hf_checkpoint, model_config_from_dict,
                                               model_config_from_hf_config, parse_size,
                                               round_fp64_to, save_hf_checkpoint)
from megatron_dsv3.config import preset
from megatron_dsv3.fp8.quantize import quantize_128x128
from megatron_dsv3.model import build_model
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_hf_parity import FP32_WHY, VARIANTS, _random_hf_model, _tokens  # noqa: E402

SHARD = "100KB"  # the tiny model (~1 MB in fp32) in about ten shards


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            tensors.update((key, handle.get_tensor(key)) for key in handle.keys())
    return tensors


def _assert_same(actual: dict, expected: dict, what: str) -> None:
    assert set(actual) == set(expected), (what, sorted(set(actual) ^ set(expected))[:6])
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, (what, key, actual[key].dtype)
        assert_equal(actual[key], expected[key], f"{what}: {key}")


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX_FILE).read_text())


def _rewrite_shard_of(folder: Path, key: str, change) -> None:
    """Rewrite the shard holding `key` with change(tensors) applied, and the index to match."""
    index = _index(folder)
    shard = index["weight_map"][key]
    with safe_open(folder / shard, framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    change(tensors)
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update({k: shard for k in tensors})
    (folder / INDEX_FILE).write_text(json.dumps(index))


def _correctly_rounded(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The `dtype` value nearest to fp64 x64, ties to the even encoding: chosen among torch's
    cast and its two neighbours by their exact fp64 distance (no code shared with
    round_fp64_to)."""
    cast = x64.to(dtype)
    candidates = torch.stack([cast, torch.nextafter(cast, torch.full_like(cast, float("inf"))),
                              torch.nextafter(cast, torch.full_like(cast, -float("inf")))])
    distance = (candidates.double() - x64).abs()
    if dtype == torch.float32:  # torch's fp64 -> fp32 cast is itself one round-to-nearest-
        return cast             # even (the int16 view below is for the 16-bit formats)
    odd = candidates.view(torch.int16) & 1
    # the nearest candidates, and among two equally near ones the even encoding
    rank = (distance > distance.min(0).values).to(torch.int16) * 2 + odd
    return candidates.gather(0, rank.argmin(0)[None])[0]


# ----------------------------------------------------------------------------------------------
# Ground truth: transformers' save_pretrained
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """(cfg, HF model, its save_pretrained folder in several shards, what we read from it)."""
    cfg = VARIANTS["qlora-yarn-groups"]  # MTP 0: save_pretrained writes no MTP layer
    model = _random_hf_model(cfg)
    folder = tmp_path_factory.mktemp("hf") / "saved"
    model.save_pretrained(folder, max_shard_size=SHARD)
    read_cfg, state_dict = load_hf_checkpoint(folder, progress=False)
    return cfg, model, folder, read_cfg, state_dict


def test_save_pretrained_folder_reads_and_writes_back_exactly(hf_folder, tmp_path):
    """Read = the in-memory converter on the same model; our writer's folder holds exactly
    save_pretrained's tensors (names, dtypes, bits), reads back to the same state dict, and
    transformers' from_pretrained loads it to the same model."""
    cfg, model, folder, read_cfg, state_dict = hf_folder
    assert len(_index(folder)["weight_map"]) and len(list(folder.glob("*.safetensors"))) > 3
    assert (read_cfg.mla, read_cfg.moe, read_cfg.mtp) == (cfg.mla, cfg.moe, cfg.mtp)
    _assert_same(state_dict, hf_to_dsv3(model.state_dict(), cfg), "read vs hf_to_dsv3")

    ours = tmp_path / "ours"
    index = save_hf_checkpoint(state_dict, read_cfg, ours, max_shard_size=SHARD,
                               progress=False)
    _assert_same(_read_folder(ours), _read_folder(folder), "our writer vs save_pretrained")
    _assert_same(load_hf_checkpoint(ours, progress=False)[1], state_dict, "re-read")

    written = _index(ours)
    assert written == index and set(written["weight_map"].values()) == {
        p.name for p in ours.glob("*.safetensors")}
    sizes = {}
    for key, tensor in _read_folder(ours).items():
        shard = written["weight_map"][key]
        sizes[shard] = sizes.get(shard, []) + [tensor.nbytes]
    assert written["metadata"]["total_size"] == sum(map(sum, sizes.values()))
    limit = parse_size(SHARD)
    assert all(sum(s) <= limit or len(s) == 1 for s in sizes.values()), sizes

    loaded = transformers.DeepseekV3ForCausalLM.from_pretrained(
        ours, attn_implementation="eager", experts_implementation="eager",
        dtype=torch.float32).eval()
    ids = _tokens(cfg)
    with torch.no_grad():
        assert_equal(loaded(ids).logits, model(ids).logits, "from_pretrained(our folder)")


def test_model_from_folder_matches_transformers_logits(hf_folder, dist_single):
    cfg, model, _, read_cfg, state_dict = hf_folder
    ours = build_model(read_cfg, pg_collection=dist_single).eval()
    load_dsv3_state_dict(ours, state_dict)
    ids = _tokens(cfg)
    with torch.no_grad():
        err = assert_close(ours(ids, None, None), model(ids).logits, FP32_REORDER, FP32_WHY,
                           "logits")
    print(f"logits from the folder: max relative error {err:.2e}")


def test_mtp_layers_round_trip_in_bf16_and_can_be_dropped(tmp_path):
    """MTP depth 1 is written as HF layer num_layers with DeepSeek's copies of the embedding
    and head; a bf16 export reads back bit for bit; mtp_layers=0 skips the layer; a copy that
    differs from the main tensor is refused."""
    cfg = VARIANTS["noqlora-rope-groups"].replace(mtp__num_layers=1)
    generator = torch.Generator().manual_seed(3)
    state_dict = {rule.ours: torch.randn(rule.our_shape, generator=generator)
                  for rule in _rules(cfg)}
    folder = tmp_path / "mtp"
    save_hf_checkpoint(state_dict, cfg, folder, max_shard_size="150KB", dtype=torch.bfloat16,
                       progress=False)
    L = cfg.num_layers
    written = _read_folder(folder)
    assert_equal(written[f"model.layers.{L}.shared_head.head.weight"],
                 state_dict["output_layer.weight"].bfloat16(), "MTP head copy")
    read_cfg, read = load_hf_checkpoint(folder, progress=False)
    assert read_cfg.mtp.num_layers == 1 and read_cfg.params_dtype == "bfloat16"
    _assert_same(read, {k: v.bfloat16() for k, v in state_dict.items()}, "bf16 round trip")

    no_mtp_cfg, no_mtp = load_hf_checkpoint(folder, mtp_layers=0, progress=False)
    assert no_mtp_cfg.mtp.num_layers == 0
    _assert_same(no_mtp, {k: v for k, v in read.items() if not k.startswith("mtp.")},
                 "mtp_layers=0")

    def spoil(tensors):
        tensors[f"model.layers.{L}.embed_tokens.weight"] += 1

    _rewrite_shard_of(folder, f"model.layers.{L}.embed_tokens.weight", spoil)
    with pytest.raises(ConversionError, match=rf"model\.layers\.{L}\.embed_tokens\.weight "
                                              r"differs from model\.embed_tokens\.weight"):
        load_hf_checkpoint(folder, progress=False)


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------
# DeepSeek-V3's released config.json (transformers 4 names: rope_theta + rope_scaling)
DEEPSEEK_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1,
    "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                            "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280}


def test_config_json_is_the_inverse_of_hf_config_and_reads_deepseeks_release():
    for cfg in VARIANTS.values():
        cfg = cfg.replace(mtp__num_layers=2)
        read = model_config_from_hf_config(hf_config_from_model_config(cfg).to_dict())
        assert read.mla == cfg.mla and read.mtp.num_layers == 2, cfg.name
        dense = cfg.moe.dense_ffn_size if cfg.moe.first_k_dense else cfg.moe.expert_ffn_size
        assert read.moe == cfg.moe.__class__(**{**cfg.moe.__dict__, "dense_ffn_size": dense,
                                                "seq_aux_loss_coeff": 0.0,
                                                "bias_update_rate": 1e-3}), cfg.name
        assert (read.vocab_size, read.hidden_size, read.num_layers, read.max_seq_len,
                read.norm_eps, read.init_std) == (cfg.vocab_size, cfg.hidden_size,
                                                  cfg.num_layers, cfg.max_seq_len,
                                                  cfg.norm_eps, cfg.init_std)
    v3, released = preset("v3-671b"), model_config_from_hf_config(DEEPSEEK_V3_CONFIG)
    assert released.mla == v3.mla and released.mtp.num_layers == 1
    assert released.params_dtype == "bfloat16"
    training_only = ("seq_aux_loss_coeff", "bias_update_rate", "bias_update_stop_tokens")
    assert all(getattr(released.moe, f) == getattr(v3.moe, f)
               for f in v3.moe.__dataclass_fields__ if f not in training_only)
    assert model_config_from_dict(json.loads(json.dumps(dataclasses.asdict(v3)))) == v3


@pytest.mark.parametrize("change, field, fix", [
    ({"architectures": ["DeepseekV2ForCausalLM"]}, "architectures", "only DeepseekV3ForCausalLM"),
    ({"scoring_func": "softmax"}, "scoring_func", "sigmoid"),
    ({"topk_method": "group_limited_greedy"}, "topk_method", "noaux_tc"),
    ({"rope_interleave": False}, "rope_interleave", "permuted"),
    ({"num_key_value_heads": 1}, "num_key_value_heads", "must equal num_attention_heads=128"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type", "yarn"),
    ({"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}},
     "rope_scaling", "mscale_all_dim"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config", "block FP8"),
])
def test_unsupported_config_json_names_the_field_and_the_fix(tmp_path, change, field, fix):
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**DEEPSEEK_V3_CONFIG, **change}))
    (folder / "model.safetensors").write_bytes(b"")  # never reached: config.json fails first
    with pytest.raises(ConversionError) as info:
        load_hf_checkpoint(folder, progress=False)
    message = str(info.value)
    assert message.startswith(f"config.json: {field}=") and fix in message, message


# ----------------------------------------------------------------------------------------------
# FP8
# ----------------------------------------------------------------------------------------------
def test_fp8_dequantization_is_one_correct_rounding_of_the_fp64_product():
    """Per element: bf16 / fp16 / fp32 results are the correctly rounded fp64 products, where
    DeepSeek's own cast (fp32 product, then bf16) rounds twice and misses some; per block: the
    scale of block (i // 128, j // 128), partial blocks at both edges."""
    generator = torch.Generator().manual_seed(11)
    n = 1 << 20
    codes = torch.randint(0, 256, (n,), generator=generator, dtype=torch.uint8)
    fp8 = codes.view(torch.float8_e4m3fn)
    fp8 = torch.where(fp8.float().isnan(), torch.zeros_like(fp8), fp8)  # no NaN codes
    scales = torch.exp2(torch.rand(n, generator=generator, dtype=torch.float64) * 20 - 30
                        ).float()
    exact = fp8.double() * scales.double()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert_equal(round_fp64_to(exact, dtype), _correctly_rounded(exact, dtype), str(dtype))
    twice = (fp8.float() * scales).bfloat16()
    misses = int((twice != _correctly_rounded(exact, torch.bfloat16)).sum())
    print(f"double rounding (DeepSeek's fp8_cast_bf16) misses {misses} of {n} elements")
    assert misses > 0, "no double-rounding case drawn: this test would not see one"

    weight = torch.randn(300, 200, generator=generator) * 0.05
    quantized = quantize_128x128(weight)  # our E4M3 blocks: weight ~= data * scale
    assert quantized.scales.shape == (3, 2)
    reference = quantized.data.double() * quantized.scales.double().repeat_interleave(
        128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    for dtype in (torch.bfloat16, torch.float32):
        assert_equal(dequantize_fp8_blocks(quantized.data, quantized.scales, dtype),
                     _correctly_rounded(reference, dtype), f"blocks to {dtype}")
    assert_close(dequantize_fp8_blocks(quantized.data, quantized.scales, torch.float32), weight,
                 2**-4, "E4M3 keeps 4 significant bits", "dequantized vs original")


def _quantized_as_deepseek(source: Path, target: Path) -> dict:
    """`source` rewritten as DeepSeek's FP8 release: the layers' 2-D weights (not the router)
    and lm_head in E4M3 with fp32 `_scale_inv` blocks, quantization_config in config.json.
    Returns {weight name: fp64 dequantization}."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                       "activation_scheme": "dynamic",
                                       "weight_block_size": [128, 128]},
                  torch_dtype="bfloat16")
    config.pop("dtype", None)
    (target / "config.json").write_text(json.dumps(config))
    exact = {}
    index = _index(target)
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(target / shard, framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        for key in list(tensors):
            if (key.startswith("model.layers.") and tensors[key].dim() == 2
                    and not key.endswith("mlp.gate.weight")) or key == "lm_head.weight":
                q = quantize_128x128(tensors[key])
                tensors[key], tensors[key + "_scale_inv"] = q.data, q.scales
                index["weight_map"][key + "_scale_inv"] = shard
                rows, cols = q.data.shape
                exact[key] = q.data.double() * q.scales.double().repeat_interleave(
                    128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        save_file(tensors, str(target / shard), metadata={"format": "pt"})
    (target / INDEX_FILE).write_text(json.dumps(index))
    # one scale in another shard than its weight: the weight waits for it
    moved = "lm_head.weight_scale_inv"
    other = next(s for s in sorted(set(index["weight_map"].values()))
                 if s != index["weight_map"][moved])
    scale = {}
    _rewrite_shard_of(target, moved, lambda t: scale.update({moved: t.pop(moved)}))
    _rewrite_shard_of(target, next(k for k, s in index["weight_map"].items() if s == other),
                      lambda t: t.update(scale))
    assert _index(target)["weight_map"][moved] == other
    return exact


def test_fp8_folder_imports_exactly(hf_folder, tmp_path):
    cfg, _, folder, _, fp32_state = hf_folder
    exact = _quantized_as_deepseek(folder, tmp_path / "fp8")
    assert len(exact) > 20
    for dtype in (None, torch.float32):  # None: config.json's torch_dtype (bf16) for FP8
        _, state = load_hf_checkpoint(tmp_path / "fp8", dtype=dtype, progress=False)
        hf = _read_folder(folder)
        for key, value in exact.items():
            hf[key] = _correctly_rounded(value, dtype or torch.bfloat16)
        expected = hf_to_dsv3(hf, cfg)  # fused experts stacked from the rounded pieces
        if dtype is None:  # tensors stored as fp32 stay fp32; fused outputs of FP8 pieces bf16
            assert state["output_layer.weight"].dtype == torch.bfloat16
            assert state["decoder.layers.1.mlp.router.weight"].dtype == torch.float32
            expected = {k: v.to(state[k].dtype) for k, v in expected.items()}
        _assert_same(state, expected, f"FP8 import to {dtype}")
    unchanged = "decoder.layers.0.input_layernorm.weight"
    assert_equal(state[unchanged], fp32_state[unchanged], "a tensor stored in fp32")


def test_fp8_scale_problems_are_named(hf_folder, tmp_path):
    folder = tmp_path / "fp8"
    _quantized_as_deepseek(hf_folder[2], folder)
    key = "model.layers.0.self_attn.q_b_proj.weight"
    _rewrite_shard_of(folder, key, lambda t: t.__setitem__(key + "_scale_inv",
                                                           torch.ones(2, 1)))
    with pytest.raises(ConversionError, match=rf"{key}_scale_inv: .*shape \(2, 1\).*needs "
                                              r"float32 of shape \(1, 1\)"):
        load_hf_checkpoint(folder, progress=False)
    _rewrite_shard_of(folder, key, lambda t: t.pop(key + "_scale_inv"))
    with pytest.raises(ConversionError, match=rf"{key} is FP8 without its {key}_scale_inv"):
        load_hf_checkpoint(folder, progress=False)


# ----------------------------------------------------------------------------------------------
# Folder errors
# ----------------------------------------------------------------------------------------------
def _damaged(folder: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    return copy


def _error(folder: Path) -> str:
    with pytest.raises(ConversionError) as info:
        load_hf_checkpoint(folder, progress=False)
    return str(info.value)


def test_folder_errors_name_the_file_or_tensor_and_the_fix(hf_folder, tmp_path):
    folder = hf_folder[2]
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"

    missing = _damaged(folder, tmp_path, "missing")
    _rewrite_shard_of(missing, bias, lambda t: t.pop(bias))
    message = _error(missing)
    assert str(missing) in message and "1 missing key" in message and bias in message, message

    shape = _damaged(folder, tmp_path, "shape")
    kv = "model.layers.2.self_attn.kv_a_proj_with_mqa.weight"
    _rewrite_shard_of(shape, kv, lambda t: t.__setitem__(kv, torch.zeros(32, 64)))
    message = _error(shape)
    assert f"{kv}: shape (32, 64)" in message and "(40, 64) = [kv_lora_rank + qk_rope_head_dim" \
        in message and "take both from the same checkpoint" in message, message

    extra = _damaged(folder, tmp_path, "extra")
    _rewrite_shard_of(extra, bias, lambda t: t.__setitem__("model.layers.1.mlp.foo.weight",
                                                           torch.zeros(2)))
    message = _error(extra)
    assert "1 unexpected key" in message and "model.layers.1.mlp.foo.weight" in message, message

    partial = _damaged(folder, tmp_path, "partial")
    shard = _index(partial)["weight_map"][bias]
    (partial / shard).unlink()
    message = _error(partial)
    assert shard in message and "shard set is incomplete" in message, message

    truncated = _damaged(folder, tmp_path, "truncated")
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[:-100])
    assert "truncated" in _error(truncated) and shard in _error(truncated)

    stale_index = _damaged(folder, tmp_path, "stale")
    index = _index(stale_index)
    index["weight_map"][bias] = next(s for s in index["weight_map"].values() if s != shard)
    (stale_index / INDEX_FILE).write_text(json.dumps(index))
    assert "does not hold what model.safetensors.index.json says" in _error(stale_index)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def test_cli_round_trip_and_refusals(hf_folder, tmp_path, capsys):
    cfg, _, folder, _, state_dict = hf_folder
    weights = tmp_path / "dsv3.pt"
    convert.main(["hf-to-dsv3", "--hf-dir", str(folder), "--out", str(weights),
                  "--no-progress"])
    payload = torch.load(weights, weights_only=False)
    _assert_same(payload["model"], state_dict, "hf-to-dsv3 file")
    assert model_config_from_dict(payload["model_config"]).mla == cfg.mla
    out = tmp_path / "exported"
    convert.main(["dsv3-to-hf", "--checkpoint", str(weights), "--out", str(out),
                  "--max-shard-size", SHARD, "--no-progress"])
    _assert_same(_read_folder(out), _read_folder(folder), "dsv3-to-hf folder")
    assert "tensors in" in capsys.readouterr().out

    with pytest.raises(SystemExit) as info:  # the folder is not empty any more
        convert.main(["dsv3-to-hf", "--checkpoint", str(weights), "--out", str(out)])
    assert info.value.code == 2 and "already holds a checkpoint" in capsys.readouterr().err

    # a training-job checkpoint (its step folder, verified, `_extra_state` entries ignored)
    from megatron_dsv3.train.checkpoint import save_checkpoint

    job = {"format": 1, "step": 5, "tokens_seen": 0, "optimizer": {}, "world_size": 1,
           "model": {**state_dict, "decoder.layers.0.self_attention._extra_state": None},
           "model_config": payload["model_config"], "train_args": {"tensor_parallel_size": 1}}
    step_dir = save_checkpoint(tmp_path / "checkpoints", 5, job)
    convert.main(["dsv3-to-hf", "--checkpoint", str(step_dir), "--out", str(tmp_path / "job"),
                  "--no-progress"])
    _assert_same(_read_folder(tmp_path / "job"), _read_folder(folder), "from a job checkpoint")

    sliced = tmp_path / "rank_00000.pt"
    torch.save({**payload, "train_args": {"tensor_parallel_size": 2}}, sliced)
    with pytest.raises(SystemExit):
        convert.main(["dsv3-to-hf", "--checkpoint", str(sliced), "--out", str(tmp_path / "x")])
    assert "tensor_parallel_size=2" in capsys.readouterr().err

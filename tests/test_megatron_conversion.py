"""Hugging Face folders <-> Megatron's distributed checkpoint (checkpoint/megatron_files.py).

The round trip: a Hugging Face folder of a small seeded model (random router biases, one MTP
depth) -> `convert hf-to-megatron` -> loaded by our model on gloo ranks at TP=2 x EP=2 (4
ranks) and at PP=2 (2 ranks; TP2 x EP2 x PP2 with -m extended) -> saved again at that layout
with `dist_checkpointing.save`, as Megatron's loop saves -> `convert megatron-to-hf` -> every
tensor of the new folder bit-identical to the original's. The TP2 x EP2 model gives the logits
and MTP losses of the model built from the same folder in memory (hf.py) at TP=1; the PP=2
stages hold, under Megatron's local layer numbers, the weights of the global layers they run.
Megatron's own `load_checkpoint`, with the arguments `python -m megatron_dsv3.pretrain --load`
parses, starts from the converted folder at iteration 0 with the loss of the in-memory model,
and what Megatron's `save_checkpoint` then writes converts back to the original folder (the
config from the run's saved arguments). hf-to-megatron writes what hf_files reads from
DeepSeek's FP8 release and from transformers' fused experts, and its writer holds one chunk at
a time. Each bad checkpoint gives its ConversionError, and nothing half-written is left behind.

PP runs without MTP: with PP, Megatron's GPTModel copies the embedding to the MTP stage
through CUDA (tests/test_pretrain_log.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers.dist_save import results_queue_by_fork
from helpers.gloo import run_gloo
from helpers.pretrain_main import pretrain_main_recorded
from helpers.small_model import small_config
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal
from megatron_dsv3.checkpoint.convert import main as convert
from megatron_dsv3.checkpoint.hf import ConversionError

BATCH, SEQ = 2, 8
SAVED_ITERATION = 7


def _hf_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _seeded_model(cfg, pg, seed: int):
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg, pg_collection=pg, megatron_config=to_megatron_config(
        cfg, use_cpu_initialization=True))
    with torch.no_grad():  # biases that differ per layer and expert (the init leaves zeros)
        for module in model.modules():
            if hasattr(module, "expert_bias"):
                module.expert_bias.copy_(torch.randn(module.expert_bias.shape) * 0.1)
    return model


def _hf_folder(tmp_path_factory, pg, name: str, cfg) -> Path:
    """A Hugging Face folder of a seeded model, in shards of ~60 kB (the model is 0.5 MB)."""
    from megatron_dsv3.checkpoint.hf_files import save_hf_checkpoint

    folder = tmp_path_factory.mktemp(name) / "hf"
    save_hf_checkpoint(_seeded_model(cfg, pg, seed=11).state_dict(), cfg, folder,
                       max_shard_size="60KB", progress=False)
    return folder


@pytest.fixture(scope="module")
def hf_mtp(tmp_path_factory, dist_single) -> Path:
    return _hf_folder(tmp_path_factory, dist_single, "hf_mtp", small_config())


@pytest.fixture(scope="module")
def hf_pp(tmp_path_factory, dist_single) -> Path:
    return _hf_folder(tmp_path_factory, dist_single, "hf_pp",
                      small_config(num_layers=4, mtp__num_layers=0))


@pytest.fixture(scope="module")
def converted(hf_mtp, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "megatron"
    convert(["hf-to-megatron", "--hf-dir", str(hf_mtp), "--out", str(out), "--no-progress"])
    return out


def _tokens(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    full = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    return full[:, :SEQ], full[:, 1:]


# ----------------------------------------------------------------------------------------------
# On the ranks: load the converted checkpoint, run it, save it again as Megatron's loop does
# ----------------------------------------------------------------------------------------------
def _load_run_save(rank: int, world_size: int, load_dir: str, save_dir: str, layout, cfg,
                   tokens, labels):
    from megatron.core import dist_checkpointing

    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.parallel import init_distributed

    if not torch.cuda.is_available():  # Megatron's torch_dist writer assumes CUDA: it syncs
        # after its copies and agrees on failures through a tensor on the current CUDA device
        torch.cuda.synchronize = lambda *args, **kwargs: None  # (this process only)
        torch.cuda.current_device = lambda: "cpu"
    results_queue_by_fork()
    tp, ep, pp = layout
    pg = init_distributed(tp, ep, pipeline_parallel_size=pp, backend="gloo")
    stage, stages = pg.pp.rank(), pg.pp.size()
    torch.manual_seed(100 + rank)  # other weights than the checkpoint's
    model = build_model(cfg, pg_collection=pg, megatron_config=to_megatron_config(
        cfg, tensor_parallel_size=tp, expert_parallel_size=ep, pipeline_parallel_size=pp,
        use_cpu_initialization=True), pre_process=stage == 0, post_process=stage == stages - 1)
    folder = Path(load_dir) / "release"
    common = dist_checkpointing.load_common_state_dict(str(folder))
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
    model.load_state_dict(loaded["model"])

    result = {"stage": stage, "stage_state": {k: v.clone() for k, v in model.state_dict().items()
                                              if not k.endswith("_extra_state")}}
    if pp == 1:
        model.eval()
        with torch.no_grad():
            positions = torch.arange(SEQ).expand(BATCH, SEQ)
            logits = model(tokens, positions, None)  # [b, s, V / tp], vocab-parallel
            parts = [torch.empty_like(logits) for _ in range(tp)]
            torch.distributed.all_gather(parts, logits.contiguous(), group=pg.tp)
            out = model(tokens, positions, None, labels=labels)
        result.update(logits=torch.cat(parts, dim=-1), lm_loss=out.lm_loss,
                      mtp_losses=out.mtp_losses)

    # Megatron's save_checkpoint: the common state (its arguments, version, iteration) beside
    # the model's sharded state dict, one folder per iteration and the tracker naming it
    iteration = Path(save_dir) / f"iter_{SAVED_ITERATION:07d}"
    if rank == 0:
        iteration.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save({"args": common["args"], "checkpoint_version": 3.0,
                             "iteration": SAVED_ITERATION, "model": model.sharded_state_dict()},
                            str(iteration))
    if rank == 0:
        (Path(save_dir) / "latest_checkpointed_iteration.txt").write_text(str(SAVED_ITERATION))
    return result


def _reference(hf_dir: Path, pg, tokens, labels) -> dict:
    """The model built from the folder's state dict in memory (hf_files + hf.py), TP=1."""
    from megatron_dsv3.checkpoint.hf import load_dsv3_state_dict
    from megatron_dsv3.checkpoint.hf_files import load_hf_checkpoint

    cfg, state_dict = load_hf_checkpoint(hf_dir, progress=False)
    model = _seeded_model(cfg, pg, seed=3)
    load_dsv3_state_dict(model, state_dict)
    model.eval()
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    with torch.no_grad():
        out = model(tokens, positions, None, labels=labels)
        return {"logits": model(tokens, positions, None), "lm_loss": out.lm_loss,
                "mtp_losses": out.mtp_losses}


def _round_trip(hf_dir: Path, tmp_path: Path, layout, cfg) -> list:
    load_dir, save_dir = tmp_path / "converted", tmp_path / "saved"
    convert(["hf-to-megatron", "--hf-dir", str(hf_dir), "--out", str(load_dir),
             "--no-progress"])
    tokens, labels = _tokens(cfg.vocab_size)
    tp, ep, pp = layout
    # world = TP x PP x DP, the experts' EP x TP spread over TP x DP ranks: DP = EP here
    results = run_gloo(_load_run_save, tp * ep * pp, str(load_dir), str(save_dir), layout, cfg,
                       tokens, labels)
    convert(["megatron-to-hf", "--load", str(save_dir), "--out", str(tmp_path / "back"),
             "--no-progress"])
    original, back = _hf_tensors(hf_dir), _hf_tensors(tmp_path / "back")
    assert set(back) == set(original)
    for key in original:
        assert_equal(back[key], original[key], key)
    assert any("e_score_correction_bias" in k for k in original)
    return results


# ----------------------------------------------------------------------------------------------
# The round trips
# ----------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_tp2_ep2_loads_the_converted_checkpoint_computes_the_same_and_converts_back_exactly(
        hf_mtp, tmp_path, dist_single):
    cfg = small_config()
    results = _round_trip(hf_mtp, tmp_path, (2, 2, 1), cfg)
    tokens, labels = _tokens(cfg.vocab_size)
    expected = _reference(hf_mtp, dist_single, tokens, labels)
    why = "TP=2 splits the heads' and the FFN's sums over two ranks (an all-reduce)"
    for rank, result in enumerate(results):
        for name in ("logits", "lm_loss", "mtp_losses"):
            assert_close(result[name], expected[name], FP32_REORDER, why, f"rank {rank} {name}")


def _stage_weights_are_the_global_layers(results, hf_dir: Path, layers_per_stage: int) -> None:
    """Stage s's decoder.layers.{j} (Megatron's local number) holds global layer
    s * layers_per_stage + j of the folder, and the stages together hold every tensor once
    (TP=1: whole tensors)."""
    from megatron_dsv3.checkpoint.hf_files import load_hf_checkpoint

    _, full = load_hf_checkpoint(hf_dir, progress=False)
    held = []
    for rank, result in enumerate(results):
        for name, tensor in result["stage_state"].items():
            parts = name.split(".")
            if name.startswith("decoder.layers."):
                parts[2] = str(int(parts[2]) + result["stage"] * layers_per_stage)
            held.append(".".join(parts))
            assert_equal(tensor, full[held[-1]], f"rank {rank} {name} as {held[-1]}")
    assert sorted(held) == sorted(full)


@pytest.mark.multiprocess
def test_pp2_stages_load_their_global_layers_and_convert_back_exactly(hf_pp, tmp_path):
    cfg = small_config(num_layers=4, mtp__num_layers=0)
    results = _round_trip(hf_pp, tmp_path, (1, 1, 2), cfg)
    _stage_weights_are_the_global_layers(results, hf_pp, layers_per_stage=2)


@pytest.mark.extended
@pytest.mark.multiprocess
def test_tp2_ep2_pp2_round_trip_is_exact(hf_pp, tmp_path):
    _round_trip(hf_pp, tmp_path, (2, 2, 2), small_config(num_layers=4, mtp__num_layers=0))


# ----------------------------------------------------------------------------------------------
# Megatron's own loader, as `python -m megatron_dsv3.pretrain --load` runs it
# ----------------------------------------------------------------------------------------------
def _pretrain_args(monkeypatch, flags: list[str]):
    """pretrain.main's arguments and model provider for `flags`, Megatron's pretrain() replaced
    by a recorder; what main installs in Megatron is restored after the test."""
    return pretrain_main_recorded(monkeypatch, flags)


def test_megatrons_loader_starts_from_the_converted_checkpoint_with_the_in_memory_loss(
        converted, hf_mtp, dist_single, monkeypatch, tmp_path):
    """`--load` of the converted folder: pretrain's resume check passes (the saved arguments
    describe the run's model), Megatron's load_checkpoint (through pretrain's digest check)
    returns iteration 0, and the first micro-batch's loss, as Megatron's loop gets it
    (pretrain.loss_func, lambda of step 0), is bit-identical to the loss of the model built
    from the Hugging Face state dict in memory: the same operations in the same order.
    Megatron's own save_checkpoint (--save) then writes what megatron-to-hf turns back into
    the original folder, the model config taken from the run's saved arguments."""
    from megatron.training import get_args, global_vars, training

    from helpers.megatron_on_cpu import _OnCpu
    from megatron_dsv3.megatron_cli import megatron_flags
    from megatron_dsv3.pretrain import loss_func, mtp_weight

    if not torch.cuda.is_available():  # Megatron's checkpointing assumes CUDA
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    results_queue_by_fork()
    cfg = small_config()
    flags = [*megatron_flags(cfg), "--seq-length", str(SEQ), "--micro-batch-size", str(BATCH),
             "--global-batch-size", str(BATCH), "--train-iters", "1",
             # NullTokenizer's vocabulary is --vocab-size + 1 (its end-of-document token)
             "--tokenizer-type", "NullTokenizer", "--vocab-size", str(cfg.vocab_size - 1),
             "--make-vocab-size-divisible-by", str(cfg.vocab_size),
             "--transformer-impl", "local", "--use-cpu-initialization", "--load", str(converted),
             "--save", str(tmp_path / "saved"), "--save-interval", "1"]
    try:
        seen = _pretrain_args(monkeypatch, flags)
        args = get_args()
        assert args.padded_vocab_size == cfg.vocab_size
        torch.manual_seed(7)  # weights the checkpoint must replace
        model = seen["provider"](pre_process=True, post_process=True, config=None,
                                 pg_collection=dist_single)
        with _OnCpu():  # Megatron's loader agrees on the iteration through a CUDA tensor
            iteration, _ = training.load_checkpoint([model], None, None)
        assert iteration == 0 and args.consumed_train_samples == 0
        tokens, labels = _tokens(cfg.vocab_size)
        mask = torch.ones(BATCH, SEQ)
        positions = torch.arange(SEQ).expand(BATCH, SEQ)
        with torch.no_grad():
            loss, count, _ = loss_func(mask, mtp_weight(args), model(
                tokens, positions, None, labels=labels, loss_mask=mask))
        with _OnCpu():
            training.save_checkpoint(SAVED_ITERATION, [model], None, None, 0)
    finally:
        global_vars.unset_global_variables()
    reference = _reference(hf_mtp, dist_single, tokens, labels)
    expected = (reference["lm_loss"].mean()
                + 0.3 * reference["mtp_losses"][0][:, :-1].mean())  # lambda 0.3 at step 0
    assert_equal(loss / count, expected, "first loss")

    result = convert(["megatron-to-hf", "--load", str(tmp_path / "saved"), "--out",
                      str(tmp_path / "back"), "--no-progress"])
    assert result["config_source"].startswith("Megatron's saved arguments")
    assert result["folder"].endswith(f"iter_{SAVED_ITERATION:07d}")
    original, back = _hf_tensors(hf_mtp), _hf_tensors(tmp_path / "back")
    assert set(back) == set(original)
    for key in original:
        assert_equal(back[key], original[key], key)


# ----------------------------------------------------------------------------------------------
# Bad checkpoints: each its ConversionError, nothing half-written
# ----------------------------------------------------------------------------------------------
def test_a_used_output_folder_is_refused_and_a_failed_conversion_leaves_nothing(hf_mtp,
                                                                                tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from megatron_dsv3.checkpoint.megatron_files import hf_to_megatron

    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match=r"--out .*used already exists and is not empty"):
        hf_to_megatron(hf_mtp, used, progress=False)
    assert [p.name for p in used.iterdir()] == ["notes.txt"]

    # the MTP layer's copy of the embedding differs from it: found while the tensors are written
    bad = tmp_path / "bad_hf"
    shutil.copytree(hf_mtp, bad)
    copy = "model.layers.3.embed_tokens.weight"
    shard = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"][copy]
    tensors = load_file(bad / shard)
    tensors[copy] = tensors[copy] + 1
    save_file(tensors, bad / shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=f"{copy} differs from model.embed_tokens.weight"):
        hf_to_megatron(bad, out, progress=False)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_folder_that_is_not_a_megatron_checkpoint_is_named_with_the_fix(hf_mtp, converted,
                                                                          tmp_path, capsys):
    from megatron_dsv3.checkpoint.megatron_files import megatron_to_hf

    with pytest.raises(SystemExit) as stop:  # the command: status 2 and the message
        convert(["megatron-to-hf", "--load", str(hf_mtp), "--out", str(tmp_path / "a")])
    assert stop.value.code == 2
    assert "is not a Megatron checkpoint folder: it has no latest_checkpointed_iteration.txt" \
        in capsys.readouterr().err
    legacy = tmp_path / "legacy"
    (legacy / "iter_0000003" / "mp_rank_00").mkdir(parents=True)
    (legacy / "latest_checkpointed_iteration.txt").write_text("3")
    with pytest.raises(ConversionError, match=r"iter_0000003 is not a torch_dist checkpoint .*"
                                              r"mp_rank_\* folders, Megatron's legacy "
                                              r"--ckpt-format torch"):
        megatron_to_hf(legacy, tmp_path / "b", progress=False)
    with pytest.raises(ConversionError, match=r"--iteration 5: .*iter_0000005 does not exist"):
        megatron_to_hf(converted, tmp_path / "c", iteration=5, progress=False)
    with pytest.raises(ConversionError, match=r"--preset tiny describes another model than .*"
                                              r"hidden_size: 128 and 32"):
        megatron_to_hf(converted, tmp_path / "d", preset="tiny", progress=False)
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_a_partial_shard_set_is_named_before_anything_is_read(converted, tmp_path):
    from megatron_dsv3.checkpoint.megatron_files import megatron_to_hf

    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    data = copy / "release" / "__0_0.distcp"
    size = data.stat().st_size
    with open(data, "r+b") as handle:  # an interrupted copy
        handle.truncate(size // 2)
    with pytest.raises(ConversionError, match=rf"a partial shard set: __0_0.distcp has "
                                              rf"{size // 2} bytes, \d+ are indexed"):
        megatron_to_hf(copy, tmp_path / "out", progress=False)
    data.unlink()
    with pytest.raises(ConversionError, match=r"__0_0.distcp is missing \(1 files in all\)"):
        megatron_to_hf(copy, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def save_here(dist_single, monkeypatch):
    """dist_checkpointing.save in this process (a world of one), as Megatron's loop saves."""
    from megatron.core import dist_checkpointing

    if not torch.cuda.is_available():  # Megatron's torch_dist writer assumes CUDA
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    results_queue_by_fork()

    def save(state_dict: dict, root: Path) -> Path:
        (root / "iter_0000001").mkdir(parents=True)
        dist_checkpointing.save(state_dict, str(root / "iter_0000001"))
        (root / "latest_checkpointed_iteration.txt").write_text("1")
        return root
    return save


def test_missing_tensors_other_shapes_and_other_models_are_named(save_here, dist_single,
                                                                 tmp_path):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_dsv3.checkpoint.megatron_files import megatron_args, megatron_to_hf

    cfg = small_config()
    common = {"args": megatron_args(cfg), "checkpoint_version": 3.0, "iteration": 1}
    model = _seeded_model(cfg, dist_single, seed=4)

    def weights(**changes):
        sharded = model.sharded_state_dict()
        for key, value in changes.items():
            key = key.replace("__", ".")
            if value is None:
                del sharded[key]
            else:
                sharded[key] = ShardedTensor.from_rank_offsets(key, value, replica_id=0)
        return sharded

    missing = save_here({**common, "model": weights(mtp__layers__0__eh_proj__weight=None)},
                        tmp_path / "missing")
    with pytest.raises(ConversionError, match=r"1 tensor\(s\) of the model missing: "
                                              r"mtp.layers.0.eh_proj.weight\. it holds another "
                                              r"model than the one of Megatron's saved arg"):
        megatron_to_hf(missing, tmp_path / "out", progress=False)
    wider = save_here({**common, "model": weights(output_layer__weight=torch.zeros(128, 32))},
                      tmp_path / "wider")
    with pytest.raises(ConversionError, match=r"output_layer.weight has the global shape "
                                              r"\(128, 32\), .* gives \(64, 32\) = "
                                              r"\[vocab_size, hidden_size\]"):
        megatron_to_hf(wider, tmp_path / "out", progress=False)
    stacked = {"decoder.layers.self_attention.linear_qkv.weight": ShardedTensor.from_rank_offsets(
        "decoder.layers.self_attention.linear_qkv.weight", torch.zeros(3, 96, 32), replica_id=0)}
    other = save_here({**common, "model": stacked}, tmp_path / "other")
    with pytest.raises(ConversionError, match=r"other tensor\(s\): decoder.layers.self_attention"
                                              r".linear_qkv.weight\. its layers are stacked"):
        megatron_to_hf(other, tmp_path / "out", progress=False)
    no_args = save_here({"iteration": 1, "model": weights()}, tmp_path / "no_args")
    with pytest.raises(ConversionError, match="records neither Megatron's arguments nor a model "
                                              "config: pass --preset NAME"):
        megatron_to_hf(no_args, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_writer_holds_one_chunk_at_a_time_and_writes_every_chunk_exactly(tmp_path):
    """torch's FileSystemWriter keeps each tensor of a file until the file is closed; the
    streaming planner frees each chunk's storage once the writer has moved on (what bounds
    hf-to-megatron's memory to one tensor). Every chunk still reads back exactly, experts
    written one per chunk included."""
    import torch.distributed.checkpoint as dcp

    from megatron_dsv3.checkpoint.megatron_files import _Chunk, write_torch_dist

    g = torch.Generator().manual_seed(0)
    experts = torch.randn(4, 3, 5, generator=g)
    dense = torch.randn(6, 7, generator=g)
    built = []

    def keep(tensor):
        built.append(tensor)
        return tensor

    chunks = [_Chunk("experts", (4, 3, 5), torch.float32, (e, 0, 0), (1, 3, 5),
                     lambda e=e: keep(experts[e: e + 1].clone())) for e in range(4)]
    chunks.append(_Chunk("dense", (6, 7), torch.float32, (0, 0), (6, 7),
                         lambda: keep(dense.clone())))
    write_torch_dist(tmp_path / "ckpt", chunks, {"iteration": 0}, ["linear._extra_state"])
    assert len(built) == 5 and all(t.untyped_storage().nbytes() == 0 for t in built)
    back = {"experts": torch.zeros(4, 3, 5), "dense": torch.zeros(6, 7)}
    dcp.load(back, storage_reader=dcp.FileSystemReader(str(tmp_path / "ckpt")), no_dist=True)
    assert_equal(back["experts"], experts, "experts")
    assert_equal(back["dense"], dense, "dense")


# ----------------------------------------------------------------------------------------------
# The folder flavours: what hf-to-megatron writes is what hf_files reads, tensor for tensor
# ----------------------------------------------------------------------------------------------
def _as_fp8_release(source: Path, target: Path) -> None:
    """`source` rewritten as DeepSeek's FP8 release: every 2-D weight of the layers (the
    per-expert ones included; not the router, not the MTP copies of the embedding and head)
    in E4M3 with its fp32 128x128 block scales, beside it in the same shard."""
    import json

    from safetensors.torch import load_file, save_file

    from megatron_dsv3.fp8.quantize import quantize_128x128

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                       "weight_block_size": [128, 128]}, torch_dtype="bfloat16")
    config.pop("dtype", None)
    (target / "config.json").write_text(json.dumps(config))
    index = json.loads((target / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(target / shard)
        for key in list(tensors):
            if (key.startswith("model.layers.") and tensors[key].dim() == 2
                    and not key.endswith(("mlp.gate.weight", "embed_tokens.weight",
                                          "shared_head.head.weight"))):
                q = quantize_128x128(tensors[key])
                tensors[key], tensors[key + "_scale_inv"] = q.data, q.scales
                index["weight_map"][key + "_scale_inv"] = shard
        save_file(tensors, str(target / shard), metadata={"format": "pt"})
    (target / "model.safetensors.index.json").write_text(json.dumps(index))


def _as_fused_experts(source: Path, target: Path) -> None:
    """`source` as transformers 5 stores it: each layer's routed experts in two fused tensors
    (`mlp.experts.gate_up_proj` [E, 2F, D], `down_proj` [E, D, F]), one safetensors file."""
    from safetensors.torch import save_file

    from megatron_dsv3.checkpoint.hf import dsv3_to_hf
    from megatron_dsv3.checkpoint.hf_files import load_hf_checkpoint

    cfg, state_dict = load_hf_checkpoint(source, progress=False)
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    tensors = {k: v.contiguous() for k, v in dsv3_to_hf(state_dict, cfg).items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("flavour", [_as_fp8_release, _as_fused_experts],
                         ids=["deepseek-fp8-release", "fused-experts"])
def test_hf_to_megatron_writes_what_hf_files_reads(hf_mtp, tmp_path, flavour):
    """Each tensor of the converted checkpoint (read back with DCP alone, no process group)
    equals hf_files.load_hf_checkpoint's reading of the same folder bit for bit: FP8 weights
    dequantized with its one rounding, experts read one at a time from per-expert FP8 tensors
    or from slices of fused ones."""
    import torch.distributed.checkpoint as dcp

    from megatron_dsv3.checkpoint.hf_files import load_hf_checkpoint

    folder = tmp_path / "hf"
    flavour(hf_mtp, folder)
    convert(["hf-to-megatron", "--hf-dir", str(folder), "--out", str(tmp_path / "m"),
             "--no-progress"])
    _, expected = load_hf_checkpoint(folder, progress=False)
    written = {k: torch.full_like(v, float("nan")) for k, v in expected.items()}
    dcp.load(written, storage_reader=dcp.FileSystemReader(str(tmp_path / "m" / "release")),
             no_dist=True)
    for key, tensor in expected.items():
        assert_equal(written[key], tensor, key)
    assert any(t.dtype == torch.bfloat16 for t in expected.values()) is (
        flavour is _as_fp8_release)

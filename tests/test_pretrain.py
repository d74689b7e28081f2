"""megatron_dsv3.pretrain: the pieces our model adds to Megatron's own training loop, on the
CPU (Megatron's `pretrain` itself asserts CUDA at start-up, see the README).

  * the MTP weight schedule argument, good and bad;
  * loss_func's (sum, tokens, report), once Megatron's per-token normalisation divides it,
    against the training job's loss (mtp.weighted_lm_loss) on fresh random losses, with and
    without a loss mask;
  * forward_step on a small model: the loss Megatron gets equals the job's loss of the same
    batch, lambda follows the tokens trained, the balance loss is scaled by 1 / micro-batches
    and the routers freeze at --bias-update-stop-tokens;
  * the data: Megatron's indexed dataset made by `indexed_data` from the bundled corpus, read
    through Megatron's GPTDataset builder with Megatron's own Hugging Face tokenizer wrapper.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from helpers.dist_save import results_queue_by_fork
from helpers.pretrain_main import pretrain_main_recorded
from helpers.small_model import small_config
from helpers.tolerance import FP32_REORDER, assert_close
from megatron_dsv3.config import ConfigError
from megatron_dsv3.model import LMOutput
from megatron_dsv3.mtp import weighted_lm_loss
from megatron_dsv3.pretrain import (add_arguments, expand_preset, forward_step, loss_func,
                                    mtp_weight, parse_mtp_loss_weights)

SEQ, BATCH = 8, 2


def test_mtp_loss_weights_parse_and_bad_ones_name_the_flag():
    assert parse_mtp_loss_weights("0:0.3,10e12:0.1") == ((0, 0.3), (10_000_000_000_000, 0.1))
    for bad in ("0.3", "5:0.3", "0:0.3,0:0.1", "0:-1", "0:x"):
        with pytest.raises(ConfigError, match="--mtp-loss-weights"):
            parse_mtp_loss_weights(bad)


def _args(**changes) -> SimpleNamespace:
    fields = dict(consumed_train_samples=0, seq_length=SEQ, micro_batch_size=BATCH,
                  mtp_loss_weights="0:0.3,64:0.1", bias_update_stop_tokens=None)
    fields.update(changes)
    return SimpleNamespace(**fields)


def test_mtp_weight_follows_the_tokens_trained():
    assert mtp_weight(_args(consumed_train_samples=7)) == 0.3  # 56 tokens
    assert mtp_weight(_args(consumed_train_samples=8)) == 0.1  # 64 tokens


def _output(seed: int, depth: int = 2) -> LMOutput:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(depth, BATCH, SEQ, dtype=torch.bool)
    for k in range(depth):
        valid[k, :, SEQ - 1 - k:] = False  # depth k+1 has no target for the last k+1 positions
    return LMOutput(torch.rand(BATCH, SEQ, generator=g) * 5,
                    torch.rand(depth, BATCH, SEQ, generator=g) * 5, valid)


def test_loss_func_normalised_by_tokens_is_the_jobs_loss():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    out = _output(seed)
    loss, tokens, report = loss_func(torch.ones(BATCH, SEQ), 0.3, out)
    assert int(tokens) == BATCH * SEQ
    expected, lm, _, depth_ce = weighted_lm_loss(out, 0.3)
    assert_close(loss / tokens, expected, FP32_REORDER, "sum then divide", f"seed {seed}")
    assert_close(report["lm loss"][0] / report["lm loss"][1], lm, FP32_REORDER, "lm report")
    assert_close(report["mtp ce"][0] / report["mtp ce"][1], depth_ce.mean(), FP32_REORDER,
                 "mtp report")
    assert sorted(report) == ["lm loss", "mtp ce", "mtp ce depth 1", "mtp ce depth 2"]
    for k in (1, 2):  # each depth's mean CE over its own valid positions
        entry = report[f"mtp ce depth {k}"]
        direct = out.mtp_losses[k - 1][out.mtp_valid[k - 1]].mean()
        assert_close(entry[0] / entry[1], direct, FP32_REORDER, f"depth {k} report")
    # a mask: the next-token CE over the unmasked positions only
    mask = torch.ones(BATCH, SEQ)
    mask[0, :3] = 0
    masked, tokens, _ = loss_func(mask, 0.0, out)
    assert int(tokens) == BATCH * SEQ - 3
    assert_close(masked / tokens, out.lm_loss[mask.bool()].mean(), FP32_REORDER, "masked mean")


@pytest.fixture
def small_model(dist_single):
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model

    cfg = small_config()
    torch.manual_seed(0)
    return cfg, build_model(cfg, pg_collection=dist_single, megatron_config=to_megatron_config(
        cfg, use_cpu_initialization=True))


def _batches(vocab: int, count: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        full = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
        yield {"tokens": full[:, :SEQ], "labels": full[:, 1:], "loss_mask": torch.ones(BATCH, SEQ),
               "position_ids": torch.arange(SEQ).expand(BATCH, SEQ)}


def test_forward_step_gives_megatron_the_jobs_loss_and_scales_and_freezes(small_model,
                                                                          monkeypatch):
    from megatron.core import num_microbatches_calculator as calculator

    from megatron_dsv3.moe.layer import DeepSeekMoE
    from megatron_dsv3.moe.router import Router

    cfg, model = small_model
    monkeypatch.setattr(calculator, "get_num_microbatches", lambda: 4)
    args = _args(consumed_train_samples=8, bias_update_stop_tokens=64)  # 64 tokens trained
    output, loss_of = forward_step(_batches(cfg.vocab_size, 1), model, args=args)
    loss, tokens, _ = loss_of(output)
    batch = next(_batches(cfg.vocab_size, 1))
    direct = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    expected = weighted_lm_loss(direct, 0.1)[0]  # lambda 0.1 from 64 tokens on
    assert_close(loss / tokens, expected, FP32_REORDER, "the same forward")
    moe = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    assert moe and all(m._balance_loss_scale == 0.25 for m in moe)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert routers and all(r.frozen_expert_bias for r in routers), "stopped at 64 tokens"
    forward_step(_batches(cfg.vocab_size, 1), model, args=_args(bias_update_stop_tokens=64))
    assert not any(r.frozen_expert_bias for r in routers), "0 tokens trained: still moving"


def test_megatrons_schedules_can_mark_the_microbatch_on_our_layers(small_model):
    """Megatron's forward_step marks the micro-batch on every decoder and MTP layer before each
    forward and asserts Megatron's MTP attribute (it stopped our model's first step on the
    GPU)."""
    from megatron.core.transformer.cuda_graphs import set_current_microbatch

    cfg, model = small_model
    set_current_microbatch(model, 3)
    marked = [layer.current_microbatch for layer in model.decoder.layers] + [
        layer.transformer_layer.current_microbatch for layer in model.mtp.layers]
    assert marked == [3] * (cfg.num_layers + cfg.mtp.num_layers) and cfg.mtp.num_layers


def test_a_resumed_run_refuses_non_finite_loaded_weights_once(small_model, monkeypatch):
    """Megatron's loader checks no values: forward_step's first call after a resume does, names
    the tensors and points at --ckpt-step; a fresh run (iteration 0) is not checked."""
    from megatron.core import num_microbatches_calculator as calculator

    from megatron_dsv3 import pretrain
    from megatron_dsv3.pretrain import CorruptCheckpoint

    cfg, model = small_model
    monkeypatch.setattr(calculator, "get_num_microbatches", lambda: 1)
    monkeypatch.setattr(pretrain, "_checked_models", set())
    name, param = list(model.named_parameters())[5]
    saved = param.detach().clone()
    with torch.no_grad():
        param.view(-1)[3] = float("nan")
    fresh = _args(load="ckpt", iteration=0)
    forward_step(_batches(cfg.vocab_size, 1), model, args=fresh)  # nothing loaded: no check
    pretrain._checked_models.clear()
    resumed = _args(load="ckpt", iteration=20)
    with pytest.raises(CorruptCheckpoint, match=rf"--load ckpt: the checkpoint of iteration 20 "
                                                 rf"holds NaN or Inf in 1 of \d+ tensors "
                                                 rf"\({name}\).*--ckpt-step"):
        forward_step(_batches(cfg.vocab_size, 1), model, args=resumed)
    with torch.no_grad():
        param.copy_(saved)
    pretrain._checked_models.clear()
    forward_step(_batches(cfg.vocab_size, 1), model, args=resumed)  # finite: trains on
    assert id(model) in pretrain._checked_models


def test_our_arguments_join_megatrons_parser():
    from megatron.training.arguments import add_megatron_arguments

    parser = add_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(["--bias-update-stop-tokens", "14.3e12"])
    assert args.bias_update_stop_tokens == 14.3e12
    assert parse_mtp_loss_weights(args.mtp_loss_weights)[-1] == (10_000_000_000_000, 0.1)


def test_preset_flags_come_first_so_the_command_line_overrides_them():
    """`--preset proxy` parses to the preset's model (the config read back from Megatron's
    arguments equals it), and a model flag given on the command line wins over the preset's."""
    from megatron.training.arguments import add_megatron_arguments

    from megatron_dsv3.config import proxy

    parser = add_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(expand_preset(["--preset", "proxy", "--bf16"]))
    assert args.preset == "proxy"
    assert (args.num_layers, args.hidden_size, args.num_experts, args.moe_router_topk) == (
        proxy().num_layers, proxy().hidden_size, proxy().moe.num_experts, proxy().moe.top_k)
    overridden = parser.parse_args(expand_preset(["--preset=proxy", "--moe-router-topk", "2"]))
    assert overridden.moe_router_topk == 2 and overridden.num_experts == proxy().moe.num_experts
    assert expand_preset(["--lr", "1e-3"]) == ["--lr", "1e-3"]
    for bad in (["--preset", "huge"], ["--preset", "tiny", "--preset", "proxy"]):
        with pytest.raises(ConfigError, match="--preset"):
            expand_preset(bad)


def test_megatrons_gpt_dataset_reads_the_indexed_corpus_with_our_tokenizer(tmp_path, corpus,
                                                                           dist_single):
    """`indexed_data` from the bundled corpus, then Megatron's dataset builder with the config
    `gpt_dataset_config` makes and Megatron's own wrapper of our tokenizer.json: windows of
    --seq-length tokens whose labels are the tokens shifted by one, all within the vocabulary,
    decoding to text of the corpus."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.arguments import add_megatron_arguments

    from megatron_dsv3.data import TOKENIZER_FILE, Tokenizer
    from megatron_dsv3.indexed_data import main as make_indexed
    from megatron_dsv3.pretrain import check_splits_have_data, gpt_dataset_config

    import json

    # 20 documents (the corpus fixture's text is one play: --split divides documents, and
    # Megatron's builder loops forever on a split that gets none)
    text = next(corpus.glob("*.txt")).read_text(encoding="utf-8")
    pieces = [text[i * 5000:(i + 1) * 5000] for i in range(20)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": piece}) + "\n"
                                                 for piece in pieces), encoding="utf-8")
    make_indexed(["--input", str(tmp_path / "docs.jsonl"), "--output-prefix",
                  str(tmp_path / "plays"), "--tokenizer", str(corpus / TOKENIZER_FILE)])
    args = add_arguments(add_megatron_arguments(argparse.ArgumentParser())).parse_args(
        ["--data-path", str(tmp_path / "plays"), "--split", "90,10,0", "--seq-length", "32",
         "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(corpus),
         "--data-cache-path", str(tmp_path / "cache")])
    args.rank, args.tensor_model_parallel_size = 0, 1  # what Megatron's set-up fills in
    tokenizer = build_tokenizer(args)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [20, 4, 0], lambda: True, gpt_dataset_config(args, tokenizer)).build()
    ours = Tokenizer.load(corpus / TOKENIZER_FILE)
    for sample in (train[0], train[19], valid[0]):
        tokens, labels = sample["tokens"], sample["labels"]
        assert tokens.shape == labels.shape == (32,)
        assert torch.equal(tokens[1:], labels[:-1])
        assert int(tokens.max()) < ours.vocab_size
        piece = ours.decode(tokens[:6].tolist()).strip()
        assert piece and piece.split()[0] in text
    check_splits_have_data(gpt_dataset_config(args, tokenizer), [20, 4, 0])
    args.split = "99,1,0"  # round(0.99 * 20) = 20: the validation split gets no sequence
    with pytest.raises(ConfigError, match=r"--split 99,1,0 gives the validation split no "
                                          r"sequence of .*plays \(20 sequences in all\) but 4"):
        check_splits_have_data(gpt_dataset_config(args, tokenizer), [20, 4, 0])
    check_splits_have_data(gpt_dataset_config(args, tokenizer), [20, 0, 0])  # none asked


def test_the_wheels_dataset_helpers_are_used_instead_of_make(monkeypatch):
    """megatron.training's start-up calls compile_helpers on rank 0, which runs `make` in
    megatron/core/datasets and exits when it fails; the wheel has the built extension and no
    Makefile (measured on the GPU: every pretrain() stopped there)."""
    import subprocess
    from pathlib import Path

    from megatron.core.datasets import utils

    from megatron_dsv3.megatron_compat import use_prebuilt_dataset_helpers

    assert not (Path(utils.__file__).parent / "Makefile").exists()
    made = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: made.append(cmd) or
                        SimpleNamespace(returncode=2))
    monkeypatch.setattr(utils, "compile_helpers", utils.compile_helpers)  # restored afterwards
    with pytest.raises(SystemExit):  # Megatron's own: `make` fails, the process exits
        utils.compile_helpers()
    assert made and made[0][0] == "make"

    made.clear()
    use_prebuilt_dataset_helpers()
    use_prebuilt_dataset_helpers()  # idempotent: one wrapper
    utils.compile_helpers()
    assert made == []
    from megatron.core.datasets import helpers_cpp  # what it found instead

    assert hasattr(helpers_cpp, "build_sample_idx_int64")

    import builtins
    real_import = builtins.__import__

    def no_extension(name, *args, **kwargs):  # a source checkout without the build
        if name.endswith("helpers_cpp") or (args[2:] and "helpers_cpp" in (args[2] or ())):
            raise ImportError("no helpers_cpp")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_extension)
    with pytest.raises(SystemExit):
        utils.compile_helpers()
    assert made and made[0][0] == "make"


def test_fused_kernel_defaults_are_off_where_the_kernels_are_missing():
    """Megatron's defaults persist_layer_norm (without TE: our torch norm refuses it) and
    gradient_accumulation_fusion (without apex's extension: ColumnParallelLinear refuses it) both
    failed the model build on the GPU; they are turned off on the command line, once."""
    import importlib.util

    from megatron_dsv3.megatron_compat import transformer_engine_available
    from megatron_dsv3.pretrain import without_missing_kernels

    argv = without_missing_kernels(["--preset", "tiny"])
    assert ("--no-persist-layer-norm" in argv) is not transformer_engine_available()
    assert ("--no-gradient-accumulation-fusion" in argv) is (
        importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None)
    assert without_missing_kernels(argv) == argv  # once


def test_a_nan_stops_the_run_unless_megatrons_rerun_mode_is_asked_for_with_somewhere_to_save():
    """Megatron's default rerun mode met --lr 1e6 on the GPU by re-running the iteration, then
    exiting through a checkpoint save that failed with a bare TypeError without --save."""
    from megatron.training.arguments import parse_args

    from megatron_dsv3.pretrain import nan_stops_the_run

    argv = nan_stops_the_run(["--preset", "tiny"])
    assert argv[-2:] == ["--rerun-mode", "disabled"]
    assert nan_stops_the_run(argv) == argv  # once
    explicit = ["--rerun-mode", "validate_results", "--save", "/ckpt"]
    assert nan_stops_the_run(explicit) == explicit
    with pytest.raises(ConfigError, match="--rerun-mode validate_results without --save.*"
                                          "give --save DIR"):
        nan_stops_the_run(["--rerun-mode=validate_results"])
    # Megatron's parser takes the mode (its RuntimeError on a NaN needs a GPU to be raised)
    import sys
    saved = sys.argv
    try:
        sys.argv = ["pretrain", "--rerun-mode", "disabled"]
        assert parse_args(ignore_unknown_args=True).rerun_mode == "disabled"
    finally:
        sys.argv = saved


def test_a_resume_with_another_model_is_refused_naming_the_flags(dist_single, tmp_path,
                                                                  monkeypatch):
    """A distributed checkpoint whose saved arguments describe another model: refused before
    anything is built, each changed flag named with both values; the same model passes."""
    import argparse

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_dsv3.pretrain import check_resume_matches

    if not torch.cuda.is_available():  # Megatron's torch_dist writer assumes CUDA here
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    results_queue_by_fork()
    saved = argparse.Namespace(num_layers=3, hidden_size=128, num_experts=8, mtp_num_layers=1,
                               moe_layer_freq=[0, 1, 1], data_path=["a"])
    folder = tmp_path / "ckpt" / "iter_0000020"
    folder.mkdir(parents=True)
    dist_checkpointing.save({"args": saved, "w": ShardedTensor.from_rank_offsets(
        "w", torch.zeros(2), replica_id=0)}, str(folder))
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("20")
    same = argparse.Namespace(**{**vars(saved), "data_path": ["b"]}, load=str(tmp_path / "ckpt"))
    check_resume_matches(same)  # other data: fine
    other = argparse.Namespace(**{**vars(same), "num_experts": 16, "hidden_size": 256})
    with pytest.raises(ConfigError, match=r"iter_0000020 was saved by another model: "
                                          r"--hidden-size 256 here, 128 in the checkpoint; "
                                          r"--num-experts 16 here, 8 in the checkpoint"):
        check_resume_matches(other)
    check_resume_matches(argparse.Namespace(**{**vars(other), "load": str(tmp_path / "none")}))


def test_megatrons_setup_builds_our_model_through_the_provider(dist_single, monkeypatch):
    """Megatron 0.19's setup_model_and_optimizer builds its own GPTModel whenever the run
    configuration carries a model config (measured on the GPU: its MLA was built, not ours);
    main hands it none, and the provider it hands builds our model, called as get_model calls
    it."""
    from megatron.training import global_vars, training

    from megatron_dsv3.attention.mla import MultiLatentAttention
    from megatron_dsv3.model import DeepSeekV3Model

    megatrons = {name: getattr(training, name) for name in ("save_checkpoint",
                                                            "load_checkpoint", "evaluate")}
    try:
        seen = _main_with(monkeypatch, [])
        assert getattr(seen["cfg"], "model", None) is None
        # the digest manifest's hooks (tests/test_checkpoint_digest.py) around Megatron's own
        assert training.save_checkpoint._megatron_original is megatrons["save_checkpoint"]
        assert training.load_checkpoint._megatron_original is megatrons["load_checkpoint"]
        assert training.evaluate._megatron_original is megatrons["evaluate"]
        assert seen["cfg"].train.train_iters == 1
        model = seen["provider"](pre_process=True, post_process=True, config=None,
                                 pg_collection=dist_single)
    finally:
        global_vars.unset_global_variables()
    assert isinstance(model, DeepSeekV3Model)
    assert sum(isinstance(m, MultiLatentAttention) for m in model.modules()) == 4  # 3 + MTP
    assert not any(getattr(m, "fp8", False) for m in model.modules())


def test_megatrons_loop_compiles_as_the_job_and_evaluates_eager_under_cuda_graphs(monkeypatch):
    """--compile / --compile-mode resolve as the training job's (model.resolve_compile): our
    modules with CUDA graphs on one GPU, without graphs with any parallelism, nothing on the
    CPU; Megatron's evaluation then runs eager (the job's first evaluation under CUDA graphs
    failed on an H200) through the wrapper around Megatron's evaluate."""
    import contextlib

    from megatron.training import training

    from megatron_dsv3.megatron_compat import around_megatron_evaluate
    from megatron_dsv3.pretrain import compile_settings, eager_while_graphed

    def args(**changes):
        return argparse.Namespace(**{"compile": "auto", "compile_mode": "auto",
                                     "tensor_model_parallel_size": 1,
                                     "expert_model_parallel_size": 1,
                                     "pipeline_model_parallel_size": 1, **changes})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compile_settings(args()) == ("modules", "reduce-overhead")
    assert compile_settings(args(expert_model_parallel_size=2)) == ("modules", "default")
    assert compile_settings(args(pipeline_model_parallel_size=2)) == ("modules", "default")
    assert compile_settings(args(compile="layers", compile_mode="max-autotune")) == (
        "layers", "max-autotune")
    stances = []
    monkeypatch.setattr(torch.compiler, "set_stance", lambda stance: stances.append(stance)
                        or contextlib.nullcontext())
    monkeypatch.setattr(training, "evaluate", lambda *a, **k: stances.append("evaluated"))
    around_megatron_evaluate(lambda: eager_while_graphed(args()))
    training.evaluate("model")
    around_megatron_evaluate(lambda: eager_while_graphed(args(compile="none")))  # replaces
    training.evaluate("model")
    assert stances == ["force_eager", "evaluated", "evaluated"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compile_settings(args()) == ("none", "default")


def test_megatrons_fp8_flags_mean_deepseeks_recipe_without_te_and_others_are_refused():
    from megatron_dsv3.megatron_compat import transformer_engine_available
    from megatron_dsv3.pretrain import fp8_without_te

    if transformer_engine_available():
        pytest.skip("with TE Megatron's FP8 flags run TE's recipes")
    argv = ["--preset", "tiny", "--fp8-format", "e4m3", "--fp8-recipe=blockwise", "--bf16"]
    assert fp8_without_te(argv) == ["--preset", "tiny", "--bf16", "--dsv3-fp8", "deepseek"]
    assert fp8_without_te(["--preset", "tiny"]) == ["--preset", "tiny"]
    for bad, named in ((["--fp8-format", "hybrid", "--fp8-recipe", "blockwise"],
                        "--fp8-format hybrid --fp8-recipe blockwise"),
                       (["--fp8-format", "e4m3"], "--fp8-format e4m3 --fp8-recipe delayed")):
        with pytest.raises(ConfigError, match=f"{named} is invalid here: .* not installed"):
            fp8_without_te(bad)


# tiny with every FP8 width a multiple of 128 (hidden 128; 2 heads x (48 + 16) queries, 2 x
# (48 + 16) for the KV up-projection; q/kv LoRA 128; dense FFN 256; shared experts 128)
FP8_TINY_FLAGS = ["--num-attention-heads", "2", "--q-lora-rank", "128", "--kv-lora-rank", "128",
                  "--qk-head-dim", "48", "--qk-pos-emb-head-dim", "16", "--v-head-dim", "16",
                  "--moe-shared-expert-intermediate-size", "128", "--moe-ffn-hidden-size", "128"]


def _main_with(monkeypatch, flags):
    """pretrain.main on the tiny preset (+ `flags`) with Megatron's pretrain() replaced by a
    recorder of what main hands it; everything main installs in Megatron is restored after the
    test."""
    return pretrain_main_recorded(monkeypatch, [
        "--preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--train-iters", "1", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "255", "--transformer-impl", "local", "--use-cpu-initialization",
        *flags])


def test_fp8_in_megatrons_loop_builds_the_fp8_model_or_names_the_width(dist_single,
                                                                        monkeypatch):
    """Megatron's --fp8-format e4m3 --fp8-recipe blockwise (no TE here): the tiny preset is
    refused before anything is built, naming its 64-wide q_lora_rank; with FP8-compatible
    widths the provider Megatron calls builds the model with the precision map in FP8."""
    from megatron.training import global_vars

    from megatron_dsv3.megatron_compat import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("with TE Megatron's FP8 flags run TE's recipes")
    fp8 = ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise"]
    try:
        with pytest.raises(ConfigError, match="MLAConfig.q_lora_rank=64 is invalid: with "
                                              "fp8='deepseek'"):
            _main_with(monkeypatch, fp8)
        global_vars.unset_global_variables()
        seen = _main_with(monkeypatch, fp8 + FP8_TINY_FLAGS)
        model = seen["provider"](pre_process=True, post_process=True, config=None,
                                 pg_collection=dist_single)
    finally:
        global_vars.unset_global_variables()
    assert model.config.dsv3.fp8 == "deepseek"
    # 4 MLAs (3 layers, 1 MTP) x 3 projections, 1 dense FFN x 2, 3 shared-expert FFNs x 2,
    # 3 routed-expert modules
    assert sum(getattr(m, "fp8", False) for m in model.modules()) == 4 * 3 + 2 + 3 * 2 + 3

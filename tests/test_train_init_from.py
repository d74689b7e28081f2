"""The training job started from given weights (`python -m megatron_dsv3.train --init-from FILE`).

FILE is written as `convert hf-to-dsv3` writes it (`state_file.write_state_file`): a 2-layer
tiny model (no preset has that architecture, so the config can only come from the file) drawn
with another seed than the job's, stored in bf16 as a converted Hugging Face checkpoint is.

  what                                        how
  the model is the file's                     the job's step-1 next-token loss equals, bit for
                                              bit, the loss of the file's weights loaded with
                                              `hf.load_dsv3_state_dict` and evaluated here on
                                              the job's keyed batches; a fresh init's differs
  it trains and resumes without --init-from   2 steps saved after each; step 1 resumed in a
                                              new folder with neither --init-from nor --preset
                                              repeats step 2 bit for bit
  sharded under TP=2                          the TP=2 run's step-1 loss is the single
                                              process's within FP32_REORDER (TP splits the
                                              GEMM reductions and the vocab-parallel LSE)
  --preset of the file's architecture         accepted, its training settings used; V3's
                                              release against v3-671b: no difference
  errors                                      missing file; --preset or --num-layers of another
                                              model (naming the fields); with --resume; TP not
                                              dividing the file's widths; missing, extra and
                                              reshaped tensors; NaN weights; --resume auto
                                              over a run
"""

import json
from pathlib import Path

import pytest
import torch

from helpers.gloo import run_gloo
from helpers.tolerance import FP32_REORDER, assert_close

FLAGS = ["--seq-len", "32", "--micro-batch-size", "2", "--grad-accum", "2", "--warmup-steps",
         "1", "--eval-interval", "0", "--no-wandb"]
GRAD_ACCUM, SEQ_LEN, MICRO_BATCH, JOB_SEED = 2, 32, 2, 1234  # FLAGS' and the default seed


def _file_config():
    from megatron_dsv3.config import tiny

    return tiny().replace(name="tiny-2-layers", num_layers=2)


@pytest.fixture(scope="module")
def init_file(tmp_path_factory, dist_single) -> Path:
    """The converter's file format holding a 2-layer tiny model of seed 99, in bf16."""
    from megatron_dsv3.checkpoint.state_file import write_state_file
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model

    cfg = _file_config()
    torch.manual_seed(99)
    model = build_model(cfg, pg_collection=dist_single, megatron_config=to_megatron_config(
        cfg, use_cpu_initialization=True))
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor)}
    path = tmp_path_factory.mktemp("init") / "converted.pt"
    write_state_file(state, cfg, path, source="test")
    return path


def _main(rank, world, argv):
    from megatron_dsv3.train import main

    return main(argv)


def _job(corpus: Path, out: Path, *flags: str, processes: int = 1) -> list[dict]:
    """main() over `processes` gloo ranks; metrics.jsonl's records."""
    run_gloo(_main, processes, FLAGS + ["--data-dir", str(corpus), "--out-dir", str(out),
                                        *flags])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def started(init_file, corpus, tmp_path_factory) -> tuple[Path, list[dict]]:
    """2 steps from the file, checkpointed after each."""
    out = tmp_path_factory.mktemp("started")
    return out, _job(corpus, out, "--init-from", str(init_file), "--steps", "2",
                     "--save-interval", "1")


def _step1_lm_loss(model, corpus_dir: Path) -> float:
    """The mean next-token CE of the job's step-1 micro-batches under `model`, summed in the
    job's order (step.py: the per-micro-batch losses added, then divided)."""
    from megatron_dsv3.data import get_batch, load_corpus
    from megatron_dsv3.moe.balance import set_balance_loss_scale
    from megatron_dsv3.mtp import weighted_lm_loss

    _, corpus = load_corpus(corpus_dir, val_fraction=0.05)
    set_balance_loss_scale(model, 1.0 / GRAD_ACCUM)
    total = 0
    with torch.no_grad():
        for micro in range(GRAD_ACCUM):
            ids, labels = get_batch(corpus.train, batch_size=MICRO_BATCH, seq_len=SEQ_LEN,
                                    seed=JOB_SEED, step=0, micro_batch=micro, rank=0)
            _, lm, _, _ = weighted_lm_loss(model(ids, None, None, labels=labels), 0.3)
            total = total + lm
    return (total / GRAD_ACCUM).item()


def test_job_starts_from_the_files_weights_and_resumes_without_init_from(
        init_file, started, corpus, dist_single, tmp_path):
    from megatron_dsv3.checkpoint.hf import load_dsv3_state_dict
    from megatron_dsv3.checkpoint.state_file import read_state_file
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.train.build import build_initial_model

    out, records = started
    cfg = _file_config()
    direct = build_model(cfg, pg_collection=dist_single, megatron_config=to_megatron_config(
        cfg, use_cpu_initialization=True))
    load_dsv3_state_dict(direct, read_state_file(init_file)[0])
    assert records[0]["lm_loss"] == _step1_lm_loss(direct, corpus)
    fresh = build_initial_model(cfg, dist_single, JOB_SEED, torch.device("cpu"))
    assert abs(records[0]["lm_loss"] - _step1_lm_loss(fresh, corpus)) > 1e-3

    saved = json.loads((out / "checkpoints" / "step_1" / "meta.json").read_text())
    assert saved["model_config"]["name"] == cfg.name
    assert saved["model_config"]["num_layers"] == 2 and saved["step"] == 1
    resumed = _job(corpus, tmp_path / "resumed", "--resume", str(out / "checkpoints" / "step_1"),
                   "--steps", "2")
    assert [r["step"] for r in resumed] == [1, 2]  # step 1's record carried over
    assert resumed[1]["loss"] == records[1]["loss"]
    assert resumed[1]["grad_norm"] == records[1]["grad_norm"]


def test_tensor_parallel_job_starts_from_the_same_weights(init_file, started, corpus, tmp_path):
    out, records = started
    tp2 = _job(corpus, tmp_path / "tp2", "--init-from", str(init_file), "--steps", "1",
               "--save-interval", "0", "--tensor-parallel-size", "2", processes=2)
    assert_close(torch.tensor(tp2[0]["lm_loss"]), torch.tensor(records[0]["lm_loss"]),
                 FP32_REORDER, "TP=2 splits GEMM reductions and the vocab-parallel log-sum-exp",
                 "TP=2 step-1 lm_loss")


@pytest.mark.parametrize("flags, world, expected", [
    (["--init-from", "{missing}"], 1, ["--init-from {missing} does not exist", "hf-to-dsv3"]),
    (["--init-from", "{file}", "--preset", "tiny"], 1,
     ["--preset tiny is not the model of --init-from {file}", "num_layers: 3 and 2",
      "Leave --preset out"]),
    (["--init-from", "{file}", "--num-layers", "3"], 1,
     ["--num-layers 3 differs from --init-from {file}", "leave --num-layers out"]),
    (["--init-from", "{file}", "--resume", "{missing}"], 1,
     ["--init-from {file} and --resume {missing} exclude each other", "Drop --init-from"]),
    (["--init-from", "{file}", "--tensor-parallel-size", "3"], 3,
     ["--tensor-parallel-size 3 is invalid: must divide the --init-from model's "
      "mla.num_heads=4"]),
])
def test_bad_init_from_arguments_name_the_flags_and_the_fix(flags, world, expected, init_file,
                                                          tmp_path, capsys, monkeypatch):
    from megatron_dsv3.train.args import parse_args

    names = {"file": init_file, "missing": tmp_path / "nothing.pt"}
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag.format(**names) for flag in flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for part in expected:
        assert part.format(**names) in err, err


def test_a_preset_of_the_files_architecture_gives_its_training_settings(init_file,
                                                                         monkeypatch):
    """--preset naming the file's architecture is accepted and brings the training settings a
    converted config.json lacks: V3's release converts to v3-671b's architecture with
    ModelConfig's defaults there (test_hf_files), which must not count as a difference."""
    from megatron_dsv3.config import preset
    from megatron_dsv3.train.args import architecture_differences, parse_args

    v3 = preset("v3-671b")
    released = v3.replace(name="hf", params_dtype="bfloat16", init_std=0.02,
                          moe__seq_aux_loss_coeff=0.0, moe__bias_update_rate=1e-3,
                          moe__bias_update_stop_tokens=None)
    assert architecture_differences(v3, released) == []
    assert architecture_differences(v3, released.replace(moe__top_k=6)) == ["moe.top_k: 8 and 6"]
    monkeypatch.setenv("WORLD_SIZE", "1")
    args, cfg = parse_args(["--init-from", str(init_file), "--preset", "tiny", "--num-layers",
                            "2"])
    assert cfg == preset("tiny").replace(num_layers=2) and args.preset == "tiny"
    args, cfg = parse_args(["--init-from", str(init_file)])
    assert cfg.name == "tiny-2-layers" and args.preset is None


def test_init_from_a_file_of_another_model_names_the_tensors(init_file, dist_single, tmp_path,
                                                             monkeypatch):
    """Missing, extra and reshaped tensors named before anything is loaded; NaN weights and an
    invalid model_config named too."""
    from megatron_dsv3.checkpoint.state_file import read_state_file, write_state_file
    from megatron_dsv3.train.args import TrainError, parse_args
    from megatron_dsv3.train.build import build_initial_model
    from megatron_dsv3.train.job import init_weights

    state, _ = read_state_file(init_file)
    cfg = _file_config()
    norm, router = "decoder.final_layernorm.weight", "decoder.layers.1.mlp.router.weight"
    assert norm in state and router in state
    broken = {k: v for k, v in state.items() if k != norm}
    broken["decoder.layers.9.extra"] = torch.zeros(1)
    broken[router] = state[router][:4]
    with pytest.raises(TrainError) as err:
        build_initial_model(cfg, dist_single, 0, torch.device("cpu"), broken, "--init-from F")
    message = str(err.value)
    for part in (f"missing tensors: {norm}", "tensors the model does not have: "
                 "decoder.layers.9.extra", f"{router} is (4, 128) in the file, (8, 128) in the "
                 "model", "--init-from F does not fit", "hf-to-dsv3"):
        assert part in message, message

    monkeypatch.setenv("WORLD_SIZE", "1")
    nan_file = tmp_path / "nan.pt"
    write_state_file({**state, norm: torch.full_like(state[norm], float("nan"))}, cfg, nan_file,
                     "test")
    with pytest.raises(TrainError, match=f"--init-from {nan_file}: model.{norm} holds NaN"):
        init_weights(parse_args(["--init-from", str(nan_file)])[0])

    invalid = torch.load(init_file, weights_only=False)
    invalid["model_config"]["moe"]["top_k"] = 9
    torch.save(invalid, tmp_path / "invalid.pt")
    with pytest.raises(SystemExit):
        parse_args(["--init-from", str(tmp_path / "invalid.pt")])


def test_init_from_with_resume_auto_over_a_run_is_refused(init_file, started, dist_single,
                                                         monkeypatch):
    """--resume auto with --init-from starts from the file in an empty --out-dir (the job
    above), but over a run it would be ambiguous: an error naming both flags."""
    from megatron_dsv3.train.args import TrainError, parse_args
    from megatron_dsv3.train.checkpoint import checkpoint_to_resume

    out, _ = started
    monkeypatch.setenv("WORLD_SIZE", "1")
    args, cfg = parse_args(FLAGS + ["--init-from", str(init_file), "--resume", "auto",
                                    "--out-dir", str(out)])
    with pytest.raises(TrainError, match="--init-from .* and --resume auto: --out-dir .* holds "
                                         "a run to resume .* Drop --init-from"):
        checkpoint_to_resume(args, cfg, out)

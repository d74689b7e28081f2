"""The GPU benchmark scripts of issue 3, run end to end on gloo processes (tiny preset):

  benchmarks/pipeline_schedules.py   DualPipeV / DualPipe timed and traced; Megatron's 1F1B and
                                     interleaved 1F1B skipped on CPU (they need CUDA), their
                                     stage models checked through Megatron's step functions (2
                                     ranks); and once more at PP=2 x EP=2 (4 ranks) with
                                     Megatron's CUDA calls pointed at the CPU, so that every
                                     schedule runs through the script's GPU code path
  benchmarks/pipeline_ep_overlap.py  EP=2 MoE F&B step, overlapped and sequential, every piece
                                     stamped; the hidden fraction of the all-to-all

Both scripts' `main(argv)` run on `run_gloo`'s ranks, with the environment torchrun would give
them (a fresh process each, forked from one that has imported torch and Megatron: ~6 s of
imports saved per process); tests/test_launch_slurm.py starts the job under torchrun itself.

What is asserted is what the CPU can say: the JSON has its keys, every loss equals the
schedule-free loss bit for bit (same fp32 operations on the same data: test_pipeline_model
shows the stages compute exactly what the whole model computes), the overlapped and sequential
EP steps agree bit for bit (test_moe_overlap: the pieces run the layers' own operations), the
fractions lie in [0, 1], the trace files exist. Timings on two shared cores mean nothing and are
only checked to be positive. The hidden-fraction arithmetic itself is checked on a made-up step.
Measured: the whole file ~38 s on 2 cores run alone, ~15 s of it starting run_gloo's fork
server (once per pytest run).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from helpers.gloo import run_gloo

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parents[1]


def _load(script: str):
    spec = importlib.util.spec_from_file_location(script, REPO / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[script] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _script_main(rank: int, world: int, script: str, argv: list[str],
                 megatron_schedules_on_cpu: bool = False) -> None:
    """A benchmark script's main on a run_gloo rank (RANK, WORLD_SIZE, MASTER_* set)."""
    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # torchrun's: the scripts share the cores by it
    module = _load(script)
    if megatron_schedules_on_cpu:
        _point_megatrons_cuda_calls_at_the_cpu()
        module.main(argv, megatron_on_cpu=True)
    else:
        module.main(argv)


def _point_megatrons_cuda_calls_at_the_cpu() -> None:
    """Megatron-Core's schedules on CPU, in this rank's process only: its three CUDA calls
    pointed at the CPU (NOTES: the schedules allocate torch.zeros(device="cuda") and p2p buffers
    on torch.cuda.current_device(); batched p2p calls torch.cuda.synchronize), so that the
    script's GPU code path runs here."""
    import torch

    zeros = torch.zeros

    def zeros_on_cpu(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return zeros(*args, **kwargs)

    torch.zeros = zeros_on_cpu
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None


# ----------------------------------------------------------------------------------------------
# pipeline_schedules.py
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def schedules_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("schedules")
    run_gloo(_script_main, 2, "pipeline_schedules",
             ["--preset", "tiny", "--layers", "4", "--device", "cpu", "--seq-len", "32",
              "--microbatches", "4,5", "--steps", "1", "--warmup", "1", "--optimizer",
              "--trace-dir", str(out / "traces"), "--json-out", str(out / "result.json")],
             timeout_s=300)
    return json.loads((out / "result.json").read_text()), out


def _run(result: dict, schedule: str, num_microbatches: int) -> dict:
    (run,) = [r for r in result["runs"]
              if r["schedule"] == schedule and r["microbatches"] == num_microbatches]
    return run


def test_schedules_json_names_the_setup_and_every_schedule_and_micro_batch_count(schedules_run):
    result, _ = schedules_run
    assert (result["pp"], result["preset"], result["layers"], result["microbatches"]) == \
        (2, "tiny", 4, [4, 5])
    pairs = {(r["schedule"], r["microbatches"]) for r in result["runs"]}
    assert pairs == {(s, m) for s in ("1f1b", "interleaved", "dualpipev", "dualpipe")
                     for m in (4, 5)}


def test_dualpipe_losses_equal_the_schedule_free_loss_bit_for_bit(schedules_run):
    result, _ = schedules_run
    for schedule, m in (("dualpipev", 4), ("dualpipev", 5), ("dualpipe", 4)):
        run = _run(result, schedule, m)
        assert run["status"] == "ok", run
        assert run["loss"] == run["reference_loss"] and run["loss_equals_reference"], run
        assert run["tok_per_s"] > 0 and run["step_s"] > 0 and len(run["peak_gib"]) == 2


def test_impossible_settings_are_skipped_with_the_reason(schedules_run):
    result, _ = schedules_run
    assert "even num_microbatches" in _run(result, "dualpipe", 5)["reason"]
    assert "multiple of 2" in _run(result, "interleaved", 5)["reason"]


def test_megatron_schedules_say_they_need_cuda_and_their_stage_models_give_the_same_loss(
        schedules_run):
    result, _ = schedules_run
    for schedule in ("1f1b", "interleaved"):
        run = _run(result, schedule, 4)
        assert run["status"] == "skipped" and "need CUDA" in run["reason"], run
        check = run["cpu_stage_check"]
        assert check["loss"] == check["reference_loss"] == _run(result, "dualpipev", 4)["loss"]
        assert check["params_with_grad"] == check["params"] > 0, check


def test_dualpipe_traces_report_the_bubble_next_to_the_paper_formula(schedules_run):
    result, out = schedules_run
    for schedule in ("dualpipev", "dualpipe"):
        bubble = _run(result, schedule, 4)["bubble"]
        times = bubble["chunk_times"]
        assert times["F"] > 0 and times["B"] > 0 and times["W"] >= 0, times
        assert all(0 <= f < 1 for f in bubble["bubble_fraction"]) and len(bubble["idle_s"]) == 2
        folder = out / "traces" / f"{schedule}_m4"
        for name in ("trace_rank0.json", "trace_rank1.json", "summary.json", "timeline.png"):
            assert (folder / name).stat().st_size > 0, folder / name
    dualpipev = _run(result, "dualpipev", 4)["bubble"]
    assert dualpipev["paper_bubble_s"] > 0 and dualpipev["mean_idle_over_paper"] > 0
    # DualPipe on 2 ranks: (PP/2 - 1) = 0, no ratio to report
    assert _run(result, "dualpipe", 4)["bubble"]["paper_bubble_s"] == 0.0
    assert _run(result, "dualpipe", 4)["bubble"]["within_10pct_of_paper"] is None


# extended (13 s): the schedules' losses at PP=2 x EP=2 are the default run's
# test_pipeline_parallel_compose and test_dualpipe; this is the benchmark script's own path
@pytest.mark.extended
def test_pp2_x_ep2_every_schedule_through_the_gpu_code_path_gives_each_pipeline_its_reference_loss(
        tmp_path):
    """Issue 4's EP=2 x PP=2 run on 4 gloo ranks with Megatron's CUDA calls pointed at the CPU:
    the part of pipeline_schedules.py that first runs on the GPUs. Two pipelines, each on its
    own micro-batches, experts sharded over the ranks of a stage; Megatron's own
    forward_backward_func (1F1B, interleaved) over our model_provider chunks with Megatron-LM's
    p2p settings, and DualPipe(V) with and without the MoE pieces, timed with the optimizer.
    Every schedule's first loss equals the schedule-free loss of each pipeline bit for bit; the
    DualPipe(V) rows with the MoE pieces stamp every row all-to-all: 4 per MoE layer and
    micro-batch on each rank, some of them inside F&B interleavings. Tiny, 4 layers, layer 0
    dense: DualPipeV's pipeline rank 0 holds layers 0 and 3 (1 MoE layer x 4 micro-batches),
    rank 1 layers 1 and 2 (2 x 4); DualPipe's ranks each hold layers 0-1 for one half of the
    micro-batches and 2-3 for the other (1 x 2 + 2 x 2)."""
    run_gloo(_script_main, 4, "pipeline_schedules",
             ["--expert-parallel-size", "2", "--moe-overlap", "both", "--preset", "tiny",
              "--layers", "4", "--device", "cpu", "--seq-len", "32", "--microbatches", "4",
              "--steps", "1", "--warmup", "1", "--optimizer",
              "--json-out", str(tmp_path / "result.json")], True, timeout_s=300)
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["pp"], result["ep"], result["complete"]) == (2, 2, True)
    rows = {(r["schedule"], r.get("moe_overlap")): r for r in result["runs"]}
    assert set(rows) == {("1f1b", None), ("interleaved", None), ("dualpipev", True),
                         ("dualpipev", False), ("dualpipe", True), ("dualpipe", False)}
    for key, run in rows.items():
        assert run["status"] == "ok", (key, run)
        assert run["loss"] == run["reference_loss"], (key, run)
        assert run["loss_equals_reference_every_pipeline"], (key, run)
        assert run["tok_per_s"] > 0 and len(run["peak_gib"]) == 4
        assert ("all_to_all" in run) == (key[1] is True), key
    for schedule, vpp in (("1f1b", None), ("interleaved", 2)):
        config = rows[schedule, None]["megatron_config"]
        assert config["vpp"] == vpp and config["deallocate_pipeline_outputs"], config
    assert rows["1f1b", None]["ratio_vs_1f1b"] == 1.0
    assert rows["interleaved", None]["ratio_vs_1f1b"] > 0
    for schedule in ("dualpipev", "dualpipe"):
        report = rows[schedule, True]["all_to_all"]
        assert len(report["per_rank"]) == 4
        for rank in report["per_rank"]:
            # global ranks 0, 1: pipeline rank 0 (rank = EP rank + 2 x pipeline rank)
            layer_microbatches = (1 * 2 + 2 * 2 if schedule == "dualpipe"
                                  else 1 * 4 if rank["rank"] < 2 else 2 * 4)
            steady, every = rank["steady"], rank["all"]
            assert every["exchanges"] == 4 * layer_microbatches, (schedule, rank)
            assert 0 < steady["exchanges"] < every["exchanges"], (schedule, rank)
            assert 0 < steady["comm_s"] <= every["comm_s"], (schedule, rank)
            for numbers in (steady, every):
                assert 0.0 <= numbers["hidden_fraction_strict"] <= numbers["hidden_fraction"] <= 1
        assert report["hidden_fraction_steady"] == min(
            r["steady"]["hidden_fraction"] for r in report["per_rank"])


def test_schedules_refuses_a_pipeline_size_other_than_the_world(tmp_path):
    module = _load("pipeline_schedules")
    args = module.parse_args(["--pp", "4"])
    with pytest.raises(SystemExit, match="--pp 4 is invalid: .* all 2 processes"):
        module.resolve(args, world=2)
    args = module.parse_args(["--preset", "proxy"])
    assert module.resolve(args, world=4) == ["1f1b", "interleaved", "dualpipev", "dualpipe"]
    assert (args.layers, args.microbatches, args.seq_len) == (16, [16], 4096)
    args = module.parse_args(["--preset", "proxy"])
    assert module.resolve(args, world=3) == ["1f1b", "interleaved", "dualpipev"]  # odd PP
    assert args.layers == 12
    with pytest.raises(SystemExit, match="--schedule 1f1b,zb is invalid: \\['zb'\\] unknown"):
        module.resolve(module.parse_args(["--schedule", "1f1b,zb"]), world=2)
    args = module.parse_args(["--preset", "proxy", "--expert-parallel-size", "2"])
    module.resolve(args, world=4)
    assert (args.pp, args.layers, args.microbatches) == (2, 8, [8])
    with pytest.raises(SystemExit, match="--expert-parallel-size 3 is invalid: it must divide"):
        module.resolve(module.parse_args(["--ep", "3"]), world=4)
    with pytest.raises(SystemExit, match="--pp 4 is invalid: .* EP=2 pipelines .* --pp 2"):
        module.resolve(module.parse_args(["--ep", "2", "--pp", "4"]), world=4)
    with pytest.raises(SystemExit, match="needs at least 2 processes: .* --nproc-per-node 4"):
        module.resolve(module.parse_args(["--ep", "2"]), world=2)


# ----------------------------------------------------------------------------------------------
# pipeline_ep_overlap.py
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    run_gloo(_script_main, 2, "pipeline_ep_overlap",
             ["--preset", "tiny", "--device", "cpu", "--seq-len", "32", "--moe-layers", "2",
              "--steps", "2", "--warmup", "1", "--trace-dir", str(out), "--count-group",
              "separate", "--defer-wgrad", "--json-out", str(out / "result.json")],
             timeout_s=180)
    return json.loads((out / "result.json").read_text()), out


def test_ep_overlap_reports_fractions_in_0_1_for_both_passes_on_every_rank(ep_run):
    result, out = ep_run
    assert (result["ep"], result["moe_layers"], result["numbers_meaningful"]) == (2, 2, False)
    for key in ("hidden_fraction", "hidden_fraction_strict", "sequential_hidden_fraction"):
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    assert result["speedup_vs_sequential"] > 0
    assert len(result["per_rank"]) == 2
    for rank in result["per_rank"]:
        for mode in ("overlapped", "sequential"):
            numbers = rank[mode]
            assert 0.0 <= numbers["hidden_fraction_strict"] <= numbers["hidden_fraction"] <= 1.0
            assert numbers["exchanges_per_step"] == 4 * 2, numbers  # 4 per MoE layer
            assert numbers["comm_s"] > 0 and numbers["bytes_per_step"] > 0
            assert len(numbers["step_times"]) == 2
    assert (out / "timeline.png").stat().st_size > 0
    assert len(json.loads((out / "pieces.json").read_text())) == 2


def test_ep_overlapped_and_sequential_steps_agree_bit_for_bit(ep_run):
    """Also the two variants: the counts over a duplicate group, and B's weight gradients
    deferred and run after each of its segments (same arithmetic, another order)."""
    result, _ = ep_run
    assert result["max_abs_diff"] == {"outputs": 0.0, "input_grads": 0.0, "param_grads": 0.0}
    for variant in ("count_group", "defer_wgrad"):
        assert result[variant]["max_abs_diff_vs_sequential"] == {"outputs": 0.0,
                                                                 "param_grads": 0.0}, variant
        assert 0.0 <= result[variant]["hidden_fraction"] <= 1.0


def test_hidden_fraction_counts_only_the_time_compute_waited():
    """A made-up step: exchange A in flight [0, 4], waited for from 3 (1 exposed); B [5, 6],
    waited for at once (1 exposed): C = 5, X = 2, hidden 0.6. A plan waiting for its counts over
    [1, 2] while A is in flight queues behind it: strict X = 3, hidden 0.4."""
    from megatron_dsv3.profiling import comm_timing as module  # the arithmetic both scripts use

    exchanges = [{"name": "F0.dispatch", "bytes": 8, "issue": 0.0, "completion": 4.0,
                  "wait": 3.0, "resumed": 4.0, "paired": True},
                 {"name": "F0.combine", "bytes": 8, "issue": 5.0, "completion": 6.0,
                  "wait": 5.0, "resumed": 6.0, "paired": False}]
    pieces = [("B1.mlp.run", 0.0, 1.0), ("F0.plan.wait", 1.0, 2.0), ("F0.plan.run", 2.0, 3.0),
              ("F0.dispatch.wait", 3.0, 4.0), ("F0.mlp.run", 4.0, 5.0),
              ("F0.combine.wait", 5.0, 6.0)]
    numbers = module.step_numbers(module.StepRecord(6.0, pieces, exchanges))
    assert (numbers["comm_s"], numbers["exposed_s"], numbers["exposed_strict_s"]) == (5, 2, 3)
    summary = module.summarize([numbers])
    assert summary["hidden_fraction"] == pytest.approx(0.6)
    assert summary["hidden_fraction_strict"] == pytest.approx(0.4)
    assert summary["pieces_s_per_step"]["F.dispatch.wait"] == 1.0
    # only the exchange issued inside an F&B interleaving (A): C = 4, X = 1, strict X = 2
    paired = module.step_numbers(module.StepRecord(6.0, pieces, exchanges), paired_only=True)
    assert (paired["comm_s"], paired["exposed_s"], paired["exposed_strict_s"]) == (4, 1, 2)
    assert paired["exchanges"] == 1

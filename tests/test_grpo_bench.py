"""benchmarks/bench_grpo.py end to end on CPU at tiny size (a logic check: its timings on two
shared cores mean nothing). What can fail: our trainer and TRL's GRPOTrainer both complete
steps on the same weights and generate the asked number of tokens, and the PPO layout holds
at least one more model's parameters than GRPO's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from helpers.gloo import run_gloo

pytestmark = [pytest.mark.multiprocess, pytest.mark.extended]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_grpo.py"


def _bench(rank, world, argv):
    spec = importlib.util.spec_from_file_location("bench_grpo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_bench_grpo_runs_ours_trl_and_the_ppo_layout():
    results = run_gloo(_bench, 1, ["--device", "cpu", "--preset", "tiny", "--num-layers", "2",
                                   "--prompts", "2", "--group-size", "2",
                                   "--max-new-tokens", "4", "--steps", "1", "--warmup", "1",
                                   "--dtype", "float32"],
                       timeout_s=300)[0]
    ours, trl, ppo = results["ours"], results["trl"], results["ppo"]
    assert results["skipped"] == [] and results["complete"]
    assert ours["step_s"] > 0 and ours["rollout_tokens_per_s"] > 0 and ours["update_s"] > 0
    assert trl["step_s"] > 0 and trl["rollout_tokens_per_s"] > 0 and trl["update_s"] > 0
    # both generate exactly --max-new-tokens per completion
    assert all(row["new_tokens"] == 2 * 2 * 4 for row in ours["steps"] + trl["steps"])
    # tiny at 2 layers: ~1.3M parameters; the critic adds its own copy (4 bytes each in
    # float32) and its AdamW state on top of the policy, its AdamW state and the reference
    critic_bytes = 1.0e6 * 4
    assert (ppo["ppo_state_gib"] - ppo["grpo_state_gib"]) * 2**30 > critic_bytes

"""benchmarks/fp8_convergence.py's arithmetic (its runs are the GPU's): the last-window mean
losses and their relative distance against DeepSeek's 0.25%, tokens/s as the median of the
steps after the first two (compilation and CUDA-graph recording), refusal of runs of unequal
length."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fp8_convergence.py"


def _module():
    spec = importlib.util.spec_from_file_location("fp8_convergence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(losses, tokens_per_s):
    return [{"step": i + 1, "loss": loss, "tokens_per_s": rate}
            for i, (loss, rate) in enumerate(zip(losses, tokens_per_s))]


def test_the_summary_compares_the_last_window_and_times_steady_steps():
    module = _module()
    bf16 = _records([9.0, 5.0, 4.0, 4.0], [1.0, 50.0, 100.0, 102.0])
    fp8 = _records([9.0, 5.1, 4.0, 4.02], [0.5, 40.0, 130.0, 134.0])
    summary = module.summarize(bf16, fp8, window=2)
    assert summary["bf16_loss"] == 4.0 and summary["fp8_loss"] == pytest.approx(4.01)
    assert summary["fp8_relative_to_bf16"] == pytest.approx(0.0025)
    assert summary["within_0_25_percent"] is (abs(summary["fp8_relative_to_bf16"]) <= 0.0025)
    assert summary["bf16_tokens_per_s"] == 101.0 and summary["fp8_tokens_per_s"] == 132.0
    assert summary["fp8_speedup"] == pytest.approx(132.0 / 101.0)
    far = module.summarize(bf16, _records([9, 5, 4.0, 4.1], [1, 1, 1, 1]), window=2)
    assert not far["within_0_25_percent"] and far["fp8_relative_to_bf16"] > 0.01
    with pytest.raises(ValueError, match="3 FP8 steps; both need the same number"):
        module.summarize(bf16, fp8[:3], window=2)


def test_the_noise_run_is_reported_against_the_first_bf16_run():
    module = _module()
    bf16 = _records([9.0, 5.0, 4.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    summary = module.summarize(bf16, bf16, window=2)
    noisy = module.add_noise_run(summary, _records([9.0, 5.0, 4.1, 4.1], [1.0] * 4), 7, 2)
    assert noisy["noise_seed"] == 7 and noisy["bf16_other_seed_loss"] == pytest.approx(4.1)
    assert noisy["bf16_other_seed_relative"] == pytest.approx(0.025)
    assert noisy["fp8_relative_to_bf16"] == summary["fp8_relative_to_bf16"] == 0.0


"""Expert-bias update over data-parallel ranks (`moe/balance.py`), against one process.

Two gloo ranks hold different local loads. After `update_expert_biases` over their group, both
must hold the same biases, equal to a single-process update with the summed loads; biases are
fp32 and both sides run the same ops on the same numbers, so the comparison is exact.
One `run_gloo` call (process start-up is the cost) runs three steps on both ranks:
  step 1  rate 0.125, tokens_seen < stop_tokens       the biases move
  step 2  tokens_seen == stop_tokens                   nothing moves, counters still reset
  step 3  rate 0                                       nothing moves
"""

import pytest
import torch

from megatron_dsv3.config import MoEConfig
from megatron_dsv3.moe.balance import ExpertLoads, update_expert_biases
from megatron_dsv3.moe.router import Router
from helpers.gloo import run_gloo
from helpers.tolerance import assert_equal

RATE = 0.125          # a power of two: bias updates are exact in fp32
STOP_TOKENS = 1000
INITIAL_BIAS = [[0.25, -0.5, 0.0, 0.125], [0.0, 0.0, 0.0, 0.0]]
# LOCAL_LOADS[rank][layer]: the per-rank loads disagree on which experts are overloaded.
LOCAL_LOADS = [
    [[5, 0, 2, 1], [4, 2, 0, 2]],   # rank 0: layer 0 mean 2 -> signs [-1, +1, 0, +1]
    [[0, 4, 2, 2], [2, 0, 2, 0]],   # rank 1: layer 0 mean 2 -> signs [+1, -1, 0, 0]
]
# Summed: layer 0 [5, 4, 4, 3] (mean 4) -> signs [-1, 0, 0, +1];
#         layer 1 [6, 2, 2, 2] (mean 3) -> signs [-1, +1, +1, +1].
SUMMED_LOADS = [[5, 4, 4, 3], [6, 2, 2, 2]]
EXPECTED_BIAS = [[0.125, -0.5, 0.0, 0.25], [-0.125, 0.125, 0.125, 0.125]]


class TwoRouters(torch.nn.Module):
    """Two MoE layers' routers, which is all the bias update looks at."""

    def __init__(self):
        super().__init__()
        cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_size=8, num_shared_experts=0,
                        first_k_dense=0, dense_ffn_size=0)
        self.layers = torch.nn.ModuleList(
            Router(8, cfg, dtype=torch.float32) for _ in range(2))

    def set_loads(self, loads):
        for router, load in zip(self.layers, loads):
            router.tokens_per_expert.copy_(torch.tensor(load))

    def biases(self) -> torch.Tensor:
        return torch.stack([router.expert_bias.clone() for router in self.layers])

    def counters(self) -> torch.Tensor:
        return torch.stack([router.tokens_per_expert.clone() for router in self.layers])


def make_model() -> TwoRouters:
    model = TwoRouters()
    for router, bias in zip(model.layers, INITIAL_BIAS):
        router.expert_bias.copy_(torch.tensor(bias))
    return model


def three_steps(model: TwoRouters, loads, group) -> dict:
    """Steps 1-3 of the module docstring; what each left behind."""
    out = {}
    model.set_loads(loads)
    step1 = update_expert_biases(model, group=group, tokens_seen=STOP_TOKENS - 1, rate=RATE,
                                 stop_tokens=STOP_TOKENS)
    out["step1"] = (step1, model.biases(), model.counters())
    model.set_loads(loads)
    step2 = update_expert_biases(model, group=group, tokens_seen=STOP_TOKENS, rate=RATE,
                                 stop_tokens=STOP_TOKENS)
    out["step2"] = (step2, model.biases(), model.counters())
    model.set_loads(loads)
    step3 = update_expert_biases(model, group=group, tokens_seen=0, rate=0.0)
    out["step3"] = (step3, model.biases(), model.counters())
    return out


def _two_rank_worker(rank: int, world_size: int) -> dict:
    from megatron_dsv3.parallel import init_distributed

    pg_collection = init_distributed(tensor_parallel_size=1)
    assert pg_collection.dp.size() == world_size, f"{pg_collection.dp.size()=}, {world_size=}"
    return three_steps(make_model(), LOCAL_LOADS[rank], pg_collection.dp)


@pytest.fixture(scope="module")
def two_rank_results():
    return run_gloo(_two_rank_worker, 2)


@pytest.fixture(scope="module")
def single_process_results():
    return three_steps(make_model(), SUMMED_LOADS, group=None)


@pytest.mark.multiprocess
def test_two_ranks_get_identical_biases_equal_to_single_process_on_summed_loads(
        two_rank_results, single_process_results):
    _, single_bias, _ = single_process_results["step1"]
    assert_equal(single_bias, torch.tensor(EXPECTED_BIAS), "single-process biases")
    for rank, results in enumerate(two_rank_results):
        loads, bias, _ = results["step1"]
        assert_equal(bias, single_bias, f"rank {rank} biases")
        assert_equal(loads.loads, torch.tensor(SUMMED_LOADS), f"rank {rank} summed loads")
        assert loads.updated and loads.names == ["layers.0", "layers.1"], f"{loads=}"


@pytest.mark.multiprocess
def test_update_resets_counters_on_every_rank(two_rank_results):
    for rank, results in enumerate(two_rank_results):
        for step in ("step1", "step2", "step3"):
            _, _, counters = results[step]
            assert_equal(counters, torch.zeros(2, 4, dtype=torch.int64), f"rank {rank} {step}")


@pytest.mark.multiprocess
def test_no_update_at_stop_tokens_or_with_zero_rate(two_rank_results):
    for rank, results in enumerate(two_rank_results):
        _, bias_after_step1, _ = results["step1"]
        for step in ("step2", "step3"):
            loads, bias, _ = results[step]
            assert not loads.updated, f"rank {rank} {step}: {loads.updated=}"
            assert_equal(bias, bias_after_step1, f"rank {rank} {step} biases")
            # The loads are still summed and reported when the biases stay put.
            assert_equal(loads.loads, torch.tensor(SUMMED_LOADS), f"rank {rank} {step} loads")


def test_zero_rate_never_moves_biases_over_many_steps():
    model = make_model()
    for step in range(5):
        model.set_loads([[100 * step, 0, 1, 2], [0, 7, 7, 0]])
        loads = update_expert_biases(model, tokens_seen=step, rate=0.0, stop_tokens=None)
        assert not loads.updated
    assert_equal(model.biases(), torch.tensor(INITIAL_BIAS), "biases after 5 zero-rate steps")


def test_imbalance_is_max_over_mean_load_per_layer():
    loads = ExpertLoads(["a", "b", "c"], torch.tensor([[5, 4, 4, 3],     # 5 / 4
                                                        [6, 2, 2, 2],     # 6 / 3
                                                        [3, 3, 3, 3]]),   # balanced
                        updated=True)
    # Small integers: max / mean is exact in fp32.
    assert_equal(loads.imbalance(), torch.tensor([1.25, 2.0, 1.0]), "imbalance")


def test_megatrons_own_update_moves_our_biases_by_the_same_rule(dist_single):
    """Megatron's training loop updates the biases itself (finalize_model_grads: every module
    with `expert_bias` and `local_tokens_per_expert`, then reset_model_temporary_tensors): on
    our routers it gives exactly our update of the same loads, zeroes the counters, and leaves
    a router with `frozen_expert_bias` alone."""
    from types import SimpleNamespace

    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias, reset_model_temporary_tensors)

    config = SimpleNamespace(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=RATE,
                             moe_router_load_balancing_type="seq_aux_loss")
    model = make_model()
    model.set_loads(SUMMED_LOADS)
    _update_router_expert_bias([model], config, tp_dp_cp_group=dist_single.dp)
    reset_model_temporary_tensors(config, [model])
    assert_equal(model.biases(), torch.tensor(EXPECTED_BIAS), "Megatron's update")
    assert not model.counters().any()

    frozen = make_model()
    frozen.layers[1].frozen_expert_bias = True
    frozen.set_loads(SUMMED_LOADS)
    _update_router_expert_bias([frozen], config, tp_dp_cp_group=dist_single.dp)
    assert_equal(frozen.biases()[0], torch.tensor(EXPECTED_BIAS[0]), "layer 0 moves")
    assert_equal(frozen.biases()[1], torch.tensor(INITIAL_BIAS[1]), "frozen layer 1 stays")

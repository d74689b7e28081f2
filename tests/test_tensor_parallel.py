"""Tensor parallelism (gloo, 2 processes) against a single process with the same weights.

The full model is built once at TP=1; each TP rank loads its slice of the same weights
(`parallel.shard_state_dict`, driven by Megatron's partition metadata). Logits, losses and every
parameter's gradient (re-assembled with `gather_state_dict`) must match the TP=1 run.

Tolerance: FP32_REORDER. TP splits each GEMM's reduction (row-parallel layers sum two partial
products with an all-reduce) and the vocab-parallel cross-entropy's log-sum-exp, so the fp32
summation order differs from TP=1; nothing else changes.
"""

import pytest
import torch

from helpers.gloo import run_gloo
from helpers.tolerance import FP32_REORDER, assert_close

pytestmark = pytest.mark.multiprocess


def _config():
    from megatron_dsv3.config import tiny

    # seq_aux_loss on, biases non-zero below: the TP path of every router feature is covered.
    return tiny().replace(num_layers=2, moe__first_k_dense=1, moe__seq_aux_loss_coeff=1e-2)


def _full_weights(rank, world):
    from megatron_dsv3.model import build_model
    from megatron_dsv3.parallel import init_distributed

    pg = init_distributed(tensor_parallel_size=1)
    torch.manual_seed(0)
    model = build_model(_config(), pg_collection=pg)
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for name in state:
        if name.endswith("expert_bias"):  # biases that actually move the selection
            state[name] = torch.randn_like(state[name]) * 0.05
    return state


def _step(rank, world, full_state):
    from megatron_dsv3.layers import gather_last_dim_from_tp
    from megatron_dsv3.model import build_model
    from megatron_dsv3.mtp import mtp_loss
    from megatron_dsv3.moe.balance import set_balance_loss_scale
    from megatron_dsv3.parallel import gather_state_dict, init_distributed, load_full_state_dict

    pg = init_distributed(tensor_parallel_size=world)
    cfg = _config()
    model = build_model(cfg, pg_collection=pg)
    load_full_state_dict(model, full_state, pg.tp)
    set_balance_loss_scale(model, 1.0)  # one micro-batch
    torch.manual_seed(1)
    input_ids = torch.randint(0, cfg.vocab_size, (2, 24))
    labels = torch.randint(0, cfg.vocab_size, (2, 24))

    model.eval()
    with torch.no_grad():
        logits = gather_last_dim_from_tp(model(input_ids, None, None), pg.tp)
    model.train()
    out = model(input_ids, None, None, labels=labels)
    loss = out.lm_loss.mean() + mtp_loss(out.mtp_losses, out.mtp_valid, 0.3)
    loss.backward()
    return {"logits": logits, "loss": loss.detach(), "grads": gather_state_dict(model, pg.tp,
                                                                                 grads=True)}


@pytest.fixture(scope="module")
def runs():
    full = run_gloo(_full_weights, 1)[0]
    single = run_gloo(_step, 1, full)[0]
    tp2 = run_gloo(_step, 2, full)
    return single, tp2


def test_tp2_logits_and_loss_match_tp1(runs):
    single, tp2 = runs
    why = "fp32, TP splits GEMM reductions and the vocab-parallel log-sum-exp"
    for rank, result in enumerate(tp2):
        assert_close(result["logits"], single["logits"], FP32_REORDER, why, f"logits rank {rank}")
        assert_close(result["loss"], single["loss"], FP32_REORDER, why, f"loss rank {rank}")


def test_tp2_gradients_of_every_parameter_match_tp1(runs):
    single, tp2 = runs
    why = "fp32, TP splits GEMM reductions; replicated params get all-reduced input gradients"
    assert set(tp2[0]["grads"]) == set(single["grads"])
    for name, expected in single["grads"].items():
        for rank, result in enumerate(tp2):
            assert_close(result["grads"][name], expected, FP32_REORDER, why,
                         f"grad {name} rank {rank}")

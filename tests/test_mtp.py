"""Multi-token prediction: target shifts, the loss, the causal chain across depths, gradient
flow, the lambda schedule, and agreement with Megatron-Core's own MTP loss.

Conventions (docs/architecture.md 3.3): the batch is a sequence of s + 1 tokens t_0..t_s; the model
reads t_0..t_{s-1} and labels[i] = t_{i+1}. Depth k at position i sees t_{i+k} and predicts
t_{i+k+1} = labels[i+k], which exists for i < s - k.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_dsv3.model import build_model
from megatron_dsv3.mtp import mtp_loss, mtp_targets, shift_left
from helpers.small_model import VOCAB, small_config
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal

SEQ, BATCH = 8, 2
V3_SWITCH_TOKENS = 10_000_000_000_000


def _batch(seed: int = 0):
    """full [b, s+1] tokens; input_ids, labels [b, s]; position_ids [b, s]."""
    full = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return full, full[:, :SEQ], full[:, 1:], torch.arange(SEQ).expand(BATCH, SEQ)


@pytest.fixture
def depth2_model(dist_single):
    torch.manual_seed(0)
    model = build_model(small_config(mtp__num_layers=2), pg_collection=dist_single)
    return model.eval()  # eval: no balance-loss injection, no router load counting


# ----------------------------------------------------------------------------------------------
# Shifts and targets
# ----------------------------------------------------------------------------------------------
def test_shift_left_moves_values_k_places_left_and_fills_the_tail():
    x = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    assert_equal(shift_left(x, 0), x)
    assert_equal(shift_left(x, 2), torch.tensor([[12, 13, 14, 0, 0], [22, 23, 24, 0, 0]]))
    assert_equal(shift_left(x, 1, fill=-1), torch.tensor([[11, 12, 13, 14, -1],
                                                          [21, 22, 23, 24, -1]]))
    floats = torch.tensor([[0.5, 1.5, 2.5]])
    assert_equal(shift_left(floats, 1, fill=9.0), torch.tensor([[1.5, 2.5, 9.0]]))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mtp_target_at_depth_k_is_labels_k_ahead_and_invalid_in_the_last_k_positions(depth):
    s = 6
    labels = torch.arange(100, 100 + s).expand(2, s)
    targets, valid = mtp_targets(labels, depth)
    for i in range(s):
        if i + depth < s:
            assert valid[:, i].all() and (targets[:, i] == labels[:, i + depth]).all()
        else:
            assert not valid[:, i].any()
    assert valid.dtype == torch.bool


# ----------------------------------------------------------------------------------------------
# The loss formula
# ----------------------------------------------------------------------------------------------
def _direct_mtp_loss(per_token, valid, weight):
    """(lambda / D) * sum_k (sum of CE_k over valid positions / their count), by loops."""
    depth, b, s = per_token.shape
    total = 0.0
    for k in range(depth):
        acc, count = 0.0, 0
        for row in range(b):
            for i in range(s):
                if valid[k, row, i]:
                    acc += per_token[k, row, i].item()
                    count += 1
        total += acc / count if count else 0.0
    return weight / depth * total


def test_mtp_loss_equals_lambda_over_depth_times_the_sum_of_per_depth_valid_means():
    gen = torch.Generator().manual_seed(0)
    per_token = torch.rand(3, 2, 7, generator=gen, dtype=torch.float64) * 5
    valid = torch.rand(3, 2, 7, generator=gen) > 0.3
    got = mtp_loss(per_token, valid, 0.3)
    assert got.item() == pytest.approx(_direct_mtp_loss(per_token, valid, 0.3), rel=1e-12)


def test_mtp_loss_ignores_invalid_positions_and_an_empty_depth_adds_nothing():
    per_token = torch.tensor([[[1.0, 2.0, 100.0]], [[7.0, 7.0, 7.0]]])  # [D=2, b=1, s=3]
    valid = torch.tensor([[[True, True, False]], [[False, False, False]]])
    assert mtp_loss(per_token, valid, 1.0).item() == pytest.approx(0.5 * 1.5, rel=1e-7)


@pytest.mark.parametrize("depth", [1, 2])
def test_lambda_schedule_applied_through_mtp_loss_scales_loss_and_gradient_exactly(depth):
    schedule = small_config(mtp__num_layers=depth).mtp
    gen = torch.Generator().manual_seed(1)
    per_token = torch.rand(depth, 2, 5, generator=gen).requires_grad_()
    valid = torch.rand(depth, 2, 5, generator=gen) > 0.2
    unit = mtp_loss(per_token, valid, 1.0)
    (unit_grad,) = torch.autograd.grad(unit, per_token)
    for tokens_seen, lam in ((0, 0.3), (V3_SWITCH_TOKENS - 1, 0.3), (V3_SWITCH_TOKENS, 0.1)):
        weight = schedule.loss_weight(tokens_seen)
        assert weight == lam
        loss = mtp_loss(per_token, valid, weight)
        (grad,) = torch.autograd.grad(loss, per_token)
        # 1/D is a power of two here, so scaling the loss by lambda is exact; in the backward
        # lambda multiplies at another point of the chain rule (one fp32 rounding apart).
        assert_equal(loss, lam * unit, f"loss at {tokens_seen=}")
        assert_close(grad, lam * unit_grad, FP32_REORDER, "one fp32 rounding of the product",
                     f"gradient at {tokens_seen=}")
    assert mtp_loss(per_token, valid, 0.0).item() == 0.0


# ----------------------------------------------------------------------------------------------
# The model's MTP losses, recomputed by hand
# ----------------------------------------------------------------------------------------------
def _manual_mtp_cross_entropy(model, full):
    """Per-depth CE [D, b, s] and validity, chaining the MTP modules by hand.

    Embedding lookups and the output head are plain F.embedding / F.linear on the shared
    weights; shifts are slices of the s + 1 token sequence.
    """
    input_ids = full[:, :SEQ]
    emb_weight, out_weight = model.embedding.word_embeddings.weight, model.output_layer.weight

    def embed(tokens_bs):
        return F.embedding(tokens_bs, emb_weight).transpose(0, 1)  # [s, b, d]

    hidden = model.decoder(hidden_states=embed(input_ids), attention_mask=None)  # h^0, normed
    losses, valids = [], []
    for k, layer in enumerate(model.mtp.layers, start=1):
        ahead = torch.cat([input_ids[:, k:], torch.zeros_like(input_ids[:, :k])], dim=1)  # t_{i+k}
        joint = torch.cat([layer.enorm(embed(ahead)), layer.hnorm(hidden)], dim=-1)
        x = F.linear(joint, layer.eh_proj.weight)
        x, _ = layer.transformer_layer(hidden_states=x, attention_mask=None)
        hidden = layer.final_layernorm(x)  # h^k [s, b, d]
        logits = F.linear(hidden, out_weight).float().transpose(0, 1)  # [b, s, V]
        positions = torch.arange(SEQ)
        valid = (positions + k + 1 <= SEQ).expand(BATCH, SEQ)  # t_{i+k+1} exists
        target = full[:, (positions + k + 1).clamp(max=SEQ)]  # t_{i+k+1}
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), reduction="none")
        losses.append(ce.view(BATCH, SEQ))
        valids.append(valid)
    return torch.stack(losses), torch.stack(valids)


def test_model_mtp_losses_equal_a_manual_chain_through_the_mtp_modules(depth2_model):
    full, input_ids, labels, position_ids = _batch()
    with torch.no_grad():
        out = depth2_model(input_ids, position_ids, None, labels=labels)
        expected, expected_valid = _manual_mtp_cross_entropy(depth2_model, full)
    assert out.mtp_losses.shape == (2, BATCH, SEQ)
    assert_equal(out.mtp_valid, expected_valid, "validity")
    why = "fp32, Megatron's vocab-parallel cross-entropy vs F.cross_entropy: summation order"
    for k in range(2):
        mask = expected_valid[k]
        assert_close(out.mtp_losses[k][mask], expected[k][mask], FP32_REORDER, why,
                     f"depth {k + 1}")
    weight = small_config().mtp.loss_weight(0)
    assert_close(mtp_loss(out.mtp_losses, out.mtp_valid, weight),
                 torch.tensor(_direct_mtp_loss(expected, expected_valid, weight)),
                 FP32_REORDER, why, "lambda-weighted MTP loss")


def test_depth_2_predicts_the_input_token_three_ahead(depth2_model):
    """Depth 2 at position i scores t_{i+3} = input_ids[i+3]: its CE must be the one of that
    token, and differ from the CE of the token two or four ahead."""
    full, input_ids, labels, position_ids = _batch(seed=3)
    with torch.no_grad():
        out = depth2_model(input_ids, position_ids, None, labels=labels)
    assert_equal(out.mtp_valid[1], (torch.arange(SEQ) < SEQ - 2).expand(BATCH, SEQ))
    # Recompute depth-2 logits once, then compare candidate targets.
    with torch.no_grad():
        emb_w = depth2_model.embedding.word_embeddings.weight
        hidden = depth2_model.decoder(hidden_states=F.embedding(input_ids, emb_w).transpose(0, 1),
                                      attention_mask=None)
        h = depth2_model.mtp(input_ids=input_ids, position_ids=position_ids, hidden_states=hidden,
                             attention_mask=None, embedding=depth2_model.embedding)
        logits_2 = F.linear(h.chunk(3, dim=0)[2], depth2_model.output_layer.weight)
        logp = logits_2.float().log_softmax(-1).transpose(0, 1)  # [b, s, V]
    for i in range(SEQ - 3):
        three_ahead = -logp[:, i].gather(-1, input_ids[:, i + 3, None]).squeeze(-1)
        assert_close(out.mtp_losses[1][:, i], three_ahead, FP32_REORDER,
                     "fp32 CE vs log_softmax: summation order", f"position {i}")
        for other in (i + 2, i + 4):
            if other < SEQ and not torch.equal(input_ids[:, other], input_ids[:, i + 3]):
                wrong = -logp[:, i].gather(-1, input_ids[:, other, None]).squeeze(-1)
                assert not torch.allclose(out.mtp_losses[1][:, i], wrong)


@pytest.mark.parametrize("changed_position", [4, 6])
def test_depth_k_at_position_i_sees_tokens_up_to_i_plus_k_and_none_later(depth2_model,
                                                                        changed_position):
    """Causal chain: change one input token t_p (labels fixed). The main loss at i changes iff
    i >= p, depth 1 iff i + 1 >= p, depth 2 iff i + 2 >= p; the rest is bit-identical."""
    full, input_ids, labels, position_ids = _batch(seed=5)
    changed = input_ids.clone()
    changed[:, changed_position] = (changed[:, changed_position] + 1) % VOCAB
    with torch.no_grad():
        before = depth2_model(input_ids, position_ids, None, labels=labels)
        after = depth2_model(changed, position_ids, None, labels=labels)
    per_depth_before = [before.lm_loss, *before.mtp_losses]
    per_depth_after = [after.lm_loss, *after.mtp_losses]
    for k, (b, a) in enumerate(zip(per_depth_before, per_depth_after)):
        first_seeing = max(changed_position - k, 0)  # i + k >= p
        assert_equal(a[:, :first_seeing], b[:, :first_seeing], f"depth {k} before {first_seeing}")
        differs = (a[:, first_seeing:] != b[:, first_seeing:]).all()
        assert differs, f"depth {k}: positions >= {first_seeing} must see token {changed_position}"


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------
def test_mtp_loss_gradient_reaches_shared_embedding_output_head_and_main_decoder(depth2_model):
    full, input_ids, labels, position_ids = _batch(seed=7)
    out = depth2_model(input_ids, position_ids, None, labels=labels)
    mtp_loss(out.mtp_losses, out.mtp_valid, 0.3).backward()  # the MTP loss alone
    params = dict(depth2_model.named_parameters())
    for name in ("embedding.word_embeddings.weight", "output_layer.weight",
                 "decoder.layers.0.self_attention.linear_kv_down.weight",
                 "decoder.layers.0.mlp.linear_fc1.weight", "decoder.final_layernorm.weight",
                 "mtp.layers.0.eh_proj.weight", "mtp.layers.1.eh_proj.weight"):
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"no MTP gradient reaches {name}"
    # Shared, not copied: the MTP modules own no embedding or output head of their own.
    assert not [n for n in params if n.startswith("mtp.") and ("embedding" in n or "output" in n)]


def test_mtp_loss_gradient_matches_megatrons_own_mtp_loss_at_the_same_lambda(
        dist_single, monkeypatch):
    """Megatron's GPTModel folds (lambda/D) * sum_k masked-mean CE_k into the backward
    (process_mtp_loss + MTPLossAutoScaler, scale 1). Our model returns the per-token losses and
    `mtp_loss` applies lambda: main + mtp_loss must give Megatron's gradients, loss mask and
    all."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from megatron_dsv3.specs import decoder_block_spec, mtp_block_spec

    monkeypatch.setattr(MTPLossAutoScaler, "main_loss_backward_scale", torch.tensor(1.0))
    cfg = small_config(mtp__num_layers=2)
    torch.manual_seed(0)
    ours = build_model(cfg, pg_collection=dist_single)
    megatron_cfg = ours.config
    assert megatron_cfg.mtp_loss_scaling_factor == cfg.mtp.loss_weight(0) == 0.3
    base = GPTModel(config=megatron_cfg, transformer_layer_spec=decoder_block_spec(megatron_cfg),
                    vocab_size=VOCAB, max_sequence_length=cfg.max_seq_len,
                    position_embedding_type="none", mtp_block_spec=mtp_block_spec(megatron_cfg),
                    pg_collection=dist_single)
    base.load_state_dict(ours.state_dict(), strict=True)
    # eval: Megatron's training-mode MTP logging allocates on CUDA; the gradients are the same.
    ours.eval(), base.eval()
    full, input_ids, labels, position_ids = _batch(seed=9)
    loss_mask = torch.ones(BATCH, SEQ)
    loss_mask[0, 2] = loss_mask[1, 5:] = 0.0

    out = ours(input_ids, position_ids, None, labels=labels, loss_mask=loss_mask)
    main = (out.lm_loss * loss_mask).sum() / loss_mask.sum()
    (main + mtp_loss(out.mtp_losses, out.mtp_valid, cfg.mtp.loss_weight(0))).backward()

    base_per_token = base(input_ids, position_ids, None, labels=labels, loss_mask=loss_mask)
    ((base_per_token * loss_mask).sum() / loss_mask.sum()).backward()

    base_params = dict(base.named_parameters())
    why = "fp32; Megatron injects the MTP loss through autograd, we sum it: summation order"
    checked = 0
    for name, param in ours.named_parameters():
        expected = base_params[name].grad
        if expected is None:  # e.g. experts no token was routed to
            assert param.grad is None or not param.grad.any(), name
            continue
        assert_close(param.grad, expected, FP32_REORDER, why, name)
        checked += 1
    assert checked > 0.9 * len(base_params)

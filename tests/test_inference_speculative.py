"""MTP speculative decoding (inference/speculative.py) and the generate/chat command line.

The reference is plain greedy `generate`: speculative decoding must emit the same tokens for
every request, whatever the drafts. The MTP layer's cached forward is checked against the
training model's own MTP block first (the drafts mean nothing otherwise). Acceptance is then
counted on constructed models: one whose MTP layer computes exactly the main model's next
choice (every draft accepted, two tokens per forward), one whose MTP layer picks the main
model's least likely token (none accepted, one token per forward), and the random model with
the drafts forced right or wrong by position, so that accepted drafts' latents are kept in the
cache and rejected ones rolled back while attention matters. The tiny models are those of
tests/test_inference.py (3 layers, MTP depth 1, fp32, std-0.2 weights so no argmax is near a
tie); the command line runs once on a checkpoint file written here.
"""

from __future__ import annotations

import io

import pytest
import torch

from megatron_dsv3.checkpoint.hf_files import model_config_dict
from megatron_dsv3.data import DEFAULT_DATA_DIR, TOKENIZER_FILE, Tokenizer
from megatron_dsv3.inference import forward_hidden, generate, generate_speculative, new_cache
from megatron_dsv3.inference import speculative
from megatron_dsv3.inference.cli import main as cli_main
from megatron_dsv3.model import build_model
from helpers.tolerance import FP32_REORDER, assert_close
from test_inference import PROMPT_LENGTHS, _cfg, _randomise

FP32_WHY = ("fp32, the MTP layer's MLA through the latent cache (absorbed) against the training "
            "forward: same math in another order; measured ~1e-6")


@pytest.fixture(scope="module")
def model(dist_single):
    built = build_model(_cfg("qlora-yarn"), pg_collection=dist_single).eval()
    _randomise(built)
    return built


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def prompts(tokens):
    return [tokens[b, :n].tolist() for b, n in enumerate(PROMPT_LENGTHS)]


def _mtp_made_to(model, pg, copy: bool):
    """The model with its layers' outputs zeroed (attention, dense and MoE down-projections),
    so that its greedy next token is a function of the current token alone:
    argmax W_out RMSNorm_f(Emb(t)). Its MTP layer gets eh_proj = [I 0] (the embedding half
    only), enorm = 1 and its final norm = +-RMSNorm_f's weight: its draft for t_{i+2} is
    argmax +-W_out RMSNorm_f(Emb(t_{i+1})): the main model's own choice (copy) or its least
    likely token (not copy)."""
    made = build_model(model.config.dsv3, pg_collection=pg).eval()
    made.load_state_dict(model.state_dict())
    d = made.config.hidden_size
    with torch.no_grad():
        for name, param in made.named_parameters():
            if name.endswith(("linear_proj.weight", "linear_fc2.weight", "experts.fc2")):
                param.zero_()
        layer = made.mtp.layers[0]
        layer.eh_proj.weight.copy_(torch.cat([torch.eye(d), torch.zeros(d, d)], dim=1))
        layer.enorm.weight.fill_(1.0)
        sign = 1.0 if copy else -1.0
        layer.final_layernorm.weight.copy_(sign * made.decoder.final_layernorm.weight)
    return made


def test_cached_mtp_layer_matches_the_training_mtp_block(model, tokens):
    """The MTP layer through its own latent cache (the prompt's 12 positions at once, then two
    positions a step as the verify rounds feed it) gives the training MTP block's logits at
    every position, each fed the main model's hidden state and the token after it."""
    with torch.no_grad():
        h0_SBD = forward_hidden(model, new_cache(model, 3, 20), tokens,
                                torch.arange(20).expand(3, 20))
        trained_SBD = model.mtp(input_ids=tokens, position_ids=None, hidden_states=h0_SBD,
                                attention_mask=None, embedding=model.embedding)
        expected_BSV = model.output_layer(trained_SBD.chunk(2)[1])[0].transpose(0, 1)
    following_BS = torch.cat([tokens[:, 1:], torch.zeros(3, 1, dtype=torch.long)], dim=1)
    cache = speculative.new_mtp_cache(model, 3, 20)
    chunks = [range(0, 12)] + [range(p, p + 2) for p in range(12, 20, 2)]
    got = []
    for positions in chunks:
        index = list(positions)
        got.append(speculative.mtp_logits(model, cache, h0_SBD[index], following_BS[:, index],
                                          torch.tensor(index).expand(3, len(index))))
    assert_close(torch.cat(got, dim=1), expected_BSV, FP32_REORDER, FP32_WHY, "MTP logits")


@pytest.mark.parametrize("attention", ["absorbed", "plain"])
def test_speculative_emits_the_greedy_tokens(model, prompts, attention):
    """Prompts of 12, 5 and 9 tokens in one batch, alone, and with a stop token that ends one
    request early: the same tokens as greedy generate; the statistics add up."""
    expected = generate(model, prompts, max_new_tokens=10, attention=attention)
    got, stats = generate_speculative(model, prompts, max_new_tokens=10, attention=attention)
    assert got == expected
    assert stats.new_tokens == 30 and stats.drafted >= stats.accepted
    # every round verifies one draft per active request and emits 1 + accepted tokens
    assert stats.new_tokens == stats.request_forwards + stats.accepted
    assert stats.request_forwards == stats.drafted + len(prompts)
    if attention == "plain":
        return
    for prompt, ids in zip(prompts, expected):
        assert generate_speculative(model, [prompt], max_new_tokens=10)[0] == [ids]
    stop = expected[1][2]
    stopped = generate(model, prompts, max_new_tokens=10, stop_tokens=[stop])
    assert len(stopped[1]) <= 3 and max(map(len, stopped)) == 10, stopped
    assert generate_speculative(model, prompts, max_new_tokens=10,
                                stop_tokens=[stop])[0] == stopped


@pytest.mark.parametrize("copy", [True, False])
def test_acceptance_is_counted_on_constructed_drafters(model, dist_single, prompts, copy):
    """An MTP layer that computes the main model's own choice: every draft accepted, two
    tokens per forward; one that picks its least likely token: none accepted, one per forward.
    Both emit greedy's tokens."""
    made = _mtp_made_to(model, dist_single, copy)
    max_new = 9
    expected = generate(made, prompts, max_new_tokens=max_new)
    got, stats = generate_speculative(made, prompts, max_new_tokens=max_new)
    assert got == expected
    # the prefill gives 1 token; each round after it 2 (copy) or 1: 1 + 4 * 2 = 9 in 5
    # forwards, or 9 forwards
    rounds = (max_new - 1) // 2 if copy else max_new - 1
    assert stats.drafted == rounds * len(prompts)
    assert stats.accepted == (stats.drafted if copy else 0)
    assert stats.acceptance_rate == (1.0 if copy else 0.0)
    assert stats.main_forwards == 1 + rounds
    assert stats.tokens_per_forward == pytest.approx(max_new / (1 + rounds))


def test_accepted_drafts_are_kept_and_rejected_ones_rolled_back(model, prompts, monkeypatch):
    """The random model (attention over every cached position matters) with its drafts forced:
    the greedy token when the drafted position is not a multiple of 3, a wrong one when it
    is. The output is greedy's, and the counts are those of a simulation of the rounds."""
    max_new = 10
    expected = generate(model, prompts, max_new_tokens=max_new)
    full = [prompt + ids + [0] * 4 for prompt, ids in zip(prompts, expected)]

    def forced(logits_BV, positions_B):
        right = torch.tensor([full[b][int(p)] for b, p in enumerate(positions_B)])
        return torch.where(positions_B % 3 == 0, (right + 1) % 64, right)

    monkeypatch.setattr(speculative, "choose_drafts", forced)
    got, stats = generate_speculative(model, prompts, max_new_tokens=max_new)
    assert got == expected

    drafted = accepted = 0
    for prompt in prompts:
        length, emitted = len(prompt), 1  # cached positions; tokens out (the prefill's)
        while emitted < max_new:
            kept = int((length + 1) % 3 != 0)
            drafted, accepted = drafted + 1, accepted + kept
            length, emitted = length + 1 + kept, emitted + 1 + kept
    assert (stats.drafted, stats.accepted) == (drafted, accepted)
    assert 0 < accepted < drafted


def test_a_round_copies_to_the_host_once_and_the_last_runs_no_mtp_layer(
        model, dist_single, prompts, monkeypatch):
    """The round's decisions are taken where the model is: one copy to the host per round
    (its tokens and acceptance together; on a GPU every other copy would be one more wait),
    and the round in which every request has one token left runs no MTP layer. Counted on
    the copying drafter (8 tokens: the prefill's 1, 3 rounds of 2, a last round of 1: 5
    forwards), whose output is still greedy's."""
    made = _mtp_made_to(model, dist_single, copy=True)
    expected = generate(made, prompts, max_new_tokens=8)
    copies, mtp_calls = [], []
    real_cpu, real_mtp = torch.Tensor.cpu, speculative.mtp_logits

    def counting_cpu(tensor, *args, **kwargs):
        copies.append(tuple(tensor.shape))
        return real_cpu(tensor, *args, **kwargs)

    def counting_mtp(*args, **kwargs):
        mtp_calls.append(1)
        return real_mtp(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    monkeypatch.setattr(speculative, "mtp_logits", counting_mtp)
    got, stats = generate_speculative(made, prompts, max_new_tokens=8)
    monkeypatch.undo()
    assert got == expected and stats.main_forwards == 5
    rounds = stats.main_forwards - 1
    # the argument check's of each prompt, then each round's one copy: g_0, g_1 and n for the
    # 3 requests ([3, 3]); the prefill's first tokens travel by tolist (no Tensor.cpu call)
    assert copies == [(len(p),) for p in prompts] + [(3, 3)] * rounds, copies
    assert len(mtp_calls) == 1 + rounds - 1  # the prefill's, then every round but the last


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_device_copies_host_tensors_through_pinned_memory():
    """forward.on_device: a host tensor (here an expanded, non-contiguous view, as positions
    are) arrives intact on the GPU; a GPU tensor and a CPU target are left to `.to`."""
    from megatron_dsv3.inference.forward import on_device

    positions = torch.arange(5).expand(3, 5)
    moved = on_device(positions, torch.device("cuda"))
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), positions)
    assert on_device(moved, torch.device("cuda")) is moved
    assert on_device(positions, torch.device("cpu")) is positions


def test_speculative_refuses_a_model_without_mtp(dist_single, prompts):
    plain = build_model(_cfg("qlora-yarn").replace(mtp__num_layers=0),
                        pg_collection=dist_single).eval()
    with pytest.raises(ValueError, match=r"has none \(mtp.num_layers=0\): use generate\(\)"):
        generate_speculative(plain, prompts, max_new_tokens=2)


@pytest.fixture(scope="module")
def checkpoint(dist_single, tmp_path_factory):
    """A converter-format file of a tiny model with the bundled tokenizer's 2048-token
    vocabulary, and that model."""
    cfg = _cfg("qlora-yarn").replace(vocab_size=2048, max_seq_len=64)
    built = build_model(cfg, pg_collection=dist_single).eval()
    _randomise(built, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"format": "megatron_dsv3.state_dict/1", "model": built.state_dict(),
                "model_config": model_config_dict(cfg)}, path)
    return path, built


def test_cli_generates_and_chats_from_a_checkpoint_file(checkpoint, capsys):
    """generate --speculative and plain greedy print the same text, the decoded greedy tokens
    of the model the file holds; chat answers two turns, the second seeing the first."""
    path, built = checkpoint
    tokenizer = Tokenizer.load(DEFAULT_DATA_DIR / TOKENIZER_FILE)
    prompt = "ROMEO: But soft"
    ids = generate(built, [tokenizer.encode(prompt)], max_new_tokens=6,
                   stop_tokens=[tokenizer.eos_id])[0]
    expected = tokenizer.decode(ids[:-1] if ids[-1] == tokenizer.eos_id else ids)
    argv = ["generate", "--checkpoint", str(path), "--prompt", prompt, "--max-new-tokens", "6"]
    assert cli_main(argv) == expected
    assert cli_main(argv + ["--speculative"]) == expected
    out = capsys.readouterr()
    assert out.out == f"{expected}\n{expected}\n"
    assert "drafts accepted" in out.err and "tokens per forward" in out.err

    conversation = cli_main(["chat", "--checkpoint", str(path), "--max-new-tokens", "4"],
                            stdin=io.StringIO("Good morrow.\nWhat news?\n\nignored\n"))
    turns = conversation.split("\n")
    assert turns[0] == "Good morrow." and "What news?" in turns
    first = generate(built, [tokenizer.encode("Good morrow.\n")], max_new_tokens=4,
                     stop_tokens=[tokenizer.eos_id])[0]
    assert conversation.startswith("Good morrow.\n" + tokenizer.decode(
        [t for t in first if t != tokenizer.eos_id]).rstrip("\n"))


def _refusal(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_cli_refuses_bad_arguments_with_the_fix(checkpoint, tmp_path, capsys):
    path, built = checkpoint
    missing = tmp_path / "nothing.pt"
    assert f"--checkpoint {missing} does not exist" in _refusal(
        ["generate", "--checkpoint", str(missing), "--prompt", "x"], capsys)
    sliced = tmp_path / "rank_00000.pt"
    torch.save({"model": {}, "model_config": {}, "train_args": {"tensor_parallel_size": 2}},
               sliced)
    err = _refusal(["generate", "--checkpoint", str(sliced), "--prompt", "x"], capsys)
    assert "tensor_parallel_size=2" in err and "gather a full state dict" in err
    err = _refusal(["generate", "--checkpoint", str(path), "--prompt", "  "], capsys)
    assert "--prompt is empty" in err
    err = _refusal(["generate", "--checkpoint", str(path), "--prompt", "x", "--speculative",
                    "--temperature", "0.7"], capsys)
    assert "greedy only" in err and "drop --temperature or --speculative" in err
    err = _refusal(["generate", "--checkpoint", str(path), "--prompt", "x",
                    "--max-new-tokens", "80"], capsys)
    assert "max_new_tokens=80" in err and "max_seq_len=64" in err

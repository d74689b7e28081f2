"""Inference through MLA's latent KV cache (megatron_dsv3.inference) against the training model.

The reference is the model's own training forward (`model(ids, None, None)`, every position's
logits at once). Cached inference must reproduce it token by token: the prompts prefilled
together (right-padded, of unequal lengths), the rest fed one token per step (teacher forcing
with the same tokens), in the absorbed form and in the plain one. Two variants: q-LoRA with
YaRN (positions beyond the original 8, so the frequency ramp and the softmax mscale matter)
and no q-LoRA with plain rope. Weights are drawn with std 0.2, norms in [0.5, 1.5] and router
biases with std 0.05, so that the logits are far from uniform and greedy choices far from ties.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv3.attention.rope import apply_rope
from megatron_dsv3.config import YarnConfig, preset, v3_671b
from megatron_dsv3.inference import (
    LatentKVCache,
    decode_step,
    generate,
    new_cache,
    prefill,
    sample_next,
)
from megatron_dsv3.model import build_model
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal

MAX_SEQ = 24
FP32_WHY = ("fp32, same math in another order: the absorbed form multiplies q by W^UK before "
            "the latent (and W^UV after the weighted sum), per-position rope angles instead "
            "of one table, batched einsums of other shapes; measured ~1e-6")


def _cfg(name: str):
    cfg = preset("tiny").replace(
        name=name, hidden_size=32, vocab_size=64, num_layers=3, max_seq_len=MAX_SEQ,
        mla__num_heads=2, mla__q_lora_rank=16, mla__kv_lora_rank=8, mla__qk_nope_head_dim=8,
        mla__qk_rope_head_dim=4, mla__v_head_dim=8, moe__expert_ffn_size=16,
        moe__dense_ffn_size=32, linear_backend="local", params_dtype="float32")
    if name == "qlora-yarn":
        return cfg.replace(mla__yarn=YarnConfig(factor=4.0, original_max_position_embeddings=8))
    return cfg.replace(mla__q_lora_rank=0)


def _randomise(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def models(dist_single):
    """The variants' models, each built once for the module when first asked for."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build_model(_cfg(name), pg_collection=dist_single).eval()
            _randomise(built[name])
        return built[name]

    return get


@pytest.fixture(params=["qlora-yarn", "noqlora-rope"])
def model(request, models):
    """Both variants: for the tests where the rope and the query path matter."""
    return models(request.param)


@pytest.fixture
def yarn_model(models):
    """One variant: for batching, sampling and argument checks, which do not depend on it."""
    return models("qlora-yarn")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))


PROMPT_LENGTHS = (12, 5, 9)


def _cached_logits(model, tokens, attention: str) -> list[torch.Tensor]:
    """Request b's logits at positions 0..19 through the cache: its first PROMPT_LENGTHS[b]
    tokens prefilled with the others, then its next tokens one decode step at a time."""
    steps = tokens.shape[1] - min(PROMPT_LENGTHS)
    cache = new_cache(model, len(PROMPT_LENGTHS), max(PROMPT_LENGTHS) + steps)
    prefilled = prefill(model, cache, [tokens[b, :n] for b, n in enumerate(PROMPT_LENGTHS)],
                        attention)
    per_request = [[prefilled[b, :n]] for b, n in enumerate(PROMPT_LENGTHS)]
    for step in range(steps):
        positions = [n + step for n in PROMPT_LENGTHS]
        fed = torch.stack([tokens[b, min(p, tokens.shape[1] - 1)]
                           for b, p in enumerate(positions)])
        logits = decode_step(model, cache, fed, attention)
        for b, p in enumerate(positions):
            if p < tokens.shape[1]:
                per_request[b].append(logits[b:b + 1])
    return [torch.cat(chunks) for chunks in per_request]


def test_absorbed_prefill_and_decode_match_the_training_forward(model, tokens):
    """(a) Every position's logits of every request, prompts of 12, 5 and 9 tokens prefilled
    together and the rest decoded, equal the full training forward's."""
    with torch.no_grad():
        full = model(tokens, None, None)  # [b, s, V]
    for b, logits in enumerate(_cached_logits(model, tokens, "absorbed")):
        err = assert_close(logits, full[b], FP32_REORDER, FP32_WHY, f"request {b} logits")
        print(f"{model.config.dsv3.name}: request {b} absorbed vs training {err:.2e}")


def test_absorbed_and_plain_agree_and_only_plain_expands_kv(model, tokens):
    """(b) The same logits from the absorbed and the plain path, the same greedy tokens; and
    the absorbed path never runs linear_kv_up (W^UKV is folded, K/V never materialised)."""
    kv_up_calls = {"absorbed": 0, "plain": 0}
    mode = ["absorbed"]

    def count(*_):
        kv_up_calls[mode[0]] += 1

    handles = [layer.self_attention.linear_kv_up.register_forward_hook(count)
               for layer in model.decoder.layers]
    try:
        absorbed = _cached_logits(model, tokens, "absorbed")
        mode[0] = "plain"
        plain = _cached_logits(model, tokens, "plain")
    finally:
        for handle in handles:
            handle.remove()
    assert kv_up_calls["absorbed"] == 0 and kv_up_calls["plain"] > 0, kv_up_calls
    for b, (a, p) in enumerate(zip(absorbed, plain)):
        assert_close(a, p, FP32_REORDER, FP32_WHY, f"request {b} absorbed vs plain")
    prompts = [tokens[b, :n] for b, n in enumerate(PROMPT_LENGTHS)]
    greedy = {mode: generate(model, prompts, max_new_tokens=10, attention=mode)
              for mode in ("absorbed", "plain")}
    assert greedy["absorbed"] == greedy["plain"]
    assert all(len(t) == 10 for t in greedy["absorbed"])


def test_batched_requests_generate_what_each_generates_alone(yarn_model, tokens):
    """(c) Greedy tokens of prompts of 12, 5 and 9 tokens in one batch equal each request's
    own, also when a stop token ends one request early while the others go on."""
    prompts = [tokens[b, :n].tolist() for b, n in enumerate(PROMPT_LENGTHS)]
    alone = [generate(yarn_model, [p], max_new_tokens=8)[0] for p in prompts]
    assert generate(yarn_model, prompts, max_new_tokens=8) == alone
    # stop at request 1's third token (which request 0 and 2 do not emit before their end)
    stop = alone[1][2]
    expected = []
    for ids in alone:
        expected.append(ids[:ids.index(stop) + 1] if stop in ids else ids)
    assert len(expected[1]) <= 3 and any(len(ids) == 8 for ids in expected), expected
    assert generate(yarn_model, prompts, max_new_tokens=8, stop_tokens=[stop]) == expected


def test_cache_holds_only_the_latent_and_the_rope_key(model, tokens):
    """(d) One token of one layer costs (kv_lora_rank + qk_rope_head_dim) * element size
    bytes, here and at V3's widths (576 values: 1152 bytes in bf16); what is stored is the
    normalised latent and the roped shared key of layer 0, computed from its modules."""
    mla = model.config.dsv3.mla
    cache = new_cache(model, 1, 12)
    assert cache.bytes_per_token_per_layer() == (mla.kv_lora_rank + mla.qk_rope_head_dim) * 4
    assert cache.latent_LBTC.nbytes == (model.config.num_layers * 12
                                        * cache.bytes_per_token_per_layer())
    v3 = LatentKVCache(v3_671b().mla, 61, 1, 1, dtype=torch.bfloat16, device="meta")
    assert v3.bytes_per_token_per_layer() == (512 + 64) * 2

    prefill(model, cache, [tokens[0, :12]])
    attn = model.decoder.layers[0].self_attention
    with torch.no_grad():
        x = model.decoder.layers[0].input_layernorm(model.embedding(tokens[:1, :12], None))
        kv_down, _ = attn.linear_kv_down(x)
        c_kv, k_rope = kv_down[:, 0].split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        cos, sin = attn.rotary.cos_sin(12, x.device)
        expected_c_kv, expected_k_rope = attn.kv_norm(c_kv), apply_rope(k_rope, cos, sin)
    cached_c_kv, cached_k_rope = cache.read(0, 12)
    # the same modules and rope on the same rows: bit for bit
    assert_equal(cached_c_kv[0], expected_c_kv, "cached c_kv")
    assert_equal(cached_k_rope[0], expected_k_rope, "cached k_r")
    with pytest.raises(ValueError, match=r"position 12 is beyond capacity=12.*max_new_tokens"):
        decode_step(model, cache, tokens[:1, 12])


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompts=[[1, 2], []]), ["prompts[1] is empty", "at least one token"]),
    (dict(prompts=[list(range(MAX_SEQ + 1))]),
     ["prompts[0] has 25 tokens", "max_seq_len=24", "shorten it"]),
    (dict(prompts=[list(range(20))], max_new_tokens=5),
     ["max_new_tokens=5", "max_seq_len=24", "lower max_new_tokens to 4"]),
    (dict(top_p=0.0), ["top_p=0.0", "(0, 1]"]),
    (dict(top_p=1.5), ["top_p=1.5", "(0, 1]"]),
    (dict(temperature=-1.0), ["temperature=-1.0", ">= 0", "greedy"]),
    (dict(prompts=[[1, 64]]), ["prompts[0] holds token 64", "vocabulary [0, 64)"]),
    (dict(prompts=[]), ["prompts must be a non-empty list"]),
    (dict(attention="flash"), ["attention='flash'", "'absorbed'", "'plain'"]),
    (dict(stop_tokens=[99]), ["stop_tokens holds 99", "vocabulary"]),
    (dict(pad_id=-1), ["pad_id=-1", "[0, 64)"]),
])
def test_bad_arguments_name_the_argument_and_the_fix(yarn_model, kwargs, words):
    """(e)"""
    arguments = dict(prompts=[[1, 2, 3]], max_new_tokens=2) | kwargs
    with pytest.raises(ValueError) as info:
        generate(yarn_model, arguments.pop("prompts"), **arguments)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_sampling_is_reproducible_and_top_p_keeps_the_nucleus(yarn_model, tokens):
    prompts = [tokens[b, :n] for b, n in enumerate(PROMPT_LENGTHS)]

    def sampled(seed, **kwargs):
        return generate(yarn_model, prompts, max_new_tokens=6, temperature=1.0,
                        generator=torch.Generator().manual_seed(seed), **kwargs)

    assert sampled(3, top_p=0.9) == sampled(3, top_p=0.9)
    assert sampled(3) != sampled(4)  # 18 draws from 64 tokens: not by chance equal
    # a nucleus of one token is the greedy choice
    assert sampled(3, top_p=1e-6) == generate(yarn_model, prompts, max_new_tokens=6)

    # probabilities 0.4, 0.3, 0.2, 0.1: top_p=0.5 keeps the first two (0.4 < 0.5 <= 0.7)
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().expand(4000, 4)
    drawn = sample_next(logits, temperature=1.0, top_p=0.5,
                        generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=4)
    assert counts[2:].sum() == 0, counts
    assert abs(counts[0] / 4000 - 4 / 7) < 0.03, counts  # renormalised 0.4 / 0.7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_absorbed_decode_on_gpu_matches_the_training_forward(dist_single, tokens):
    """(a) on a GPU: the same model moved to CUDA (SDPA in the training forward, the grouped
    experts GEMM), fp32."""
    from megatron_dsv3.config import to_megatron_config

    cfg = _cfg("qlora-yarn")
    model = build_model(cfg, pg_collection=dist_single,
                        megatron_config=to_megatron_config(cfg, use_cpu_initialization=True))
    _randomise(model)
    model = model.cuda().eval()
    tokens = tokens.cuda()
    with torch.no_grad():
        full = model(tokens, None, None)
    for b, logits in enumerate(_cached_logits(model, tokens, "absorbed")):
        assert_close(logits, full[b], FP32_REORDER, FP32_WHY, f"request {b} logits")

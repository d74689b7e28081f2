#!/usr/bin/env python3
"""Decoding speed through MLA's latent KV cache (issue 13), against Hugging Face transformers.

  python benchmarks/bench_decode.py                  # proxy, bf16, one GPU: batch 1,32 x
                                                     # context 4096,32768, 64 new tokens
  python benchmarks/bench_decode.py --preset tiny --context 64 --new-tokens 4 --batch 1,2 \
      --device cpu                                   # logic check on the CPU (~1 min)

Per (context, batch), our model (random weights, `--dtype` parameters, eval mode, TP=1, MTP
kept for the speculative case) through megatron_dsv3.inference:
  prefill   the random prompt [batch, context] fed in chunks through `forward_hidden` at
            positions start..end (the latent cache filled exactly as `prefill` fills it; one
            forward of 32 x 32,768 tokens would need [b, h, s, s] fp32 scores: chunks keep the
            scores under `--prefill-budget-gib`), absorbed attention; timed, reported apart
  absorbed  `decode_step(..., "absorbed")`: `--warmup` untimed steps, then `--new-tokens`
            timed steps, each feeding the previous step's greedy token
  plain     the same from the same prefilled cache (its lengths reset to the context),
            `decode_step(..., "plain")`: K and V expanded from the latent at every step
tokens/s = batch x new tokens / decode time. Then, with the same weights (dsv3_to_hf into
`DeepseekV3ForCausalLM` built from hf_config_from_model_config, sdpa attention, its default
cache), `generate(max_new_tokens = min_new_tokens = new_tokens + 1, greedy)`: a logits processor
stamps the time after each forward, so prefill = start .. first stamp and decode = first ..
last stamp (new_tokens forwards, as ours). Speculative decoding (batch 1): `generate_speculative`
with `choose_drafts` wrapped to stamp the end of its prefill (main model + MTP layer), its
tokens/s over the tokens after the first against our absorbed greedy decode of the same case.
RANDOM WEIGHTS: the MTP layer's drafts almost never match, so the acceptance rate (~0%) and its
speed-up (< 1: a round feeds 2 tokens and runs the MTP layer) say nothing of a trained model.

Every case catches torch.cuda.OutOfMemoryError and records it as skipped, with the reason;
so is a case transformers cannot build. The KV cache per token per layer: ours (c + r values)
against what standard MLA caches (h x (n + r) keys + h x v values; also at V3's widths) and
what transformers' cache measured after generate holds (transformers >= 5.17 caches the latent
too and expands K and V from it at every step, as our plain path does). Peak memory per case
(GPU: max allocated since the phase began; CPU: the process's max RSS). Prints a table and
one JSON line (bench_proxy's header); `--json-out` is rewritten after every case ("complete":
false until the end), so a run cut short by a timeout keeps the cases it finished.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import (emit_json, empty_cache, peak_gib,  # noqa: E402
                               reset_peak, resolve_device, result_header, sync, write_json)

OOM = torch.cuda.OutOfMemoryError


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _free(device: torch.device) -> None:
    gc.collect()
    empty_cache(device)


def _oom_reason(error: BaseException) -> str:
    return f"out of memory: {str(error).splitlines()[0][:300]}"


# ----------------------------------------------------------------------------------------------
# Our model
# ----------------------------------------------------------------------------------------------
def build_ours(args, device: torch.device):
    from megatron_dsv3.config import preset, to_megatron_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.parallel import init_distributed

    cfg = preset(args.preset).replace(params_dtype=args.dtype)
    needed = max(args.context) + args.warmup + args.new_tokens + 1
    if cfg.max_seq_len < needed:
        # rope without YaRN has no length limit; max_seq_len only bounds the prompts
        if cfg.mla.yarn is not None:
            raise SystemExit(f"--context {max(args.context)}: preset {args.preset} has YaRN "
                             f"up to max_seq_len={cfg.max_seq_len}; lower --context")
        cfg = cfg.replace(max_seq_len=needed)
    pg = init_distributed(tensor_parallel_size=1)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(args.seed)
    megatron_cfg = to_megatron_config(cfg, use_cpu_initialization=device.type != "cuda")
    model = build_model(cfg, pg_collection=pg, megatron_config=megatron_cfg).to(device).eval()
    return cfg, model


def prompts_for(cfg, batch: int, context: int, seed: int) -> torch.Tensor:
    """The random prompt [batch, context] of a case (the same for ours and transformers)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch * 100_003 + context)
    return torch.randint(0, cfg.vocab_size, (batch, context), generator=generator)


def prefill_chunk(cfg, batch: int, context: int, budget_gib: float, forced: int) -> int:
    """Tokens per request per prefill forward: the fp32 scores [b, h, chunk, context] of one
    layer within the budget (the attention keeps ~3 such tensors alive)."""
    if forced:
        return min(forced, context)
    per_token = batch * cfg.mla.num_heads * context * 4
    return max(1, min(context, int(budget_gib * 2**30) // per_token))


@torch.no_grad()
def chunked_prefill(model, cache, tokens_BS: torch.Tensor, chunk: int) -> torch.Tensor:
    """The prompt through `forward_hidden` chunk by chunk (absorbed) -> the greedy first new
    token [B] from the last position's logits; the cache's lengths set to the context."""
    from megatron_dsv3.inference import forward_hidden

    device = cache.latent_LBTC.device
    batch, context = tokens_BS.shape
    tokens_BS = tokens_BS.to(device)
    for start in range(0, context, chunk):
        end = min(context, start + chunk)
        positions_BS = torch.arange(start, end).expand(batch, end - start)
        h_SBD = forward_hidden(model, cache, tokens_BS[:, start:end], positions_BS, "absorbed")
    logits_1BV, _ = model.output_layer(h_SBD[-1:])
    cache.lengths_B = torch.full((batch,), context, dtype=torch.long)
    return logits_1BV[0].float().argmax(dim=-1)


@torch.no_grad()
def decode(model, cache, first_B: torch.Tensor, steps: int, mode: str) -> torch.Tensor:
    """`steps` decode steps, each feeding the previous greedy token; the last token [B]."""
    from megatron_dsv3.inference import decode_step

    token_B = first_B
    for _ in range(steps):
        token_B = decode_step(model, cache, token_B, mode).float().argmax(dim=-1)
    return token_B


def timed(device: torch.device, fn, *args, **kwargs) -> tuple[object, float, float]:
    """(fn(*args, **kwargs), seconds, peak GiB), the device synchronised around it, the
    peak reset before."""
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - start, peak_gib(device)


def run_ours_case(args, cfg, model, device, batch: int, context: int) -> list[dict]:
    """Prefill, then the absorbed and the plain decode from the same cache: their rows."""
    from megatron_dsv3.inference import new_cache

    chunk = prefill_chunk(cfg, batch, context, args.prefill_budget_gib, args.prefill_chunk)
    base = {"batch": batch, "context": context, "new_tokens": args.new_tokens,
            "prefill_chunk": chunk}
    rows: list[dict] = []
    cache = None
    error = None
    try:
        cache = new_cache(model, batch, context + args.warmup + args.new_tokens)
        tokens = prompts_for(cfg, batch, context, args.seed)
        first_B, prefill_s, prefill_peak = timed(device, chunked_prefill, model, cache, tokens,
                                                 chunk)
        base.update(prefill_s=round(prefill_s, 4),
                    prefill_tok_per_s=round(batch * context / prefill_s, 1),
                    prefill_peak_gib=round(prefill_peak, 2),
                    cache_gib=round(cache.latent_LBTC.numel()
                                    * cache.latent_LBTC.element_size() / 2**30, 3))
    except OOM as e:
        error = _oom_reason(e)
    if error is not None:
        cache = None
        _free(device)
        reason = f"prefill: {error}"
        return [{"impl": f"ours-{m}", **base, "skipped": reason} for m in args.modes_ours]

    for mode in args.modes_ours:
        row = {"impl": f"ours-{mode}", **base}
        try:
            cache.lengths_B = torch.full((batch,), context, dtype=torch.long)
            token_B = decode(model, cache, first_B, args.warmup, mode)
            _, decode_s, decode_peak = timed(device, decode, model, cache, token_B,
                                             args.new_tokens, mode)
            row.update(decode_s=round(decode_s, 4),
                       ms_per_step=round(1e3 * decode_s / args.new_tokens, 3),
                       tok_per_s=round(batch * args.new_tokens / decode_s, 1),
                       peak_gib=round(decode_peak, 2))
        except OOM as e:
            row["skipped"] = f"decode: {_oom_reason(e)}"
        except Exception as e:  # noqa: BLE001 - recorded, the other cases still run
            traceback.print_exc()
            row["skipped"] = f"decode error: {type(e).__name__}: {e}"[:500]
        _free(device)
        rows.append(row)
    cache = None
    _free(device)
    return rows


def run_speculative(args, cfg, model, device, context: int, absorbed_tok_s) -> dict:
    """generate_speculative on batch 1 (its own unchunked prefill), stamped after the prefill
    by a wrapper on `choose_drafts` (which synchronises at its first call only); tokens/s
    over the tokens after the first."""
    from megatron_dsv3.inference import speculative

    row = {"impl": "ours-speculative", "batch": 1, "context": context,
           "new_tokens": args.new_tokens,
           "note": "random weights: the MTP drafts are noise, acceptance ~0% by construction"}
    scores_gib = cfg.mla.num_heads * context * context * 4 / 2**30
    if device.type == "cuda":
        free_gib = torch.cuda.mem_get_info()[0] / 2**30
        if 3 * scores_gib > free_gib:
            row["skipped"] = (f"generate_speculative prefills the prompt in one forward: its "
                              f"fp32 scores [1, h, s, s] take {scores_gib:.1f} GiB per tensor "
                              f"(~3 alive), {free_gib:.1f} GiB free")
            return row
    stamps: list[float] = []
    original = speculative.choose_drafts

    def stamped(logits_BV, positions_B):
        drafts = original(logits_BV, positions_B)
        if not stamps:  # the prefill's draft: synchronised once (the rounds' own sync later)
            sync(device)
            stamps.append(time.perf_counter())
        return drafts

    prompt = prompts_for(cfg, 1, context, args.seed)[0]
    speculative.choose_drafts = stamped
    try:
        warm = min(context, 8)  # kernels warmed on a short prompt first
        speculative.generate_speculative(model, [prompt[:warm]], max_new_tokens=3)
        stamps.clear()
        start = time.perf_counter()
        (tokens, stats), _, peak = timed(device, speculative.generate_speculative, model,
                                         [prompt], max_new_tokens=args.new_tokens + 1)
        end = time.perf_counter()
        decode_s = end - stamps[0]
        after_first = len(tokens[0]) - 1
        tok_s = after_first / decode_s
        row.update(prefill_s=round(stamps[0] - start, 4), decode_s=round(decode_s, 4),
                   tok_per_s=round(tok_s, 1), peak_gib=round(peak, 2),
                   acceptance_rate=round(stats.acceptance_rate, 4),
                   drafted=stats.drafted, accepted=stats.accepted,
                   tokens_per_forward=round(stats.tokens_per_forward, 3),
                   main_forwards=stats.main_forwards)
        if absorbed_tok_s:
            row["speedup_vs_absorbed_greedy"] = round(tok_s / absorbed_tok_s, 3)
    except OOM as e:
        row["skipped"] = _oom_reason(e)
    except Exception as e:  # noqa: BLE001 - recorded, the other cases still run
        traceback.print_exc()
        row["skipped"] = f"error: {type(e).__name__}: {e}"[:500]
    finally:
        speculative.choose_drafts = original
    _free(device)
    return row


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers
# ----------------------------------------------------------------------------------------------
def build_hf(args, cfg, state_dict, device: torch.device):
    """DeepseekV3ForCausalLM from hf_config_from_model_config with our weights (dsv3_to_hf);
    the router's weight and correction bias in fp32 as from_pretrained keeps them."""
    import transformers
    from transformers import DeepseekV3ForCausalLM

    from megatron_dsv3.checkpoint.hf import dsv3_to_hf, hf_config_from_model_config

    config = hf_config_from_model_config(cfg)
    experts = args.hf_experts or ("grouped_mm" if device.type == "cuda" else "eager")
    with torch.device(device):
        model = DeepseekV3ForCausalLM._from_config(
            config, attn_implementation=args.hf_attention, experts_implementation=experts,
            dtype=cfg.torch_dtype)
    for module in model.modules():
        if isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor):
            module.e_score_correction_bias = module.e_score_correction_bias.float()
            module.weight.data = module.weight.data.float()
    hf_sd = dsv3_to_hf(state_dict, cfg)
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    # HF builds no MTP layers: DeepSeek's layout stores them as layers num_layers + k
    mtp_prefix = tuple(f"model.layers.{cfg.num_layers + k}." for k in range(cfg.mtp.num_layers))
    unexpected = [k for k in unexpected if not k.startswith(mtp_prefix)]
    if missing or unexpected:
        raise RuntimeError(f"dsv3_to_hf does not fit transformers {transformers.__version__}'s "
                           f"model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    info = {"transformers": transformers.__version__,
            "attention": model.config._attn_implementation,
            "experts": getattr(model.config, "_experts_implementation", experts)}
    return model, info


def hf_cache_bytes(cache) -> tuple[int, int]:
    """(bytes of every tensor the generate cache holds, cached positions)."""
    tensors = []
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values", "compressed_kv", "k_rot"):
            value = getattr(layer, name, None)
            if isinstance(value, torch.Tensor):
                tensors.append(value)
    for name in ("key_cache", "value_cache"):
        if not tensors and isinstance(getattr(cache, name, None), list):
            tensors += [t for t in getattr(cache, name) if isinstance(t, torch.Tensor)]
    length = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
    return sum(t.numel() * t.element_size() for t in tensors), length


class _Stamps:
    """A logits processor that stamps the (synchronised) time after each forward."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def hf_generate(hf, tokens_BS: torch.Tensor, new_tokens: int, stamps=None):
    from transformers import LogitsProcessorList

    return hf.generate(
        tokens_BS, attention_mask=torch.ones_like(tokens_BS), do_sample=False,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        logits_processor=LogitsProcessorList([stamps] if stamps else []),
        return_dict_in_generate=True, use_cache=True)


def run_hf_case(args, cfg, hf, device, batch: int, context: int) -> dict:
    row = {"impl": "hf", "batch": batch, "context": context, "new_tokens": args.new_tokens}
    out = None
    try:
        tokens = prompts_for(cfg, batch, context, args.seed).to(device)
        stamps = _Stamps(device)
        sync(device)
        reset_peak(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = hf_generate(hf, tokens, args.new_tokens + 1, stamps)
        sync(device)
        peak = peak_gib(device)
        times = stamps.times
        decode_s = times[-1] - times[0]
        row.update(prefill_s=round(times[0] - start, 4), decode_s=round(decode_s, 4),
                   ms_per_step=round(1e3 * decode_s / (len(times) - 1), 3),
                   tok_per_s=round(batch * (len(times) - 1) / decode_s, 1),
                   peak_gib=round(peak, 2), generated=int(out.sequences.shape[1] - context))
        total, length = hf_cache_bytes(out.past_key_values)
        if total and length:
            row["cache_bytes_per_token_per_layer"] = total // (cfg.num_layers * batch * length)
            row["cache_gib"] = round(total / 2**30, 3)
    except OOM as e:
        row["skipped"] = _oom_reason(e)
    except Exception as e:  # noqa: BLE001 - e.g. a transformers version's generate
        traceback.print_exc()
        row["skipped"] = f"error: {type(e).__name__}: {e}"[:500]
    out = None
    _free(device)
    return row


# ----------------------------------------------------------------------------------------------
# KV-cache sizes
# ----------------------------------------------------------------------------------------------
def kv_cache_sizes(cfg, element_size: int) -> dict:
    mla = cfg.mla
    latent = mla.kv_cache_values_per_token  # c + r
    standard = mla.num_heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim
                                + mla.v_head_dim)  # h(n + r) keys + h v values
    return {"element_bytes": element_size,
            "latent_values": latent, "latent_bytes": latent * element_size,
            "standard_values": standard, "standard_bytes": standard * element_size,
            "ratio": round(latent / standard, 5),
            "reduction_pct": round(100 * (1 - latent / standard), 2),
            "target_met": (1 - latent / standard) >= 0.9}


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def print_table(results: dict) -> None:
    out = sys.stderr
    kv = results["kv_cache"]
    print(f"KV cache per token per layer: latent (c + r) {kv['latent_values']} values = "
          f"{kv['latent_bytes']} B; standard MLA h(n + r) + h v = {kv['standard_values']} values "
          f"= {kv['standard_bytes']} B; ratio {kv['ratio']} ({kv['reduction_pct']}% smaller, "
          f"target >= 90%: {'met' if kv['target_met'] else 'NOT met'})", file=out)
    v3 = results["kv_cache_v3_671b"]
    print(f"  at V3's widths (h=128): {v3['latent_values']} vs {v3['standard_values']} values, "
          f"{v3['reduction_pct']}% smaller", file=out)
    if "hf_measured_bytes" in kv:
        print(f"  transformers' cache after generate holds {kv['hf_measured_bytes']} B per "
              f"token per layer (ours / it: {kv['hf_ratio']})", file=out)
    header = (f"{'impl':<18}{'batch':>6}{'context':>9}{'prefill s':>11}{'decode s':>10}"
              f"{'ms/step':>9}{'tok/s':>10}{'peak GiB':>10}  note")
    print(header, file=out)
    print("-" * len(header), file=out)
    def cell(row, key, width):
        value = row.get(key)
        return f"{'-' if value is None else value:>{width}}"

    for row in results["cases"]:
        note = row.get("skipped", "")
        if "acceptance_rate" in row:
            note = (f"acceptance {100 * row['acceptance_rate']:.1f}% (random weights), "
                    f"x{row.get('speedup_vs_absorbed_greedy', '-')} vs absorbed greedy")
        if row.get("cache_bytes_per_token_per_layer"):
            note = (f"cache {row['cache_bytes_per_token_per_layer']} B/token/layer " + note).strip()
        if row.get("prefill_chunk") and not note:
            note = f"prefill chunk {row['prefill_chunk']}"
        print(f"{row['impl']:<18}{row['batch']:>6}{row['context']:>9}"
              f"{cell(row, 'prefill_s', 11)}{cell(row, 'decode_s', 10)}"
              f"{cell(row, 'ms_per_step', 9)}{cell(row, 'tok_per_s', 10)}"
              f"{cell(row, 'peak_gib', 10)}  {note}", file=out)
    for skip in results.get("skipped", []):
        print(f"skipped: {skip}", file=out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="proxy")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=_ints, default=[1, 32])
    parser.add_argument("--context", type=_ints, default=[4096, 32768])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps per case")
    parser.add_argument("--modes", default="absorbed,plain,hf,speculative",
                        help="which of absorbed, plain, hf, speculative to run")
    parser.add_argument("--prefill-budget-gib", type=float, default=4.0,
                        help="fp32 score bytes per layer per prefill chunk (sets the chunk)")
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="tokens per request per prefill forward (0: from the budget)")
    parser.add_argument("--hf-attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--hf-experts", default=None,
                        help="transformers' experts implementation (grouped_mm on GPU, eager "
                             "on CPU)")
    parser.add_argument("--tf32", action="store_true",
                        help="let fp32 matmuls (our attention's einsums) use TF32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(resolve_device(args.device))
    if device.type == "cpu":
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron's jit_fuser on CPU
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible; use --device cpu for a logic check")
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"absorbed", "plain", "hf", "speculative"}
    if unknown or args.new_tokens < 1 or args.warmup < 0:
        raise SystemExit(f"--modes {sorted(unknown)} unknown, or --new-tokens < 1 / --warmup < 0")
    args.modes_ours = [m for m in ("absorbed", "plain") if m in modes]

    if args.tf32:  # the library's fp32 attention einsums on TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
    from megatron_dsv3.config import preset

    cfg, model = build_ours(args, device)
    results = {**result_header(device), "bench": "decode", "preset": cfg.name,
               "dtype": args.dtype, "max_seq_len": cfg.max_seq_len,
               "params": sum(p.numel() for p in model.parameters()),
               "new_tokens": args.new_tokens, "warmup": args.warmup,
               "kv_cache": kv_cache_sizes(cfg, cfg.torch_dtype.itemsize),
               "kv_cache_v3_671b": kv_cache_sizes(preset("v3-671b"), 2), "tf32": args.tf32,
               "random_weights": True, "cases": [], "skipped": [], "complete": False}

    def save():
        if args.json_out:
            write_json(args.json_out, results)

    def log(row):
        results["cases"].append(row)
        print(f"case: {row}", file=sys.stderr, flush=True)
        save()

    if args.modes_ours or "speculative" in modes:  # kernels warmed on a short case first
        warm_cache = None
        try:
            from megatron_dsv3.inference import new_cache

            warm_cache = new_cache(model, 1, 16 + 2 * args.warmup + 2)
            first = chunked_prefill(model, warm_cache, prompts_for(cfg, 1, 16, args.seed), 16)
            for mode in args.modes_ours:
                warm_cache.lengths_B = torch.full((1,), 16, dtype=torch.long)
                decode(model, warm_cache, first, args.warmup + 1, mode)
        finally:
            warm_cache = None
            _free(device)

    absorbed_b1: dict[int, float] = {}
    for context in args.context:
        for batch in args.batch:
            if args.modes_ours:
                for row in run_ours_case(args, cfg, model, device, batch, context):
                    if row["impl"] == "ours-absorbed" and batch == 1 and "tok_per_s" in row:
                        absorbed_b1[context] = row["tok_per_s"]
                    log(row)
        if "speculative" in modes and 1 in args.batch:
            if cfg.mtp.num_layers == 0:
                results["skipped"].append(f"speculative: preset {cfg.name} has no MTP layer")
            else:
                log(run_speculative(args, cfg, model, device, context,
                                    absorbed_b1.get(context)))

    if "hf" in modes:
        state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()
                      if isinstance(v, torch.Tensor)}  # not Megatron's _extra_state (None)
        model = None
        _free(device)
        hf = None
        try:
            hf, results["hf"] = build_hf(args, cfg, state_dict, device)
        except OOM as e:
            results["skipped"].append(f"hf: building the model: {_oom_reason(e)}")
        except Exception as e:  # noqa: BLE001 - transformers' version may not build it
            traceback.print_exc()
            results["skipped"].append(f"hf: transformers cannot build DeepseekV3ForCausalLM "
                                      f"from our config/weights: {type(e).__name__}: {e}"[:500])
        state_dict = None
        if hf is not None:
            try:  # kernels warmed on a short prompt first
                with torch.no_grad():
                    hf_generate(hf, prompts_for(cfg, 1, 16, args.seed).to(device), 3)
            except OOM as e:
                results["skipped"].append(f"hf warm-up: {_oom_reason(e)}")
            _free(device)
            for context in args.context:
                for batch in args.batch:
                    log(run_hf_case(args, cfg, hf, device, batch, context))
                    measured = results["cases"][-1].get("cache_bytes_per_token_per_layer")
                    if measured:
                        results["kv_cache"]["hf_measured_bytes"] = measured
                        results["kv_cache"]["hf_ratio"] = round(
                            results["kv_cache"]["latent_bytes"] / measured, 5)

    # ours against transformers, per case
    by_key = {(r["impl"], r["batch"], r["context"]): r for r in results["cases"]}
    for (impl, batch, context), row in by_key.items():
        hf_row = by_key.get(("hf", batch, context), {})
        if impl.startswith("ours-") and "tok_per_s" in row and "tok_per_s" in hf_row:
            row["speedup_vs_hf"] = round(row["tok_per_s"] / hf_row["tok_per_s"], 3)
    results["complete"] = True
    print_table(results)
    emit_json(results, args.json_out)
    return results


if __name__ == "__main__":
    main()

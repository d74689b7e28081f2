#!/usr/bin/env python3
"""Forward + backward (and, separately, the full optimizer step) of a preset, against the peers.

  python benchmarks/bench_proxy.py                       # proxy preset, bf16, one GPU
  python benchmarks/bench_proxy.py --peers-dir .peers    # + HF transformers and torchtitan
  python benchmarks/bench_proxy.py --preset tiny --device cpu --steps 2   # logic check on CPU
  python benchmarks/bench_proxy.py --fp8 deepseek --peer-fp8 rowwise --peers torchtitan ...
      # ours in FP8 (proxy: --fp8-layers without dense_ffn, the default here), the torchtitan
      # peer with torchao's float8 (TT_FP8), run once more in BF16 for the same-run ratios

Same shapes as the peers' `proxy` (anchor_hf.py and anchor_torchtitan.py in --peers-dir; the
torchtitan peer with its per-block compile, TT_COMPILE=1): micro-batch 1 x 4096 tokens, random ids
and labels, parameters in bf16 (no fp32 master copy, as the peers build theirs), no MTP unless
`--mtp`. Model FLOPs per token from `megatron_dsv3.flops` (the peers' formula: 6 x active
matmul parameters + causal attention). Prints a table and one JSON line; `--json-out` saves it.

The forward + backward passes run inside one `weights_fixed()` block, as a training step's
micro-batches do (no weight changes between them): in FP8 the layers' weight blocks are
refreshed once when the block opens, not at every pass. That refresh is timed on its own
("fp8_refresh_s": a step of N micro-batches pays it once); the full step (optimizer included)
opens a block per step and pays it each time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import (emit_json, empty_cache, peak_gib,  # noqa: E402
                               resolve_device, result_header, time_steps)


def build(args, device):
    from megatron_dsv3.config import fp8_layers_flag, preset, to_megatron_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.moe.balance import set_balance_loss_scale
    from megatron_dsv3.parallel import init_distributed

    cfg = preset(args.preset)
    if args.fp8 != "none":
        cfg = cfg.replace(fp8=args.fp8, fp8_layers=fp8_layers_flag(args.fp8_layers))
    if not args.mtp:
        cfg = cfg.replace(mtp__num_layers=0)
    if args.dtype:
        cfg = cfg.replace(params_dtype=args.dtype)
    if args.attention:
        cfg = cfg.replace(mla__attention_impl=args.attention)
    if args.experts:
        cfg = cfg.replace(moe__experts_impl=args.experts)
    pg = init_distributed(tensor_parallel_size=1)
    torch.manual_seed(0)
    megatron_cfg = to_megatron_config(cfg, use_cpu_initialization=device.type != "cuda")
    model = build_model(cfg, pg_collection=pg, megatron_config=megatron_cfg).to(device)
    set_balance_loss_scale(model, 1.0)  # one micro-batch per step
    if args.compile != "none":
        from megatron_dsv3.model import compile_model

        torch._dynamo.utils.counters.clear()  # compile_stats() reads this model's only
        compile_model(model, scope=args.compile,
                      **({"mode": args.compile_mode} if args.compile_mode else {}))
    return cfg, model


def run_ours(args, device) -> dict:
    from megatron_dsv3.flops import active_matmul_params, training_flops_per_token
    from megatron_dsv3.fp8.weight_cache import weights_fixed
    from megatron_dsv3.mtp import mtp_loss

    cfg, model = build(args, device)
    seq = args.seq_len or cfg.max_seq_len
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, cfg.vocab_size, (args.batch, seq), generator=g).to(device)
    labels = torch.randint(0, cfg.vocab_size, (args.batch, seq), generator=g).to(device)
    tokens = args.batch * seq

    def forward_backward():
        out = model(input_ids, None, None, labels=labels)
        loss = out.lm_loss.mean()
        if out.mtp_losses is not None:
            loss = loss + mtp_loss(out.mtp_losses, out.mtp_valid, 0.3)
        loss.backward()
        return loss

    def fwd_bwd_step():
        model.zero_grad(set_to_none=True)
        forward_backward()

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5,
                                  fused=device.type == "cuda")

    def full_step():
        optimizer.zero_grad(set_to_none=True)
        with weights_fixed():  # the weights change at each step: their FP8 blocks too
            forward_backward()
        optimizer.step()

    with weights_fixed():  # forward + backward passes as a step's micro-batches run them
        kernels = (profile(fwd_bwd_step, args.profile)
                   if args.profile and device.type == "cuda" else None)
        fb_times = time_steps(fwd_bwd_step, args.steps, args.warmup, device,
                              reset_peak_after_warmup=True)
        fb_peak = peak_gib(device)

    def refresh():  # the FP8 blocks' refresh alone (nothing without FP8 layers)
        with weights_fixed():
            pass

    refresh_s = statistics.median(time_steps(refresh, args.steps, 1, device))
    step_times = time_steps(full_step, args.steps, args.warmup, device,
                            reset_peak_after_warmup=True)
    step_peak = peak_gib(device)
    flops_tok = training_flops_per_token(cfg, seq, include_mtp=args.mtp)
    fb = statistics.median(fb_times)
    st = statistics.median(step_times)
    return {
        "impl": "megatron_dsv3", "preset": cfg.name, "mtp": cfg.mtp.num_layers,
        "fp8": cfg.fp8, "fp8_layers": list(cfg.fp8_layers) if cfg.fp8 != "none" else [],
        "params": sum(p.numel() for p in model.parameters()),
        "active_matmul_params": active_matmul_params(cfg, include_mtp=args.mtp),
        "tokens": tokens, "flops_per_token": flops_tok,
        "fwd_bwd_s": round(fb, 6), "tok_per_s": round(tokens / fb, 1),
        "tflops": round(flops_tok * tokens / fb / 1e12, 1), "peak_gib": round(fb_peak, 2),
        "step_s": round(st, 6), "step_tok_per_s": round(tokens / st, 1),
        "step_peak_gib": round(step_peak, 2), "fp8_refresh_s": round(refresh_s, 6),
        "fwd_bwd_times": [round(t, 5) for t in fb_times],
        "attention": cfg.mla.attention_impl, "experts": cfg.moe.experts_impl,
        "compile": args.compile, "compile_mode": args.compile_mode,
        **({"compiled": compile_stats()} if args.compile != "none" else {}),
        **({"kernel_breakdown": kernels} if kernels else {}),
    }


def compile_stats() -> dict:
    """What torch.compile made of the compiled modules, from dynamo's and inductor's counters
    (after every step ran): the graphs compiled (one per kind of compiled module or layer when
    nothing breaks, recompilations included), the graph breaks with their first reasons, and
    the graphs that CUDA graphs skipped (reduce-overhead: those run without one)."""
    from torch._dynamo.utils import counters

    reasons = [reason.splitlines()[0] for reason in counters["graph_break"]]
    return {"graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "break_reasons": reasons[:5],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def profile(step_fn, path: str) -> dict:
    """One step under torch.profiler (after two untimed ones): the per-kernel table and the
    per-category breakdown (benchmarks/kernel_breakdown.py) written to `path`, the breakdown
    printed and returned (the JSON's "kernel_breakdown")."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from benchmarks.kernel_breakdown import breakdown, format_breakdown, kernels_of

    for _ in range(2):
        step_fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step_fn()
        torch.cuda.synchronize()
        wall_s = time.perf_counter() - start
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=60)
    categories = breakdown(kernels_of(prof), wall_s)
    Path(path).write_text(table + "\n\n" + format_breakdown(categories) + "\n")
    print(table[:6000], file=sys.stderr)
    print(format_breakdown(categories), file=sys.stderr)
    return categories


def run_peer(name: str, peers_dir: Path, steps: int, fp8: str = "none") -> dict:
    script = {"hf": "anchor_hf.py", "torchtitan": "anchor_torchtitan.py"}[name]
    # torchtitan as its users run it: each block compiled (TT_COMPILE=0 in the environment
    # measures it eager); `fp8`: torchao's float8 linears the way torchtitan converts them
    env = {"TT_COMPILE": "1", **os.environ}
    if fp8 != "none":
        env["TT_FP8"] = fp8
    site = peers_dir / ".site"
    if name == "torchtitan" and site.exists():
        env["PYTHONPATH"] = f"{site}:{env.get('PYTHONPATH', '')}"
    proc = subprocess.run([sys.executable, str(peers_dir / script), "proxy", str(steps)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"impl": name, "error": proc.stderr[-500:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(proc.stderr[-1500:], file=sys.stderr)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="proxy")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=[None, "bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    parser.add_argument("--mtp", action="store_true", help="include the preset's MTP modules")
    parser.add_argument("--attention", default=None, choices=[None, "sdpa", "reference"])
    parser.add_argument("--experts", default=None, choices=[None, "grouped_mm", "loop", "triton"],
                        help="MoEConfig.experts_impl (default: the preset's, auto); triton: the "
                        "forward and input-gradient GEMMs by kernels/grouped_gemm.py")
    parser.add_argument("--compile", default="auto", choices=["auto", "none", "layers", "modules"],
                        help="torch.compile each transformer layer or each of our modules "
                             "(auto: modules on GPU, none on CPU)")
    parser.add_argument("--compile-mode", default="reduce-overhead",
                        help="torch.compile mode (reduce-overhead: CUDA graphs; 'default')")
    parser.add_argument("--peers-dir", type=Path, default=None,
                        help="folder with the peers' anchor_hf.py / anchor_torchtitan.py")
    parser.add_argument("--peers", default="hf,torchtitan")
    parser.add_argument("--profile", default=None, help="write a kernel profile table here")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--fp8", default="none", choices=["none", "deepseek"],
                        help="our model in FP8 (ModelConfig.fp8)")
    parser.add_argument("--fp8-layers", default="attention,shared_experts,routed_experts,dispatch",
                        help="ModelConfig.fp8_layers with --fp8 (default: proxy's map, its "
                             "10944-wide dense FFN in BF16)")
    parser.add_argument("--peer-fp8", default="none", choices=["none", "rowwise", "tensorwise"],
                        help="the torchtitan peer also with torchao's float8 (TT_FP8)")
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    device = torch.device(args.device)
    if args.compile == "auto":
        args.compile = "modules" if device.type == "cuda" else "none"
    if device.type == "cpu":
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

    results = {**result_header(device), "ours": run_ours(args, device), "peers": []}
    empty_cache(device)
    if args.peers_dir is not None:
        for name in args.peers.split(","):
            results["peers"].append(run_peer(name, args.peers_dir, max(args.steps // 2, 3)))
            if name == "torchtitan" and args.peer_fp8 != "none":
                peer = run_peer(name, args.peers_dir, max(args.steps // 2, 3), args.peer_fp8)
                peer["impl"] = f"torchtitan+torchao {args.peer_fp8}"
                results["peers"].append(peer)
    ok_peers = [p for p in results["peers"] if "tok_per_s" in p]
    if ok_peers:
        best = max(ok_peers, key=lambda p: p["tok_per_s"])
        results["speedup_vs_best_peer"] = round(results["ours"]["tok_per_s"] / best["tok_per_s"],
                                                3)
        results["best_peer"] = best["impl"]
    ours = results["ours"]
    print(f"ours: fwd+bwd {ours['fwd_bwd_s'] * 1e3:.1f} ms  {ours['tok_per_s']:.0f} tok/s  "
          f"{ours['tflops']} TFLOP/s  peak {ours['peak_gib']} GiB | full step "
          f"{ours['step_s'] * 1e3:.1f} ms  {ours['step_tok_per_s']:.0f} tok/s  peak "
          f"{ours['step_peak_gib']} GiB | FP8 blocks' refresh {ours['fp8_refresh_s'] * 1e3:.2f} ms "
          "per step", file=sys.stderr)
    if "compiled" in ours:
        c = ours["compiled"]
        print(f"ours compiled ({args.compile}): {c['graphs']} graphs, {c['graph_breaks']} graph "
              f"breaks {c['break_reasons']}, {c['cudagraph_skips']} skipped by CUDA graphs",
              file=sys.stderr)
    for peer in ok_peers:
        print(f"{peer['impl']}: {peer['step_s'] * 1e3:.1f} ms  {peer['tok_per_s']:.0f} tok/s  "
              f"peak {peer['peak_gib']} GiB", file=sys.stderr)
    emit_json(results, args.json_out)
    return results


if __name__ == "__main__":
    main()

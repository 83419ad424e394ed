"""CPU benchmark of the chunked read of cached states (mcdist.ops.cached_read_chunked), one thread.

Compares, in one run and on the same inputs:
  new       mcdist.ops.cached_read_chunked: blocks of READ_BLOCK_STATES states, a few GEMMs per block,
            hand-written backward (torch.autograd.Function)
  old       BASELINE, the implementation before the blocked read, copied below (linear states; verbatim but
            for names): per query segment an einsum over all visible states at once, autograd through
            torch.utils.checkpoint
  autograd  the new blocked GEMM layout, but differentiated by autograd through a checkpoint per block (shows
            what the hand-written backward buys)
  sdpa      torch.nn.functional.scaled_dot_product_attention, causal, same B, T, H, d

Reported: median CPU seconds (time.process_time; wall seconds in the JSON) of ``--repeats`` runs of the forward
(no grad) and of forward + backward (loss Σ out² + Σ lse, so lse gets a gradient), GFLOP/s of the forward
(read: 2·(d² + d) FLOPs per token and visible state; attention: 4·d per query-key pair), a sweep of
READ_BLOCK_STATES, and the peak RSS (VmHWM, also ru_maxrss) of a fresh process that runs one forward + backward
at the largest T with glibc's default allocator settings (MALLOC_MMAP_THRESHOLD_ unset). Also one training step
of benchmarks/sp_cpu.py's model (grm, independent, one process) with each read, each in a fresh process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_read.py --out benchmarks/results/cpu_read.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mcdist.ops import masked_softmax, merge_partials
from mcdist.ops.cached_read import chunked as aggregate


# ---------------------------------------------------------------------------------------------------------------
# BASELINE: cached_read_chunked as it was before the blocked read (mcdist/aggregate.py at f770d68), linear
# states only. Kept verbatim apart from names, so the comparison is against the real old code.
# ---------------------------------------------------------------------------------------------------------------


def _old_read_states(z, states, count):
    return torch.einsum("bnhoi,bthi->btnho", states[:, :count], z)


def _old_segment_read(zq, uq, states, contexts, chosen, visible, segment_offset, gate_scale):
    scores = gate_scale * torch.einsum("bthc,bnhc->btnh", uq, contexts)  # [B, Tq, n, H]
    if chosen is not None:
        index = torch.arange(visible, device=zq.device) + segment_offset
        member = (chosen[:, :, None, :, :] == index[None, None, :, None, None]).any(-1)
        scores = scores.masked_fill(~member, float("-inf"))
    weights, lse = masked_softmax(scores, dim=2)  # [B, Tq, n, H], [B, Tq, H]
    reads = _old_read_states(zq, states, visible)  # [B, Tq, n, H, Dout]
    return torch.einsum("btnh,btnho->btho", weights, reads), lse


def old_cached_read_chunked(z, u, states, contexts, *, segment_len, gate_scale, query_offset=0, segment_offset=0,
                            selected=None):
    B, T, H = z.shape[:3]
    dtype = states.dtype
    n = states.shape[1]
    out_parts, lse_parts = [], []
    for start, stop, visible in aggregate._query_segments(T, query_offset, segment_len, segment_offset, n):
        zq = z[:, start:stop].to(dtype)
        if visible == 0:
            out_parts.append(zq.new_zeros(B, stop - start, H, states.shape[3]))
            lse_parts.append(zq.new_full((B, stop - start, H), float("-inf")))
        else:
            chosen = selected[:, start:stop] if selected is not None else None
            args = (zq, u[:, start:stop].to(dtype), states, contexts[:, :visible].to(dtype), chosen, visible,
                    segment_offset, gate_scale)
            if torch.is_grad_enabled():
                out, lse = checkpoint(_old_segment_read, *args, use_reentrant=False)
            else:
                out, lse = _old_segment_read(*args)
            out_parts.append(out)
            lse_parts.append(lse)
    return torch.cat(out_parts, 1), torch.cat(lse_parts, 1)


# ---------------------------------------------------------------------------------------------------------------
# The new blocked layout differentiated by autograd (checkpoint per block), for comparison only.
# ---------------------------------------------------------------------------------------------------------------


def _autograd_block(zq, uq, block_states, block_contexts, gate_scale):
    weights, lse = masked_softmax(aggregate._block_scores(uq, block_contexts, None, 0, gate_scale), dim=-1)
    return torch.matmul(aggregate._weighted_outer(weights, zq), block_states.flatten(2, 3)), lse


def autograd_cached_read(z, u, states, contexts, *, segment_len, gate_scale):
    zt, ut = z.transpose(1, 2), u.transpose(1, 2)
    stacked = states.permute(0, 2, 1, 4, 3).contiguous()  # [B, H, N, Din, Dout]
    contexts_t = contexts.permute(0, 2, 3, 1)
    outs, lses = [], []
    for start, stop, visible in aggregate._query_segments(z.shape[1], 0, segment_len, 0, states.shape[1]):
        zq, uq = zt[:, :, start:stop], ut[:, :, start:stop]
        if visible == 0:
            outs.append(torch.zeros_like(zq))
            lses.append(zq.new_full(zq.shape[:3], float("-inf")))
            continue
        merged = None
        for first, last in aggregate._state_blocks(visible):
            part = checkpoint(_autograd_block, zq, uq, stacked[:, :, first:last], contexts_t[..., first:last],
                              gate_scale, use_reentrant=False)
            merged = part if merged is None else merge_partials(merged, part)
        outs.append(merged[0])
        lses.append(merged[1])
    return torch.cat(outs, 2).transpose(1, 2), torch.cat(lses, 2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------


def make_inputs(batch, tokens, heads, dim, segment_len, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = -(-tokens // segment_len)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).requires_grad_()

    return dict(z=draw(batch, tokens, heads, dim), u=draw(batch, tokens, heads, dim),
                states=draw(batch, n, heads, dim, dim, scale=dim ** -0.5), contexts=draw(batch, n, heads, dim))


def run_read(name, inputs, segment_len, backward):
    z, u, states, contexts = inputs["z"], inputs["u"], inputs["states"], inputs["contexts"]
    gate_scale = z.shape[-1] ** -0.5
    with torch.set_grad_enabled(backward):
        if name == "sdpa":
            q, k, v = (x.transpose(1, 2) for x in (z, u, inputs["z_value"]))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            lse = None
        elif name == "autograd":
            out, lse = autograd_cached_read(z, u, states, contexts, segment_len=segment_len, gate_scale=gate_scale)
        else:
            read = aggregate.cached_read_chunked if name == "new" else old_cached_read_chunked
            out, lse = read(z, u, states, contexts, segment_len=segment_len, gate_scale=gate_scale)
        if backward:
            loss = out.square().sum()
            if lse is not None:  # the lse gets a gradient too, as when partials are merged
                loss = loss + torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum()
            loss.backward()


def median_seconds(name, inputs, segment_len, backward, repeats):
    """Median wall and CPU seconds (this process, one thread) over ``repeats`` runs, and all runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        for x in inputs.values():
            x.grad = None
        wall, cpu = time.perf_counter(), time.process_time()
        run_read(name, inputs, segment_len, backward)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), walls, cpus


def read_flops(batch, tokens, heads, dim, segment_len):
    """Multiply-adds × 2 of the state products, Σ_t visible(t) · d², plus the scores, Σ_t visible(t) · d."""
    visible = sum(t // segment_len for t in range(tokens))
    return 2 * batch * heads * visible * (dim * dim + dim)


def attention_flops(batch, tokens, heads, dim):
    return 4 * batch * heads * dim * tokens * (tokens + 1) // 2


def high_water_kib():
    """Peak resident set of this process in KiB: VmHWM (Linux; per address space, so a fresh exec starts low),
    else ru_maxrss (which Linux carries over from the parent across fork + exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_child(args):
    """Run in a fresh process: one forward + backward of ``args.child`` at ``args.tokens``; print the peaks."""
    torch.set_num_threads(1)
    inputs = make_inputs(args.batch, args.tokens, args.heads, args.dim, args.segment_len)
    before = high_water_kib()
    run_read(args.child, inputs, args.segment_len, backward=True)
    print(json.dumps({"inputs_kib": before, "peak_kib": high_water_kib(),
                      "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def model_step_child(args):
    """Run in a fresh process: one training step (forward + backward) of sp_cpu.py's model, grm, independent, on
    one process at ``args.tokens`` tokens, with the new read or the old one (``args.child_model_step``)."""
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sp_cpu

    import importlib

    from mcdist.model import MCLanguageModel

    if args.child_model_step == "old":  # the name ops.cached_read dispatches to, in its own package module
        importlib.import_module("mcdist.ops.cached_read").cached_read_chunked = old_cached_read_chunked
    torch.manual_seed(0)
    model = MCLanguageModel(sp_cpu.model_config("grm", "independent"))
    ids = torch.randint(0, sp_cpu.VOCAB, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    before = high_water_kib()
    wall, cpu = time.perf_counter(), time.process_time()
    loss = model(ids, torch.roll(ids, -1, 1)).loss
    loss.backward()
    print(json.dumps({"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
                      "inputs_kib": before, "peak_kib": high_water_kib(), "loss": float(loss.detach())}))


def fresh_process(args, tokens, *flags):
    command = [sys.executable, __file__, *flags, "--tokens", str(tokens), "--batch", str(args.batch),
               "--heads", str(args.heads), "--dim", str(args.dim), "--segment-len", str(args.segment_len)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss(name, args, tokens):
    return fresh_process(args, tokens, "--child", name)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--segment-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sdpa-max-tokens", type=int, default=32768,
                        help="run SDPA only up to this T (causal attention at 128K costs 64× the read)")
    parser.add_argument("--autograd-max-tokens", type=int, default=32768)
    parser.add_argument("--block-sweep", type=int, nargs="*", default=[8, 16, 32, 64],
                        help="READ_BLOCK_STATES values timed (forward, forward + backward) at the largest T")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--model-step-tokens", type=int, default=131072,
                        help="also time one training step of benchmarks/sp_cpu.py's model (grm, one process) at this "
                             "T with the new and the old read, each in a fresh process; 0 skips it")
    parser.add_argument("--model-step-repeats", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-model-step", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.child_model_step:
        args.tokens = args.tokens[0]
        return peak_rss_child(args) if args.child else model_step_child(args)
    torch.set_num_threads(1)
    report = dict(torch=torch.__version__, machine=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), load_average_start=os.getloadavg(), batch=args.batch,
                  heads=args.heads, dim=args.dim, segment_len=args.segment_len,
                  read_block_states=aggregate.READ_BLOCK_STATES, repeats=args.repeats, timings=[])
    print(f"B={args.batch} H={args.heads} d={args.dim} C={args.segment_len} one thread, "
          f"block={aggregate.READ_BLOCK_STATES}, load {os.getloadavg()}")
    # first, while this process is small: on Linux a child starts from its parent's ru_maxrss
    tokens = max(args.tokens)
    report["peak_rss"] = []
    for name in ("new", "old"):
        rss = peak_rss(name, args, tokens)
        report["peak_rss"].append(dict(tokens=tokens, impl=name, **rss))
        print(f"peak RSS, fresh process, fwd+bwd T={tokens} {name}: {rss['peak_kib'] / 2**20:.2f} GiB "
              f"(after torch and the inputs: {rss['inputs_kib'] / 2**20:.2f} GiB; "
              f"ru_maxrss {rss['ru_maxrss_kib'] / 2**20:.2f} GiB)")
    warmup = make_inputs(args.batch, 4 * args.segment_len, args.heads, args.dim, args.segment_len)
    warmup["z_value"] = warmup["z"].detach().requires_grad_()
    for name in ("new", "old", "autograd", "sdpa"):  # first calls (allocator, MKL) outside the timings
        for backward in (False, True):
            run_read(name, warmup, args.segment_len, backward)
    print("medians; CPU seconds of this one-thread process (wall seconds in the JSON); ratios are new / impl")
    header = f"{'T':>7} {'impl':>8} {'fwd s':>8} {'fwd GF/s':>9} {'fwd+bwd s':>10} {'fwd ratio':>10} {'f+b ratio':>10}"
    print(header)
    for tokens in args.tokens:
        inputs = make_inputs(args.batch, tokens, args.heads, args.dim, args.segment_len)
        inputs["z_value"] = inputs["z"].detach().flip(1).requires_grad_()
        names = ["new", "old"]
        if tokens <= args.autograd_max_tokens:
            names.append("autograd")
        if tokens <= args.sdpa_max_tokens:
            names.append("sdpa")
        rows = {}
        for name in names:
            fwd_wall, fwd_cpu, fwd_walls, fwd_cpus = median_seconds(name, inputs, args.segment_len, False,
                                                                    args.repeats)
            both_wall, both_cpu, both_walls, both_cpus = median_seconds(name, inputs, args.segment_len, True,
                                                                        args.repeats)
            flops = (attention_flops(args.batch, tokens, args.heads, args.dim) if name == "sdpa"
                     else read_flops(args.batch, tokens, args.heads, args.dim, args.segment_len))
            rows[name] = dict(tokens=tokens, impl=name, forward_cpu_s=fwd_cpu, forward_wall_s=fwd_wall,
                              forward_cpu_runs=fwd_cpus, forward_wall_runs=fwd_walls,
                              forward_backward_cpu_s=both_cpu, forward_backward_wall_s=both_wall,
                              forward_backward_cpu_runs=both_cpus, forward_backward_wall_runs=both_walls,
                              flops_forward=flops, gflops_forward=flops / fwd_cpu / 1e9)
        for name, row in rows.items():
            row["new_over_impl_forward"] = rows["new"]["forward_cpu_s"] / row["forward_cpu_s"]
            row["new_over_impl_forward_backward"] = (rows["new"]["forward_backward_cpu_s"]
                                                     / row["forward_backward_cpu_s"])
            report["timings"].append(row)
            print(f"{tokens:>7} {name:>8} {row['forward_cpu_s']:>8.3f} {row['gflops_forward']:>9.1f} "
                  f"{row['forward_backward_cpu_s']:>10.3f} {row['new_over_impl_forward']:>10.3f} "
                  f"{row['new_over_impl_forward_backward']:>10.3f}")
    if args.block_sweep:
        tokens = max(args.tokens)
        inputs = make_inputs(args.batch, tokens, args.heads, args.dim, args.segment_len)
        chosen, report["block_sweep"] = aggregate.READ_BLOCK_STATES, []
        try:
            for block in args.block_sweep:
                aggregate.READ_BLOCK_STATES = block
                _, forward, _, _ = median_seconds("new", inputs, args.segment_len, False, args.repeats)
                _, both, _, _ = median_seconds("new", inputs, args.segment_len, True, args.repeats)
                report["block_sweep"].append(dict(tokens=tokens, block=block, forward_cpu_s=forward,
                                                  forward_backward_cpu_s=both))
                print(f"block sweep T={tokens} block={block:>3}: fwd {forward:.3f} s, fwd+bwd {both:.3f} s (CPU)")
        finally:
            aggregate.READ_BLOCK_STATES = chosen
    if args.model_step_tokens:
        report["model_step"] = []
        for _ in range(args.model_step_repeats):
            for name in ("new", "old"):
                step = fresh_process(args, args.model_step_tokens, "--child-model-step", name)
                report["model_step"].append(dict(tokens=args.model_step_tokens, impl=name, **step))
                print(f"model step (sp_cpu.py's model, grm, one process) T={args.model_step_tokens} {name}: "
                      f"{step['cpu_s']:.1f} CPU s, peak RSS {step['peak_kib'] / 2**20:.2f} GiB, "
                      f"loss {step['loss']:.6f}")
    report["load_average_end"] = os.getloadavg()
    print(f"load average at the end: {report['load_average_end']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

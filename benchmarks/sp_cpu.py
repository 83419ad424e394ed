"""CPU benchmark of sequence parallelism on gloo processes (prints a table and writes JSON; not a test).

    python benchmarks/sp_cpu.py [--quick] [--out benchmarks/results/sp_cpu.json] [--length 1048576] [--ranks 4]
                                [--cases grm-independent,grm-checkpoint,ssc-independent,ssc-checkpoint]
                                [--repeats 1] [--warmup 0] [--forward-only] [--malloc-mmap-threshold BYTES]
                                [--skip-main] [--skip-scaling] [--skip-strong] [--fresh/--no-fresh] [--force]

One training step (forward + backward of the loss share ``loss_sum / global_token_count``, gradients summed by DDP) of a tiny
MCLanguageModel (d_model 64, 2 layers, 2 heads of dim 32, segment_len C = 1024, chunk_len 64, linear memory,
float32, B = 1, zigzag layout, ``impl="chunked"``) on P processes started by ``mcdist.parallel.spawn.spawn``
(gloo, one thread per rank), every rank holding L/P tokens. Ray is not needed.

1. ``main``: by default L = 1,048,576 tokens over P = 4 ranks for aggregation grm and ssc (top_k 4) × state_init
   independent and checkpoint. Per case: wall time of the step (the slowest rank, between two barriers; median
   over ``--repeats`` steps after ``--warmup`` untimed ones), the forward alone, the CPU seconds of every rank
   (``time.process_time()``: less sensitive than wall time to other jobs on the machine), peak RSS per rank
   (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which includes the ~0.22 GiB of an imported torch; the
   increase over the RSS before the model was built is reported too), the bytes each rank received per layer
   by purpose (``SPGroup.stats``, reset before every timed step) against the read budget of docs/distributed.md §5 and against the exact ring
   formula (``analytical_bytes``), and the time each rank spent blocked in communication (below).
   ``--forward-only`` runs the forward under ``torch.no_grad()`` instead (no saved activations).
2. ``scaling``: grm independent at equal per-rank length L/P for P = 1 and 2; weak-scaling efficiency
   T₁(L/P) / T₂(L), from wall time and from CPU time. The read is quadratic in L, so even perfect sequence
   parallelism has T₂(L) > T₁(L/P): a rank's share of the read at L is about 2× the whole read at L/2
   (``read_work_ratio``). Also one process on the whole L (``strong-p1``; ``--skip-strong``, always skipped by
   ``--quick``): strong-scaling efficiency T₁(L) / (2·T₂(L)).

Before anything runs, every case's memory is estimated (``estimated_peak_bytes``: measured activation bytes
per token of this model); a case that cannot fit in the machine's available memory is refused with the numbers
(``--force`` runs it anyway). The 1M-token forward + backward needs ≈ 27 GiB on one machine whatever P is, so on
a 24 GiB machine the default command stops there (docs/benchmarks.md). ``--malloc-mmap-threshold`` sets
``MALLOC_MMAP_THRESHOLD_`` for the ranks, so that glibc returns freed blocks and the peak RSS shows the memory in
use rather than the allocator's retention.

By default every case runs in fresh processes, so the peak RSS of a rank is the case's own; ``--quick``
(``--no-fresh``) runs all cases of one P in one set of processes (P = 1 in this process) to save start-ups, and
writes partial results after each set. ``--quick``: L = 16,384 on P = 2 for the four main cases and
L/P = 8,192 for the scaling pair (about 20 s on an idle 2-core machine).

Communication time: the benchmark wraps ``Exchange.__init__``/``wait`` (the ring's point-to-point messages) and
the all-gathers in timers (instrumentation in this process only; the library is unchanged). ``comm_wait_s`` is the time a rank spent
blocked there: the non-overlapped (exposed) communication plus any wait for a slower peer. With more ranks than
cores (4 ranks on 2 cores here) the peers time-share the cores and the waits are mostly imbalance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

C = 1024
D_MODEL, N_LAYERS, N_HEADS, HEAD_DIM, CHUNK_LEN, TOP_K, VOCAB = 64, 2, 2, 32, 64, 4, 256
LAYOUT = "zigzag"
BATCH = 1
DTYPE_BYTES = 4  # float32 states


def model_config(aggregation: str, state_init: str):
    """The benchmark's ModelConfig for one (aggregation, state_init) case."""
    from mcdist.config import ModelConfig

    return ModelConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, memory="linear",
                       aggregation=aggregation, state_init=state_init, segment_len=C, chunk_len=CHUNK_LEN,
                       top_k=TOP_K)  # CPU tensors: impl 'auto' is the chunked path


# -- analytical communication (docs/distributed.md §5) ---------------------------------------------------------------------


def analytical_bytes(seq_len: int, sp: int, rank: int, state_init: str) -> dict:
    """Per layer, per rank: the bytes the read budget (docs/distributed.md §5) allows and the exact counts of the ring as implemented.

    ``needed_read``: the cached states of other ranks' segments that precede this rank's last token (the
    segments some local token may read), × B·H·d²·bytes: the budget's "(earlier segments) × H × d² × bytes".
    ``prefix``: B·H·d²·bytes (one incoming state per rank) under checkpoint, else 0.
    ``ring_exact``: what the ring moves, (P−1) blocks of n_local states and contexts:
    (P−1)·n_local·B·H·(d²+d)·bytes; ``ring_backward_exact``: (2(P−1) + 1) blocks (block + gradient, then
    the gradient home).
    """
    from mcdist.parallel.layout import rank_pieces

    mine = rank_pieces(seq_len, sp, rank, LAYOUT)
    last_segment = max(start + length - 1 for start, length in mine) // C
    own = {s for start, length in mine for s in range(start // C, (start + length) // C)}
    earlier = sum(1 for s in range(last_segment) if s not in own)
    n_local = seq_len // sp // C
    state = BATCH * N_HEADS * HEAD_DIM * HEAD_DIM * DTYPE_BYTES
    block = n_local * BATCH * N_HEADS * (HEAD_DIM * HEAD_DIM + HEAD_DIM) * DTYPE_BYTES
    return {
        "earlier_segments": earlier,
        "needed_read": earlier * state,
        "prefix": state if state_init == "checkpoint" else 0,
        "ring_exact": (sp - 1) * block,
        "ring_backward_exact": (2 * (sp - 1) + 1) * block if sp > 1 else 0,
    }


# -- will it fit? -----------------------------------------------------------------------------------------------

# Peak RSS of one rank ≥ RSS_BASE + RSS_PER_TOKEN × (tokens on the rank): the activations autograd keeps for the
# backward of this model (one process, L = 128K, with MALLOC_MMAP_THRESHOLD_=131072 so that freed blocks leave
# the RSS: 3.26 GiB above the idle process, 26 KiB per token; an imported torch is ~0.22 GiB). glibc's default
# allocator keeps freed memory and adds to this (up to 2× measured here). The cached states (N·H·d² floats per
# layer) are negligible beside the activations.
RSS_BASE = 0.25 * 2**30
RSS_PER_TOKEN = 26 * 2**10
RSS_PER_TOKEN_NO_GRAD = 5 * 2**10  # forward only (no saved activations), same measurement


def estimated_peak_bytes(seq_len: int, sp: int, forward_only: bool) -> float:
    """A lower bound of the peak RSS of all ``sp`` ranks together (they share this machine)."""
    per_token = RSS_PER_TOKEN_NO_GRAD if forward_only else RSS_PER_TOKEN
    return sp * (RSS_BASE + per_token * seq_len / sp)


def available_bytes() -> float:
    """MemAvailable of this machine in bytes (inf where /proc/meminfo has none)."""
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return float("inf")


def check_fits(seq_len: int, sp: int, forward_only: bool, force: bool) -> None:
    """Refuse a case whose estimated memory exceeds what this machine has free (unless ``force``)."""
    need, have = estimated_peak_bytes(seq_len, sp, forward_only), available_bytes()
    per_token = RSS_PER_TOKEN_NO_GRAD if forward_only else RSS_PER_TOKEN
    if need > have and not force:
        raise SystemExit(
            f"L = {seq_len} tokens on P = {sp} ranks of this machine needs at least {need / 2**30:.1f} GiB "
            f"({sp} × ({RSS_BASE / 2**30:.2f} GiB + {per_token / 1024:.1f} KiB × {seq_len // sp} tokens)) but "
            f"{have / 2**30:.1f} GiB is available. Every rank runs on this machine, so sequence parallelism does "
            f"not reduce the total; pass a smaller --length, --forward-only, or --force to try anyway.")


# -- the per-rank worker ---------------------------------------------------------------------------------------


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Timers:
    """Seconds spent blocked in communication, by purpose (benchmark instrumentation only)."""

    def __init__(self):
        self.seconds = {}

    def add(self, kind, seconds):
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds

    def reset(self):
        self.seconds.clear()


def _instrument(timers: _Timers) -> None:
    """Wrap the ring exchange and the all-gathers of mcdist.parallel in timers (this process only)."""
    from mcdist.parallel import comm, ring_reader

    ring_init, ring_wait = comm.Exchange.__init__, comm.Exchange.wait

    def init(self, sends, receives, sp, kind):
        start = time.perf_counter()
        ring_init(self, sends, receives, sp, kind)
        self._bench_kind = kind
        timers.add(kind, time.perf_counter() - start)

    def wait(self):
        start = time.perf_counter()
        out = ring_wait(self)
        timers.add(self._bench_kind, time.perf_counter() - start)
        return out

    comm.Exchange.__init__, comm.Exchange.wait = init, wait
    gather = comm.all_gather_tensor

    def timed_gather(tensor, sp, kind):
        start = time.perf_counter()
        out = gather(tensor, sp, kind)
        timers.add(kind, time.perf_counter() - start)
        return out

    comm.all_gather_tensor = timed_gather  # used by _AllGather
    ring_reader.all_gather_tensor = timed_gather  # used by _PieceScan and the ssc contexts


def _layer_groups(model, mesh, layout):
    """Parallelize ``model``; its SPGroups as a list (one per layer, or the one shared group of older code)."""
    from mcdist.parallel.model import parallelize

    groups = parallelize(model, mesh, layout)
    return list(groups) if isinstance(groups, (list, tuple)) else [groups]


def _per_layer(groups, direction: str) -> dict:
    """Bytes ``direction`` ('sent' or 'received') per layer (mean over the layers), by purpose."""
    total = {}
    for group in groups:
        for kind, value in getattr(group.stats, direction).items():
            total[kind] = total.get(kind, 0) + value
    return {kind: value / max(len(groups), 1) for kind, value in total.items()}


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def step_worker(rank: int, world: int, cases: list, out_path: str) -> None:
    """Each case on this rank in turn: warm-up + timed training steps; rank 0 writes every rank's numbers."""
    import gc

    import torch.distributed as dist

    from mcdist.config import ParallelConfig
    from mcdist.model import MCLanguageModel
    from mcdist.parallel.layout import shard_sequence
    from mcdist.parallel.mesh import build_mesh
    from mcdist.parallel.data_parallel import DataParallel, global_token_count

    timers = _Timers()
    _instrument(timers)
    mesh = build_mesh(ParallelConfig(dp=1, sp=world, layout=LAYOUT, backend="gloo"))
    results = {}
    for case in cases:
        gc.collect()
        rss_before = _current_rss_bytes()
        torch.manual_seed(0)
        model = MCLanguageModel(model_config(case["aggregation"], case["state_init"]))
        groups = _layer_groups(model, mesh, LAYOUT)
        parallel = DataParallel(model, mesh)  # DDP over the ranks: the backward sums the gradients
        generator = torch.Generator().manual_seed(1)
        L = case["seq_len"]
        ids = torch.randint(0, VOCAB, (BATCH, L), generator=generator)
        labels = torch.roll(ids, -1, 1)
        local_ids = shard_sequence(ids, world, mesh.sp_rank, LAYOUT).contiguous()
        local_labels = shard_sequence(labels, world, mesh.sp_rank, LAYOUT).contiguous()
        del ids, labels
        steps = []
        for index in range(case["warmup"] + case["repeats"]):
            model.zero_grad(set_to_none=True)
            for group in groups:
                group.stats.reset()
            timers.reset()
            _barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            with torch.set_grad_enabled(not case["forward_only"]):
                share = parallel.loss_sum(local_ids, local_labels) / global_token_count(local_labels)
            forward = time.perf_counter() - start
            if not case["forward_only"]:
                share.backward()
            local, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            _barrier()
            total = time.perf_counter() - start
            if index >= case["warmup"]:
                steps.append(dict(step_s=total, forward_s=forward, local_s=local, cpu_s=cpu,
                                  comm_wait_s=dict(timers.seconds), received=_per_layer(groups, "received"),
                                  sent=_per_layer(groups, "sent"),
                                  loss_share=float(share.detach())))
            del share
        results[case["name"]] = dict(rank=rank, max_rss=_max_rss_bytes(), rss_before=rss_before, steps=steps)
        del model, groups
    everyone = [results]
    if dist.is_initialized():
        everyone = [None] * world
        dist.all_gather_object(everyone, results)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(everyone, handle)


# -- driver ----------------------------------------------------------------------------------------------------


def run_cases(cases: list, sp: int, timeout_s: float, tmp_dir: str, in_process: bool = False) -> list:
    """Run ``cases`` one after the other in one set of ``sp`` fresh processes (or, for sp = 1 and
    ``in_process``, in this process); one summary per case."""
    from mcdist.parallel.layout import check_sequence_length
    from mcdist.parallel.spawn import spawn

    for case in cases:
        check_sequence_length(case["seq_len"], sp, C, LAYOUT)
    path = os.path.join(tmp_dir, f"{cases[0]['name']}-{sp}.json")
    start = time.perf_counter()
    if sp == 1 and in_process:  # no process group needed: save a process start-up (--quick)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            step_worker(0, 1, cases, path)
        finally:
            torch.set_num_threads(threads)
    else:
        # collective timeout: one ring step of the 1M-token case takes minutes on 2 shared cores
        spawn(step_worker, sp, cases, path, timeout_s=timeout_s, backend="gloo", collective_timeout_s=timeout_s,
              threads_per_rank=1)
    elapsed = time.perf_counter() - start
    with open(path) as handle:
        ranks = json.load(handle)
    return [summarise(case, sp, [r[case["name"]] for r in ranks], elapsed, fresh=len(cases) == 1)
            for case in cases]


def summarise(case: dict, sp: int, ranks: list, elapsed: float, fresh: bool) -> dict:
    """One case's row: times (slowest rank, median over steps), per-rank RSS, bytes and their analytical figures.

    Args:
        case: the case dict given to ``step_worker``. sp: ranks. ranks: every rank's raw numbers for the case.
        elapsed: seconds of the whole process set (start-up included). fresh: whether it ran in its own processes.
    """
    repeats = len(ranks[0]["steps"])
    step_times = [max(r["steps"][i]["step_s"] for r in ranks) for i in range(repeats)]
    forward_times = [max(r["steps"][i]["forward_s"] for r in ranks) for i in range(repeats)]
    per_rank = []
    for r in ranks:
        last = r["steps"][-1]
        expected = analytical_bytes(case["seq_len"], sp, r["rank"], case["state_init"])
        received = last["received"]
        read = received.get("ring", 0.0)
        per_rank.append(dict(
            rank=r["rank"], max_rss_gib=r["max_rss"] / 2**30,
            rss_increase_gib=(r["max_rss"] - r["rss_before"]) / 2**30,
            received_per_layer=received, sent_per_layer=last["sent"], analytical=expected,
            read_ratio=read / expected["needed_read"] if expected["needed_read"] else None,
            prefix_ratio=(received.get("prefix", 0.0) / expected["prefix"]) if expected["prefix"] else None,
            ring_equals_exact=(read == expected["ring_exact"] and received.get("ring_backward", 0.0) ==
                               (0 if case["forward_only"] else expected["ring_backward_exact"])),
            comm_wait_s={k: statistics.median(s["comm_wait_s"].get(k, 0.0) for s in r["steps"])
                         for k in r["steps"][-1]["comm_wait_s"]},
            step_local_s=statistics.median(s["local_s"] for s in r["steps"]),
            step_cpu_s=statistics.median(s["cpu_s"] for s in r["steps"]),
        ))
    return dict(name=case["name"], fresh_processes=fresh, aggregation=case["aggregation"],
                state_init=case["state_init"], seq_len=case["seq_len"], sp=sp, tokens_per_rank=case["seq_len"] // sp,
                forward_only=case["forward_only"], repeats=repeats, warmup=case["warmup"],
                estimated_peak_gib_all_ranks=estimated_peak_bytes(case["seq_len"], sp, case["forward_only"]) / 2**30,
                step_s=statistics.median(step_times), step_s_all=step_times,
                forward_s=statistics.median(forward_times), spawn_total_s=elapsed,
                cpu_s=max(r["step_cpu_s"] for r in per_rank), cpu_s_all_ranks=sum(r["step_cpu_s"] for r in per_rank),
                loss=sum(r["steps"][-1]["loss_share"] for r in ranks), per_rank=per_rank)


def _mib(x):
    return f"{x / 2**20:.2f}"


def print_main(rows: list) -> None:
    """The main table: one line per rank of every case."""
    print("\nmain: one training step, zigzag, B = 1, float32, linear memory, C = 1024 "
          "(time = slowest rank, median; bytes received per rank per layer)")
    header = (f"{'case':<18}{'L':>9}{'P':>3}{'reps':>5}{'step s':>8}{'fwd s':>8}{'rank':>5}{'max RSS GiB':>12}"
              f"{'ring MiB':>10}{'budget MiB':>11}{'ratio':>7}{'ring bwd MiB':>13}{'prefix KiB':>11}"
              f"{'ctx KiB':>9}{'cpu s':>8}{'wait s':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        for r in row["per_rank"]:
            got = r["received_per_layer"]
            wait = sum(r["comm_wait_s"].values())
            ratio = f"{r['read_ratio']:.2f}" if r["read_ratio"] is not None else "-"
            if r["rank"] == 0:
                lead = (f"{row['name']:<18}{row['seq_len']:>9}{row['sp']:>3}{row['repeats']:>5}"
                        f"{row['step_s']:>8.1f}{row['forward_s']:>8.1f}")
            else:
                lead = " " * 51
            print(f"{lead}{r['rank']:>5}{r['max_rss_gib']:>12.2f}{_mib(got.get('ring', 0)):>10}"
                  f"{_mib(r['analytical']['needed_read']):>11}{ratio:>7}{_mib(got.get('ring_backward', 0)):>13}"
                  f"{got.get('prefix', 0) / 1024:>11.1f}{got.get('contexts', 0) / 1024:>9.1f}{r['step_cpu_s']:>8.1f}"
                  f"{wait:>8.1f}")


def print_scaling(scaling: dict) -> None:
    """The scaling rows and efficiencies."""
    print("\nscaling: grm independent (time = slowest rank, median)")
    for row in scaling["rows"]:
        print(f"  {row['name']:<12} P = {row['sp']}: L = {row['seq_len']:>8}, L/P = {row['tokens_per_rank']:>7}: "
              f"step {row['step_s']:.2f} s (forward {row['forward_s']:.2f} s, CPU of the slowest rank "
              f"{row['cpu_s']:.2f} s), "
              f"max RSS {max(r['max_rss_gib'] for r in row['per_rank']):.2f} GiB")
    print(f"  weak-scaling efficiency T1(L/2) / T2(L) = {scaling['efficiency']:.3f} "
          f"(the read is quadratic: a rank's read work at L over 2 ranks is {scaling['read_work_ratio']:.2f}x "
          f"the read work at L/2 on one)")
    print(f"  the same from CPU seconds (each rank as if on its own core): {scaling['cpu_efficiency']:.3f}")
    if scaling.get("strong_efficiency") is not None:
        print(f"  strong-scaling efficiency T1(L) / (2 T2(L)) = {scaling['strong_efficiency']:.3f}")


def machine_info() -> dict:
    """CPU, memory and software versions for the JSON."""
    info = dict(platform=platform.platform(), python=sys.version.split()[0], torch=torch.__version__,
                cpu_count=os.cpu_count(), threads_per_rank=1, backend="gloo")
    try:
        with open("/proc/meminfo") as handle:
            info["mem_total_gib"] = int(handle.readline().split()[1]) / 2**20
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        info["cpu"] = names[0] if names else "unknown"
    except OSError:
        pass
    return info


def read_work(seq_len: int) -> float:
    """Visible (token, cached state) pairs of the grm read over the whole sequence: Σ_t segment(t)."""
    n = seq_len // C
    return C * n * (n - 1) / 2


def main(argv=None) -> dict:
    """Parse the arguments, run every case, print the tables and write the JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="L = 16K on P = 2 (under a minute)")
    parser.add_argument("--out", default="benchmarks/results/sp_cpu.json")
    parser.add_argument("--length", type=int, default=None, help="L of the main cases (default 1M, quick 16K)")
    parser.add_argument("--ranks", type=int, default=None, help="P of the main cases (default 4, quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per main case (default 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 0, quick 1)")
    parser.add_argument("--cases", default="grm-independent,grm-checkpoint,ssc-independent,ssc-checkpoint")
    parser.add_argument("--scaling-tokens-per-rank", type=int, default=None, help="default 131072, quick 8192")
    parser.add_argument("--scaling-repeats", type=int, default=None, help="default 3, quick 1")
    parser.add_argument("--skip-main", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-strong", action="store_true",
                        help="no single-process run at the full scaling L (always skipped by --quick)")
    parser.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=None,
                        help="fresh processes for every case, so the peak RSS is the case's own (default: on, "
                             "off with --quick, where one process set runs every case of one P)")
    parser.add_argument("--forward-only", action="store_true",
                        help="main cases: forward of the loss under no_grad only (memory: no saved activations)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None,
                        help="set MALLOC_MMAP_THRESHOLD_ (bytes) for the ranks: glibc then returns freed large blocks "
                             "to the OS, so the peak RSS shows the memory in use rather than the allocator's "
                             "retention (slower: more page faults)")
    parser.add_argument("--force", action="store_true", help="run even when the memory estimate exceeds what is free")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per case before every rank is killed")
    args = parser.parse_args(argv)
    quick = args.quick
    length = args.length or (16384 if quick else 1 << 20)
    ranks = args.ranks or (2 if quick else 4)
    repeats = args.repeats or 1
    warmup = args.warmup if args.warmup is not None else (1 if quick else 0)
    per_rank = args.scaling_tokens_per_rank or (8192 if quick else 131072)
    scaling_repeats = args.scaling_repeats or (1 if quick else 3)

    import tempfile

    from mcdist.config import write_text_atomic

    results = dict(machine=machine_info(), quick=quick, load_before=os.getloadavg(),
                   model=dict(d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, head_dim=HEAD_DIM, segment_len=C,
                              chunk_len=CHUNK_LEN, memory="linear", top_k=TOP_K, vocab_size=VOCAB, layout=LAYOUT,
                              batch=BATCH, dtype="float32", impl="chunked"),
                   main=[], scaling=None)
    print(f"machine: {results['machine'].get('cpu', '?')}, {os.cpu_count()} cores, "
          f"{results['machine'].get('mem_total_gib', 0):.1f} GiB; gloo, 1 thread per rank; load {os.getloadavg()}")
    plan = []  # (section, case, sp)
    aliases = {}  # scaling case -> the identical main case it reuses
    if not args.skip_main:
        from mcdist.config import AGGREGATIONS, STATE_INITS

        for name in args.cases.split(","):
            aggregation, _, state_init = name.partition("-")
            if aggregation not in AGGREGATIONS or state_init not in STATE_INITS:
                parser.error(f"--cases entry {name!r} is invalid; expected aggregation-state_init with aggregation "
                             f"in {list(AGGREGATIONS)} and state_init in {list(STATE_INITS)}")
            plan.append(("main", dict(name=name, aggregation=aggregation, state_init=state_init, seq_len=length,
                                      repeats=repeats, warmup=warmup, forward_only=args.forward_only), ranks))
    if not args.skip_scaling:
        scaling_plan = [("weak-p1", 1, per_rank), ("weak-p2", 2, 2 * per_rank)]
        if not (args.skip_strong or quick):
            scaling_plan.append(("strong-p1", 1, 2 * per_rank))
        for name, sp, seq_len in scaling_plan:
            case = dict(name=name, aggregation="grm", state_init="independent", seq_len=seq_len,
                        repeats=scaling_repeats, warmup=1, forward_only=False)
            same = [c["name"] for section, c, p in plan
                    if p == sp and {**c, "name": name} == case]  # e.g. --quick: weak-p2 is grm-independent
            if same:
                aliases[name] = same[0]
            else:
                plan.append(("scaling", case, sp))
    if args.malloc_mmap_threshold is not None:  # read by glibc when each spawned rank starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    results["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    for _, case, sp in plan:
        check_fits(case["seq_len"], sp, case["forward_only"], args.force)
    fresh = not quick if args.fresh is None else args.fresh
    groups = [[item] for item in plan] if fresh else \
        [[item for item in plan if item[2] == sp] for sp in dict.fromkeys(item[2] for item in plan)]
    summaries = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        for group in groups:
            start = time.perf_counter()
            sp = group[0][2]
            for row in run_cases([case for _, case, _ in group], sp, args.timeout, tmp_dir,
                                 in_process=not fresh and args.malloc_mmap_threshold is None):
                summaries[row["name"]] = row
                print(f"  {row['name']}: L = {row['seq_len']}, P = {sp}: step {row['step_s']:.2f} s", flush=True)
            print(f"    ({time.perf_counter() - start:.0f} s for this process set, start-up included)", flush=True)
            if args.out:  # what is done so far, in case a later case is stopped
                write_text_atomic(args.out, json.dumps({**results, "partial": True, "cases": summaries}, indent=2))
    results["fresh_processes_per_case"] = fresh
    results["aliases"] = aliases
    results["main"] = [summaries[case["name"]] for section, case, _ in plan if section == "main"]
    if results["main"]:
        print_main(results["main"])
    if not args.skip_scaling:
        rows = [summaries[aliases.get(name, name)] for name, _, _ in scaling_plan]
        t1, t2 = rows[0]["step_s"], rows[1]["step_s"]
        results["scaling"] = dict(
            rows=rows, efficiency=t1 / t2, cpu_efficiency=rows[0]["cpu_s"] / rows[1]["cpu_s"],
            read_work_ratio=(read_work(2 * per_rank) / 2) / read_work(per_rank) if read_work(per_rank) else None,
            strong_efficiency=rows[2]["step_s"] / (2 * t2) if len(rows) > 2 else None)
        print_scaling(results["scaling"])
    results["load_after"] = os.getloadavg()
    if args.out:
        write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()

"""
bench.py: training throughput of single vs padded vs packed (vs the fixed-length ideal) on the same
documents, and per-op timings of the packed conv1d and scan against their memory floor.

    python bench.py                                  # 1.4b on a GPU (tiny on CPU), D1 lengths, all four modes
    python bench.py --preset 130m --dist d2          # another model, another length distribution
    python bench.py --data_dir data                  # the real document lengths of pack.py's train shards
    python bench.py --ops                            # per-op timings instead of the model
    python bench.py --ops --ops_impl kernels         # the kernels only (the references take most of the time)
    python bench.py --preset 2.8b --compile blocks   # compile each block on its own: minutes less per mode
    python bench.py --device cpu --max_tokens 4096 --seq_len 256 --vocab_size 257   # CPU smoke test
    python bench.py --help                           # all options and their defaults

Every mode runs the same documents (a document is [EOT, t1, ..., tn]; its length counts the EOT)
through the same model: torch.compile (as train.py), bf16 autocast on CUDA, forward + backward + fused
AdamW step. Longer documents than --seq_len are cut into pieces first (pack.cut_document).
  single  one document per step at its own length (B=1, pos=None); the length dimension is marked
          dynamic, so one compiled graph serves every length (the compile count is reported)
  padded  consecutive documents grouped while (group size + 1) x longest <= batch_size x seq_len,
          padded to the group's longest (targets -1), pos=None; batch and length dimensions dynamic
  packed  pack.pack_documents into rows of seq_len (+1), batch_size rows per step, pos from the
          boundaries; the last n_rows % batch_size rows are left out (a partial batch would recompile)
  ideal   as many steps of batch_size full rows of random tokens, pos=None: the ceiling for packed
Throughput = real tokens (targets != -1) per second. Each mode first runs all its steps once
(compile + warm-up, not timed), then --repeats timed passes over the same steps; the median pass counts.
Random documents use token ids below vocab_size - 1 and EOT = vocab_size - 1 (as gpt2 and pack.py's
byte encoding do). Results go to --out (JSON, with the environment) and a PNG chart next to it.

--ops times kernels.causal_conv1d and kernels.selective_scan (Triton on CUDA) and their PyTorch
references at d_inner = --widths on batch_size rows of seq_len, pos from the packed documents or None.
The kernels are timed on the GPU alone (gpu_ms: CUDA graphs, L2 flushed before every call, as the CUDA
figures were), the references with triton.testing.do_bench (median, L2 flushed).
"% floor" = floor ms / ms, where the floor = bytes that must move (each input read once, each output
written once; the backward reads the inputs and dout and writes every gradient) / the device-to-device
copy bandwidth of this run.
The kernels' forward + backward calls their forward and backward ops directly, as a compiled block
does (through the autograd engine, one op alone would time mostly the host); the references' goes
through autograd. The references loop over tokens in Python: they are timed on one row only, few times
(the scan's fwd+bwd takes ~2.6 s per call at d_inner 5120 on an H200); --ops_impl kernels leaves them out.
On CPU the ops are the references themselves and timed with perf_counter (a test of this script only).
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np
import torch
import triton
import triton.testing
from torch._dynamo.utils import counters

import kernels
import pack
from model import PEAK_BF16_FLOPS, MambaConfig, MambaLM

MODES = ("single", "padded", "packed", "ideal")
OPS_IMPLS = ("kernels", "ref")
# the paper's CUDA code on the H200 this is run on, same settings, real tokens/s
REF_TOKENS_PER_S = {
    "130m": {"packed": 122856, "ideal": 174183, "padded": 60684, "single": 13695},
    "1.4b": {"packed": 21788, "ideal": 30165, "padded": 10125, "single": 6442},
    "2.8b": {"packed": 12269, "ideal": 16859, "padded": 5576, "single": 4079},
}
# the paper's CUDA kernels on the same H200, forward + backward, 8 rows x 2048, ms: (packed, pos=None)
REF_OPS_MS = {
    ("scan", 1536): (2.575, 2.195), ("scan", 4096): (6.742, 5.686), ("scan", 5120): (8.458, 7.097),
    ("conv", 1536): (0.205, 0.085), ("conv", 4096): (0.546, 0.201), ("conv", 5120): (0.648, 0.247),
}
LR = 1e-4  # the learning rate does not change the speed; small keeps random-token training finite

# -----------------------------------------------------------------------------
# documents


def prefix(lengths, max_tokens):
    """The shortest prefix of lengths whose sum reaches max_tokens (all of them if none does)."""
    return lengths[:int(np.searchsorted(np.cumsum(lengths), max_tokens)) + 1]


def doc_lengths(dist, max_tokens):
    """DESIGN.md's D1 (lognormal, median 512, sigma 1, clipped to [16, 2048]) or D2 (uniform [64, 2048])."""
    n = max_tokens // 16 + 1  # enough draws: every length is >= 16
    if dist == "d1":
        lengths = np.clip(np.rint(np.random.default_rng(0).lognormal(np.log(512), 1.0, n)), 16, 2048)
    else:
        lengths = np.random.default_rng(1).integers(64, 2049, n)
    return prefix(lengths.astype(np.int64), max_tokens)


def make_documents(args):
    """-> (documents [EOT, t...] int64, vocab_size, eot, name of the source)."""
    if args.data_dir:
        shards = pack.open_split(args.data_dir, "train")
        docs = []
        for shard in shards:
            docs += shard.documents()
            if sum(len(d) for d in docs) >= args.max_tokens:
                break
        docs = docs[:len(prefix(np.array([len(d) for d in docs]), args.max_tokens))]
        return docs, shards[0].vocab_size, shards[0].eot, os.path.basename(os.path.normpath(args.data_dir))
    eot = args.vocab_size - 1
    rng = np.random.default_rng(2)
    docs = []
    for n in doc_lengths(args.dist, args.max_tokens):
        d = rng.integers(0, eot, n)
        d[0] = eot
        docs.append(d)
    return docs, args.vocab_size, eot, args.dist


def padded_groups(lengths, budget):
    """Consecutive documents; one joins the group while (group size + 1) x longest <= budget.
    -> list of groups of indices."""
    groups, longest = [], 0
    for i, n in enumerate(lengths):
        if groups and (len(groups[-1]) + 1) * max(longest, n) <= budget:
            groups[-1].append(i)
            longest = max(longest, n)
        else:
            groups.append([i])
            longest = n
    return groups


def make_batches(mode, docs, eot, vocab_size, args, device):
    """-> list of steps (x, y, pos or None), on device, and the number of input slots (B x L summed)."""
    B, L = args.batch_size, args.seq_len
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    steps = []
    if mode == "single":
        for d in docs:
            x, y = pack.pad_documents([d], eot)  # (1, n) each: [EOT, t...] and [t..., EOT]
            steps.append((to(x), to(y), None))
    elif mode == "padded":
        for g in padded_groups([len(d) for d in docs], B * L):
            x, y = pack.pad_documents([docs[i] for i in g], eot)  # (len(g), longest) each
            steps.append((to(x), to(y), None))
    else:
        tokens, cu = pack.pack_documents(docs, L, eot, rng=np.random.default_rng(0))  # rows in training order
        n_steps = len(tokens) // B
        if n_steps == 0:
            raise SystemExit(f"bench.py: the documents fill {len(tokens)} rows of {L}, fewer than one step of "
                             f"--batch_size {B}; raise --max_tokens")
        if mode == "packed":
            x, y, pos = pack.batch_rows(tokens[:n_steps * B], cu[:n_steps * B], L)
            steps = [(to(x[i:i + B]), to(y[i:i + B]), to(pos[i:i + B])) for i in range(0, n_steps * B, B)]
        else:  # ideal
            rng = np.random.default_rng(3)
            for _ in range(n_steps):
                row = rng.integers(0, vocab_size, (B, L + 1))  # (B, L+1)
                steps.append((to(row[:, :L]), to(row[:, 1:]), None))
    if mode in ("single", "padded"):  # one graph for every shape: symbolic lengths (and group sizes)
        for x, y, _ in steps:
            for t in (x, y):
                torch._dynamo.mark_dynamic(t, 1)
                if mode == "padded":
                    torch._dynamo.maybe_mark_dynamic(t, 0)  # a lone document (size 1) stays static
    if args.steps:
        steps = steps[:args.steps]
    return steps, sum(x.numel() for x, _, _ in steps)


# -----------------------------------------------------------------------------
# end-to-end throughput


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_mode(steps, model, opt, device, repeats):
    """Warm-up pass (compiles), then timed passes. -> dict of pass times and compile counts."""
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def one_pass():
        sync(device)
        t0 = time.perf_counter()
        for x, y, pos in steps:
            with autocast:
                _, loss = model(x, y, pos)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    torch._dynamo.reset()  # each mode compiles afresh: no shapes remembered from another mode
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    graphs = counters["stats"]["unique_graphs"]
    warmup_s = one_pass()
    compiles = counters["stats"]["unique_graphs"] - graphs
    return {"warmup_s": warmup_s, "compiles": compiles, "pass_s": [one_pass() for _ in range(repeats)],
            "recompiles_timed": counters["stats"]["unique_graphs"] - graphs - compiles}


def bench_model(args, device, docs, vocab_size, eot, source):
    cfg = MambaConfig.from_preset(args.preset, vocab_size=vocab_size, recompute=args.recompute)
    model = MambaLM(cfg).to(device)
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=LR, betas=(0.9, 0.95), fused=device == "cuda")
    compile_mode = {"auto": "on" if device == "cuda" else "off"}.get(args.compile, args.compile)
    run = torch.compile(model) if compile_mode == "on" else model  # as train.py compiles it
    if compile_mode == "blocks":  # each Block compiled on its own: one graph serves all layers, far quicker
        for layer in model.layers:
            layer.compile()
        model.head = torch.compile(model.head)  # and the head: final norm, lm_head + loss (a custom op)
    gpu = torch.cuda.get_device_name() if device == "cuda" else ""
    peak = next((f for k, f in PEAK_BF16_FLOPS.items() if k in gpu), None)
    print(f"model {args.preset}: {model.num_params() / 1e6:.1f}M parameters, {model.flops_per_token() / 1e9:.2f} "
          f"GFLOP/token; {len(docs)} documents, {sum(len(d) for d in docs):,} tokens ({source}); "
          f"compile {compile_mode}, recompute {'on' if args.recompute else 'off'}", flush=True)
    results = {}
    for mode in [m for m in MODES if m in args.modes]:
        steps, slots = make_batches(mode, docs, eot, vocab_size, args, device)
        real = sum(int((y != -1).sum()) for _, y, _ in steps)
        r = run_mode(steps, run, opt, device, args.repeats)
        r.update(steps=len(steps), real_tokens=real, slots=slots, median_s=statistics.median(r["pass_s"]))
        r["tokens_per_s"] = real / r["median_s"]
        if mode == "single":
            r["distinct_lengths"] = len({x.shape[1] for x, _, _ in steps})
        if mode == "padded":
            r["padding_fraction"] = 1 - real / slots
        if mode == "packed":
            r["fill"] = real / slots
        if device == "cuda":
            r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if peak:
            r["mfu"] = model.flops_per_token() * r["tokens_per_s"] / peak
        ref = REF_TOKENS_PER_S.get(args.preset, {}).get(mode)
        if ref and args.dist == "d1" and not args.data_dir and args.seq_len == 2048 and args.batch_size == 8:
            r["ref_tokens_per_s"] = ref
        results[mode] = r
        print(f"{mode:7s} {len(steps)} steps, {real:,} real tokens: compile + warm-up {r['warmup_s']:.1f}s "
              f"({r['compiles']} graphs compiled, {r['recompiles_timed']} during timing), passes "
              f"{' '.join(f'{t:.3f}' for t in r['pass_s'])} s -> {r['tokens_per_s']:,.0f} tokens/s", flush=True)
        if r["recompiles_timed"]:
            print(f"warning: {mode} recompiled {r['recompiles_timed']} times during the timed passes")
    for r in results.values():
        for base in ("single", "padded"):
            if base in results:
                r[f"speedup_vs_{base}"] = r["tokens_per_s"] / results[base]["tokens_per_s"]
    return {"preset": args.preset, "params": model.num_params(), "flops_per_token": model.flops_per_token(),
            "compile": compile_mode, "peak_bf16_flops": peak, "modes": results}


def print_model_table(res):
    print(f"\n{'mode':8s} {'tokens/s':>10s} {'x single':>8s} {'x padded':>8s} {'pad/fill':>11s} {'peak GiB':>8s} "
          f"{'MFU':>6s} {'theirs':>9s} {'ours/theirs':>11s}")
    for mode, r in res["modes"].items():
        f = lambda k, fmt: format(r[k], fmt) if k in r else "-"
        pad = (f"pad {r['padding_fraction']:.1%}" if "padding_fraction" in r
               else f"fill {r['fill']:.1%}" if "fill" in r else "-")
        ratio = f"{r['tokens_per_s'] / r['ref_tokens_per_s']:.2f}" if "ref_tokens_per_s" in r else "-"
        print(f"{mode:8s} {r['tokens_per_s']:10,.0f} {f('speedup_vs_single', '.2f'):>8s} "
              f"{f('speedup_vs_padded', '.2f'):>8s} {pad:>11s} {f('peak_mem_gib', '.1f'):>8s} {f('mfu', '.1%'):>6s} "
              f"{f('ref_tokens_per_s', ',d'):>9s} {ratio:>11s}")


def plot(res, title, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: matplotlib is not installed (pip install matplotlib)")
        return
    modes = list(res["modes"])
    ours = [res["modes"][m]["tokens_per_s"] for m in modes]
    theirs = [res["modes"][m].get("ref_tokens_per_s", 0) for m in modes]
    x = np.arange(len(modes))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = ax.bar(x - 0.2 * any(theirs), ours, 0.4, label="packmamba")
    if any(theirs):
        ax.bar(x + 0.2, theirs, 0.4, label="paper's CUDA code", color="lightgray")
    base = res["modes"].get("single")
    ax.bar_label(bars, [f"{v:,.0f}" + (f"\n{v / base['tokens_per_s']:.2f}x single" if base else "") for v in ours])
    ax.set_xticks(x, modes)
    ax.set_ylabel("real tokens/s (fwd + bwd + AdamW)")
    ax.set_title(title)
    ax.legend()
    ax.margins(y=0.2)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------
# per-op timings


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def time_ms(fn, device, grads=(), quick=False):
    """Median ms of fn: triton.testing.do_bench on CUDA (L2 flushed between calls), perf_counter on CPU."""
    if device == "cuda":
        w, r = (1, 1) if quick else (25, 100)  # quick: do_bench's 5 estimate calls + 1 warm-up + 1 timed
        return triton.testing.do_bench(fn, warmup=w, rep=r, grad_to_none=list(grads), return_mode="median")
    fn()
    ts = []
    for _ in range(3):
        for g in grads:
            g.grad = None
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def gpu_ms(fn, target_ms=50.0):
    """GPU time of fn in ms without the host, L2 flushed before every call: fn's kernels, as a compiled
    model's CUDA graph or a busy GPU queue runs them. Two CUDA graphs, n x (flush, fn) and n x flush, each
    replayed 5 times; the difference of the medians / n. (do_bench times from the host's first launch, so
    a kernel shorter than its Python launcher times the launcher: 0.1 ms kernels measured 0.1 to 0.3 ms.)"""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # as do_bench's L2 flush
    fn()  # compiles the kernels outside the capture
    n = max(1, min(500, round(target_ms / triton.testing.do_bench(fn, warmup=1, rep=1))))

    def replay_ms(body):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                body()
        ts = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            ts.append(start.elapsed_time(end))
        return statistics.median(ts)

    return (replay_ms(lambda: (flush.zero_(), fn())) - replay_ms(flush.zero_)) / n


def op_inputs(op, Bb, L, D, pos, device):
    """Inputs of one op as the model feeds them under bf16 autocast (conv weights fp32, A/D/delta_bias fp32)."""
    g = torch.Generator(device).manual_seed(0)
    rand = lambda *s, dtype=torch.bfloat16, scale=1.0: (scale * torch.randn(*s, generator=g, device=device)).to(dtype)
    if op == "conv":  # x (B, L, D), weight (D, 4), bias (D,)
        return [rand(Bb, L, D), rand(D, 4, dtype=torch.float32, scale=0.5), rand(D, dtype=torch.float32), pos]
    N = 16  # u, delta (B, L, D); A (D, N); B, C (B, L, N); D (D,); z (B, L, D); delta_bias (D,)
    A = -torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(D, 1)
    return [rand(Bb, L, D), rand(Bb, L, D, scale=0.5), A, rand(Bb, L, N), rand(Bb, L, N),
            torch.ones(D, device=device), rand(Bb, L, D), rand(D, dtype=torch.float32, scale=0.5) - 4, pos]


def forward_backward_ops(op, inputs, dout):
    """The op's forward and backward custom ops called directly, without the autograd engine between them:
    the GPU work of one training step's op. (One op alone through autograd times mostly the host's hand-off
    to the engine and back, ~0.5 ms for the conv; notes/perf.md.)"""
    if op == "conv":
        x, weight, bias, pos = inputs
        kernels._conv1d_fwd(x, weight, bias, pos, True)
        kernels._conv1d_bwd(dout, x, weight, bias, pos, True)
    else:  # u, delta, A, B, C, D, z, delta_bias, pos
        _, states = kernels._scan_fwd(*inputs, True)
        kernels._scan_bwd(dout, *inputs, states, True)


def bench_ops(args, device, docs, eot):
    B, L = args.batch_size, args.seq_len
    tokens, cu = pack.pack_documents(docs, L, eot, rng=np.random.default_rng(0))
    if len(tokens) < B:
        raise SystemExit(f"bench.py: the documents fill {len(tokens)} rows, fewer than --batch_size {B}")
    pos_packed = torch.from_numpy(pack.batch_rows(tokens[:B], cu[:B], L)[2]).to(device)  # (B, L), as packed mode's 1st step
    n_copy = int(args.copy_gib * 2**30)
    src = torch.empty(n_copy, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    bandwidth = 2 * n_copy / (copy_ms * 1e-3)  # bytes/s, read + write
    del src, dst
    print(f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s ({args.copy_gib} GiB device-to-device copy, {copy_ms:.3f} ms)")
    ops = {"conv": (kernels.causal_conv1d, kernels.causal_conv1d_ref),
           "scan": (kernels.selective_scan, kernels.selective_scan_ref)}
    rows = []
    for D in args.widths:
        for op, (fast, ref) in ops.items():
            for bounds in ("packed", "none"):
                for impl, fn, Bb in (("kernels", fast, B), ("ref", ref, 1)):  # the reference on one row only
                    if impl not in args.ops_impl:
                        continue
                    pos = pos_packed[:Bb] if bounds == "packed" else None
                    inputs = op_inputs(op, Bb, L, D, pos, device)
                    grads = [t for t in inputs if t is not None and t.is_floating_point()]
                    out = fn(*inputs)
                    dout = torch.randn_like(out)
                    fwd_bytes = nbytes(*inputs, out)
                    bwd_bytes = nbytes(*inputs, dout, *grads)
                    if impl == "kernels":  # the ops as a compiled block calls them; on CUDA the GPU's time alone
                        timed = gpu_ms if device == "cuda" else lambda f: time_ms(f, device)
                        fwd_ms = timed(lambda: fn(*inputs))
                        fb_ms = timed(lambda: forward_backward_ops(op, inputs, dout))
                    else:
                        fwd_ms = time_ms(lambda: fn(*inputs), device, quick=True)  # no grads required yet
                        for t in grads:
                            t.requires_grad_(True)
                        fb_ms = time_ms(lambda: fn(*inputs).backward(dout), device, grads, quick=True)
                    theirs = REF_OPS_MS.get((op, D))
                    for passes, ms, nb in (("fwd", fwd_ms, fwd_bytes), ("fwd+bwd", fb_ms, fwd_bytes + bwd_bytes)):
                        floor_ms = 1e3 * nb / bandwidth
                        rows.append({"op": op, "impl": impl, "width": D, "pos": bounds, "pass": passes,
                                     "rows": Bb, "seq_len": L, "ms": ms, "floor_ms": floor_ms,
                                     "pct_floor": floor_ms / ms, "bytes": nb,
                                     "ref_cuda_ms": theirs[bounds == "none"] if theirs and passes == "fwd+bwd"
                                     and impl == "kernels" and (B, L) == (8, 2048) else None})
                    del inputs, grads, out, dout
    return {"copy_gib": args.copy_gib, "copy_ms": copy_ms, "bandwidth_gb_s": bandwidth / 1e9, "ops": rows}


def print_ops_table(res):
    print(f"\n{'op':5s} {'impl':8s} {'width':>5s} {'pos':7s} {'pass':8s} {'rows':>4s} {'ms':>9s} {'floor ms':>9s} "
          f"{'% floor':>7s} {'theirs ms':>9s} {'ours/theirs':>11s}")
    for r in res["ops"]:
        theirs = f"{r['ref_cuda_ms']:.3f}" if r["ref_cuda_ms"] else "-"
        ratio = f"{r['ms'] / r['ref_cuda_ms']:.2f}" if r["ref_cuda_ms"] else "-"
        print(f"{r['op']:5s} {r['impl']:8s} {r['width']:5d} {r['pos']:7s} {r['pass']:8s} {r['rows']:4d} "
              f"{r['ms']:9.3f} {r['floor_ms']:9.3f} {r['pct_floor']:7.1%} {theirs:>9s} {ratio:>11s}")
    print(f"% floor = floor ms / ms at {res['bandwidth_gb_s']:,.0f} GB/s; theirs = the paper's CUDA kernels on the "
          f"H200; ref rows: the PyTorch reference, one row only (a Python loop over tokens)")


# -----------------------------------------------------------------------------


def environment(device, argv):
    return {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "numpy": np.__version__, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(["python", "bench.py", *argv])}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="auto", help="model size (model.PRESETS); auto: 1.4b on CUDA, tiny on CPU")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of single, padded, packed, ideal")
    parser.add_argument("--dist", default="d1", choices=["d1", "d2"], help="document lengths (DESIGN.md)")
    parser.add_argument("--data_dir", default="", help="use the documents of pack.py's train shards here instead")
    parser.add_argument("--max_tokens", type=int, default=131072, help="shortest prefix of documents reaching this")
    parser.add_argument("--seq_len", type=int, default=2048, help="row length L; longer documents are cut")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per step (packed, ideal); padded "
                        "groups hold at most batch_size x seq_len tokens")
    parser.add_argument("--vocab_size", type=int, default=50257, help="for random documents (EOT = vocab_size-1)")
    parser.add_argument("--steps", type=int, default=0, help="time only the first N steps of each mode (0: all "
                        "of them; with fewer the modes no longer cover the same documents)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per mode; the median counts")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "blocks", "off"],
                        help="torch.compile the model (auto: on CUDA), or each block on its own (blocks: compiles in a "
                             "fraction of the time for deep models; the head, norm + lm_head + loss, is compiled on its "
                             "own too, the embedding runs eagerly)")
    parser.add_argument("--recompute", action="store_true", help="MambaConfig.recompute: every block recomputes its cheap "
                        "activations in the backward instead of saving them (less memory, a little more compute)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if available")
    parser.add_argument("--ops", action="store_true", help="per-op timings (conv, scan) instead of the model")
    parser.add_argument("--widths", default="1536,4096,5120", help="--ops: d_inner values")
    parser.add_argument("--ops_impl", default=",".join(OPS_IMPLS), help="--ops: comma list of kernels, ref "
                        "(the PyTorch references, slow: a Python loop over tokens)")
    parser.add_argument("--copy_gib", type=float, default=2.0, help="--ops: size of the copy that measures bandwidth")
    parser.add_argument("--out", default="", help="JSON path; default bench_results/bench_<preset>_<dist>.json "
                        "(ops_<dist>.json with --ops); the chart goes next to it as .png")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.preset == "auto":
        args.preset = "1.4b" if device == "cuda" else "tiny"
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in args.modes if m not in MODES]:
        parser.error(f"unknown --modes {', '.join(bad)}; choose from {', '.join(MODES)}")
    args.widths = [int(w) for w in args.widths.split(",")]
    impls = [i.strip() for i in args.ops_impl.split(",") if i.strip()]
    if not impls or any(i not in OPS_IMPLS for i in impls):
        parser.error(f"--ops_impl {args.ops_impl!r}: give a comma list of {', '.join(OPS_IMPLS)}")
    args.ops_impl = impls
    if device == "cpu" and args.ops:
        args.copy_gib = min(args.copy_gib, 0.0625)

    docs, vocab_size, eot, source = make_documents(args)
    docs = [p for d in docs for p in pack.cut_document(np.asarray(d, np.int64), args.seq_len)]
    out = args.out or os.path.join("bench_results", f"{'ops' if args.ops else 'bench_' + args.preset}_{source}.json")
    result = {"env": environment(device, argv), "args": vars(args), "documents": source, "n_docs": len(docs),
              "n_tokens": sum(len(d) for d in docs)}
    if args.ops:
        result.update(bench_ops(args, device, docs, eot))
    else:
        result.update(bench_model(args, device, docs, vocab_size, eot, source))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    if args.ops:
        print_ops_table(result)
    else:
        plot(result, f"{args.preset} on {result['env']['device']}, {source} ({len(docs)} documents)",
             os.path.splitext(out)[0] + ".png")
        print_model_table(result)
    return result


if __name__ == "__main__":
    main()

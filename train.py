"""
train.py: train a Mamba language model on the shards of pack.py, packed or padded.

    python pack.py && python train.py --packed     # CUDA: the 130m model; CPU: a tiny one, a few minutes
    python train.py                                # the padded baseline: one document per row
    python train.py --packed --preset 370m --batch_size 4 --grad_accum 8 --max_iters 20000
    python train.py --packed --resume              # continue the run in --out_dir from its ckpt.pt
    python train.py --help                         # every option with its default

--packed feeds the rows as pack.py stored them: several documents per row, kept apart by the
per-token position index pos. Without it every document gets a row of its own, padded to the row
length (the baseline packing is measured against). Both read the same shards and see the same
documents; tok/s counts real tokens (targets != -1) per second of forward + backward + optimizer step.

Defaults marked "auto" depend on the device (CUDA: bf16 autocast, fused AdamW, torch.compile;
CPU: fp32, eager, a tiny model) and are printed at start. Output in --out_dir: ckpt.pt (written
atomically every --ckpt_interval steps and at the end) and log.jsonl (one record per step and eval).
"""

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from model import PEAK_BF16_FLOPS, PRESETS, MambaConfig, MambaLM
from pack import ShardError, open_split, pad_documents, shard_names

# defaults of the options left at "auto": (on CUDA, on CPU)
AUTO = {
    "preset": ("130m", "tiny"),
    "dtype": ("bfloat16", "float32"),
    "compile": (True, False),  # on CPU the scan runs its PyTorch reference outside the graph: compiling costs ~1 min, gains nothing
    "batch_size": (8, 1),
    "max_iters": (5000, 50),
    "eval_interval": (250, 25),
    "eval_iters": (20, 4),
}


class TrainError(Exception):
    """A user-facing error: main prints it as one line and exits with status 2."""


def auto_or(kind, minimum=None):
    """argparse type: "auto" or a number of `kind` that is at least `minimum`."""
    def parse(s):
        if s == "auto":
            return s
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected auto or a {kind.__name__}, got {s!r}") from None
        if minimum is not None and v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {s}")
        return v
    return parse


def at_least(kind, minimum):
    def parse(s):
        v = auto_or(kind, minimum)(s)
        if v == "auto":
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got 'auto'")
        return v
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", default="data", help="folder of pack.py's train_*.bin, val_*.bin")
    p.add_argument("--out_dir", default="out", help="where ckpt.pt and log.jsonl go")
    p.add_argument("--packed", action="store_true", help="packed rows; without it one document per row, padded to the row length")
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS], help="model size (auto: 130m on CUDA, tiny on CPU)")
    p.add_argument("--batch_size", type=auto_or(int, 1), default="auto", help="rows per micro-batch (auto: 8 on CUDA, 1 on CPU)")
    p.add_argument("--grad_accum", type=at_least(int, 1), default=1, help="micro-batches per optimizer step")
    p.add_argument("--max_iters", type=auto_or(int, 1), default="auto", help="optimizer steps in all (auto: 5000 on CUDA, 50 on CPU)")
    p.add_argument("--lr", type=at_least(float, 0.0), default=3e-3, help="peak learning rate (the Mamba paper's for 130m)")
    p.add_argument("--min_lr", type=auto_or(float, 0.0), default="auto", help="learning rate at the end of the cosine (auto: lr/10)")
    p.add_argument("--warmup_iters", type=auto_or(int, 0), default="auto", help="linear warmup steps (auto: max_iters/20, at most 200)")
    p.add_argument("--lr_decay_iters", type=auto_or(int, 1), default="auto", help="steps of the cosine decay (auto: max_iters)")
    p.add_argument("--weight_decay", type=at_least(float, 0.0), default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--beta2", type=at_least(float, 0.0), default=0.95, help="AdamW beta2")
    p.add_argument("--grad_clip", type=at_least(float, 0.0), default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--eval_interval", type=auto_or(int, 1), default="auto", help="steps between evals on val (auto: 250 on CUDA, 25 on CPU)")
    p.add_argument("--eval_iters", type=auto_or(int, 1), default="auto", help="val batches per eval (auto: 20 on CUDA, 4 on CPU)")
    p.add_argument("--ckpt_interval", type=at_least(int, 1), default=500, help="steps between checkpoints (one is also written at the end)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt: same data position, step and lr schedule")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default="auto", help="torch.compile the model (auto: on for CUDA, off for CPU)")
    p.add_argument("--recompute", action="store_true", help="recompute the cheap activations of every block in the "
                   "backward instead of saving them (MambaConfig.recompute: at d_model 2048, 34 instead of 54 KB per token "
                   "per layer compiled; a little more compute, same math)")
    p.add_argument("--threads", type=auto_or(int, 1), default="auto",
                   help="torch CPU threads (auto: 1 on CPU, where the reference scan is a loop of small ops that "
                        "more threads slow down, badly so on a busy machine; torch's default on CUDA)")
    p.add_argument("--seed", type=int, default=1337, help="model init and the order of the training data")
    return p.parse_args(argv)


def resolve(args):
    """Fill in the "auto" defaults for the device; check what argparse can't."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise TrainError(f"--device {args.device}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {args.device}: this torch sees no CUDA GPU; use --device cpu")
    if dev.type not in ("cuda", "cpu"):
        raise TrainError(f"--device {args.device}: only cuda and cpu are supported")
    on_cpu = dev.type == "cpu"
    for name, choices in AUTO.items():
        if getattr(args, name) == "auto":
            setattr(args, name, choices[on_cpu])
    if args.threads == "auto":
        args.threads = 1 if on_cpu else torch.get_num_threads()
    torch.set_num_threads(args.threads)
    if args.warmup_iters == "auto":
        args.warmup_iters = min(200, args.max_iters // 20)
    if args.lr_decay_iters == "auto":
        args.lr_decay_iters = args.max_iters
    if args.min_lr == "auto":
        args.min_lr = args.lr / 10
    if args.min_lr > args.lr:
        raise TrainError(f"--min_lr {args.min_lr} is above --lr {args.lr}")
    return dev


# -----------------------------------------------------------------------------
# data: the train items (rows, or documents for the padded baseline) in a seeded shuffled order

class Batches:
    """Batches of `batch_size` items from shards. Packed: an item is a row. Padded: an item is a
    document, padded to a row. With shuffle, epoch e visits the items in the order
    permutation(seed, e), wrapping into the next epoch; (epoch, index) is the data position."""

    def __init__(self, shards, packed, batch_size, seed, shuffle=True):
        self.shards, self.packed, self.batch_size, self.seed, self.shuffle = shards, packed, batch_size, seed, shuffle
        if packed:  # (shard, row)
            self.items = np.concatenate([np.stack([np.full(s.n_rows, k), np.arange(s.n_rows)], 1)
                                         for k, s in enumerate(shards)])
        else:  # (shard, row, start, end) of every document, from the boundary table alone
            parts = []
            for k, s in enumerate(shards):
                row_of = np.repeat(np.arange(s.n_rows), np.diff(np.asarray(s.row_ptr)))  # row of each entry of cu
                cu = np.asarray(s.cu, np.int64)
                same = row_of[:-1] == row_of[1:]  # consecutive entries of one row bound a document
                parts.append(np.stack([np.full(same.sum(), k), row_of[:-1][same], cu[:-1][same], cu[1:][same]], 1))
            self.items = np.concatenate(parts)
        self.seq_len, self.eot = shards[0].seq_len, shards[0].eot
        self.epoch, self.index = 0, 0
        self._order = None

    def order(self):
        if self._order is None or self._order[0] != self.epoch:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.items)) if self.shuffle \
                else np.arange(len(self.items))
            self._order = (self.epoch, perm)
        return self._order[1]

    def next(self):
        """-> x (B, L) int64, y (B, L) int64 (-1: no target), pos (B, L) int32 or None (padded)."""
        picked, n = [], 0
        while n < self.batch_size:
            take = self.order()[self.index:self.index + self.batch_size - n]
            picked.append(take)
            n += len(take)
            self.index += len(take)
            if self.index == len(self.items):
                self.epoch, self.index = self.epoch + 1, 0
        return self.make(self.items[np.concatenate(picked)])

    def make(self, items):
        if self.packed:
            parts = [self.shards[k].rows(items[items[:, 0] == k, 1]) for k in np.unique(items[:, 0])]
            x, y, pos = (np.concatenate(a) for a in zip(*parts))
            return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(pos)
        docs = [np.asarray(self.shards[k].tokens[r, a:b], np.int64) for k, r, a, b in items]
        x, y = pad_documents(docs, self.eot, self.seq_len)
        return torch.from_numpy(x), torch.from_numpy(y), None

    def state(self):
        return {"epoch": self.epoch, "index": self.index}


def load_data(args):
    """-> train shards, val shards (None where pack.py held no document out)."""
    train = open_split(args.data_dir, "train")
    if not shard_names(args.data_dir, "val"):
        print(f"note: no val shards in {args.data_dir}: training without evaluation")
        return train, None
    val = open_split(args.data_dir, "val")
    a, b = train[0], val[0]
    if (a.encoding, a.vocab_size, a.eot, a.seq_len) != (b.encoding, b.vocab_size, b.eot, b.seq_len):
        raise TrainError(f"train shards ({a.encoding}, vocab {a.vocab_size}, eot {a.eot}, seq_len {a.seq_len}) and val "
                         f"shards ({b.encoding}, vocab {b.vocab_size}, eot {b.eot}, seq_len {b.seq_len}) in {args.data_dir} "
                         f"come from different runs; re-run `python pack.py --overwrite --out_dir {args.data_dir}`")
    return train, val


# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, model, optimizer, cfg, step, data, args):
    ckpt = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": asdict(cfg), "step": step,
        "data": data.state(), "n_items": len(data.items), "args": vars(args),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact


def load_checkpoint(path, cfg, args, n_items):
    """Read ckpt.pt and check that it belongs to this run's model and data."""
    if not os.path.exists(path):
        raise TrainError(f"--resume: no checkpoint at {path}; drop --resume to start a new run, "
                         f"or pass the --out_dir of the run to continue")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own file: it holds RNG states
        old_cfg, old_args = ckpt["config"], ckpt["args"]
    except Exception as e:
        raise TrainError(f"--resume: cannot read {path} ({type(e).__name__}: {e}); delete it or use another --out_dir") from None
    new_cfg = asdict(cfg)
    diff = [f"{k} {old_cfg.get(k)} -> {v}" for k, v in new_cfg.items()
            if k not in ("ops", "recompute") and old_cfg.get(k) != v]  # those two don't change the math
    if diff:
        raise TrainError(f"--resume: {path} holds a preset {old_args.get('preset')} model, this run asks for preset "
                         f"{args.preset} ({', '.join(diff)}); pass --preset {old_args.get('preset')} with the same "
                         f"data to continue it, or another --out_dir to start a new run")
    if old_args.get("packed") != args.packed or old_args.get("seed") != args.seed or ckpt.get("n_items") != n_items:
        raise TrainError(f"--resume: {path} was trained {'with' if old_args.get('packed') else 'without'} --packed, "
                         f"--seed {old_args.get('seed')}, on {ckpt.get('n_items')} train items; this run: "
                         f"{'with' if args.packed else 'without'} --packed, --seed {args.seed}, {n_items} items. "
                         f"Use the same data and options to continue it")
    if ckpt["step"] >= args.max_iters:
        raise TrainError(f"--resume: {path} is at step {ckpt['step']} already; pass a larger --max_iters to train on")
    return ckpt


# -----------------------------------------------------------------------------

def get_lr(it, args):
    """Linear warmup, cosine decay to min_lr over lr_decay_iters, then min_lr."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / (args.warmup_iters + 1)
    if it >= args.lr_decay_iters:
        return args.min_lr
    ratio = (it - args.warmup_iters) / max(1, args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


@torch.no_grad()
def evaluate(model, val, n_batches, autocast, dev):
    """Mean loss over the real target tokens of the first n_batches val batches (always the same ones)."""
    model.eval()
    n = min(n_batches, math.ceil(len(val.items) / val.batch_size))
    total, count = 0.0, 0
    for i in range(n):
        items = val.items[i * val.batch_size:(i + 1) * val.batch_size]
        x, y, pos = (None if t is None else t.to(dev) for t in val.make(items))
        with autocast:
            _, loss = model(x, y, pos)
        k = int((y != -1).sum())
        total, count = total + loss.item() * k, count + k
    model.train()
    return total / max(count, 1)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train(args):
    dev = resolve(args)
    train_shards, val_shards = load_data(args)
    vocab, seq_len = train_shards[0].vocab_size, train_shards[0].seq_len
    data = Batches(train_shards, args.packed, args.batch_size, args.seed)
    val = Batches(val_shards, args.packed, args.batch_size, args.seed, shuffle=False) if val_shards else None

    torch.manual_seed(args.seed)
    cfg = MambaConfig.from_preset(args.preset, vocab_size=vocab, recompute=args.recompute)
    model = MambaLM(cfg).to(dev)
    optimizer = torch.optim.AdamW(model.optimizer_groups(args.weight_decay), lr=args.lr, betas=(0.9, args.beta2),
                                  fused=dev.type == "cuda")
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")
    step = 0
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, cfg, args, len(data.items))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        data.epoch, data.index = ckpt["data"]["epoch"], ckpt["data"]["index"]
        rng = ckpt["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    elif os.path.exists(ckpt_path):
        print(f"note: {ckpt_path} exists and will be overwritten (pass --resume to continue that run instead)")

    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    run_model = torch.compile(model) if args.compile else model
    peak = next((f for name, f in PEAK_BF16_FLOPS.items() if dev.type == "cuda" and name in torch.cuda.get_device_name(dev)), None)
    flops_per_token = model.flops_per_token()

    real = sum(int(np.asarray(s.cu)[np.asarray(s.row_ptr)[1:] - 1].sum()) for s in train_shards)  # rows' used lengths
    rows = len(data.items)
    print(f"device {dev} | dtype {args.dtype} | compile {'on' if args.compile else 'off'} | "
          f"recompute {'on' if args.recompute else 'off'} | threads {args.threads} | seed {args.seed}")
    print(f"model  preset {args.preset} (d_model {cfg.d_model}, n_layer {cfg.n_layer}, vocab {vocab}) | "
          f"{model.num_params() / 1e6:.2f}M params | {flops_per_token / 1e6:.1f} MFLOPs/token")
    print(f"data   {args.data_dir}: {'packed' if args.packed else 'padded'}, {rows:,} train "
          f"{'rows' if args.packed else 'documents'} of {seq_len} tokens, {real:,} real tokens, "
          f"row fill {real / (rows * seq_len):.1%} | val {len(val.items) if val is not None else 0:,} "
          f"{'rows' if args.packed else 'documents'}")
    print(f"train  batch {args.batch_size} x {seq_len} x grad_accum {args.grad_accum} | max_iters {args.max_iters} | "
          f"lr {args.lr:g} -> {args.min_lr:g}, warmup {args.warmup_iters}, decay {args.lr_decay_iters} | "
          f"eval every {args.eval_interval} ({args.eval_iters} batches) | out {args.out_dir}"
          + (f" | resumed at step {step}, epoch {data.epoch}, item {data.index}" if args.resume else ""))

    log = open(log_path, "a" if args.resume else "w")

    def record(line, **fields):
        tqdm.write(line)
        log.write(json.dumps(fields) + "\n")
        log.flush()

    if step == 0 and val is not None:
        val_loss = evaluate(run_model, val, args.eval_iters, autocast, dev)
        record(f"eval step 0 | val loss {val_loss:.4f}", step=0, val_loss=val_loss)
    bar = tqdm(total=args.max_iters, initial=step, desc="train", unit="step", dynamic_ncols=True)
    timings = []  # (seconds, real tokens) of each step of this process
    while step < args.max_iters:
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [data.next() for _ in range(args.grad_accum)]  # made before the clock starts
        counts = [int((y != -1).sum()) for _, y, _ in batches]  # real target tokens, counted on the host
        n_real = sum(counts)
        sync(dev)
        t0 = time.perf_counter()
        step_loss = 0.0
        for (x, y, pos), count in zip(batches, counts):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            pos = None if pos is None else pos.to(dev, non_blocking=True)
            with autocast:
                _, loss = run_model(x, y, pos)
            weight = count / max(n_real, 1)  # every real target token of the step counts the same
            (loss * weight).backward()
            step_loss += loss.detach() * weight
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = step_loss.item()  # syncs
        dt = time.perf_counter() - t0
        step += 1
        timings.append((dt, n_real))
        tok_s = n_real / dt
        mfu = flops_per_token * tok_s / peak if peak else None
        record(f"step {step}/{args.max_iters} | loss {step_loss:.4f} | lr {lr:.1e} | {tok_s:,.0f} tok/s"
               + (f" | mfu {mfu:.1%}" if mfu is not None else "") + f" | {dt * 1000:.0f} ms",
               step=step, loss=step_loss, lr=lr, tokens=n_real, tok_per_s=tok_s, mfu=mfu, ms=dt * 1000,
               epoch=data.epoch, index=data.index)
        bar.update(1)
        if val is not None and (step % args.eval_interval == 0 or step == args.max_iters):  # outside the clock
            val_loss = evaluate(run_model, val, args.eval_iters, autocast, dev)
            record(f"eval step {step} | val loss {val_loss:.4f}", step=step, val_loss=val_loss)
        if step % args.ckpt_interval == 0 or step == args.max_iters:
            save_checkpoint(ckpt_path, model, optimizer, cfg, step, data, args)
    bar.close()
    log.close()
    mem = f" | peak memory {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB" if dev.type == "cuda" else ""
    skip = 1 if args.compile and len(timings) > 1 else 0  # the first compiled step includes the compilation
    train_time, train_tokens = (sum(t) for t in zip(*timings[skip:]))
    print(f"done   step {step} | {train_tokens / train_time:,.0f} tok/s over {len(timings) - skip} steps "
          f"({train_time:.1f}s{', the first step with compilation left out' if skip else ''}){mem} | "
          f"checkpoint {ckpt_path}")


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (TrainError, ShardError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

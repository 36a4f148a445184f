"""
GPU sweep for the Triton kernels: scan correctness against the fp64 reference, then scan forward and
backward times for several (BD, num_warps) configurations at d_inner 1536/4096/5120 (8 rows x 2048,
D1 packing), then the conv sweep (bench_conv). The results of each version are in notes/results/ and
notes/perf.md. Run from the repository root on a GPU (SKIP_CONV=1 skips the conv sweep):
    python notes/kernel_sweep.py [out.json]
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, ".")
import kernels  # noqa: E402

dev = "cuda"


def d1_pos(B, L, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(B):
        p, used = [], 0
        while used < L:
            n = int(np.clip(round(rng.lognormal(math.log(512), 1.0)), 16, 2048))
            n = min(n, L - used)
            p.append(np.arange(n)); used += n
        rows.append(np.concatenate(p))
    return torch.tensor(np.stack(rows), dtype=torch.int32, device=dev)


def inputs(B, L, Dm, N=16, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=dev, generator=g)
    xz = r(B, L, 2 * Dm).to(dtype)
    u, z = xz[..., :Dm], xz[..., Dm:]
    delta = (r(B, L, Dm) * 0.5 - 1).to(dtype)
    A = -torch.exp(torch.log(torch.arange(1, N + 1, device=dev, dtype=torch.float32))).repeat(Dm, 1) * (0.5 + torch.rand(Dm, N, device=dev, generator=g))
    xbc = r(B, L, 64 + 2 * N).to(dtype)
    Bm, Cm = xbc[..., 64:64 + N], xbc[..., 64 + N:]
    D = r(Dm); bias = r(Dm) * 0.5 - 3
    return u, delta, A, Bm, Cm, D, z, bias


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def copy_tbs():
    """Device-to-device copy bandwidth of 2 GiB (read + write), TB/s."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    return 2 * x.numel() / (do_bench(lambda: y.copy_(x), return_mode="median") * 1e-3) / 1e12


def timing_shapes(B=8, L=2048, widths=(1536, 4096, 5120)):
    """The timing sweeps' shapes, B rows x L tokens packed from D1 lengths: yields (d_inner, scan inputs
    (bf16), an output gradient, pos)."""
    pos = d1_pos(B, L)
    for Dm in widths:
        yield Dm, inputs(B, L, Dm), torch.randn(B, L, Dm, device=dev, dtype=torch.bfloat16), pos


def bench_conv(B=8, L=2048, D=4096, dtype=torch.bfloat16, W=4, configs=None):
    """Median ms of forward and forward+backward (do_bench), packed and pos=None, per config.

    Also returns the memory floor: bytes the forward (x in, out) and backward (x, dout in,
    dx out) must move, and the floor in ms at the copy bandwidth measured here.
    """
    from triton.testing import do_bench

    dev = "cuda"
    torch.manual_seed(0)
    x = torch.randn(B, L, D, device=dev, dtype=dtype)  # (B, L, D)
    weight = torch.randn(D, W, device=dev, dtype=dtype) * 0.5
    bias = torch.randn(D, device=dev, dtype=dtype) * 0.1
    dout = torch.randn(B, L, D, device=dev, dtype=dtype)
    pos = d1_pos(B, L)
    if configs is None:  # the defaults first, then a sweep around them
        configs = [{}] + [dict(num_warps=nw, BLOCK_D=32 * nw * vb // x.element_size(), BLOCK_L=bl, AHEAD=a)
                          for nw in (2, 4) for vb in (8, 16) for bl in (64, 128) for a in (1, 2, 3)]
        configs.append(dict(num_warps=4, BLOCK_D=128 * 8 // x.element_size(), BLOCK_L=128, ROWS=2))

    nbytes = x.numel() * x.element_size()
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_gbps = 2 * nbytes / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6
    res = {"fwd_floor_bytes": 2 * nbytes, "bwd_floor_bytes": 3 * nbytes, "copy_GBps": copy_gbps,
           "fwd_floor_ms": 2 * nbytes / copy_gbps / 1e6, "fwd+bwd_floor_ms": 5 * nbytes / copy_gbps / 1e6}
    for name, p in (("packed", pos), ("nopos", None)):
        for cfg in configs:
            key = f"{name} " + (" ".join(f"{k}={v}" for k, v in cfg.items()) or "defaults")
            fwd = lambda: kernels.conv1d_fwd_triton(x, weight, bias, p, True, **cfg)
            both = lambda: (fwd(), kernels.conv1d_bwd_triton(x, weight, bias, p, dout, True, **cfg))
            res[key + " fwd_ms"] = do_bench(fwd, return_mode="median")
            res[key + " fwd+bwd_ms"] = do_bench(both, return_mode="median")
    return res


def main():
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    res["copy_bw_TBs"] = copy_tbs()
    bw = res["copy_bw_TBs"] * 1e12
    print(f"copy bandwidth {bw/1e12:.2f} TB/s", flush=True)

    # correctness at 2 rows x 2048, d_inner 1536 (bf16 and fp32 inputs vs fp64 reference)
    B, L, Dm = 2, 2048, 1536
    pos = d1_pos(B, L)
    for dtype in (torch.bfloat16, torch.float32):
        args = inputs(B, L, Dm, dtype=dtype)
        a64 = [t.double() for t in args]
        for p in (pos, None):
            ref64, st64 = kernels.selective_scan_ref(*a64[:5], a64[5], a64[6], a64[7], p, True, return_states=True)
            ref32 = kernels.selective_scan_ref(*[t.float() for t in args[:5]], args[5], args[6].float(), args[7], p, True)
            out, st = kernels.scan_fwd_triton(*args, p, True)
            dout = torch.randn_like(out)
            g64 = kernels.selective_scan_bwd_ref(dout.double(), *a64[:5], a64[5], a64[6], a64[7], p, True)
            g32 = kernels.selective_scan_bwd_ref(dout.float(), *[t.float() for t in args[:5]], args[5], args[6].float(), args[7], p, True)
            gt = kernels.scan_bwd_triton(dout, *args, p, st, True)
            names = "du ddelta dA dB dC dD dz dbias".split()
            row = {"out": (rel(out, ref64), rel(ref32.to(dtype), ref64)), "states": (rel(st, st64), 0.0)}
            for nm, a, b, c in zip(names, gt, g64, g32):
                row[nm] = (rel(a, b), rel(c.to(a.dtype), b))
            key = f"check_{str(dtype)[6:]}_{'packed' if p is not None else 'nopos'}"
            res[key] = row
            bad = [k for k, (e, eref) in row.items() if not (e <= max(3 * eref, 1e-5))]
            print(key, "BAD " + str(bad) if bad else "ok", {k: f"{e:.1e}/{r:.1e}" for k, (e, r) in row.items()}, flush=True)

    # timings
    fwd_cfgs = [(32, 1), (16, 1), (64, 2), (128, 4)]
    bwd_cfgs = [(32, 1), (16, 1), (8, 1), (32, 2)]
    B, L = 8, 2048
    res["timings"] = []
    table = []
    for Dm, args, dout, pos in timing_shapes(B, L):
        out, st = kernels.scan_fwd_triton(*args, pos, True)
        elt = B * L * Dm
        fwd_bytes = 2 * elt * 4 + 2 * B * L * 16 * 2 + B * L * 4 + st.numel() * 4  # u, delta, z, out; B, C; pos; states
        bwd_bytes = 2 * elt * 7 + 4 * B * L * 16 * 2 + B * L * 4 + st.numel() * 4  # u, delta, z, dout, du, ddelta, dz; B, C, dB, dC
        best = {}
        for kind, cfgs in (("fwd", fwd_cfgs), ("bwd", bwd_cfgs)):
            for (BD, W) in cfgs:
                kw = dict(BD=BD, num_warps=W)
                try:
                    if kind == "fwd":
                        fn = lambda: kernels.scan_fwd_triton(*args, pos, True, **kw)
                    else:
                        fn = lambda: kernels.scan_bwd_triton(dout, *args, pos, st, True, **kw)
                    t0 = time.time(); fn(); torch.cuda.synchronize(); ct = time.time() - t0
                    ms = do_bench(fn, return_mode="median")
                except Exception as e:
                    print(kind, Dm, kw, "FAILED", repr(e)[:200], flush=True); continue
                floor = (fwd_bytes if kind == "fwd" else bwd_bytes) / bw * 1e3
                res["timings"].append(dict(kind=kind, Dm=Dm, BD=BD, num_warps=W, ms=ms, floor_ms=floor, compile_s=ct))
                print(f"{kind} Dm={Dm} BD={BD} w={W}: {ms:.3f} ms (floor {floor:.3f}, compile {ct:.1f}s)", flush=True)
                if kind not in best or ms < best[kind][0]:
                    best[kind] = (ms, kw)
        # pos=None with the best configs, and the op end to end (fwd+bwd through autograd)
        nopos = {}
        for kind in ("fwd", "bwd"):
            kw = best[kind][1]
            if kind == "fwd":
                out0, st0 = kernels.scan_fwd_triton(*args, None, True, **kw)
                nopos[kind] = do_bench(lambda: kernels.scan_fwd_triton(*args, None, True, **kw), return_mode="median")
            else:
                nopos[kind] = do_bench(lambda: kernels.scan_bwd_triton(dout, *args, None, st0, True, **kw), return_mode="median")
        table.append((Dm, best["fwd"], best["bwd"], nopos))
        res.setdefault("best", []).append(dict(Dm=Dm, fwd=best["fwd"], bwd=best["bwd"], nopos=nopos))

    conv_rows = []
    for Dm in () if os.environ.get("SKIP_CONV") else (1536, 4096, 5120):
        r = bench_conv(D=Dm, configs=None if Dm == 4096 else [{}])
        res[f"conv_{Dm}"] = r
        for mode in ("packed", "nopos"):
            keys = [k for k in r if k.startswith(mode) and k.endswith("fwd+bwd_ms")]
            k = min(keys, key=lambda k: r[k])
            conv_rows.append((Dm, mode, r[k], r["fwd+bwd_floor_ms"], k))
    if len(sys.argv) > 1:
        json.dump(res, open(sys.argv[1], "w"), indent=1)
    print("\nconv  Dm  mode   fwd+bwd ms  floor  best config")
    for row in conv_rows:
        print(f"{row[0]:5d} {row[1]:7s} {row[2]:.3f} {row[3]:.3f}  {row[4]}")
    print("\nDm    fwd ms (cfg)            bwd ms (cfg)             fwd+bwd  | pos=None fwd+bwd | boundary cost")
    for Dm, f, b_, npz in table:
        tot = f[0] + b_[0]; tn = npz["fwd"] + npz["bwd"]
        print(f"{Dm:5d} {f[0]:.3f} {f[1]}  {b_[0]:.3f} {b_[1]}  {tot:.3f} | {tn:.3f} | {100*(tot/tn-1):+.1f}%")


if __name__ == "__main__":
    main()

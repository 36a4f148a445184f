"""
GPU sweep of the scan's segment counts: first the scan against the fp64 reference at 2 rows x 2048,
d_inner 1536, bf16, for 1, 3 and 8 segments; then the GPU time (bench.gpu_ms) of the forward at several
segment counts, packed and pos=None, at d_inner 1536/4096/5120 (8 rows x 2048, D1 packing), with the count
kernels._segments picks. The backward's two passes have a sweep of their own, notes/scan_bwd_grid.py.
Results: notes/results/scan_segments_h200.json (from the version before the two-pass backward, which swept
the one-pass backward here too; notes/results/scan_v4_sweep_h200.json came from the v4 version of this
script: do_bench times, pos=None at the best count only, and the v3 kernels' times), discussed in
notes/perf.md. Run from the repository root on a GPU:
    python notes/scan_sweep.py out.json
"""
import json
import sys

import torch
import triton

sys.path.insert(0, ".")
sys.path.insert(0, "notes")
import bench  # noqa: E402
import kernels  # noqa: E402
from kernel_sweep import d1_pos, inputs, rel, timing_shapes  # noqa: E402

FWD_COUNTS = {1536: (1, 4, 6, 8, 11, 16), 4096: (1, 2, 3, 4, 8), 5120: (1, 2, 3, 4, 8)}


def main(out):
    res = {"env": bench.environment("cuda", [])}
    # correctness: error against fp64 vs the fp32 reference's own error, per output and gradient
    B, L, Dm = 2, 2048, 1536
    pos = d1_pos(B, L)
    args = inputs(B, L, Dm)
    a64 = [t.double() for t in args]
    ref, st64 = kernels.selective_scan_ref(*a64, pos, True, return_states=True)
    ref32 = kernels.selective_scan_ref(*[t.float() for t in args], pos, True)
    dout = torch.randn_like(args[0])
    g64 = kernels.selective_scan_bwd_ref(dout.double(), *a64, pos, True)
    g32 = kernels.selective_scan_bwd_ref(dout.float(), *[t.float() for t in args], pos, True)
    names = "du ddelta dA dB dC dD dz dbias".split()
    for seg in (1, 3, 8):
        o, st = kernels.scan_fwd_triton(*args, pos, True, segments=seg)
        gt = kernels.scan_bwd_triton(dout, *args, pos, st, True, segments=seg)
        row = {"out": (rel(o, ref), rel(ref32.to(o.dtype), ref)), "states": (rel(st, st64), 1e-6)}
        for nm, a, b, c in zip(names, gt, g64, g32):
            row[nm] = (rel(a, b), rel(c.to(a.dtype), b))
        bad = [k for k, (e, r) in row.items() if not e <= max(3 * r, 1e-5)]
        print("check seg", seg, "BAD " + str(bad) if bad else "ok", flush=True)
        res[f"check_seg{seg}"] = row
    # GPU ms, L2 flushed before each call
    for Dm, args, dout, pos in timing_shapes():
        t = {}
        programs = triton.cdiv(Dm, kernels.SCAN_FWD_CONFIG["BD"]) * args[0].shape[0]
        picked = kernels._segments(args[0], programs, None, kernels.SCAN_FWD_PROGRAMS_PER_SM)[1]
        for bounds, p in (("packed", pos), ("nopos", None)):
            for seg in FWD_COUNTS[Dm]:
                t[f"fwd_s{seg}_{bounds}"] = bench.gpu_ms(lambda: kernels.scan_fwd_triton(*args, p, True, segments=seg))
        res[f"t{Dm}"] = dict(t, picked=picked)
        print(Dm, "picked", picked, {k: round(v, 3) for k, v in t.items()}, flush=True)
    print(f"\n{'d_inner':>7s} {'segments':>8s} {'packed':>7s} {'no pos':>7s} {'bounds':>7s}   (forward ms)")
    for Dm in FWD_COUNTS:
        t = res[f"t{Dm}"]
        for seg in FWD_COUNTS[Dm]:
            a, b = t[f"fwd_s{seg}_packed"], t[f"fwd_s{seg}_nopos"]
            mark = " (picked)" if t["picked"] == seg else ""
            print(f"{Dm:7d} {seg:8d} {a:7.3f} {b:7.3f} {a / b - 1:+7.1%}{mark}")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "scan_sweep.json")

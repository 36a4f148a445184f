"""
A/B timing of the scan's Triton kernels: this checkout's kernels.py against other versions of that file,
at the shapes of notes/kernel_sweep.py (8 rows x 2048 tokens packed from D1 lengths, d_inner 1536 /
4096 / 5120, bf16). Each other version is checked first (test_scan_real_size at d_inner 1536 in bf16
and fp32); a version that fails is reported and not timed. Then every version's forward and backward
run on the GPU alone (bench.gpu_ms), packed and pos=None, with each gradient's largest difference from
this checkout's (relative to its largest value). With --fwd, only the forward: its time and its output's
and chunk states' largest differences from this checkout's. With --profile, also each kernel's GPU ms
(torch.profiler) in the passes timed. A table last; everything in out.json. Run from the repository root
on a GPU, the other versions inside the tree (the device copies only the tree), e.g.:
    git show scan-softplus-series:kernels.py > notes/kernels_b.py
    python notes/scan_ab.py out.json notes/kernels_b.py
    python notes/scan_ab.py --fwd out.json notes/kernels_b.py
    python notes/scan_ab.py --widths 1536 --profile out.json notes/kernels_b.py
"""
import argparse
import importlib.util
import json
import os
import shlex
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
sys.path.insert(0, "notes")
import bench  # noqa: E402
import kernels  # noqa: E402
import test_pack  # noqa: E402
from kernel_sweep import timing_shapes  # noqa: E402


def load(path):
    """kernels.py of another version, as a module of its own (its Triton kernels compile on their own)."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(module):
    """'pass', or the first failure of test_scan_real_size at d_inner 1536 with module as kernels."""
    test_pack.kernels = module
    try:
        for dtype in (torch.bfloat16, torch.float32):
            test_pack.test_scan_real_size(dtype, 1536)
        return "pass"
    except AssertionError as e:
        return f"FAIL ({dtype}): {e}"
    finally:
        test_pack.kernels = kernels


def maxdiff(got, ref):
    """The largest difference of any of the tensors got from ref's (None in ref: absent), relative to ref's
    largest value."""
    return max(float((g.float() - r.float()).abs().max() / (r.float().abs().max() + 1e-30))
               for g, r in zip(got, ref) if r is not None)


def kernel_ms(fn):
    """Each kernel's GPU ms in one call of fn: torch.profiler, the mean of 5 calls after a warm-up."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / 5 / 1000 for e in prof.key_averages() if e.device_time_total > 0}


def measure(t, k, key, fn):
    """t[key] = fn's GPU ms; with k (a dict, for --profile) also k[key] = each kernel's."""
    t[key] = bench.gpu_ms(fn)
    if k is not None:
        k[key] = kernel_ms(fn)


def time_fwd(module, args, dout, pos, ref, k):
    """The forward's GPU ms, packed and pos=None, and the largest difference of its output and states from
    ref's (this checkout's; None: these are)."""
    got = module.scan_fwd_triton(*args, pos, True)
    ref = ref or got
    t = {"maxdiff": maxdiff(got, ref)}
    for bounds, p in (("packed", pos), ("nopos", None)):
        measure(t, k, f"fwd_{bounds}", lambda: module.scan_fwd_triton(*args, p, True))
    return t, ref


def time_both(module, args, dout, pos, ref, k):
    """The forward's and the backward's GPU ms, packed and pos=None, and the largest difference of the
    gradients (packed) from ref's (this checkout's; None: these are)."""
    t = {}
    for bounds, p in (("packed", pos), ("nopos", None)):
        _, states = module.scan_fwd_triton(*args, p, True)
        if bounds == "packed":
            grads = module.scan_bwd_triton(dout, *args, p, states, True)
            ref = ref or grads
            t["maxdiff"] = maxdiff(grads, ref)
        measure(t, k, f"fwd_{bounds}", lambda: module.scan_fwd_triton(*args, p, True))
        measure(t, k, f"bwd_{bounds}", lambda: module.scan_bwd_triton(dout, *args, p, states, True))
    return t, ref


def main(out, paths, fwd_only, widths, profile_kernels):
    versions = [("this", kernels)] + [(os.path.basename(p), load(p)) for p in paths]
    res = {"env": dict(bench.environment("cuda", []), command=shlex.join(["python", *sys.argv])),
           "checks": {name: check(module) for name, module in versions[1:]}}
    print("checks:", res["checks"], flush=True)
    versions = [(name, m) for name, m in versions if name == "this" or res["checks"][name] == "pass"]
    timed = time_fwd if fwd_only else time_both
    rows = []
    for Dm, args, dout, pos in timing_shapes(widths=widths):
        ref = None
        for name, module in versions:
            k = {} if profile_kernels else None
            t, ref = timed(module, args, dout, pos, ref, k)
            res[f"{name}_{Dm}"] = t
            rows.append((Dm, name, t))
            print(Dm, name, {key: round(v, 4) for key, v in t.items()}, flush=True)
            if profile_kernels:
                res[f"{name}_{Dm}_kernels"] = k
                for passes, ms in k.items():
                    print(f"  {passes}:", {kernel[:32]: round(v, 4) for kernel, v in ms.items()}, flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    if fwd_only:
        print(f"\n{'d_inner':>7s} {'version':20s} {'fwd':>7s} {'no pos':>7s} {'vs this':>8s} {'maxdiff':>8s}   (ms)")
        base = {}
        for Dm, name, t in rows:
            base.setdefault(Dm, t["fwd_packed"])
            print(f"{Dm:7d} {name:20s} {t['fwd_packed']:7.3f} {t['fwd_nopos']:7.3f} "
                  f"{t['fwd_packed'] / base[Dm] - 1:+8.1%} {t['maxdiff']:8.1e}")
        return
    print(f"\n{'d_inner':>7s} {'version':20s} {'fwd':>7s} {'bwd':>7s} {'fwd+bwd':>8s} {'no pos':>8s} "
          f"{'bounds':>7s} {'vs this':>8s} {'maxdiff':>8s}   (ms, packed unless said)")
    base = {}
    for Dm, name, t in rows:
        both, nopos = t["fwd_packed"] + t["bwd_packed"], t["fwd_nopos"] + t["bwd_nopos"]
        base.setdefault(Dm, both)
        print(f"{Dm:7d} {name:20s} {t['fwd_packed']:7.3f} {t['bwd_packed']:7.3f} {both:8.3f} {nopos:8.3f} "
              f"{both / nopos - 1:+7.1%} {both / base[Dm] - 1:+8.1%} {t['maxdiff']:8.1e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSON file for the results")
    parser.add_argument("versions", nargs="*", help="other versions of kernels.py to time against this one")
    parser.add_argument("--fwd", action="store_true", help="the forward only")
    parser.add_argument("--widths", default="1536,4096,5120", help="d_inner values, comma-separated")
    parser.add_argument("--profile", action="store_true", help="also each kernel's GPU ms (torch.profiler)")
    a = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU")
    main(a.out, a.versions, a.fwd, tuple(int(w) for w in a.widths.split(",")), a.profile)

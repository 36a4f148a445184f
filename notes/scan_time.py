"""
GPU timing of the scan with its default configuration (kernels.py), forward and backward, packed (D1
lengths) and pos=None, 8 rows x 2048 tokens at d_inner 1536/4096/5120, plus the copy bandwidth; then
the host time of one conv forward + backward through autograd (the custom op, and a plain
torch.autograd.Function around the same ops) against a bare autograd call. Results:
notes/results/scan_v5_h200.json, discussed in notes/perf.md. Run from the repository root on a GPU:
    python notes/scan_time.py out.json
"""
import json
import sys
import time

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, ".")
sys.path.insert(0, "notes")
import kernels  # noqa: E402
from kernel_sweep import copy_tbs, timing_shapes  # noqa: E402


def host_us(fn, n=200):
    """Host microseconds per call of fn, the GPU left to catch up (work queued, not waited for)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / n


class ConvFn(torch.autograd.Function):
    """The conv's forward and backward ops under a plain autograd.Function (bias on, pos None)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w, b)
        return kernels._conv1d_fwd(x, w, b, None, True)

    @staticmethod
    def backward(ctx, d):
        x, w, b = ctx.saved_tensors
        return tuple(kernels._conv1d_bwd(d, x, w, b, None, True))


def main(out):
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "copy_TBs": copy_tbs()}
    for Dm, args, dout, pos in timing_shapes():
        t = {}
        for name, p in (("packed", pos), ("nopos", None)):
            _, st = kernels.scan_fwd_triton(*args, p, True)
            t[f"fwd_{name}"] = do_bench(lambda: kernels.scan_fwd_triton(*args, p, True), return_mode="median")
            t[f"bwd_{name}"] = do_bench(lambda: kernels.scan_bwd_triton(dout, *args, p, st, True),
                                        return_mode="median")
        res[f"t{Dm}"] = t
        print(Dm, {k: round(v, 3) for k, v in t.items()}, "fwd+bwd packed %.3f nopos %.3f" % (
            t["fwd_packed"] + t["bwd_packed"], t["fwd_nopos"] + t["bwd_nopos"]), flush=True)
    x = torch.randn(1, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(256, 4, device="cuda", requires_grad=True)
    b = torch.randn(256, device="cuda", requires_grad=True)
    d = torch.randn(1, 64, 256, device="cuda", dtype=torch.bfloat16)
    probe = {
        "trivial_autograd": host_us(lambda: torch.autograd.grad((x * 2).float().sum(), x)),
        "conv_fwd_op_nograd": host_us(lambda: kernels._conv1d_fwd(x.detach(), w.detach(), b.detach(), None, True)),
        "conv_bwd_op": host_us(lambda: kernels._conv1d_bwd(d, x.detach(), w.detach(), b.detach(), None, True)),
        "conv_custom_op_autograd": host_us(lambda: torch.autograd.grad(kernels.causal_conv1d(x, w, b), (x, w, b), d)),
        "conv_autograd_function": host_us(lambda: torch.autograd.grad(ConvFn.apply(x, w, b), (x, w, b), d)),
    }
    res["host_us"] = probe
    print("host us", {k: round(v, 1) for k, v in probe.items()})
    json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])

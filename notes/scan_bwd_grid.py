"""
GPU sweep of the scan backward's grids: each of its two passes (kernels._scan_bwd_states_kernel, forward in
time; kernels._scan_bwd_adjoint_kernel, back) at several segment counts, uncapped (255 registers) or capped at
168 (SCAN_BWD_CAP) or at other caps, the other pass as kernels._bwd_grid sets it, against _bwd_grid's own
choice ("rule"). Also each kernel's GPU time in one backward (torch.profiler), packed and without boundaries.
Shapes as notes/kernel_sweep.py: 8 rows x 2048 tokens packed from D1 lengths, d_inner 1536 / 4096 / 5120, bf16;
backward GPU ms (bench.gpu_ms), packed, and with --nopos also without boundaries (pos=None).
Results: notes/results/scan_twopass_grids*_h200.json, discussed in notes/perf.md. Run from the repository
root on a GPU:
    python notes/scan_bwd_grid.py out.json
    python notes/scan_bwd_grid.py --nopos out.json   # each grid also without boundaries
"""
import json
import shlex
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "notes")
import bench  # noqa: E402
import kernels  # noqa: E402
from kernel_sweep import timing_shapes  # noqa: E402
from scan_ab import kernel_ms  # noqa: E402

RULE = kernels._bwd_grid
# name: {pass: (segments, maxnreg)}, "states" the first pass, "adjoint" the second
VARIANTS = {
    "rule": {},
    "st_u1": dict(states=(1, None)), "st_u2": dict(states=(2, None)), "st_c2": dict(states=(2, 168)),
    "st_c4": dict(states=(4, 168)), "st_c8": dict(states=(8, 168)), "st_c16": dict(states=(16, 168)),
    "ad_c1": dict(adjoint=(1, 168)), "ad_u1": dict(adjoint=(1, None)), "ad_c2": dict(adjoint=(2, 168)),
    "ad_c4": dict(adjoint=(4, 168)), "ad_c8": dict(adjoint=(8, 168)), "ad_u8": dict(adjoint=(8, None)),
    "ad_u2": dict(adjoint=(2, None)), "ad_u4": dict(adjoint=(4, None)),
    # the states pass in one-chunk segments at caps with fewer spills (offline: 192 none, 10 programs per SM)
    "st_c16r192": dict(states=(16, 192)), "st_c16r224": dict(states=(16, 224)),
}


def with_grid(states=None, adjoint=None):
    """Makes kernels._bwd_grid return (segments, maxnreg) as given for a pass, the rule's choice otherwise."""
    def grid(u, programs, segments, carry):
        chosen = adjoint if carry else states
        if chosen is None:
            return RULE(u, programs, segments, carry)
        n_seg, maxnreg = chosen
        seg_len, n_seg = kernels._segments(u, programs, n_seg, 1)  # an explicit count is kept
        return seg_len, n_seg, maxnreg
    kernels._bwd_grid = grid


def main(out, nopos):
    res = {"env": dict(bench.environment("cuda", []), command=shlex.join(["python", *sys.argv]))}
    for Dm, args, dout, packed in timing_shapes():
        for bounds, pos in (("packed", packed), ("nopos", None))[:2 if nopos else 1]:
            _, states = kernels.scan_fwd_triton(*args, pos, True)
            fn = lambda: kernels.scan_bwd_triton(dout, *args, pos, states, True)  # noqa: E731
            tag = f"{Dm}" if bounds == "packed" else f"{Dm}_nopos"  # packed keys as in earlier results
            res[f"kernels_{tag}"] = {k[:60]: ms for k, ms in kernel_ms(fn).items()}
            print(tag, {k: round(v, 3) for k, v in res[f"kernels_{tag}"].items()}, flush=True)
            for name, v in VARIANTS.items():
                with_grid(**v)
                try:
                    res[f"{name}_{tag}"] = bench.gpu_ms(fn)
                finally:
                    kernels._bwd_grid = RULE
                print(f"  {tag} {name:10s} {res[f'{name}_{tag}']:.3f}", flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if a != "--nopos"]
    if len(argv) != 1 or not torch.cuda.is_available():
        raise SystemExit(__doc__ + "\n(needs a GPU)")
    main(argv[0], "--nopos" in sys.argv[1:])

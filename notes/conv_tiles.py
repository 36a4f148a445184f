"""
GPU sweep of the conv's token tile: BLOCK_L (multiples of 8 and 16, not only powers of 2) x register cap,
forward and backward, packed (8 rows x 2048, D1 packing), GPU time (bench.gpu_ms), every output checked
against the default tile's; then the default tile (kernels._token_tile) itself, packed and pos=None, at 4,
8 and 16 rows. What it is for and the numbers: notes/perf.md, "Conv: tokens per program from the waves".
Run from the repository root on a GPU:
    python notes/conv_tiles.py [out.json]
"""
import json
import math
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "notes")
import bench  # noqa: E402
import kernels  # noqa: E402
from kernel_sweep import d1_pos, rel  # noqa: E402


def main(out_path):
    res = []
    for rows in (8, 4, 16):
        pos = d1_pos(rows, 2048)
        for D in (1536, 4096, 5120):
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(rows, 2048, D, device="cuda", generator=g).bfloat16()  # (B, L, D)
            w = torch.randn(D, 4, device="cuda", generator=g) * 0.5  # (D, W)
            b = torch.randn(D, device="cuda", generator=g) * 0.5  # (D,)
            dout = torch.randn(rows, 2048, D, device="cuda", generator=g).bfloat16()
            y0 = kernels.conv1d_fwd_triton(x, w, b, pos, True)
            g0 = kernels.conv1d_bwd_triton(x, w, b, pos, dout, True)
            n_dblocks = math.ceil(D / 512)
            sweeps = [("fwd", BL, cap) for BL in (32, 40, 48, 56, 64, 80, 96, 128) for cap in (64, None)]
            sweeps += [("bwd", BL, cap) for BL in (64, 80, 96, 112, 128, 160, 192) for cap in (None, 96)]
            for which, BL, cap in sweeps if rows == 8 else []:
                if which == "fwd":
                    f = lambda: [kernels.conv1d_fwd_triton(x, w, b, pos, True, BLOCK_L=BL, maxnreg=cap)]
                    ref = [y0]
                else:
                    f = lambda: kernels.conv1d_bwd_triton(x, w, b, pos, dout, True, BLOCK_L=BL, maxnreg=cap)
                    ref = g0
                res.append(dict(rows=rows, D=D, which=which, BLOCK_L=BL, maxnreg=cap,
                                programs=rows * math.ceil(2048 / BL) * n_dblocks,
                                rel_diff=max(rel(o, r) for o, r in zip(f(), ref)), ms=bench.gpu_ms(f, 30.0)))
                print(res[-1], flush=True)
            for p, mode in ((pos, "packed"), (None, "none")):
                fwd = lambda: kernels.conv1d_fwd_triton(x, w, b, p, True)
                bwd = lambda: kernels.conv1d_bwd_triton(x, w, b, p, dout, True)
                res.append(dict(rows=rows, D=D, which="default", pos=mode, fwd_ms=bench.gpu_ms(fwd, 30.0),
                                bwd_ms=bench.gpu_ms(bwd, 30.0), fwd_bwd_ms=bench.gpu_ms(lambda: (fwd(), bwd()), 30.0)))
                print(res[-1], flush=True)
    env = dict(bench.environment("cuda", []), command=f"python notes/conv_tiles.py {out_path}")
    with open(out_path, "w") as f:
        json.dump(dict(env=env, results=res), f, indent=1)
    print("8 rows, best (BLOCK_L, cap): ms")
    for D in (1536, 4096, 5120):
        for which in ("fwd", "bwd"):
            rs = sorted((r for r in res if r["D"] == D and r["which"] == which), key=lambda r: r["ms"])
            print(f"{D:5d} {which}", " | ".join(f"({r['BLOCK_L']}, {r['maxnreg']}): {r['ms']:.4f}" for r in rs[:4]))
    for r in res:
        if r["which"] == "default":
            print(f"{r['rows']:4d} {r['D']:5d} default {r['pos']:6} fwd {r['fwd_ms']:.4f} bwd {r['bwd_ms']:.4f} "
                  f"fwd+bwd {r['fwd_bwd_ms']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "conv_tiles.json")

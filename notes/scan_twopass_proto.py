"""
CPU prototype of the scan backward's two passes (kernels._scan_bwd_states_kernel forward in time, then
kernels._scan_bwd_adjoint_kernel back), in fp32 torch, against the fp64 reference: what rounding the split
of X_t = g_t a_t h_{t-1} into an h-side and a g-side sum costs, for a chunk length and with or without the
term C_t dy_t x_t the two sides share (see kernels.py, notes above _softplus). Prints each gradient's error
(test_pack.rel) next to the fp32 reference's own. Inputs as test_pack.scan_inputs, 2 rows x 2048 tokens
packed from D1 lengths. Numbers in notes/perf.md (section v11). Run from the repository root:
    python notes/scan_twopass_proto.py --chunk 64 --channels 256 --dtype bfloat16
"""
import argparse
import sys

import torch

sys.path.insert(0, ".")
import kernels  # noqa: E402
import test_pack  # noqa: E402


def two_pass(dout, u, delta, A, B, C, D, z, delta_bias, pos, chunk, shared_out):
    """du, ddelta, dA, dB, dC, dz as the two passes form them, every token's state never kept."""
    Bb, L, Dm = u.shape
    dt = torch.nn.functional.softplus(delta + delta_bias)
    a = torch.where((pos == 0)[..., None, None], 0.0, torch.exp(dt[..., None] * A))  # (B, L, Dm, N)
    x = (dt * u)[..., None] * B[:, :, None, :]
    sz = torch.sigmoid(z)
    dy = dout * z * sz
    n_chunks = -(-L // chunk)
    dA = torch.zeros(n_chunks, *A.shape)  # per chunk: the two sides' parts summed before the chunks are
    # first pass: h forward; keeps only the state at each chunk's end and, per token, QA = sum_N A q
    h = torch.zeros(Bb, Dm, A.shape[1])
    QA, y, dC, ends = torch.zeros_like(u), torch.zeros_like(u), torch.zeros_like(B), {}
    for t in range(L):
        P = dt[:, t] if t % chunk == 0 else P + dt[:, t]  # the chunk's dt up to t
        h_prev, h = h, a[:, t] * h + x[:, t]
        y[:, t] = (h * C[:, t, None, :]).sum(-1) + u[:, t] * D
        qC = (a[:, t] * h_prev if shared_out else h) * C[:, t, None, :]  # q / dy
        QA[:, t] = dy[:, t] * (qC * A).sum(-1)
        dA[t // chunk] += (qC * (dy[:, t] * P)[..., None]).sum(0)
        dC[:, t] = (h * dy[:, t, :, None]).sum(1)
        ends[t // chunk] = h
    dz = dout * y * sz * (1 + z * (1 - sz))
    # second pass: the adjoint back; K = X at the chunk's end minus the k terms so far
    gc = torch.zeros_like(h)
    du, ddt, dB = torch.zeros_like(u), torch.zeros_like(u), torch.zeros_like(B)
    for t in reversed(range(L)):
        if t == L - 1 or t % chunk == chunk - 1:
            K, RQ = gc * ends[t // chunk], torch.zeros_like(u[:, 0])
        g = gc + C[:, t, None, :] * dy[:, t, :, None]
        K = K - (gc if shared_out else g) * x[:, t]
        RQ = RQ + QA[:, t]
        gB = (g * B[:, t, None, :]).sum(-1)
        ddt[:, t] = (A * K).sum(-1) + RQ + gB * u[:, t]
        dA[t // chunk] += (K * dt[:, t, :, None]).sum(0)
        du[:, t] = gB * dt[:, t] + dy[:, t] * D
        dB[:, t] = (g * (dt[:, t] * u[:, t])[..., None]).sum(1)
        gc = a[:, t] * g
    ddelta = ddt * torch.sigmoid(delta + delta_bias)
    return dict(du=du, ddelta=ddelta, dA=dA.sum(0), dB=dB, dC=dC, dz=dz, dbias=ddelta.sum((0, 1)))


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--chunk", type=int, default=64, help="tokens per chunk (kernels.CHUNK)")
    p.add_argument("--channels", type=int, default=256, help="d_inner")
    p.add_argument("--dtype", default="bfloat16", help="the inputs are rounded to this, then computed in fp32")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--shared", action="store_true", help="q and k each keep the term C dy x (the first derivation)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    x = test_pack.scan_inputs(2, 2048, args.channels, 16, getattr(torch, args.dtype), "cpu", seed=args.seed)
    x = {k: v.float() for k, v in x.items()}
    pos = test_pack.d1_pos(2, 2048)
    dout = torch.randn(2, 2048, args.channels).to(getattr(torch, args.dtype)).float()
    want = kernels.selective_scan_bwd_ref(dout.double(), **{k: v.double() for k, v in x.items()}, pos=pos)
    own = kernels.selective_scan_bwd_ref(dout, **x, pos=pos)
    got = two_pass(dout, **x, pos=pos, chunk=args.chunk, shared_out=not args.shared)
    for i, name in enumerate(["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias"]):
        if name in got:
            print(f"{name:7s} fp32 reference {test_pack.rel(own[i], want[i]):.2e}   two passes "
                  f"{test_pack.rel(got[name], want[i]):.2e}")


if __name__ == "__main__":
    main()

"""
Packed sequence-mixing ops for Mamba: depthwise causal conv1d and the selective scan.

Each op resets at document boundaries, given as a per-token position index
pos (B, L) int32 (the token's offset inside its document, 0 at each start;
pos=None means one document per row):
  conv: the tap that looks k tokens back contributes only where pos >= k.
  scan: where pos == 0 the state entering the token is dropped (decay set to 0).

Every op has a pure PyTorch reference twin (`*_ref`, same signature). The public
functions `causal_conv1d` and `selective_scan` are torch custom ops (fake
kernels, autograd, backward ops of their own) so torch.compile(fullgraph=True)
traces through them: CUDA tensors run the Triton kernels below, CPU tensors run
the reference. At the end of the file, the LM head's loss, `linear_cross_entropy`
(the lm_head matmul and cross-entropy a chunk of rows at a time, never the whole
logits), is a custom op of the same kind.

Checked by test_pack.py (on a GPU: python -m pytest -q -k "cuda or real_size"), timed by
python bench.py --ops and the scripts in notes/ (notes/scan_time.py: the default configuration;
notes/scan_ab.py: other versions of this file against it), the scan's machine code read offline
(no GPU) by notes/sass.py; the numbers are in notes/perf.md.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from torch import Tensor

# The scan forward keeps the fp32 state at the end of every CHUNK tokens for the
# backward, which recomputes everything else from the inputs (see _scan_bwd_adjoint_kernel).
# The backward's dA and ddelta sum terms that cancel over up to CHUNK tokens: at 128 their
# fp32 error is ~2x what it is at 64, still a third of the tests' bound, for 3% less time and
# half the saved states (notes/perf.md). A multiple of 8: the kernels walk 4 or 8 tokens per turn.
CHUNK = 128

# -----------------------------------------------------------------------------
# PyTorch references (any device; fp32 math, fp64 for fp64 inputs; differentiable by autograd)


def _up(t):
    return t if t.dtype == torch.float64 else t.float()


def _tap_ok(pos, L, k, device):
    """Where the conv tap that looks k tokens back may contribute: (B, L), or (1, L) without pos."""
    return (torch.arange(L, device=device) >= k)[None, :] if pos is None else pos >= k


def causal_conv1d_ref(x, weight, bias=None, pos=None, activation=True):
    """x (B, L, D), weight (D, W), bias (D,), pos (B, L) -> (B, L, D) in x.dtype."""
    Bb, L, D = x.shape
    W = weight.shape[1]
    xf, wf = _up(x), _up(weight)
    out = torch.zeros_like(xf) if bias is None else _up(bias).expand(Bb, L, D).clone()
    for k in range(W):  # tap k looks k tokens back
        shifted = F.pad(xf, (0, 0, k, 0))[:, :L]  # (B, L, D): x[t-k], zeros before the row
        out = out + torch.where(_tap_ok(pos, L, k, x.device)[..., None], shifted, 0.0) * wf[:, W - 1 - k]
    if activation:
        out = F.silu(out)
    return out.to(x.dtype)


def _chunk_ends(L, device):
    """Token index of the last token of every CHUNK-token chunk of a row of L."""
    return torch.arange(CHUNK - 1, L + CHUNK - 1, CHUNK, device=device).clamp(max=L - 1)


def _ref_states(u, delta, A, B, delta_bias, pos, delta_softplus):
    """The scan's forward recurrence, shared by the reference forward and backward.
    Returns the softplus input pre and dt (B, L, Dm), the decays dA (B, L, Dm, N; 0 at document starts)
    and the state after every token hs (B, L, Dm, N)."""
    uf, Bf = _up(u), _up(B)
    pre = _up(delta) if delta_bias is None else _up(delta) + _up(delta_bias)
    dt = F.softplus(pre) if delta_softplus else pre
    dA = torch.exp(dt[..., None] * _up(A))  # (B, L, Dm, N)
    if pos is not None:
        dA = torch.where((pos == 0)[..., None, None], 0.0, dA)
    dBu = (dt * uf)[..., None] * Bf[:, :, None, :]  # (B, L, Dm, N)
    h = torch.zeros_like(dBu[:, 0])  # (B, Dm, N)
    hs = []
    for t in range(u.shape[1]):
        h = dA[:, t] * h + dBu[:, t]
        hs.append(h)
    return pre, dt, dA, torch.stack(hs, 1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, pos=None,
                       delta_softplus=True, return_states=False):
    """Mamba-1 selective scan, one token at a time, fp32 state.
    u, delta, z (B, L, Dm); A (Dm, N); B, C (B, L, N); D, delta_bias (Dm,); pos (B, L).
    Returns out (B, L, Dm) in u.dtype [and the fp32 states at chunk ends (B, n_chunks, N, Dm)]."""
    _, _, _, hs = _ref_states(u, delta, A, B, delta_bias, pos, delta_softplus)
    y = (hs * _up(C)[:, :, None, :]).sum(-1)  # (B, L, Dm)
    if D is not None:
        y = y + _up(u) * _up(D)
    if z is not None:
        y = y * F.silu(_up(z))
    out = y.to(u.dtype)
    if not return_states:
        return out
    states = hs[:, _chunk_ends(u.shape[1], u.device)]  # (B, n_chunks, Dm, N)
    return out, states.transpose(2, 3).contiguous()  # (B, n_chunks, N, Dm)


def causal_conv1d_bwd_ref(x, weight, bias, pos, dout, activation=True):
    """Backward of causal_conv1d_ref by hand: returns dx (B, L, D), dweight (D, W), dbias (D,) or None."""
    L = x.shape[1]
    W = weight.shape[1]
    xf, wf = _up(x), _up(weight)
    g = _up(dout)  # (B, L, D)
    if activation:
        pre = causal_conv1d_ref(xf, wf, None if bias is None else _up(bias), pos, activation=False)
        s = torch.sigmoid(pre)
        g = g * s * (1 + pre * (1 - s))
    dx = torch.zeros_like(xf)
    dw = torch.zeros_like(wf)
    for k in range(W):
        gk = torch.where(_tap_ok(pos, L, k, x.device)[..., None], g, 0.0)  # (B, L, D): gradient reaching tap k at token t
        dx = dx + F.pad(gk, (0, 0, 0, k))[:, k:] * wf[:, W - 1 - k]  # lands on token t-k
        dw[:, W - 1 - k] = (gk * F.pad(xf, (0, 0, k, 0))[:, :L]).sum((0, 1))
    db = None if bias is None else g.sum((0, 1)).to(bias.dtype)
    return dx.to(x.dtype), dw.to(weight.dtype), db


def selective_scan_bwd_ref(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None, pos=None,
                           delta_softplus=True):
    """Backward of selective_scan_ref by hand, one token at a time in reverse.
    Returns [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias] (None for absent inputs)."""
    L = u.shape[1]
    uf, Bf, Cf, Af = _up(u), _up(B), _up(C), _up(A)
    pre, dt, dA_, hs = _ref_states(u, delta, A, B, delta_bias, pos, delta_softplus)  # hs (B, L, Dm, N)
    y = (hs * Cf[:, :, None, :]).sum(-1)  # (B, L, Dm)
    if D is not None:
        y = y + uf * _up(D)
    dy = _up(dout)
    dz = None
    if z is not None:
        zf = _up(z)
        sz = torch.sigmoid(zf)
        dz = (dy * y * sz * (1 + zf * (1 - sz))).to(z.dtype)
        dy = dy * zf * sz
    dC = (dy[..., None] * hs).sum(2)  # (B, L, N)
    du = torch.zeros_like(uf)
    ddt = torch.zeros_like(dt)
    dB = torch.zeros_like(Bf)
    dAsum = torch.zeros_like(Af)
    g = torch.zeros_like(hs[:, 0])  # dL/dh_t flowing back from token t+1
    for t in reversed(range(L)):
        g = g + Cf[:, t, None, :] * dy[:, t, :, None]  # (B, Dm, N)
        h_prev = hs[:, t - 1] if t > 0 else torch.zeros_like(g)
        dB[:, t] = (g * (dt[:, t] * uf[:, t])[..., None]).sum(1)
        du[:, t] = (g * Bf[:, t, None, :]).sum(-1) * dt[:, t]
        ddt[:, t] = (g * (Af * dA_[:, t] * h_prev + Bf[:, t, None, :] * uf[:, t, :, None])).sum(-1)
        dAsum = dAsum + (g * dt[:, t, :, None] * dA_[:, t] * h_prev).sum(0)
        g = dA_[:, t] * g
    dD = None
    if D is not None:
        du = du + dy * _up(D)
        dD = (dy * uf).sum((0, 1)).to(D.dtype)
    ddelta = ddt * torch.sigmoid(pre) if delta_softplus else ddt
    ddelta_bias = None if delta_bias is None else ddelta.sum((0, 1)).to(delta_bias.dtype)
    return [du.to(u.dtype), ddelta.to(delta.dtype), dAsum.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, dz,
            ddelta_bias]


# -----------------------------------------------------------------------------
# Triton causal conv1d
#
# Kernel design. Every program owns BLOCK_L consecutive tokens of one row and BLOCK_D
# channels, split into ROWS segments of BLOCK_L // ROWS tokens that are walked token by
# token in lock-step (one (ROWS, BLOCK_D) tile per step). The last W-1 rows of x are kept
# in registers as a sliding window, so x and dout are read from memory once per token; only
# the W-1 halo rows in front of each segment (and, in the backward, the W-1 rows after it)
# are read twice, and those are L2 hits. The rows of the next AHEAD steps are requested before
# the current step is computed and stored, so AHEAD+1 steps of loads are in flight per warp:
# the kernels are latency-bound otherwise. In the offline sm_90 compile a queued row costs
# about one register per two bf16 channels, while a second ROWS segment doubles the backward's
# registers (112 -> 216 at 4 channels per thread) because every segment carries its own window.
# Recomputing the shifted pre-activations instead (a tile re-read at every shift) was
# rejected: the backward needs g at W shifts, i.e. W sigmoids per element, and the SFU
# throughput (16/clk/SM) alone would cost more than the whole memory floor.
#
# The backward is one fused kernel: it recomputes pre (not saved by the forward), forms
# g = dout * silu'(pre), scatters g into dx for the W tokens it feeds, and accumulates the
# weight and bias gradients of its tokens in fp32 registers. Those per-program partial sums
# go to an fp32 buffer (n_programs_along_tokens, W+1, D) (bias in slot W), summed by torch
# afterwards: deterministic, no atomics.
#
# The token loops are bound by instruction issue as much as by memory (notes/perf.md), so the
# common token runs no more than its arithmetic: the tap masks are applied only in the first W-1
# tokens of a document, behind a branch the whole tile takes together (_near_start), the sigmoid is
# inline PTX without denormal handling (_sigmoid), the row pointers advance by one row per step
# (_rows_at), and the backward branches on own vs lookahead tokens instead of masking per element.


@triton.jit
def _load_tap(w_ptr, d, dmask, stride_wd, stride_wk, j):
    """weight[d, j] as fp32, (BLOCK_D,)."""
    return tl.load(w_ptr + d * stride_wd + j * stride_wk, mask=dmask, other=0.0).to(tl.float32)


@triton.jit
def _load_taps(w_ptr, bias_ptr, d, dmask, stride_wd, stride_wk, stride_bias, W: tl.constexpr,
               HAS_BIAS: tl.constexpr):
    """w_k = weight[d, W-1-k], the tap on x[t-k], for k = 0..3 (zeros for k >= W), and the bias;
    fp32 (BLOCK_D,) each."""
    w0 = _load_tap(w_ptr, d, dmask, stride_wd, stride_wk, W - 1)
    w1 = _load_tap(w_ptr, d, dmask, stride_wd, stride_wk, W - 2)
    w2 = _load_tap(w_ptr, d, dmask, stride_wd, stride_wk, W - 3) if W > 2 else tl.zeros_like(w0)
    w3 = _load_tap(w_ptr, d, dmask, stride_wd, stride_wk, W - 4) if W > 3 else tl.zeros_like(w0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d * stride_bias, mask=dmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros_like(w0)
    return w0, w1, w2, w3, bias


@triton.jit
def _load_rows(cols, t, stride_l, L, dmask):
    """x[t, d] for a (ROWS,) vector of tokens t, (ROWS, BLOCK_D) in x's dtype; zero outside [0, L)."""
    ok = (t >= 0) & (t < L)
    ptrs = cols[None, :] + (t.to(tl.int64) * stride_l)[:, None]
    return tl.load(ptrs, mask=ok[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _push(q0, q1, q2, new, AHEAD: tl.constexpr):
    """Queue of the next AHEAD rows already requested (q0 first): drop q0, append new."""
    if AHEAD == 1:
        return new, q1, q2
    elif AHEAD == 2:
        return q1, new, q2
    else:
        return q1, q2, new


@triton.jit
def _load_pos(pos_row, t, stride_pl, L, HAS_POS: tl.constexpr):
    """pos[t] (ROWS, 1), in the layout of the (ROWS, BLOCK_D) tiles it masks: as a (ROWS,) vector the backward
    loaded it twice per token, once per layout its uses need (offline sm_90, capped at 96 registers: 315 ->
    306 instructions per 2 tokens on the common path). Without boundaries the position is the token index."""
    if HAS_POS:
        return tl.load((pos_row + t.to(tl.int64) * stride_pl)[:, None], mask=((t >= 0) & (t < L))[:, None], other=0)
    else:
        return t[:, None]


@triton.jit
def _rows_at(cols, t, stride_l):
    """Pointers (ROWS, BLOCK_D) to rows t (ROWS,) of the columns cols (BLOCK_D,). The loops advance
    them by one row per step instead: an add, where the offset t * stride_l costs ~6 integer ops."""
    return cols[None, :] + (t.to(tl.int64) * stride_l)[:, None]


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    """sigmoid(x) in fp32. FAST: the same 1 / (1 + 2^(-x log2(e))) as tl.sigmoid, with the flush-to-zero
    ex2.approx and rcp.approx of inline PTX: 4 instructions, where tl.sigmoid adds denormal range checks
    around the ex2 and a full-range division (~12). The two differ only where an intermediate is
    denormal, |x| > 87, where sigmoid is 0 or 1 to fp32 precision. The interpreter cannot run PTX."""
    if FAST:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 e; mul.ftz.f32 e, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 e, e; "
            "add.ftz.f32 e, e, 0f3F800000; rcp.approx.ftz.f32 $0, e; }",
            "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.sigmoid(x)


@triton.jit
def _tap(v, pt, k: tl.constexpr, MASK: tl.constexpr):
    """v (x[t-k], or the weight that carries g[t] to dx[t-k]) as tap k sees it: zero where pos[t] < k if MASK."""
    if MASK:
        return tl.where(pt >= k, v, 0.0)
    else:
        return v


@triton.jit
def _preact(xt, x1, x2, x3, w0, w1, w2, w3, bias, pt, W: tl.constexpr, MASK: tl.constexpr):
    """bias + sum_k w_k x[t-k], (ROWS, BLOCK_D) fp32; MASK drops the taps that reach into an earlier document."""
    acc = bias[None, :] + w0[None, :] * xt + w1[None, :] * _tap(x1, pt, 1, MASK)
    if W > 2:
        acc += w2[None, :] * _tap(x2, pt, 2, MASK)
    if W > 3:
        acc += w3[None, :] * _tap(x3, pt, 3, MASK)
    return acc


@triton.jit
def _near_start(pt, W: tl.constexpr):
    """Whether any token of the step is among the first W-1 of its document, the only ones whose taps need
    masks. The tile takes or skips the masked code as a whole (a uniform branch), so the common token
    pays no select per tap and element. Without pos no token needs masks: the window holds zeros
    before the row start, which is exactly the reference's t >= k."""
    return tl.min(pt) < W - 1


@triton.jit
def _conv1d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr,
    L, D, n_lblocks,
    stride_xb, stride_xl, stride_xd,
    stride_wd, stride_wk, stride_bias,
    stride_pb, stride_pl,
    stride_ob, stride_ol, stride_od,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, AHEAD: tl.constexpr,
    UNROLL: tl.constexpr, FAST_SIGMOID: tl.constexpr,
):
    SEG: tl.constexpr = BLOCK_L // ROWS
    pid_l = tl.program_id(0)
    b = (pid_l // n_lblocks).to(tl.int64)
    t_seg = (pid_l % n_lblocks) * BLOCK_L + tl.arange(0, ROWS) * SEG  # (ROWS,) first token of each segment
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    dmask = d < D
    x_cols = x_ptr + b * stride_xb + d * stride_xd  # (BLOCK_D,) pointers to x[b, 0, d]
    o_cols = out_ptr + b * stride_ob + d * stride_od
    pos_row = pos_ptr + b * stride_pb

    w0, w1, w2, w3, bias = _load_taps(w_ptr, bias_ptr, d, dmask, stride_wd, stride_wk, stride_bias, W, HAS_BIAS)

    # Sliding window x[t-1], x[t-2], x[t-3] (ROWS, BLOCK_D) fp32; zeros before the row start
    # (and for the taps that W < 4 lacks).
    x1 = _load_rows(x_cols, t_seg - 1, stride_xl, L, dmask).to(tl.float32)
    x2 = _load_rows(x_cols, t_seg - 2, stride_xl, L, dmask).to(tl.float32) if W > 2 else tl.zeros_like(x1)
    x3 = _load_rows(x_cols, t_seg - 3, stride_xl, L, dmask).to(tl.float32) if W > 3 else tl.zeros_like(x1)
    # Rows t+1..t+AHEAD are requested before step t is computed and stored, so AHEAD+1 row
    # loads are in flight per warp (the compiler cannot move a load above the store of the previous
    # step by itself: it does not know that x and out do not alias).
    xq0 = _load_rows(x_cols, t_seg, stride_xl, L, dmask)
    pq0 = _load_pos(pos_row, t_seg, stride_pl, L, HAS_POS)
    xq1, xq2, pq1, pq2 = xq0, xq0, pq0, pq0
    if AHEAD > 1:
        xq1 = _load_rows(x_cols, t_seg + 1, stride_xl, L, dmask)
        pq1 = _load_pos(pos_row, t_seg + 1, stride_pl, L, HAS_POS)
    if AHEAD > 2:
        xq2 = _load_rows(x_cols, t_seg + 2, stride_xl, L, dmask)
        pq2 = _load_pos(pos_row, t_seg + 2, stride_pl, L, HAS_POS)

    x_ahead = _rows_at(x_cols, t_seg + AHEAD, stride_xl)  # (ROWS, BLOCK_D) the row to load at step 0
    p_ahead = (pos_row + (t_seg + AHEAD).to(tl.int64) * stride_pl)[:, None]  # (ROWS, 1)
    o_ptrs = _rows_at(o_cols, t_seg, stride_ol)  # the row to store at step 0
    for i in tl.range(SEG, loop_unroll_factor=UNROLL):
        t = t_seg + i  # (ROWS,)
        xt, pt = xq0.to(tl.float32), pq0
        ok = t + AHEAD < L  # (ROWS,)
        xq0, xq1, xq2 = _push(xq0, xq1, xq2, tl.load(x_ahead, mask=ok[:, None] & dmask[None, :], other=0.0), AHEAD)
        x_ahead += stride_xl
        if HAS_POS:  # without pos nothing reads pt (see _near_start)
            pq0, pq1, pq2 = _push(pq0, pq1, pq2, tl.load(p_ahead, mask=ok[:, None], other=0), AHEAD)
            p_ahead += stride_pl

        if HAS_POS:
            if _near_start(pt, W):
                acc = _preact(xt, x1, x2, x3, w0, w1, w2, w3, bias, pt, W, True)
            else:
                acc = _preact(xt, x1, x2, x3, w0, w1, w2, w3, bias, pt, W, False)
        else:
            acc = _preact(xt, x1, x2, x3, w0, w1, w2, w3, bias, pt, W, False)
        if ACTIVATION:
            acc = acc * _sigmoid(acc, FAST_SIGMOID)
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(t < L)[:, None] & dmask[None, :])
        o_ptrs += stride_ol

        x3 = x2
        x2 = x1
        x1 = xt


@triton.jit
def _bwd_math(xt, dyt, pt, x1, x2, x3, a1, a2, a3, dw0, dw1, dw2, dw3, db, w0, w1, w2, w3, bias,
              W: tl.constexpr, ACTIVATION: tl.constexpr, FAST_SIGMOID: tl.constexpr, OWN: tl.constexpr,
              MASK: tl.constexpr):
    """The backward's arithmetic for one step (see _conv1d_bwd_kernel). Recomputes pre as the forward
    does, forms g = dout * silu'(pre), adds g[t] w_k to the partial sum a_k of dx[t-k] (a_0 = 0) and,
    for the segment's OWN tokens, g[t] x[t-k] to dw_k and g[t] to db. MASK drops every tap k where
    pos[t] < k. Returns c_0..c_3 (the partial sums after this token) and the updated dw_0..dw_3, db."""
    pre = _preact(xt, x1, x2, x3, w0, w1, w2, w3, bias, pt, W, MASK)
    if ACTIVATION:
        sig = _sigmoid(pre, FAST_SIGMOID)
        g = dyt * sig * (1.0 + pre * (1.0 - sig))  # dout * silu'(pre)
    else:
        g = dyt  # zero beyond L: dout is loaded as 0 there
    if OWN:
        db += tl.sum(g, axis=0)
        dw0 += tl.sum(g * xt, axis=0)
        dw1 += tl.sum(g * _tap(x1, pt, 1, MASK), axis=0)
        if W > 2:
            dw2 += tl.sum(g * _tap(x2, pt, 2, MASK), axis=0)
        if W > 3:
            dw3 += tl.sum(g * _tap(x3, pt, 3, MASK), axis=0)
    # Explicit fmas: left as a multiply and an add, the add is common to the branches of _bwd_masked
    # and _bwd_step, and the compiler moves it past their join, where it no longer fuses.
    c0 = w0[None, :] * g
    c1 = tl.fma(_tap(w1[None, :], pt, 1, MASK), g, a1)
    c2 = tl.fma(_tap(w2[None, :], pt, 2, MASK), g, a2) if W > 2 else a2
    c3 = tl.fma(_tap(w3[None, :], pt, 3, MASK), g, a3) if W > 3 else a3
    return c0, c1, c2, c3, dw0, dw1, dw2, dw3, db


@triton.jit
def _bwd_masked(xt, dyt, pt, x1, x2, x3, a1, a2, a3, dw0, dw1, dw2, dw3, db, w0, w1, w2, w3, bias,
                W: tl.constexpr, HAS_POS: tl.constexpr, ACTIVATION: tl.constexpr, FAST_SIGMOID: tl.constexpr,
                OWN: tl.constexpr):
    """_bwd_math with the tap masks only where a token of the step is near a document start (_near_start)."""
    if HAS_POS:
        if _near_start(pt, W):
            c0, c1, c2, c3, dw0, dw1, dw2, dw3, db = _bwd_math(
                xt, dyt, pt, x1, x2, x3, a1, a2, a3, dw0, dw1, dw2, dw3, db, w0, w1, w2, w3, bias,
                W, ACTIVATION, FAST_SIGMOID, OWN, True)
        else:
            c0, c1, c2, c3, dw0, dw1, dw2, dw3, db = _bwd_math(
                xt, dyt, pt, x1, x2, x3, a1, a2, a3, dw0, dw1, dw2, dw3, db, w0, w1, w2, w3, bias,
                W, ACTIVATION, FAST_SIGMOID, OWN, False)
    else:
        c0, c1, c2, c3, dw0, dw1, dw2, dw3, db = _bwd_math(
            xt, dyt, pt, x1, x2, x3, a1, a2, a3, dw0, dw1, dw2, dw3, db, w0, w1, w2, w3, bias,
            W, ACTIVATION, FAST_SIGMOID, OWN, False)
    return c0, c1, c2, c3, dw0, dw1, dw2, dw3, db


@triton.jit
def _bwd_step(own, xt, dyt, pt, x1, x2, x3, a1, a2, a3, dw0, dw1, dw2, dw3, db, w0, w1, w2, w3, bias,
              W: tl.constexpr, HAS_POS: tl.constexpr, ACTIVATION: tl.constexpr, FAST_SIGMOID: tl.constexpr):
    """_bwd_masked for an own token (own, a scalar) or a lookahead one: a branch the whole tile takes,
    instead of a select per element that keeps the lookahead tokens out of dw and db."""
    if own:
        c0, c1, c2, c3, dw0, dw1, dw2, dw3, db = _bwd_masked(
            xt, dyt, pt, x1, x2, x3, a1, a2, a3, dw0, dw1, dw2, dw3, db, w0, w1, w2, w3, bias,
            W, HAS_POS, ACTIVATION, FAST_SIGMOID, True)
    else:
        c0, c1, c2, c3, dw0, dw1, dw2, dw3, db = _bwd_masked(
            xt, dyt, pt, x1, x2, x3, a1, a2, a3, dw0, dw1, dw2, dw3, db, w0, w1, w2, w3, bias,
            W, HAS_POS, ACTIVATION, FAST_SIGMOID, False)
    return c0, c1, c2, c3, dw0, dw1, dw2, dw3, db


@triton.jit
def _conv1d_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, pos_ptr, dout_ptr, dx_ptr, part_ptr,
    L, D, n_lblocks,
    stride_xb, stride_xl, stride_xd,
    stride_wd, stride_wk, stride_bias,
    stride_pb, stride_pl,
    stride_gb, stride_gl, stride_gd,
    stride_dxb, stride_dxl, stride_dxd,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, AHEAD: tl.constexpr,
    UNROLL: tl.constexpr, FAST_SIGMOID: tl.constexpr,
):
    SEG: tl.constexpr = BLOCK_L // ROWS
    pid_l = tl.program_id(0)
    b = (pid_l // n_lblocks).to(tl.int64)
    t_seg = (pid_l % n_lblocks) * BLOCK_L + tl.arange(0, ROWS) * SEG  # (ROWS,)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    dmask = d < D
    x_cols = x_ptr + b * stride_xb + d * stride_xd
    g_cols = dout_ptr + b * stride_gb + d * stride_gd
    dx_cols = dx_ptr + b * stride_dxb + d * stride_dxd
    pos_row = pos_ptr + b * stride_pb

    w0, w1, w2, w3, bias = _load_taps(w_ptr, bias_ptr, d, dmask, stride_wd, stride_wk, stride_bias, W, HAS_BIAS)

    # Window of x[t-1..t-3] as in the forward, and of partial sums a_j = dx[t-j] so far
    # (dx[s] collects g[s..s+W-1], so it is complete after step s+W-1).
    x1 = _load_rows(x_cols, t_seg - 1, stride_xl, L, dmask).to(tl.float32)
    x2 = _load_rows(x_cols, t_seg - 2, stride_xl, L, dmask).to(tl.float32) if W > 2 else tl.zeros_like(x1)
    x3 = _load_rows(x_cols, t_seg - 3, stride_xl, L, dmask).to(tl.float32) if W > 3 else tl.zeros_like(x1)
    a1 = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    a2 = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    a3 = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    # Gradient sums over this program's tokens: dw_k for weight[d, W-1-k], db for bias.
    dw0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw3 = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    # Queues of the next AHEAD rows of x, dout and pos, as in the forward.
    xq0 = _load_rows(x_cols, t_seg, stride_xl, L, dmask)
    gq0 = _load_rows(g_cols, t_seg, stride_gl, L, dmask)
    pq0 = _load_pos(pos_row, t_seg, stride_pl, L, HAS_POS)
    xq1, xq2, gq1, gq2, pq1, pq2 = xq0, xq0, gq0, gq0, pq0, pq0
    if AHEAD > 1:
        xq1 = _load_rows(x_cols, t_seg + 1, stride_xl, L, dmask)
        gq1 = _load_rows(g_cols, t_seg + 1, stride_gl, L, dmask)
        pq1 = _load_pos(pos_row, t_seg + 1, stride_pl, L, HAS_POS)
    if AHEAD > 2:
        xq2 = _load_rows(x_cols, t_seg + 2, stride_xl, L, dmask)
        gq2 = _load_rows(g_cols, t_seg + 2, stride_gl, L, dmask)
        pq2 = _load_pos(pos_row, t_seg + 2, stride_pl, L, HAS_POS)

    # SEG steps over the segment's own tokens, then W-1 lookahead steps that only finish dx
    # of the segment's last W-1 tokens (their g is needed, their dw/db belong to the next segment).
    x_ahead = _rows_at(x_cols, t_seg + AHEAD, stride_xl)  # (ROWS, BLOCK_D) the rows to load at step 0
    g_ahead = _rows_at(g_cols, t_seg + AHEAD, stride_gl)
    p_ahead = (pos_row + (t_seg + AHEAD).to(tl.int64) * stride_pl)[:, None]  # (ROWS, 1)
    dx_ptrs = _rows_at(dx_cols, t_seg - (W - 1), stride_dxl)  # the row of dx to store at step 0
    for i in tl.range(SEG + W - 1, loop_unroll_factor=UNROLL):
        t = t_seg + i  # (ROWS,)
        xt, dyt, pt = xq0.to(tl.float32), gq0.to(tl.float32), pq0
        ok = t + AHEAD < L  # (ROWS,)
        xq0, xq1, xq2 = _push(xq0, xq1, xq2, tl.load(x_ahead, mask=ok[:, None] & dmask[None, :], other=0.0), AHEAD)
        gq0, gq1, gq2 = _push(gq0, gq1, gq2, tl.load(g_ahead, mask=ok[:, None] & dmask[None, :], other=0.0), AHEAD)
        x_ahead += stride_xl
        g_ahead += stride_gl
        if HAS_POS:  # without pos nothing reads pt (see _near_start)
            pq0, pq1, pq2 = _push(pq0, pq1, pq2, tl.load(p_ahead, mask=ok[:, None], other=0), AHEAD)
            p_ahead += stride_pl

        c0, c1, c2, c3, dw0, dw1, dw2, dw3, db = _bwd_step(
            i < SEG, xt, dyt, pt, x1, x2, x3, a1, a2, a3, dw0, dw1, dw2, dw3, db, w0, w1, w2, w3, bias,
            W, HAS_POS, ACTIVATION, FAST_SIGMOID)

        # dx[t-(W-1)] is complete.
        done = c1 if W == 2 else (c2 if W == 3 else c3)
        s_ok = (i >= W - 1) & (t - (W - 1) < L)  # (ROWS,) dx of token t-(W-1) is this segment's
        tl.store(dx_ptrs, done.to(dx_ptr.dtype.element_ty), mask=s_ok[:, None] & dmask[None, :])
        dx_ptrs += stride_dxl

        x3, x2, x1 = x2, x1, xt
        a3, a2, a1 = c2, c1, c0

    # Partial sums: part[pid_l, W-1-k, d] = dw_k, part[pid_l, W, d] = db.
    part_row = part_ptr + pid_l.to(tl.int64) * ((W + 1) * D) + d
    tl.store(part_row + (W - 1) * D, dw0, mask=dmask)
    tl.store(part_row + (W - 2) * D, dw1, mask=dmask)
    if W > 2:
        tl.store(part_row + (W - 3) * D, dw2, mask=dmask)
    if W > 3:
        tl.store(part_row + (W - 4) * D, dw3, mask=dmask)
    if HAS_BIAS:
        tl.store(part_row + W * D, db, mask=dmask)


# -----------------------------------------------------------------------------
# Triton causal conv1d: launchers


# The token tile of each kernel: the BLOCK_L and register cap swept best on an H200 at 8 x 2048 tokens
# (nreg: the registers it then compiles to, triton 3.6), the cap a badly filled grid gets instead, and a
# program's fixed cost in token steps. See _token_tile.
_FWD_TILE = dict(block_l=64, maxnreg=64, nreg=64, capped=64, setup_steps=16)
_BWD_TILE = dict(block_l=128, maxnreg=None, nreg=128, capped=96, setup_steps=32)


def _sm_count(device):
    """Multiprocessors of a CUDA device, which the launchers fill in waves of programs; 1 for the
    interpreter's CPU tensors."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _default_blocks(x, BLOCK_L, BLOCK_D, ROWS, AHEAD, num_warps, maxnreg, tile):
    """Defaults: 8 bytes of channels per thread (4 bf16 / 2 fp32), 4 warps side by side along D,
    one segment per program, 2 rows loaded ahead, BLOCK_L and the register cap from _token_tile.

    Tile width from the offline sm_90 compile: with 16-byte vectors the backward needs ~240 registers
    (8 warps/SM), with 8-byte ones 128 (16 warps/SM); the bytes in flight per SM are about equal, the
    smaller tile fills the GPU at smaller D. AHEAD, ROWS, num_warps and UNROLL were swept on an H200
    at D = 1536, 4096 and 5120 (8 x 2048, GPU time; notes/perf.md, conv_sweep2_h200.json): none of
    them moved the time by more than noise, except UNROLL (2 is best in both kernels).
    """
    num_warps = 4 if num_warps is None else num_warps
    BLOCK_D = 32 * num_warps * max(1, 8 // x.element_size()) if BLOCK_D is None else BLOCK_D
    ROWS = 1 if ROWS is None else ROWS
    AHEAD = 2 if AHEAD is None else AHEAD
    if BLOCK_L is None:
        B, L, D = x.shape
        BLOCK_L, cap = _token_tile(x.device, B, L, triton.cdiv(D, BLOCK_D), num_warps, tile)
        maxnreg = cap if maxnreg is None else maxnreg
    elif maxnreg is None:
        maxnreg = tile["maxnreg"]
    assert BLOCK_L % ROWS == 0, "BLOCK_L must be a multiple of ROWS"
    assert 1 <= AHEAD <= 3, "AHEAD (rows loaded ahead) must be 1, 2 or 3"
    return BLOCK_L, BLOCK_D, ROWS, AHEAD, num_warps, maxnreg


def _token_tile(device, B, L, n_dblocks, num_warps, tile):
    """(BLOCK_L, maxnreg) for a grid of B x cdiv(L, BLOCK_L) x n_dblocks programs. A kernel takes about its
    number of waves times one program's time, a wave being every SM full: 65,536 registers per SM over
    registers x 32 x num_warps per program. The swept default tile stays where its waves are at least 90%
    full (at 8 x 2048: D = 4096; there the search below picked a capped backward at BLOCK_L 112 that was
    3% slower, the cap costing more than the shorter programs gained). Otherwise a grid just over a wave
    runs a second wave almost empty (5120: 2.4 waves) and one under a wave leaves SMs idle (1536: 0.7), so
    the registers are capped at tile["capped"] (the backward: 5 programs per SM instead of 4) and BLOCK_L
    is the multiple of 16 from 32 to 128 (the range swept) with the fewest waves x (BLOCK_L + setup_steps)
    token steps, the longer on a tie. setup_steps (16 forward, 32 backward: the weights, window and queue
    loaded before the first step; the backward's W-1 lookahead steps and partial sums) fit the times of a
    BLOCK_L sweep best. At 8 x 2048 this picks the forward's 48 / 64 / 80 and the backward's 80 / 128 /
    128 (capped / default / capped) at D = 1536 / 4096 / 5120: the best of the sweep or within 1% of it,
    but for the forward at 4096, where BLOCK_L 128 is 3% faster (notes/conv_tiles.py, notes/perf.md)."""
    sms = _sm_count(device)

    def waves(block_l, nreg):
        return B * triton.cdiv(L, block_l) * n_dblocks / (sms * max(1, 65536 // (nreg * 32 * num_warps)))

    w = waves(tile["block_l"], tile["nreg"])
    if w >= 0.9 * math.ceil(w):
        return tile["block_l"], tile["maxnreg"]
    cost = lambda block_l: (math.ceil(waves(block_l, tile["capped"])) * (block_l + tile["setup_steps"]), -block_l)
    return min(range(32, 129, 16), key=cost), tile["capped"]


def _inline_ptx():
    """Whether the kernels may use inline PTX (the conv's _sigmoid): not under the Triton interpreter, which
    cannot run it."""
    return not triton.knobs.runtime.interpret


def _check(x, weight, bias, pos):
    B, L, D = x.shape
    W = weight.shape[1]
    assert weight.shape == (D, W) and 2 <= W <= 4, f"weight must be (D, W) with W in 2..4, got {tuple(weight.shape)}"
    assert bias is None or bias.shape == (D,)
    assert pos is None or (pos.shape == (B, L) and pos.dtype == torch.int32), "pos must be (B, L) int32"
    return B, L, D, W


def conv1d_fwd_triton(x, weight, bias, pos, activation, *, BLOCK_L=None, BLOCK_D=None, ROWS=None,
                      AHEAD=None, UNROLL=None, num_warps=None, maxnreg=None):
    """x (B, L, D) any strides, weight (D, W), bias (D,) or None, pos (B, L) int32 or None -> (B, L, D) contiguous.
    UNROLL: token steps per loop iteration, 2 by default: the offline sm_90 compile drops the loop from 95 to
    79 instructions per token (packed) for 70 registers instead of 64; on an H200 at BLOCK_L 64, 0.040 /
    0.099 / 0.112 ms at D = 1536 / 4096 / 5120 against 0.046 / 0.099 / 0.133 unrolled once (notes/perf.md).
    maxnreg: registers per thread at most; None: chosen with BLOCK_L (_token_tile), always 64, so that 8
    programs of 4 warps fit an SM with pos as they do without it. Uncapped, pos takes 70 (the tap masks near
    document starts, the queue of pos values), 7 programs fit, and the 2048 programs at D = 4096 (8 x 2048)
    run in 3 waves instead of 2: on an H200 0.097 ms against 0.083 without pos. Capped, ptxas keeps 8 bytes
    on the stack: one L1 load per two tokens."""
    B, L, D, W = _check(x, weight, bias, pos)
    BLOCK_L, BLOCK_D, ROWS, AHEAD, num_warps, maxnreg = _default_blocks(x, BLOCK_L, BLOCK_D, ROWS, AHEAD, num_warps,
                                                                         maxnreg, _FWD_TILE)
    UNROLL = 2 if UNROLL is None else UNROLL
    out = torch.empty((B, L, D), dtype=x.dtype, device=x.device)  # (B, L, D)
    n_lblocks = triton.cdiv(L, BLOCK_L)
    grid = (B * n_lblocks, triton.cdiv(D, BLOCK_D))
    # Absent bias / pos: pass weight as a never-read placeholder (HAS_BIAS / HAS_POS are constexpr).
    bias_arg = weight if bias is None else bias
    pos_arg = weight if pos is None else pos
    _conv1d_fwd_kernel[grid](
        x, weight, bias_arg, pos_arg, out,
        L, D, n_lblocks,
        *x.stride(), *weight.stride(), 0 if bias is None else bias.stride(0),
        *((0, 0) if pos is None else pos.stride()),
        *out.stride(),
        W=W, HAS_BIAS=bias is not None, HAS_POS=pos is not None, ACTIVATION=bool(activation),
        BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, ROWS=ROWS, AHEAD=AHEAD, UNROLL=UNROLL,
        FAST_SIGMOID=_inline_ptx(), num_warps=num_warps, maxnreg=maxnreg,
    )
    return out


def conv1d_bwd_triton(x, weight, bias, pos, dout, activation, *, BLOCK_L=None, BLOCK_D=None, ROWS=None,
                      AHEAD=None, UNROLL=None, num_warps=None, maxnreg=None):
    """Gradients of conv1d_fwd_triton: (dx (B, L, D) contiguous, dweight (D, W), dbias (D,) or None).
    UNROLL (token steps per loop iteration) 2 by default: in the offline sm_90 compile it saves the register
    copies of the sliding windows and queues (165 -> 144 instructions per token, packed) for 4 more
    registers, 128, still 16 warps per SM; on an H200 at 4096, 0.159 against 0.201 ms unrolled once.
    maxnreg: registers per thread at most; None: chosen with BLOCK_L (_token_tile): uncapped at the default
    tile, 96 for grids that fill their waves badly (no spills offline, 4% more instructions, 5 programs
    per SM instead of 4)."""
    B, L, D, W = _check(x, weight, bias, pos)
    assert dout.shape == x.shape
    BLOCK_L, BLOCK_D, ROWS, AHEAD, num_warps, maxnreg = _default_blocks(x, BLOCK_L, BLOCK_D, ROWS, AHEAD, num_warps,
                                                                         maxnreg, _BWD_TILE)
    UNROLL = 2 if UNROLL is None else UNROLL
    dx = torch.empty((B, L, D), dtype=x.dtype, device=x.device)  # (B, L, D)
    n_lblocks = triton.cdiv(L, BLOCK_L)
    grid = (B * n_lblocks, triton.cdiv(D, BLOCK_D))
    part = torch.empty((grid[0], W + 1, D), dtype=torch.float32, device=x.device)  # (programs, W+1, D)
    bias_arg = weight if bias is None else bias
    pos_arg = weight if pos is None else pos
    _conv1d_bwd_kernel[grid](
        x, weight, bias_arg, pos_arg, dout, dx, part,
        L, D, n_lblocks,
        *x.stride(), *weight.stride(), 0 if bias is None else bias.stride(0),
        *((0, 0) if pos is None else pos.stride()),
        *dout.stride(), *dx.stride(),
        W=W, HAS_BIAS=bias is not None, HAS_POS=pos is not None, ACTIVATION=bool(activation),
        BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, ROWS=ROWS, AHEAD=AHEAD, UNROLL=UNROLL,
        FAST_SIGMOID=_inline_ptx(), num_warps=num_warps, maxnreg=maxnreg,
    )
    sums = part.sum(0)  # (W+1, D) fp32, fixed reduction order
    dweight = sums[:W].t().contiguous().to(weight.dtype)  # (D, W)
    dbias = None if bias is None else sums[W].to(bias.dtype, copy=True)  # (D,), its own storage like the fake
    return dx, dweight, dbias


# -----------------------------------------------------------------------------
# Triton selective scan
#
# One program owns one segment of one row b (whole CHUNKs of tokens; the whole
# row unless the GPU would be underfilled, see _segments) and BD channels, the
# fp32 state (N, BD) in registers: a thread holds all N states of its channel
# (BD = 32 per warp) or N/2, N/4 of them for smaller BD, so the sum over N that
# forms y is (mostly) inside a thread. The program walks its tokens one at a
# time: the recurrence h = a h + x is one FMA per state, and the work of a token
# is a few loads, one softplus per channel and one exp2 per state. Loads run
# GROUP tokens ahead of their use (FWD_AHEAD in the forward): the loop is
# unrolled by that many, and each token's inputs are re-loaded for the token
# that many ahead as soon as they are consumed. ptxas tracks the forward loop's
# loads on one scoreboard, so the loop's first use of a loaded value waits for
# the loads just issued: one full load latency per turn (notes/perf.md).
# B and C are the same for every channel. Either every lane loads all of them
# (2N values per token, spread over the lanes until used), or
# (BC_LANES) lane j loads one value, B[j] or C[j - N], and each is broadcast by a
# shuffle where used (2N shuffles per token, 4 registers): the backward, whose
# state needs every register, takes the second (notes/perf.md).
#
# Segments: the recurrence is linear, so the state entering a segment is the
# sum over the segments before it of their state started from zero, each
# decayed by the product of the decays after it (0 past a document start).
# _scan_carry_kernel computes the local carry and decay product of every chunk
# a segment needs (one more exp per state and token, for the tokens no document
# start cuts off; a chunk per program, so it fills the GPU where the segments do
# not), _scan_combine_kernel chains them (an associative scan over the chunks)
# into the carry entering each segment, and the main kernels start from that.
# The backward does the same for the adjoint, the other way, except that its
# carry pass (_scan_carry_bwd_kernel) does not walk: a chunk's carry is a sum
# over its tokens, each decayed by exp(A x the dt summed from the chunk's start),
# so it takes tiles of tokens at once (faster there; in the forward, no faster).
#
# What the backward needs and what is saved: the inputs, plus the state at the
# end of every CHUNK tokens (B, L/CHUNK, N, Dm) in fp32 (d_inner 4096: 32 states
# x 256 KB per row, half the size of u in bf16), never the full state history
# (L x N x Dm). The backward is two passes, each walking its tokens one way only,
# so neither keeps or recomputes states it has passed (an earlier design walked
# back through chunks, re-running the forward into a scratch stash: notes/perf.md).
# Per channel and state, with the adjoint g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1},
# every gradient but dA and ddelta needs only h (dC, dz) or only g (du, dB); those
# two need X_t = g_t a_t h_{t-1} (dA = sum_t X_t dt_t, ddelta from sum_N X_t A).
# Since h_t = a_t h_{t-1} + x_t, X_t - X_{t+1} = q_t - k_t with q_t = C_t dy_t a_t
# h_{t-1} (h only) and k_t = a_{t+1} g_{t+1} x_t (g only), so within a chunk [c0, c1)
#     X_t = X_{c1} + sum_{s=t}^{c1-1} (q_s - k_s),   X_{c1} = a_{c1} g_{c1} h_{c1-1},
# the last from the saved state. _scan_bwd_states_kernel walks forward from the
# saved states (segments need no carry pass): dC, dz, QA_t = sum_N A q_t and the q
# part of each chunk's dA. It also writes each token's dt and dy = dL/dy (the
# output's gradient through the gate): with QA, three fp32 temporaries per token and
# channel (d_inner 4096, 8 x 2048 tokens: 256 MiB each, freed when the op returns),
# so the passes after it form no softplus and no gate (d_inner 4096: 2.68 -> 2.53 ms
# backward, notes/perf.md v16). _scan_bwd_adjoint_kernel walks back (segments
# chained by the carry passes, as in the forward): the k part, X's sum_N A for
# ddelta (with the running sum of QA), and the rest. The split terms cancel where X
# is small, so each chunk's dA is summed from its two parts before the chunks are.
# The cancellation grows with the chunk: on an H200 at CHUNK 128, dA's fp32 error
# is 3.5x the fp32 reference's own and d(delta bias)'s ~9x (3.5e-6 and 3.1e-6
# relative, the bound 1.1-1.3e-5), about half of that at CHUNK 64, more with q and
# k each keeping the C_t dy_t x_t they share (notes/perf.md).
# dB and dC are sums over channels: each program sums its BD channels (a
# reduce-scatter across lanes, _channel_sum) and adds that to the output with an
# atomic add, so the order of the additions, and the last bits of dB and dC, vary
# from run to run, as in Mamba's CUDA kernels; dA (each chunk's, after its two
# parts), dD and d(delta bias) the same. Under torch.use_deterministic_algorithms
# each program writes its partial sums instead, and torch sums them: the same bits
# every time, for the sums' time (0.05-0.1 ms at 8 x 2048 tokens on an H200,
# 4-5% of the backward; notes/perf.md v20).

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
GROUP = tl.constexpr(4)
# the forward's loop: 8 slots of inputs, one wait for its loads per 8 tokens instead of per 4 (159 registers
# instead of 124): on an H200 at 8 x 2048, 7% faster at d_inner 4096, 1-2% at 1536 and 5120 (notes/perf.md v14;
# timed with the tiles the launcher's alignment gave the forward before v21, not since)
FWD_AHEAD = tl.constexpr(8)


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20), in fp32. softplus = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1],
    with log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3, by its odd series to s^13 (truncation < 2e-8
    relative): ~20 instructions on one exp and one reciprocal, where tl.log and a division took ~50, with
    the same accuracy (a few ulp). Once per token and channel in each pass, it was a tenth of the scan's
    instructions."""
    e = tl.exp(-tl.abs(x))
    s = e / (2.0 + e)
    q = s * s
    series = 1.0 + q * (1 / 3 + q * (1 / 5 + q * (1 / 7 + q * (1 / 9 + q * (1 / 11 + q * (1 / 13))))))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + 2.0 * s * series)


@triton.jit
def _softplus_slope(dt):
    """softplus'(x) = sigmoid(x) from dt = softplus(x) itself, in fp32: 1 - exp(-dt), since exp(-softplus(x))
    = 1 - sigmoid(x) (above torch's threshold 20 both are 1 in fp32). Below dt = 1/2, where the subtraction
    would cancel, by the series of 1 - exp(-dt) to dt^8 (truncation < 2e-8 relative)."""
    series = dt * (1 + dt * (-1 / 2 + dt * (1 / 6 + dt * (-1 / 24 + dt * (1 / 120 + dt * (
        -1 / 720 + dt * (1 / 5040 + dt * (-1 / 40320))))))))
    return tl.where(dt < 0.5, series, 1.0 - tl.exp(-dt))


@triton.jit
def _in_row(t, L, EVEN: tl.constexpr):
    """(the token to read for t, whether t is in the row). EVEN (L a multiple of CHUNK): the kernels use
    no token past the row's end, so the answer is the constant True (no masks, no selects: 5-8% of the
    scan's instructions), and a load issued ahead past the end reads the last token instead."""
    if EVEN:
        return tl.minimum(t, L - 1), True
    return t, t < L


@triton.jit
def _channels(pid, BD: tl.constexpr):
    """The BD channels (BD,) of channel block pid, with no claim on their alignment. Triton's launcher marks
    d_inner and the strides divisible by 16 where they are, and from that lays the (N, BD) tiles out for 4-wide
    loads: in the forward, 4 channels x 4 states per thread, each token's per-channel values moved there
    through shared memory (5 barriers a token) and y summed across lanes. tl.multiple_of(.., 1) withholds the
    alignment, so each thread keeps one channel's N states, as designed (H200, forward -22% at d_inner 4096;
    the backward's passes compile to the same code either way; notes/perf.md v21)."""
    return tl.multiple_of(pid * BD + tl.arange(0, BD), 1)


@triton.jit
def _in_channels(d, Dm, EVEN_D: tl.constexpr):
    """d < Dm (BD,): which of the block's channels exist. EVEN_D (Dm a multiple of BD): the constant True, so
    the masks built from it fold away (ptxas turned two stores under one runtime mask into a branch around
    them and the work they store: notes/perf.md)."""
    if EVEN_D:
        return tl.full(d.shape, 1, tl.int1)
    return d < Dm


@triton.jit
def _chunk_starts(pos_p, t0, L, s_pl, CHUNK: tl.constexpr, HAS_POS: tl.constexpr):
    """Which of the CHUNK (at most 128) tokens from t0 start a document (pos 0), as the bits of two int64: bit i
    of the first for token t0 + i, of the second for token t0 + 64 + i (0 past the chunk's or the row's end,
    and without pos). The walks take each token's flag from these (_group_starts, _is_start), one load of pos
    per chunk: loaded per token, ptxas compared each pos with 0 right after its load, where the loop then waited
    for it (H200, d_inner 4096: boundaries cost the backward's passes 5%; notes/perf.md v21)."""
    starts = (0, 0)
    if HAS_POS:
        starts = (_start_word(pos_p, t0, 0, L, s_pl, CHUNK), _start_word(pos_p, t0, 64, L, s_pl, CHUNK))
    return starts


@triton.jit
def _start_word(pos_p, t0, j0, L, s_pl, CHUNK: tl.constexpr):
    """One int64 of _chunk_starts: bit i for token t0 + j0 + i having pos 0 (0 past the chunk's or the row's end)."""
    i = tl.arange(0, 64)
    j = j0 + i  # the token's offset in the chunk
    p = tl.load(pos_p + (t0 + j) * s_pl, mask=(j < CHUNK) & (t0 + j < L), other=1)
    return tl.sum(tl.where(p == 0, tl.full((64,), 1, tl.int64) << i.to(tl.int64), 0), 0)


@triton.jit
def _group_starts(starts, o, HAS_POS: tl.constexpr):
    """The document-start bits (_chunk_starts) of the tokens from offset o in their chunk (a group: o a multiple
    of its size, 4 or 8, so all in one int64), token o + i at bit i (int32; 0 without pos)."""
    bits = 0
    if HAS_POS:
        bits = (tl.where(o < 64, starts[0], starts[1]) >> (o % 64)).to(tl.int32)
    return bits


@triton.jit
def _is_start(bits, i):
    """Token i of a group starts a document (bits: _group_starts)."""
    return ((bits >> i) & 1) != 0


@triton.jit
def _load_token(u_p, dl_p, B_p, C_p, z_p, t, L, dm, nm, s_ul, s_dl, s_bl, s_cl, s_zl,
                HAS_Z: tl.constexpr, BC_LANES: tl.constexpr, EVEN: tl.constexpr):
    """Inputs of token t: u, delta, z (BD,), B, C (N,) (with BC_LANES both in one (BD,): lane j holds
    B[j] for j < N and C[j - N] for N <= j < 2N, B_p and s_bl being the lanes' from _bc_lanes) and
    t < L (a scalar, see _in_row); zeros past the row's end. B and C are read through _col. Not pos: the
    walks take whether a token starts a document from _chunk_starts."""
    t, ok = _in_row(t, L, EVEN)
    m = tl.where(ok, dm, False)  # (BD,); `dm & ok` breaks the interpreter (scalar ok)
    u = tl.load(u_p + t * s_ul, mask=m, other=0.0)
    dl = tl.load(dl_p + t * s_dl, mask=m, other=0.0)
    N: tl.constexpr = nm.shape[0]
    if BC_LANES:
        j = tl.arange(0, dm.shape[0])
        Bt = tl.load(B_p + t * s_bl, mask=tl.where(ok, j < 2 * N, False), other=0.0)
        Ct = Bt
    else:
        Bt = tl.load(B_p + t * s_bl + tl.arange(0, N), mask=tl.where(ok, nm, False), other=0.0)
        Ct = tl.load(C_p + t * s_cl + tl.arange(0, N), mask=tl.where(ok, nm, False), other=0.0)
    zz = tl.load(z_p + t * s_zl, mask=m, other=0.0) if HAS_Z else u
    return u, dl, Bt, Ct, zz, ok


@triton.jit
def _bc_lanes(B_p, C_p, s_bl, s_cl, BD: tl.constexpr, N: tl.constexpr, BC_LANES: tl.constexpr):
    """The B pointer and stride that _load_token takes. With BC_LANES, lane j's pointer to B[j] (j < N) or
    C[j - N] of token 0 and its stride along tokens, (BD,) each: worked out once, where working them out
    at every token cost ~10 instructions per token (offline sm_90 SASS). Else B_p and s_bl as they are."""
    if BC_LANES:
        j = tl.arange(0, BD)
        B_p, s_bl = tl.where(j < N, B_p + j, C_p + (j - N)), tl.where(j < N, s_bl, s_cl)
    return B_p, s_bl


@triton.jit
def _load_row(p, t, L, Dm, dm, EVEN: tl.constexpr):
    """Token t's (BD,) of a (B, L, Dm) tensor at p (this row and these channels): dL/dout, or the backward's
    QA, in fp32; zeros past the row's end (see _in_row)."""
    t, ok = _in_row(t, L, EVEN)
    return tl.load(p + t * Dm, mask=tl.where(ok, dm, False), other=0.0).to(tl.float32)


@triton.jit
def _col(x, IS_C: tl.constexpr, sn, BC_LANES: tl.constexpr):
    """B (IS_C false) or C of a token from _load_token as an fp32 column that broadcasts against the
    state (N, BD). With BC_LANES, the (N, BD) tile whose element (r, j) is B or C of state sn[r, j]
    (sn: the state each element of the tile holds, (N, 1) or (N, BD)), one shuffle per row; else
    x (N,) as (N, 1)."""
    if BC_LANES:
        N: tl.constexpr = sn.shape[0]
        shape: tl.constexpr = (N, x.shape[0])
        src = tl.broadcast_to(x.to(tl.float32)[None, :], shape)
        col = tl.gather(src, tl.broadcast_to(sn + (N if IS_C else 0), shape), axis=1)
    else:
        col = x.to(tl.float32)[:, None]
    return col


@triton.jit
def _decay_dt(dt, start, A2):
    """The decay a = exp(dt A) (N, BD) of a token's dt (BD,), 0 at a document start (start true)."""
    # at a document start the exponent gets -inf (one FMA per state, where a select after the exp2
    # would cost one more instruction per state): exp2(-inf) = 0
    return tl.exp2(dt[None, :] * A2 + tl.where(start, float("-inf"), 0.0))


@triton.jit
def _decay(dl, start, ok, bias, A2, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """One token's dt (BD,) from its delta and decay a (N, BD; see _decay_dt). Tokens past the row's end are
    identities (dt = 0, a = 1)."""
    dt = dl.to(tl.float32)
    if HAS_BIAS:
        dt += bias
    if SOFTPLUS:
        dt = _softplus(dt)
    dt = tl.where(ok, dt, 0.0)
    return dt, _decay_dt(dt, start, A2)


@triton.jit
def _decay_input(dl, u, Bt, start, ok, bias, A2, sn, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 BC_LANES: tl.constexpr):
    """_decay, plus the token's input x = dt u B (N, BD; 0 past the row's end)."""
    dt, a = _decay(dl, start, ok, bias, A2, HAS_BIAS, SOFTPLUS)
    x = (dt * u.to(tl.float32))[None, :] * _col(Bt, False, sn, BC_LANES)
    return dt, a, x


@triton.jit
def _gate(x, zz, HAS_Z: tl.constexpr):
    """x silu(z) (BD,) with z, x without: out from y, and dL/dy from dL/dout."""
    if HAS_Z:
        zf = zz.to(tl.float32)
        return x * zf * tl.sigmoid(zf)
    return x


@triton.jit
def _first_start(pos_p, lo, hi, s_pl, CHUNK: tl.constexpr):
    """The first document start among the tokens [lo, hi) of a row's pos, else hi."""
    start = hi
    for t0 in range(lo, hi, CHUNK):
        tt = t0 + tl.arange(0, CHUNK)
        pp = tl.load(pos_p + tt * s_pl, mask=tt < hi, other=1)
        start = tl.minimum(start, tl.min(tl.where(pp == 0, tt, hi)))
    return start


@triton.jit
def _carry_token(c, sdt, t, last, u, dl, Bt, ok, bias, A2, sn, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
                 SOFTPLUS: tl.constexpr, BC_LANES: tl.constexpr):
    """Token t of _scan_carry_kernel: the carry c (N, BD) and sum of dt (BD,) after it; t == last is the walk's
    one document start."""
    start = (t == last) if HAS_POS else False
    dt, a, x = _decay_input(dl, u, Bt, start, ok, bias, A2, sn, HAS_BIAS, SOFTPLUS, BC_LANES)
    return a * c + x, sdt + dt


@triton.jit
def _scan_carry_kernel(u_ptr, dl_ptr, At_ptr, B_ptr, C_ptr, bias_ptr, pos_ptr, loc_ptr, S_ptr, L, Dm, piece_len, sub,
                       n_c, s_ub, s_ul, s_db, s_dl, s_bb, s_bl, s_cb, s_cl, s_pb, s_pl,
                       N: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_POS: tl.constexpr, SOFTPLUS: tl.constexpr, BC_LANES: tl.constexpr, EVEN: tl.constexpr,
                       EVEN_D: tl.constexpr):
    """The forward's local carries of n_c pieces of piece_len tokens (sub to a segment), each started from
    zero: the state leaving the piece, h = a_t h + dt_t u_t B_t, walked GROUP tokens a turn. With P = prod
    a_t over the piece (N, BD), the true carry is loc + P carry_in, which _scan_combine_kernel chains, forming
    P = exp(A S) from the piece's sum of dt S (BD,) stored here (+inf for P = 0).
    A document start zeroes what came before it, so only the tokens from the piece's last start on are
    walked, and none where a document starts between the piece and its segment's end: no segment's carry
    gets anything from the piece then, and it leaves loc = 0, P = 1. In bench.py's D1 rows (2048 tokens, 4
    segments at d_inner 1536) that skips 14% of the tokens (notes/perf.md, v15). The backward's carry pass
    sums tiles instead (_scan_carry_bwd_kernel); here tiles ran even with the walk on packed rows and slower
    without boundaries (notes/perf.md v17, v18)."""
    b = tl.program_id(2).to(tl.int64)
    s = tl.program_id(1)
    # the tokens to walk, [w0, w1): whole groups of GROUP from the piece's end (piece_len is a multiple of
    # GROUP, and every piece lies before the last segment, inside the row); the extra tokens a group adds lie
    # before the document start, which zeroes them
    w0 = s * piece_len
    w1 = w0 + piece_len
    last = -1
    cut = False  # a document starts in the piece (P = 0)
    if HAS_POS:
        # the last document start up to the segment's end: pos being each token's offset in its document, one
        # load at the segment's last token tells it. The walk's only start, if it is in the piece: a start
        # before it in the walk's first group would be zeroed by it anyway
        hi = tl.minimum((s // sub + 1) * sub * piece_len, L)
        last = hi - 1 - tl.load(pos_ptr + b * s_pb + (hi - 1) * s_pl)
        w0 = tl.maximum(w0, w1 - tl.cdiv(tl.maximum(w1 - last, 0), GROUP) * GROUP)
        cut = (last >= w0) & (last < w1)
    d = _channels(tl.program_id(0), BD)  # (BD,)
    dm = _in_channels(d, Dm, EVEN_D)
    n = tl.arange(0, N)
    nm = n < N
    sn = n[:, None]  # the state each row of the (N, BD) tiles holds
    A2 = tl.load(At_ptr + sn * Dm + d[None, :], mask=dm[None, :], other=0.0) * LOG2E  # (N, BD)
    bias = tl.load(bias_ptr + d, mask=dm, other=0.0) if HAS_BIAS else 0.0
    B_p, C_p = B_ptr + b * s_bb, C_ptr + b * s_cb
    B_p, s_bl = _bc_lanes(B_p, C_p, s_bl, s_cl, BD, N, BC_LANES)
    # no z: HAS_Z False in each _load_token below, z_p a placeholder it does not load
    args = (u_ptr + b * s_ub + d, dl_ptr + b * s_db + d, B_p, C_p, u_ptr)
    strides = (s_ul, s_dl, s_bl, s_cl, 0)
    c = tl.zeros((N, BD), tl.float32)
    sdt = tl.zeros((BD,), tl.float32)  # sum of dt over the piece: P = exp(A sdt) unless a document starts
    # unrolled by GROUP, each token's inputs re-loaded GROUP tokens ahead as soon as used
    u0, dl0, B0, _, _, ok0 = _load_token(*args, w0, L, dm, nm, *strides, False, BC_LANES, EVEN)
    u1, dl1, B1, _, _, ok1 = _load_token(*args, w0 + 1, L, dm, nm, *strides, False, BC_LANES, EVEN)
    u2, dl2, B2, _, _, ok2 = _load_token(*args, w0 + 2, L, dm, nm, *strides, False, BC_LANES, EVEN)
    u3, dl3, B3, _, _, ok3 = _load_token(*args, w0 + 3, L, dm, nm, *strides, False, BC_LANES, EVEN)
    for t in range(w0, w1, GROUP):
        c, sdt = _carry_token(c, sdt, t, last, u0, dl0, B0, ok0, bias, A2, sn, HAS_BIAS, HAS_POS, SOFTPLUS,
                              BC_LANES)
        u0, dl0, B0, _, _, ok0 = _load_token(*args, t + 4, L, dm, nm, *strides, False, BC_LANES, EVEN)
        c, sdt = _carry_token(c, sdt, t + 1, last, u1, dl1, B1, ok1, bias, A2, sn, HAS_BIAS, HAS_POS, SOFTPLUS,
                              BC_LANES)
        u1, dl1, B1, _, _, ok1 = _load_token(*args, t + 5, L, dm, nm, *strides, False, BC_LANES, EVEN)
        c, sdt = _carry_token(c, sdt, t + 2, last, u2, dl2, B2, ok2, bias, A2, sn, HAS_BIAS, HAS_POS, SOFTPLUS,
                              BC_LANES)
        u2, dl2, B2, _, _, ok2 = _load_token(*args, t + 6, L, dm, nm, *strides, False, BC_LANES, EVEN)
        c, sdt = _carry_token(c, sdt, t + 3, last, u3, dl3, B3, ok3, bias, A2, sn, HAS_BIAS, HAS_POS, SOFTPLUS,
                              BC_LANES)
        u3, dl3, B3, _, _, ok3 = _load_token(*args, t + 7, L, dm, nm, *strides, False, BC_LANES, EVEN)
    tl.store(loc_ptr + (b * n_c + s) * N * Dm + sn * Dm + d[None, :], c, mask=dm[None, :])
    tl.store(S_ptr + (b * n_c + s) * Dm + d, tl.where(cut, float("inf"), sdt), mask=dm)


@triton.jit
def _scan_carry_bwd_kernel(dt_ptr, At_ptr, C_ptr, pos_ptr, dy_ptr, loc_ptr, S_ptr, L, Dm, piece_len, sub, n_c,
                           s_db, s_dl, s_cb, s_cl, s_pb, s_pl, N: tl.constexpr, BD: tl.constexpr, T: tl.constexpr,
                           CHUNK: tl.constexpr, HAS_POS: tl.constexpr, EVEN_D: tl.constexpr):
    """The backward's local carries of n_c pieces of piece_len tokens (sub to a segment; the pieces of every
    segment but the first), each started from zero: the adjoint leaving the piece's first token, g = a_t (g +
    C_t dy_t) walking back, from the dt and dy = dL/dy (B, L, Dm) fp32 the backward's first pass stored. With
    P = prod a_t over the piece (N, BD), the true carry is loc + P carry_in, which _scan_combine_kernel chains
    (P from the sum of dt stored here, as in the forward's carry pass).
    No walk: since a_t = exp(dt_t A), loc is a sum over the piece's tokens [w0, w1),
        loc = sum_t exp(A S_t) C_t dy_t,  S_t = the sum of dt over [w0, t],
    taken T tokens at a time as (T, N, BD) tiles, S by a cumulative sum along the tile: every load of a tile is
    issued before any is used, where a walk waits on its loads every few tokens (H200, d_inner 1536, 8 x 2048
    tokens: 0.144 -> 0.098 ms; the forward's carry pass, summed so, gained nothing: notes/perf.md v17, v18).
    A document start zeroes what comes after it in the adjoint's order (a_t = 0 there), so only the tokens
    before the piece's first start count, and none where a document starts between its segment's start and
    the piece: no segment's carry gets anything from the piece then, and it leaves loc = 0, P = 1."""
    b = tl.program_id(2).to(tl.int64)
    s = tl.program_id(1) + sub  # the first segment's pieces carry into nothing
    w0 = s * piece_len
    w1 = tl.minimum(w0 + piece_len, L)
    a1, cut = w1, False  # the tokens that count are [w0, a1); cut: a document starts in the piece (P = 0)
    if HAS_POS:
        pos_p = pos_ptr + b * s_pb
        lo = (s // sub) * sub * piece_len  # the segment's first token
        first_start = _first_start(pos_p, w0, w1, s_pl, CHUNK)  # the piece's first (w1: none)
        # no start in [lo, w0): the document of the token before the piece starts before lo
        needed = (w0 == lo) | (w0 - 1 - tl.load(pos_p + tl.maximum(w0 - 1, 0) * s_pl) < lo)
        cut = needed & (first_start < w1)
        a1 = tl.where(needed, first_start, w0)
    d = tl.program_id(0) * BD + tl.arange(0, BD)  # (BD,)
    dm = _in_channels(d, Dm, EVEN_D)
    n = tl.arange(0, N)
    A2 = tl.load(At_ptr + n[:, None] * Dm + d[None, :], mask=dm[None, :], other=0.0) * LOG2E  # (N, BD)
    acc = tl.zeros((N, BD), tl.float32)
    run = tl.zeros((BD,), tl.float32)  # sum of dt over the tiles done
    for t0 in range(w0, a1, T):
        t = t0 + tl.arange(0, T)  # (T,)
        ok = t < a1
        m = ok[:, None] & dm[None, :]  # (T, BD)
        dt = tl.load(dt_ptr + b * s_db + t[:, None] * s_dl + d[None, :], mask=m, other=0.0)
        dy = tl.load(dy_ptr + b * L * Dm + t[:, None] * Dm + d[None, :], mask=m, other=0.0)
        Ct = tl.load(C_ptr + b * s_cb + t[:, None] * s_cl + n[None, :], mask=ok[:, None], other=0.0)  # (T, N)
        S = run[None, :] + tl.cumsum(dt, 0)
        w = tl.exp2(A2[None, :, :] * S[:, None, :])  # (T, N, BD)
        acc += tl.sum(w * dy[:, None, :] * Ct.to(tl.float32)[:, :, None], 0)
        run += tl.sum(dt, 0)
    piece = b * n_c + tl.program_id(1)
    tl.store(loc_ptr + piece * N * Dm + n[:, None] * Dm + d[None, :], acc, mask=dm[None, :])
    tl.store(S_ptr + piece * Dm + d, tl.where(cut, float("inf"), run), mask=dm)


@triton.jit
def _chain(P1, loc1, P2, loc2):
    """Two consecutive pieces' (decay product, local carry) as one: c -> P2 (P1 c + loc1) + loc2."""
    return P1 * P2, P2 * loc1 + loc2


@triton.jit
def _scan_combine_kernel(loc_ptr, S_ptr, At_ptr, cin_ptr, n_c, sub, n_seg, M, Dm, SEGS: tl.constexpr,
                         BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """Chains the carry pass's n_c local carries (B, n_c, M = N Dm), sub pieces to a segment, into the carry
    entering each segment, cin (B, n_seg, M) (zero for the first in the pass's direction): one associative scan.
    Each piece's decay product is P = exp(A S) from its sum of dt S (B, n_c, Dm), +inf where a document starts
    in the piece (P = 0): the carry passes store S, 1/N of P's bytes."""
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[None, :]  # (1, BLOCK): state i // Dm, channel i % Dm
    j = tl.arange(0, SEGS)[:, None]  # (SEGS, 1)
    m = (j < n_c) & (i < M)
    loc = tl.load(loc_ptr + (b * n_c + j) * M + i, mask=m, other=0.0)  # (SEGS, BLOCK)
    S = tl.load(S_ptr + (b * n_c + j) * Dm + i % Dm, mask=m, other=0.0)
    A2 = tl.load(At_ptr + i, mask=i < M, other=0.0) * LOG2E  # At (N, Dm) flattened as the carries are
    P = tl.where(S == float("inf"), 0.0, tl.exp2(A2 * S))
    _, c = tl.associative_scan((P, loc), 0, _chain, reverse=REVERSE)  # c[j]: the carry leaving piece j
    # pieces that end a segment, and the segment their carry enters: forward, piece s sub - 1 enters segment s;
    # backward (pieces counted from segment 1), piece s sub enters segment s
    ends = (j % sub == 0) if REVERSE else ((j + 1) % sub == 0)
    to = j // sub if REVERSE else (j + 1) // sub
    tl.store(cin_ptr + (b * n_seg + to) * M + i, c, mask=m & ends & (to < n_seg))
    first = n_seg - 1 if REVERSE else 0
    tl.store(cin_ptr + (b * n_seg + first) * M + i, tl.zeros((1, BLOCK), tl.float32), mask=i < M)


@triton.jit
def _fwd_token(h, t, slot, start, A2, sn, bias, Dv, out_p, Dm, dm, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BC_LANES: tl.constexpr):
    """Token t of the forward, its inputs in slot (a tuple from _load_token), start whether it starts a document:
    the state h (N, BD) after it; stores its output."""
    u, dl, Bt, Ct, zz, ok = slot
    dt, a, x = _decay_input(dl, u, Bt, start, ok, bias, A2, sn, HAS_BIAS, SOFTPLUS, BC_LANES)
    h = a * h + x  # (N, BD)
    y = tl.sum(h * _col(Ct, True, sn, BC_LANES), 0)  # (BD,)
    uf = u.to(tl.float32)
    if HAS_D:
        y += uf * Dv
    y = _gate(y, zz, HAS_Z)
    tl.store(out_p + t * Dm, y.to(out_p.dtype.element_ty), mask=tl.where(ok, dm, False))
    return h


@triton.jit
def _scan_fwd_kernel(u_ptr, dl_ptr, At_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, pos_ptr, out_ptr, st_ptr,
                     cin_ptr, L, Dm, n_chunks, seg_len, n_seg,
                     s_ub, s_ul, s_db, s_dl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_pb, s_pl,
                     N: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, BC_LANES: tl.constexpr, EVEN: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    s = tl.program_id(1)  # segment: chunks [c0, c1)
    c0 = s * (seg_len // CHUNK)
    c1 = tl.minimum(c0 + seg_len // CHUNK, n_chunks)
    d = _channels(tl.program_id(0), BD)  # (BD,)
    dm = d < Dm
    n = tl.arange(0, N)
    nm = n < N
    sn = n[:, None]  # the state each row of the (N, BD) tiles holds (the backward permutes them)
    A2 = tl.load(At_ptr + sn * Dm + d[None, :], mask=dm[None, :], other=0.0) * LOG2E  # (N, BD)
    bias = tl.load(bias_ptr + d, mask=dm, other=0.0) if HAS_BIAS else 0.0
    Dv = tl.load(D_ptr + d, mask=dm, other=0.0) if HAS_D else 0.0
    u_p, dl_p, z_p = u_ptr + b * s_ub + d, dl_ptr + b * s_db + d, z_ptr + b * s_zb + d
    B_p, C_p, pos_p = B_ptr + b * s_bb, C_ptr + b * s_cb, pos_ptr + b * s_pb
    B_p, s_bl = _bc_lanes(B_p, C_p, s_bl, s_cl, BD, N, BC_LANES)
    out_p = out_ptr + b * L * Dm + d
    st_p = st_ptr + b * n_chunks * N * Dm + sn * Dm + d[None, :]
    args = (u_p, dl_p, B_p, C_p, z_p)
    strides = (s_ul, s_dl, s_bl, s_cl, s_zl)
    seg_p = (b * n_seg + s) * N * Dm + sn * Dm + d[None, :]
    h = tl.load(cin_ptr + seg_p, mask=tl.where(n_seg > 1, dm, False)[None, :], other=0.0)  # the state entering
    t0 = c0 * CHUNK
    # slot i: the inputs of the next token t with t % FWD_AHEAD == i (a tuple from _load_token)
    s0 = _load_token(*args, t0, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    s1 = _load_token(*args, t0 + 1, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    s2 = _load_token(*args, t0 + 2, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    s3 = _load_token(*args, t0 + 3, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    s4 = _load_token(*args, t0 + 4, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    s5 = _load_token(*args, t0 + 5, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    s6 = _load_token(*args, t0 + 6, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    s7 = _load_token(*args, t0 + 7, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    consts = (A2, sn, bias, Dv, out_p, Dm, dm)
    for c in range(c0, c1):
        starts = _chunk_starts(pos_p, c * CHUNK, L, s_pl, CHUNK, HAS_POS)
        # unrolled by FWD_AHEAD = 8 with no branch inside, so the compiler can interleave the tokens; each
        # slot is re-loaded FWD_AHEAD tokens ahead as soon as it is consumed
        for k in range(0, CHUNK, FWD_AHEAD):
            t = c * CHUNK + k
            st = _group_starts(starts, k, HAS_POS)
            h = _fwd_token(h, t, s0, _is_start(st, 0), *consts, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, BC_LANES)
            s0 = _load_token(*args, t + 8, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            h = _fwd_token(h, t + 1, s1, _is_start(st, 1), *consts, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, BC_LANES)
            s1 = _load_token(*args, t + 9, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            h = _fwd_token(h, t + 2, s2, _is_start(st, 2), *consts, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, BC_LANES)
            s2 = _load_token(*args, t + 10, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            h = _fwd_token(h, t + 3, s3, _is_start(st, 3), *consts, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, BC_LANES)
            s3 = _load_token(*args, t + 11, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            h = _fwd_token(h, t + 4, s4, _is_start(st, 4), *consts, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, BC_LANES)
            s4 = _load_token(*args, t + 12, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            h = _fwd_token(h, t + 5, s5, _is_start(st, 5), *consts, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, BC_LANES)
            s5 = _load_token(*args, t + 13, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            h = _fwd_token(h, t + 6, s6, _is_start(st, 6), *consts, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, BC_LANES)
            s6 = _load_token(*args, t + 14, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            h = _fwd_token(h, t + 7, s7, _is_start(st, 7), *consts, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, BC_LANES)
            s7 = _load_token(*args, t + 15, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
        tl.store(st_p + c * N * Dm, h, mask=dm[None, :])  # tokens past L were identities: h is h_{L-1}


@triton.jit
def _lane_xor(x, m):
    """x (K, BD) with column d replaced by column d ^ m: a warp shuffle when the columns sit one per lane."""
    idx = tl.arange(0, x.shape[1])[None, :] ^ m
    return tl.gather(x, tl.broadcast_to(idx, x.shape), axis=1)


@triton.jit
def _channel_sum(x, ok, nm, LOG2_N: tl.constexpr, LOG2_BD: tl.constexpr, PERMUTED: tl.constexpr):
    """The state-shaped x (N, BD) summed over its BD channels, as (state, sum, mask) for _put: each thread's
    sum, the state it is of and whether it is one to write (token ok, one thread per state). tl.sum
    would reduce each of the N rows across the lanes on its own (log2(BD) shuffles each). With the
    rows PERMUTED (row r of column j holds state r ^ (j >> (LOG2_BD - LOG2_N)), N < BD, powers of 2)
    a reduce-scatter halves the rows at each shuffle instead (N = 16, BD = 32: 16 shuffles, not 80):
    at step i every column keeps the lower half of its rows, which holds the states whose bit
    LOG2_N-1-i equals its own bit LOG2_BD-1-i, and adds the upper half of column j ^ (that bit),
    which holds the same states."""
    if PERMUTED:
        col = tl.arange(0, x.shape[1])[None, :]  # (1, BD)
        s = x
        for i in tl.static_range(LOG2_N):  # rows N -> 1; column j then holds state j >> SPREAD
            lo, hi = tl.split(tl.permute(tl.reshape(s, (2, s.shape[0] // 2, s.shape[1])), (1, 2, 0)))
            s = lo + _lane_xor(hi, 1 << (LOG2_BD - 1 - i))
        SPREAD: tl.constexpr = LOG2_BD - LOG2_N
        for i in tl.static_range(SPREAD):  # sum the copies of each row, 2**SPREAD columns apart
            s = s + _lane_xor(s, 1 << i)
        n, m = col >> SPREAD, tl.where(ok, (col & ((1 << SPREAD) - 1)) == 0, False)
    else:
        n, s, m = tl.arange(0, x.shape[0]), tl.sum(x, 1), tl.where(ok, nm, False)
    return n, s, m


@triton.jit
def _put(p, x, mask, ATOMIC: tl.constexpr):
    """x stored at p, or added to what is there (relaxed: no order needed before the kernel ends)."""
    if ATOMIC:
        tl.atomic_add(p, x, mask=mask, sem="relaxed")
    else:
        tl.store(p, x, mask=mask)


@triton.jit
def _put_group(p, ts, sums, N: tl.constexpr, ATOMIC: tl.constexpr):
    """_put of a group's 4 sums over channels (_channel_sum: state, sum, mask) of its tokens ts into p's (L, N).
    The walks call it after the group's loads ahead: ptxas keeps an atomic add ahead of the loads after it (a store
    it lets them pass), and an add per token left the loads too little time (H200, d_inner 4096: the adjoint pass
    1.13 -> 1.39 ms; notes/perf.md v20)."""
    for i in tl.static_range(4):
        _put(p + ts[i] * N + sums[i][0], sums[i][1], sums[i][2], ATOMIC)


@triton.jit
def _bwd_state_token(h, dA_c, P, t, u, dl, Bt, Ct, zz, dout, start, ok, A2, sn, bias, Dv, dz_p, qa_p, dtt_p, dyt_p,
                     Dm, dm, nm, N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, LOG2_N: tl.constexpr, LOG2_BD: tl.constexpr, BC_LANES: tl.constexpr):
    """Token t of the backward's first pass, forward in time: the state h (N, BD) after it, and what needs h.
    dz; QA = sum over states of A2 q (BD,), q = C dy a h_{t-1} (N, BD) being the token's term in X (see the notes
    above _softplus); and the chunk's dA term from q, dA_c += q P, P = the sum of dt over the chunk up to t. Stores
    dt and dy for the passes after it; returns dC's sum over the channels (_channel_sum) for the caller to store."""
    dt, a, x = _decay_input(dl, u, Bt, start, ok, bias, A2, sn, HAS_BIAS, SOFTPLUS, BC_LANES)
    ah = a * h  # (N, BD)
    h = ah + x
    P += dt
    Cf = _col(Ct, True, sn, BC_LANES)
    qC = ah * Cf  # q / dy
    dy = _gate(dout, zz, HAS_Z)
    m = tl.where(ok, dm, False)  # (BD,); `dm & ok` breaks the interpreter (scalar ok)
    if HAS_Z:
        y = tl.sum(h * Cf, 0)
        if HAS_D:
            y += u.to(tl.float32) * Dv
        zf = zz.to(tl.float32)
        sz = tl.sigmoid(zf)
        tl.store(dz_p + t * Dm, (dout * y * sz * (1 + zf * (1 - sz))).to(dz_p.dtype.element_ty), mask=m)
    tl.store(qa_p + t * Dm, dy * tl.sum(qC * A2, 0), mask=m)
    tl.store(dtt_p + t * Dm, dt, mask=m)
    tl.store(dyt_p + t * Dm, dy, mask=m)
    dA_c += qC * (dy * P)[None, :]
    return h, dA_c, P, _channel_sum(h * dy[None, :], ok, nm, LOG2_N, LOG2_BD, BC_LANES)


@triton.jit
def _bwd_adjoint_token(gc, RX, Suf, dA_c, dD_acc, dbias_acc, T, t, u, dt, Bt, Ct, dy, qa, start, ok, A2, sn, Dv,
                       du_p, ddl_p, Dm, dm, nm, N: tl.constexpr, HAS_D: tl.constexpr, SOFTPLUS: tl.constexpr,
                       LOG2_N: tl.constexpr, LOG2_BD: tl.constexpr, BC_LANES: tl.constexpr):
    """Token t of the backward's second pass, back in time. gc = a_{t+1} g_{t+1} (N, BD) comes in, a_t g_t goes
    out. With K_t = X_{c1} - sum of k_s over the chunk's tokens s >= t: RX = sum over states of A2 K_{t+1}, plus
    the sum of QA over the chunk's tokens after t (BD,), comes in, the same for t goes out; Suf = the sum of dt
    over the chunk's tokens after t (BD,), T = over the whole chunk. dA_c gathers sum_t dt_t K_t as
    X_{c1} T - sum_s k_s (T - Suf_s), so K itself is never formed. dt and dy = dL/dy (BD,) come from the
    first pass. Returns dB's sum over the channels (_channel_sum) last, for the caller to store."""
    dt = dt.to(tl.float32)
    a = _decay_dt(dt, start, A2)
    uf = u.to(tl.float32)
    g = gc + _col(Ct, True, sn, BC_LANES) * dy[None, :]  # (N, BD): dL/dh_t
    Bf = _col(Bt, False, sn, BC_LANES)
    dtu = dt * uf
    kx = gc * Bf  # k_t / (dt_t u_t), k_t = a_{t+1} g_{t+1} x_t
    RX += qa - tl.sum(kx * A2, 0) * dtu  # sum over states of A2 X_t (A2 = A log2(e))
    gBs = tl.sum(g * Bf, 0)  # (BD,)
    ddt = RX * LN2 + gBs * uf  # the decay's term, plus the input's
    dA_c -= kx * (dtu * (T - Suf))[None, :]
    Suf += dt
    du = gBs * dt
    if HAS_D:
        du += dy * Dv
        dD_acc += dy * uf
    ddelta = ddt * _softplus_slope(dt) if SOFTPLUS else ddt
    m = tl.where(ok, dm, False)
    dbias_acc += tl.where(m, ddelta, 0.0)
    tl.store(du_p + t * Dm, du.to(du_p.dtype.element_ty), mask=m)
    tl.store(ddl_p + t * Dm, ddelta.to(ddl_p.dtype.element_ty), mask=m)
    return a * g, RX, Suf, dA_c, dD_acc, dbias_acc, _channel_sum(g * dtu[None, :], ok, nm, LOG2_N, LOG2_BD, BC_LANES)


@triton.jit
def _part(pid_d, b, ATOMIC: tl.constexpr):
    """Which (L, N) slice of the dB or dC buffer row b of channel block pid_d writes: with ATOMIC, the row's one
    sum (B, L, N), every block adding to it; else its own partial sum (n_dblk, B, L, N), block outermost."""
    return b if ATOMIC else pid_d * tl.num_programs(2) + b


@triton.jit
def _bwd_lanes(BD: tl.constexpr, N: tl.constexpr, LOG2_N: tl.constexpr, LOG2_BD: tl.constexpr,
               BC_LANES: tl.constexpr):
    """sn: the state each element of the backward's (N, BD) tiles holds. With BC_LANES (so N < BD) row r of
    lane j holds state r ^ (j >> (LOG2_BD - LOG2_N)), which lets _channel_sum skip its selects."""
    sn = tl.arange(0, N)[:, None]
    if BC_LANES:
        sn = sn ^ (tl.arange(0, BD)[None, :] >> (LOG2_BD - LOG2_N))
    return sn


@triton.jit
def _scan_bwd_states_kernel(u_ptr, dl_ptr, At_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, pos_ptr, st_ptr, dout_ptr,
                            qa_ptr, dtt_ptr, dyt_ptr, dz_ptr, dC_ptr, dAc_ptr, dt_ptr, L, Dm, n_chunks, seg_len,
                            s_ub, s_ul, s_db, s_dl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_pb, s_pl,
                            N: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr, HAS_D: tl.constexpr,
                            HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
                            SOFTPLUS: tl.constexpr, LOG2_N: tl.constexpr, LOG2_BD: tl.constexpr,
                            BC_LANES: tl.constexpr, EVEN: tl.constexpr, EVEN_D: tl.constexpr, ATOMIC: tl.constexpr):
    """The backward's first pass: one segment of one row forward from the saved state entering it (no carry pass)."""
    pid_d = tl.program_id(0)
    c0 = tl.program_id(1) * (seg_len // CHUNK)
    c1 = tl.minimum(c0 + seg_len // CHUNK, n_chunks)
    b = tl.program_id(2).to(tl.int64)
    d = _channels(pid_d, BD)  # (BD,)
    dm = _in_channels(d, Dm, EVEN_D)
    nm = tl.arange(0, N) < N
    sn = _bwd_lanes(BD, N, LOG2_N, LOG2_BD, BC_LANES)
    A2 = tl.load(At_ptr + sn * Dm + d[None, :], mask=dm[None, :], other=0.0) * LOG2E  # (N, BD)
    bias = tl.load(bias_ptr + d, mask=dm, other=0.0) if HAS_BIAS else 0.0
    Dv = tl.load(D_ptr + d, mask=dm, other=0.0) if HAS_D else 0.0
    B_p, C_p = B_ptr + b * s_bb, C_ptr + b * s_cb
    B_p, s_bl = _bc_lanes(B_p, C_p, s_bl, s_cl, BD, N, BC_LANES)
    args = (u_ptr + b * s_ub + d, dl_ptr + b * s_db + d, B_p, C_p, z_ptr + b * s_zb + d)
    strides = (s_ul, s_dl, s_bl, s_cl, s_zl)
    pos_p = pos_ptr + b * s_pb
    row = b * L * Dm + d
    dout_p, dz_p, qa_p, dtt_p, dyt_p = dout_ptr + row, dz_ptr + row, qa_ptr + row, dtt_ptr + row, dyt_ptr + row
    dC_p = dC_ptr + _part(pid_d, b, ATOMIC) * L * N
    chunk_p = b * n_chunks * N * Dm + sn * Dm + d[None, :]  # + c N Dm: chunk c's (N, BD) in (B, n_chunks, N, Dm)
    h = tl.where(c0 > 0, tl.load(st_ptr + chunk_p + tl.maximum(c0 - 1, 0) * N * Dm, mask=dm[None, :], other=0.0),
                 0.0)
    t = c0 * CHUNK
    u0, dl0, B0, C0, z0, ok0 = _load_token(*args, t, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    u1, dl1, B1, C1, z1, ok1 = _load_token(*args, t + 1, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    u2, dl2, B2, C2, z2, ok2 = _load_token(*args, t + 2, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    u3, dl3, B3, C3, z3, ok3 = _load_token(*args, t + 3, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    g0, g1 = _load_row(dout_p, t, L, Dm, dm, EVEN), _load_row(dout_p, t + 1, L, Dm, dm, EVEN)
    g2, g3 = _load_row(dout_p, t + 2, L, Dm, dm, EVEN), _load_row(dout_p, t + 3, L, Dm, dm, EVEN)
    for c in range(c0, c1):
        dA_c = tl.zeros((N, BD), tl.float32)
        P = tl.zeros((BD,), tl.float32)
        starts = _chunk_starts(pos_p, c * CHUNK, L, s_pl, CHUNK, HAS_POS)
        for k in range(0, CHUNK, GROUP):
            t = c * CHUNK + k
            st = _group_starts(starts, k, HAS_POS)
            h, dA_c, P, dC0 = _bwd_state_token(h, dA_c, P, t, u0, dl0, B0, C0, z0, g0, _is_start(st, 0), ok0,
                                               A2, sn, bias, Dv, dz_p, qa_p, dtt_p, dyt_p, Dm, dm, nm, N, HAS_D,
                                               HAS_Z, HAS_BIAS, SOFTPLUS, LOG2_N, LOG2_BD, BC_LANES)
            u0, dl0, B0, C0, z0, ok0 = _load_token(*args, t + 4, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            g0 = _load_row(dout_p, t + 4, L, Dm, dm, EVEN)
            h, dA_c, P, dC1 = _bwd_state_token(h, dA_c, P, t + 1, u1, dl1, B1, C1, z1, g1, _is_start(st, 1), ok1,
                                               A2, sn, bias, Dv, dz_p, qa_p, dtt_p, dyt_p, Dm, dm, nm, N, HAS_D,
                                               HAS_Z, HAS_BIAS, SOFTPLUS, LOG2_N, LOG2_BD, BC_LANES)
            u1, dl1, B1, C1, z1, ok1 = _load_token(*args, t + 5, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            g1 = _load_row(dout_p, t + 5, L, Dm, dm, EVEN)
            h, dA_c, P, dC2 = _bwd_state_token(h, dA_c, P, t + 2, u2, dl2, B2, C2, z2, g2, _is_start(st, 2), ok2,
                                               A2, sn, bias, Dv, dz_p, qa_p, dtt_p, dyt_p, Dm, dm, nm, N, HAS_D,
                                               HAS_Z, HAS_BIAS, SOFTPLUS, LOG2_N, LOG2_BD, BC_LANES)
            u2, dl2, B2, C2, z2, ok2 = _load_token(*args, t + 6, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            g2 = _load_row(dout_p, t + 6, L, Dm, dm, EVEN)
            h, dA_c, P, dC3 = _bwd_state_token(h, dA_c, P, t + 3, u3, dl3, B3, C3, z3, g3, _is_start(st, 3), ok3,
                                               A2, sn, bias, Dv, dz_p, qa_p, dtt_p, dyt_p, Dm, dm, nm, N, HAS_D,
                                               HAS_Z, HAS_BIAS, SOFTPLUS, LOG2_N, LOG2_BD, BC_LANES)
            u3, dl3, B3, C3, z3, ok3 = _load_token(*args, t + 7, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            g3 = _load_row(dout_p, t + 7, L, Dm, dm, EVEN)
            _put_group(dC_p, (t, t + 1, t + 2, t + 3), (dC0, dC1, dC2, dC3), N, ATOMIC)  # after the loads
        tl.store(dAc_ptr + chunk_p + c * N * Dm, dA_c, mask=dm[None, :])
        tl.store(dt_ptr + (b * n_chunks + c) * Dm + d, P, mask=dm)  # the chunk's sum of dt, for the second pass


@triton.jit
def _scan_bwd_adjoint_kernel(u_ptr, dl_ptr, At_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, pos_ptr, st_ptr, dout_ptr,
                             qa_ptr, cin_ptr, du_ptr, ddl_ptr, dB_ptr, dAc_ptr, dA_ptr, dt_ptr, dD_ptr, dbias_ptr,
                             L, Dm, n_chunks, seg_len, n_seg,
                             s_ub, s_ul, s_db, s_dl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_pb, s_pl,
                             N: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr, HAS_D: tl.constexpr,
                             HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
                             SOFTPLUS: tl.constexpr, LOG2_N: tl.constexpr, LOG2_BD: tl.constexpr,
                             BC_LANES: tl.constexpr, EVEN: tl.constexpr, EVEN_D: tl.constexpr, ATOMIC: tl.constexpr):
    """The backward's second pass: one segment of one row back from the adjoint entering its end. Takes dt in
    delta's place and dL/dy in dout's (the first pass stored them; no z)."""
    pid_d = tl.program_id(0)
    s = tl.program_id(1)
    c0 = s * (seg_len // CHUNK)
    c1 = tl.minimum(c0 + seg_len // CHUNK, n_chunks)
    b = tl.program_id(2).to(tl.int64)
    bs = b * n_seg + s
    d = _channels(pid_d, BD)  # (BD,)
    dm = _in_channels(d, Dm, EVEN_D)
    nm = tl.arange(0, N) < N
    sn = _bwd_lanes(BD, N, LOG2_N, LOG2_BD, BC_LANES)
    A2 = tl.load(At_ptr + sn * Dm + d[None, :], mask=dm[None, :], other=0.0) * LOG2E  # (N, BD)
    Dv = tl.load(D_ptr + d, mask=dm, other=0.0) if HAS_D else 0.0
    B_p, C_p = B_ptr + b * s_bb, C_ptr + b * s_cb
    B_p, s_bl = _bc_lanes(B_p, C_p, s_bl, s_cl, BD, N, BC_LANES)
    args = (u_ptr + b * s_ub + d, dl_ptr + b * s_db + d, B_p, C_p, z_ptr + b * s_zb + d)
    strides = (s_ul, s_dl, s_bl, s_cl, s_zl)
    pos_p = pos_ptr + b * s_pb
    row = b * L * Dm + d
    dout_p, du_p, ddl_p, qa_p = dout_ptr + row, du_ptr + row, ddl_ptr + row, qa_ptr + row
    dB_p = dB_ptr + _part(pid_d, b, ATOMIC) * L * N
    chunk_p = b * n_chunks * N * Dm + sn * Dm + d[None, :]  # + c N Dm: chunk c's (N, BD) in (B, n_chunks, N, Dm)
    # a_{t+1} g_{t+1}: the adjoint flowing back into token t; at first, what the later segments send
    gc = tl.load(cin_ptr + bs * N * Dm + sn * Dm + d[None, :], mask=tl.where(n_seg > 1, dm, False)[None, :],
                 other=0.0)
    dD_acc = tl.zeros((BD,), tl.float32)
    dbias_acc = tl.zeros((BD,), tl.float32)
    t = c1 * CHUNK - 1
    u0, dl0, B0, C0, z0, ok0 = _load_token(*args, t, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    u1, dl1, B1, C1, z1, ok1 = _load_token(*args, t - 1, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    u2, dl2, B2, C2, z2, ok2 = _load_token(*args, t - 2, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    u3, dl3, B3, C3, z3, ok3 = _load_token(*args, t - 3, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
    g0, g1 = _load_row(dout_p, t, L, Dm, dm, EVEN), _load_row(dout_p, t - 1, L, Dm, dm, EVEN)
    g2, g3 = _load_row(dout_p, t - 2, L, Dm, dm, EVEN), _load_row(dout_p, t - 3, L, Dm, dm, EVEN)
    q0, q1 = _load_row(qa_p, t, L, Dm, dm, EVEN), _load_row(qa_p, t - 1, L, Dm, dm, EVEN)
    q2, q3 = _load_row(qa_p, t - 2, L, Dm, dm, EVEN), _load_row(qa_p, t - 3, L, Dm, dm, EVEN)
    for cc in range(c1 - c0):
        c = c1 - 1 - cc
        # X_t = g_t a_t h_{t-1} = K_t + sum of q_s over the chunk's s >= t; at the chunk's end gc times the saved state
        X = gc * tl.load(st_ptr + chunk_p + c * N * Dm, mask=dm[None, :], other=0.0)
        T = tl.load(dt_ptr + (b * n_chunks + c) * Dm + d, mask=dm, other=0.0)  # the chunk's sum of dt
        RX = tl.sum(X * A2, 0)
        Suf = tl.zeros((BD,), tl.float32)
        # the chunk's dA: X_{c1} T (the K part's first term) plus the first pass's q part
        dA_c = X * T[None, :] + tl.load(dAc_ptr + chunk_p + c * N * Dm, mask=dm[None, :], other=0.0)
        starts = _chunk_starts(pos_p, c * CHUNK, L, s_pl, CHUNK, HAS_POS)
        for kk in range(0, CHUNK, GROUP):
            t = c * CHUNK + CHUNK - 1 - kk
            st = _group_starts(starts, CHUNK - GROUP - kk, HAS_POS)  # token t - i: bit GROUP - 1 - i
            tp = tl.maximum(t - GROUP, GROUP - 1)  # the group before (a harmless re-load at the row's start)
            gc, RX, Suf, dA_c, dD_acc, dbias_acc, dB0 = _bwd_adjoint_token(
                gc, RX, Suf, dA_c, dD_acc, dbias_acc, T, t, u0, dl0, B0, C0, g0, q0, _is_start(st, 3),
                ok0, A2, sn, Dv, du_p, ddl_p, Dm, dm, nm, N, HAS_D, SOFTPLUS, LOG2_N, LOG2_BD, BC_LANES)
            u0, dl0, B0, C0, z0, ok0 = _load_token(*args, tp, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            g0, q0 = _load_row(dout_p, tp, L, Dm, dm, EVEN), _load_row(qa_p, tp, L, Dm, dm, EVEN)
            gc, RX, Suf, dA_c, dD_acc, dbias_acc, dB1 = _bwd_adjoint_token(
                gc, RX, Suf, dA_c, dD_acc, dbias_acc, T, t - 1, u1, dl1, B1, C1, g1, q1, _is_start(st, 2),
                ok1, A2, sn, Dv, du_p, ddl_p, Dm, dm, nm, N, HAS_D, SOFTPLUS, LOG2_N, LOG2_BD, BC_LANES)
            u1, dl1, B1, C1, z1, ok1 = _load_token(*args, tp - 1, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            g1, q1 = _load_row(dout_p, tp - 1, L, Dm, dm, EVEN), _load_row(qa_p, tp - 1, L, Dm, dm, EVEN)
            gc, RX, Suf, dA_c, dD_acc, dbias_acc, dB2 = _bwd_adjoint_token(
                gc, RX, Suf, dA_c, dD_acc, dbias_acc, T, t - 2, u2, dl2, B2, C2, g2, q2, _is_start(st, 1),
                ok2, A2, sn, Dv, du_p, ddl_p, Dm, dm, nm, N, HAS_D, SOFTPLUS, LOG2_N, LOG2_BD, BC_LANES)
            u2, dl2, B2, C2, z2, ok2 = _load_token(*args, tp - 2, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            g2, q2 = _load_row(dout_p, tp - 2, L, Dm, dm, EVEN), _load_row(qa_p, tp - 2, L, Dm, dm, EVEN)
            gc, RX, Suf, dA_c, dD_acc, dbias_acc, dB3 = _bwd_adjoint_token(
                gc, RX, Suf, dA_c, dD_acc, dbias_acc, T, t - 3, u3, dl3, B3, C3, g3, q3, _is_start(st, 0),
                ok3, A2, sn, Dv, du_p, ddl_p, Dm, dm, nm, N, HAS_D, SOFTPLUS, LOG2_N, LOG2_BD, BC_LANES)
            u3, dl3, B3, C3, z3, ok3 = _load_token(*args, tp - 3, L, dm, nm, *strides, HAS_Z, BC_LANES, EVEN)
            g3, q3 = _load_row(dout_p, tp - 3, L, Dm, dm, EVEN), _load_row(qa_p, tp - 3, L, Dm, dm, EVEN)
            _put_group(dB_p, (t, t - 1, t - 2, t - 3), (dB0, dB1, dB2, dB3), N, ATOMIC)  # after the loads
        # the chunk's dA: with ATOMIC added to dA (Dm, N), A's layout; else over the first pass's part, for torch
        if ATOMIC:
            tl.atomic_add(dA_ptr + d[None, :] * N + sn, dA_c, mask=dm[None, :], sem="relaxed")
        else:
            tl.store(dAc_ptr + chunk_p + c * N * Dm, dA_c, mask=dm[None, :])
    sums = 0 if ATOMIC else bs * Dm  # dD and d(delta bias): the (Dm,) sums, else this row and segment's part
    if HAS_D:
        _put(dD_ptr + sums + d, dD_acc, dm, ATOMIC)
    if HAS_BIAS:
        _put(dbias_ptr + sums + d, dbias_acc, dm, ATOMIC)


# BD channels per program, num_warps, and whether B and C travel one element per lane (BC_LANES,
# used where 2N <= BD): the best of a sweep on an H200 (notes/perf.md). BC_LANES saved the earlier
# one-pass backward ~60 registers of prefetched B and C and 15-20% of its time (its two passes keep it,
# not timed without); the forward, which has registers to spare, runs 0-2% faster with every lane
# loading all of B and C (even at 1536; 5-15% before v21's _channels, notes/perf.md v21).
SCAN_FWD_CONFIG = dict(BD=32, num_warps=1, bc_lanes=False)
SCAN_BWD_CONFIG = dict(BD=32, num_warps=1, bc_lanes=True)
# The backward's carry pass: tiles of T tokens x N states x BD channels on num_warps warps. H200, d_inner 1536,
# 8 x 2048 tokens: 0.098 ms at T 32 on 4 warps, 0.105 at T 16; T 16 on 2 warps and T 8 on 1 within 1% of it
# in the whole backward (notes/perf.md v17).
SCAN_CARRY_BWD_CONFIG = dict(T=32, num_warps=4)
# The carry passes' pieces: CHUNK / SCAN_CARRY_SPLIT tokens. The forward's programs are short walks of one warp
# at 127 registers (16 per SM): in one-chunk pieces at d_inner 1536 they made 2.2 waves, the last a fifth full
# (ncu: 72% of the occupancy the registers allow), 0.105 ms; in half-chunk pieces 4.4 waves, 0.092 ms (the
# combine's 0.008 -> 0.015); quarter-chunk 0.091 (combine 0.030). The backward's tile programs already made 8.7
# waves: in half-chunk pieces 0.093 -> 0.100 ms (combine 0.013 -> 0.025) (H200, 8 x 2048 tokens; notes/perf.md v19).
SCAN_CARRY_SPLIT = dict(fwd=2, bwd=1)
# How many programs of each kernel fit on a multiprocessor at once (registers: 159 forward, 255 backward).
# With the GPU well filled, rows stay whole; else they are split into segments (notes/perf.md).
SCAN_FWD_PROGRAMS_PER_SM = 12
SCAN_BWD_PROGRAMS_PER_SM = 8
# The backward's passes where their whole rows do not fill one wave of 8 programs per SM: registers capped
# (a few spills) for 12 per SM, and rows split to fill them (see _bwd_grid).
SCAN_BWD_CAP = dict(maxnreg=168, programs_per_sm=12)


def _config(cfg, N, BD, num_warps, bc_lanes):
    """(BD, num_warps, bc_lanes) for a launch: the ones given, else cfg's; B and C go one element per
    lane only where the 2N values fit on the BD lanes."""
    BD = BD or cfg["BD"]
    bc_lanes = cfg["bc_lanes"] if bc_lanes is None else bc_lanes
    return BD, num_warps or cfg["num_warps"], bc_lanes and 2 * N <= BD


def _rowmajor(t):
    """Last dimension contiguous (what the kernels index with stride 1); copies only if needed."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _scan_args(u, delta, A, B, C, D, z, delta_bias, pos):
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_POS=pos is not None,
                 EVEN=u.shape[1] % CHUNK == 0)  # rows of whole chunks: no token past the end is used
    u, delta, B, C = (_rowmajor(t) for t in (u, delta, B, C))
    z = _rowmajor(z) if z is not None else u
    pos_ = pos if pos is not None else u.new_empty(1, 1, dtype=torch.int32)  # read by no kernel
    # A goes in transposed, (N, Dm): loads along d are contiguous, which keeps the state's N axis
    # inside each thread (Triton lays tiles out along the contiguous axis)
    At = A.t().contiguous()
    # At also stands in for an absent D or delta bias, which no kernel reads (a tensor of its own would cost a
    # launch to fill)
    tensors = (u, delta, At, B, C, D if D is not None else At, z, delta_bias if delta_bias is not None else At, pos_)
    strides = (u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1),
               C.stride(0), C.stride(1), z.stride(0), z.stride(1), pos_.stride(0), pos_.stride(1))
    return tensors, strides, flags


def _segments(u, programs, segments, per_sm):
    """(segment length in tokens, number of segments), a segment being whole chunks: `segments` of them
    if given, else chosen from the waves of programs the GPU runs (slots = per_sm x multiprocessors at
    once). One wave at least 40% full stays whole. Otherwise: the fewest waves x segment length, plus
    the carry pass that splitting costs (15% of a whole pass times the share of the row it walks, all
    segments but the last) and 0.5% per segment (each program's setup). On an H200 at 8 x
    2048 tokens this picks 4 / 1 / 1 forward segments at d_inner 1536 / 4096 / 5120, the best of a sweep
    (1536: 0.311 ms, 8 segments 0.348, 2 0.373, 6 0.397; 4096: 2 segments +21%; notes/perf.md v21); the
    backward's passes, see _bwd_grid."""
    n_chunks = _n_chunks(u.shape[1])
    slots = per_sm * _sm_count(u.device)

    def cost(seg_chunks):
        n_seg = triton.cdiv(n_chunks, seg_chunks)
        return (triton.cdiv(programs * n_seg, slots) * seg_chunks / n_chunks + 0.15 * (n_seg - 1) / n_seg
                + 0.005 * n_seg)

    if segments is not None:
        seg_chunks = triton.cdiv(n_chunks, min(segments, n_chunks))
    elif 0.4 * slots <= programs <= slots:
        seg_chunks = n_chunks
    else:
        seg_chunks = min(range(n_chunks, 0, -1), key=cost)
    return seg_chunks * CHUNK, triton.cdiv(n_chunks, seg_chunks)


def _bwd_grid(u, programs, segments, carry):
    """(segment length, number of segments, maxnreg) of one of the backward's passes (carry: the adjoint
    pass, whose split rows need a carry pass). The states pass starts each segment from a saved state, so it
    splits for free: capped (SCAN_BWD_CAP), one chunk per segment (`segments` of them if given), the most
    programs, which the GPU balances best. The adjoint pass runs uncapped (255 registers,
    SCAN_BWD_PROGRAMS_PER_SM) where whole rows fill one wave of it at least 40%; otherwise capped, since a
    second wave would run almost empty (at 8 x 2048 tokens: d_inner 5120) and splitting a row costs its
    carry pass (1536). The whole backward on an H200 at 8 x 2048 tokens (CHUNK 128), against other grids
    (ms): at 4096 the states pass uncapped in whole rows 2.551, capped in 16 segments 2.509 (A/B), in 3
    (what _segments' model picks) 2.613, the adjoint pass capped in whole rows 2.688; at 5120 the same, at
    1536 +0.5% for the states pass's 16 segments against the model's 4; no other grid swept was faster by
    more than the sweep's noise, 1% (notes/scan_bwd_grid.py, notes/perf.md v16, v17)."""
    if not carry:
        # an explicit count, which _segments keeps (per_sm unused)
        seg_len, n_seg = _segments(u, programs, segments or _n_chunks(u.shape[1]), 1)
        return seg_len, n_seg, SCAN_BWD_CAP["maxnreg"]
    slots = SCAN_BWD_PROGRAMS_PER_SM * _sm_count(u.device)
    if 0.4 * slots <= programs <= slots:
        return *_segments(u, programs, segments, SCAN_BWD_PROGRAMS_PER_SM), None
    return *_segments(u, programs, segments, SCAN_BWD_CAP["programs_per_sm"]), SCAN_BWD_CAP["maxnreg"]


def _carries(tensors, strides, flags, dout, seg_len, n_seg, BD, num_warps, bc_lanes, softplus, reverse):
    """The carry entering each segment (B, n_seg, N, Dm) fp32: the state for the forward (reverse=False),
    the adjoint a_{t+1} g_{t+1} for the backward. Nothing to compute for one segment. The carry passes take
    pieces (sub to a segment) of CHUNK / SCAN_CARRY_SPLIT tokens (fewer, larger ones past 1024 per row, the
    combine's tile), not whole segments: where the segments leave the GPU underfilled, that fills it (H200,
    d_inner 1536, 8 x 2048 tokens, backward in 4 segments of 4 chunks, one-chunk pieces against whole segments:
    1.189 -> 1.158 ms, notes/perf.md v13). The backward's tensors carry dt in delta's place and dout is dL/dy.
    flags: _scan_args', plus EVEN_D as the caller's kernels take it."""
    u, delta, At, B, C, _, _, bias, pos = tensors
    if n_seg == 1:
        return At  # read by no program
    Bb, L, Dm = u.shape
    N = At.shape[0]
    # the smallest pieces, then as many to a segment as the combine takes
    split = SCAN_CARRY_SPLIT["bwd" if reverse else "fwd"]
    assert reverse or (CHUNK // split) % GROUP.value == 0, \
        f"forward carry pieces of {CHUNK // split} tokens: not a multiple of GROUP ({GROUP.value}), its walk's step"
    pieces = seg_len // CHUNK * split
    sub = max(m for m in range(1, pieces + 1) if pieces % m == 0 and n_seg * m <= max(n_seg, 1024))
    # the pieces whose carries some segment needs: forward, all of the segments before the last; backward,
    # all after the first
    n_c = (n_seg - 1) * sub if not reverse else triton.cdiv(L, seg_len // sub) - sub
    loc = torch.empty(Bb, n_c, N, Dm, device=u.device, dtype=torch.float32)
    S = torch.empty(Bb, n_c, Dm, device=u.device, dtype=torch.float32)
    s_ub, s_ul, s_db, s_dl, s_bb, s_bl, s_cb, s_cl, _, _, s_pb, s_pl = strides
    grid = (triton.cdiv(Dm, BD), n_c, Bb)
    if reverse:
        T = min(SCAN_CARRY_BWD_CONFIG["T"], triton.next_power_of_2(CHUNK))  # no longer than a piece
        _scan_carry_bwd_kernel[grid](delta, At, C, pos, dout, loc, S, L, Dm, seg_len // sub, sub, n_c, s_db, s_dl,
                                     s_cb, s_cl, s_pb, s_pl, N=N, BD=BD, T=T, CHUNK=CHUNK, HAS_POS=flags["HAS_POS"],
                                     EVEN_D=flags["EVEN_D"], num_warps=SCAN_CARRY_BWD_CONFIG["num_warps"])
    else:
        _scan_carry_kernel[grid](u, delta, At, B, C, bias, pos, loc, S, L, Dm, seg_len // sub, sub, n_c, s_ub, s_ul,
                                 s_db, s_dl, s_bb, s_bl, s_cb, s_cl, s_pb, s_pl, N=N, BD=BD,
                                 HAS_BIAS=flags["HAS_BIAS"], HAS_POS=flags["HAS_POS"], SOFTPLUS=softplus,
                                 BC_LANES=bc_lanes, EVEN=flags["EVEN"], EVEN_D=flags["EVEN_D"], num_warps=num_warps)
    cin = torch.empty(Bb, n_seg, N, Dm, device=u.device, dtype=torch.float32)
    SEGS = triton.next_power_of_2(n_c)
    _scan_combine_kernel[(triton.cdiv(N * Dm, 2048 // SEGS), Bb)](loc, S, At, cin, n_c, sub, n_seg, N * Dm, Dm,
                                                                   SEGS=SEGS, BLOCK=2048 // SEGS, REVERSE=reverse)
    return cin


def scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, pos, delta_softplus, BD=None, num_warps=None,
                    bc_lanes=None, segments=None):
    """Launches the forward; returns out (B, L, Dm) in u.dtype and the chunk-end states (B, n_chunks, N, Dm)."""
    Bb, L, Dm = u.shape
    N = A.shape[1]
    assert CHUNK % FWD_AHEAD.value == 0, f"CHUNK ({CHUNK}) must be a multiple of {FWD_AHEAD.value}"
    BD, num_warps, bc_lanes = _config(SCAN_FWD_CONFIG, N, BD, num_warps, bc_lanes)
    n_chunks = _n_chunks(L)
    seg_len, n_seg = _segments(u, triton.cdiv(Dm, BD) * Bb, segments, SCAN_FWD_PROGRAMS_PER_SM)
    out = torch.empty(Bb, L, Dm, device=u.device, dtype=u.dtype)
    states = torch.empty(Bb, n_chunks, N, Dm, device=u.device, dtype=torch.float32)
    if not bc_lanes:
        # every lane reads all of B and C: in fp32 (a copy, 2N values per token) it uses them as read, where
        # in bf16 it unpacks them at 3 instructions per pair: 18% fewer in the token loop, 0-2% faster (notes/perf.md)
        B, C = B.float(), C.float()
    tensors, strides, flags = _scan_args(u, delta, A, B, C, D, z, delta_bias, pos)
    # the forward keeps its channel masks (EVEN_D: slower with boundaries, notes/perf.md v16)
    cin = _carries(tensors, strides, dict(flags, EVEN_D=False), out, seg_len, n_seg, BD, num_warps, bc_lanes,
                   delta_softplus, False)
    _scan_fwd_kernel[(triton.cdiv(Dm, BD), n_seg, Bb)](
        *tensors, out, states, cin, L, Dm, n_chunks, seg_len, n_seg, *strides, N=N, BD=BD, CHUNK=CHUNK,
        SOFTPLUS=delta_softplus, BC_LANES=bc_lanes, num_warps=num_warps, **flags)
    return out, states


def scan_bwd_triton(dout, u, delta, A, B, C, D, z, delta_bias, pos, states, delta_softplus, BD=None,
                    num_warps=None, bc_lanes=None, segments=None):
    """Launches the backward's two passes; returns [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias] (None for
    absent inputs). `segments` applies to both passes."""
    Bb, L, Dm = u.shape
    N = A.shape[1]
    BD, num_warps, bc_lanes = _config(SCAN_BWD_CONFIG, N, BD, num_warps, bc_lanes)
    n_dblk = triton.cdiv(Dm, BD)
    n_chunks = states.shape[1]
    f32 = dict(device=u.device, dtype=torch.float32)
    dout = dout.contiguous()
    du = torch.empty(Bb, L, Dm, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(Bb, L, Dm, device=u.device, dtype=delta.dtype)
    dz = torch.empty(Bb, L, Dm, device=u.device, dtype=z.dtype) if z is not None else du
    qa = torch.empty(Bb, L, Dm, **f32)  # QA of every token: the first pass writes it, the second reads it back
    # dt and dL/dy of every token: the first pass writes them, the carry pass and the second read them instead of
    # forming their own (softplus, gate)
    dt_tok, dy_tok = torch.empty(Bb, L, Dm, **f32), torch.empty(Bb, L, Dm, **f32)
    dA = torch.empty(Bb, n_chunks, N, Dm, **f32)  # each (row, chunk)'s part from the first pass; the second adds to it
    dts = torch.empty(Bb, n_chunks, Dm, **f32)  # each chunk's sum of dt: the first pass writes it, the second reads it
    # dB and dC: every channel block adds its sums over channels to one fp32 buffer, in whatever order the programs
    # run. Where torch.use_deterministic_algorithms asks for the same bits every time, each writes its partial sums
    # instead, which torch sums (block outermost, in one coalesced sweep, dB's and dC's together; on an H200 that
    # sum alone took 0.050 / 0.087 ms at d_inner 1536 / 4096, notes/perf.md v20).
    atomic = not torch.are_deterministic_algorithms_enabled()
    dBC = (torch.zeros if atomic else torch.empty)(2, 1 if atomic else n_dblk, Bb, L, N, **f32)
    dB_parts, dC_parts = dBC
    tensors, strides, flags = _scan_args(u, delta, A, B, C, D, z, delta_bias, pos)
    even_d = Dm % BD == 0  # blocks of whole channels: no channel masks
    consts = dict(N=N, BD=BD, CHUNK=CHUNK, SOFTPLUS=delta_softplus, BC_LANES=bc_lanes, num_warps=num_warps,
                  LOG2_N=N.bit_length() - 1, LOG2_BD=BD.bit_length() - 1,  # tl.arange: powers of 2
                  EVEN_D=even_d, ATOMIC=atomic, **flags)
    seg_len, n_seg, maxnreg = _bwd_grid(u, n_dblk * Bb, segments, carry=False)
    _scan_bwd_states_kernel[(n_dblk, n_seg, Bb)](*tensors, states, dout, qa, dt_tok, dy_tok, dz, dC_parts, dA, dts,
                                                 L, Dm, n_chunks, seg_len, *strides, maxnreg=maxnreg, **consts)
    # dt for delta, no z; A as the first call's transposed copy, which transposes back without another copy
    tensors, strides, flags = _scan_args(u, dt_tok, tensors[2].t(), B, C, D, None, delta_bias, pos)
    consts.update(flags)
    seg_len, n_seg, maxnreg = _bwd_grid(u, n_dblk * Bb, segments, carry=True)
    if atomic:  # dA (in A's layout), dD and d(delta bias) summed in place too
        dA_sum, dD, dbias = torch.zeros(Dm, N, **f32), torch.zeros(Dm, **f32), torch.zeros(Dm, **f32)
    else:  # partial sums for torch: dA's chunks in dA itself (dA_sum read by no program), dD's and d(delta bias)'s
        # of each (row, segment)
        dA_sum, dD, dbias = dA, torch.empty(Bb * n_seg, Dm, **f32), torch.empty(Bb * n_seg, Dm, **f32)
    cin = _carries(tensors, strides, dict(flags, EVEN_D=even_d), dy_tok, seg_len, n_seg, BD, num_warps, bc_lanes,
                   delta_softplus, True)
    _scan_bwd_adjoint_kernel[(n_dblk, n_seg, Bb)](*tensors, states, dy_tok, qa, cin, du, ddelta, dB_parts, dA, dA_sum,
                                                  dts, dD, dbias, L, Dm, n_chunks, seg_len, n_seg, *strides,
                                                  maxnreg=maxnreg, **consts)
    dB, dC = dBC[:, 0] if atomic else dBC.sum(1)  # views of one tensor: each output its own copy (a custom op's
    # outputs may not alias)
    if not atomic:
        dA_sum, dD, dbias = dA.sum((0, 1)).t().contiguous(), dD.sum(0), dbias.sum(0)
    return [du, ddelta, dA_sum.to(A.dtype), dB.to(B.dtype, copy=True), dC.to(C.dtype, copy=True),
            dD.to(D.dtype) if D is not None else None, dz if z is not None else None,
            dbias.to(delta_bias.dtype) if delta_bias is not None else None]


# -----------------------------------------------------------------------------
# torch custom ops: CUDA -> Triton, CPU -> reference. Backward ops are ops of their own.


@torch.library.custom_op("packmamba::conv1d_fwd", mutates_args=())
def _conv1d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], pos: Optional[Tensor],
                activation: bool) -> Tensor:
    if x.is_cuda:
        return conv1d_fwd_triton(x, weight, bias, pos, activation)
    return causal_conv1d_ref(x, weight, bias, pos, activation)


@_conv1d_fwd.register_fake
def _(x, weight, bias, pos, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("packmamba::conv1d_bwd", mutates_args=())
def _conv1d_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], pos: Optional[Tensor],
                activation: bool) -> tuple[Tensor, Tensor, Tensor]:
    if x.is_cuda:
        dx, dw, db = conv1d_bwd_triton(x, weight, bias, pos, dout, activation)
    else:
        dx, dw, db = causal_conv1d_bwd_ref(x, weight, bias, pos, dout, activation)
    return dx, dw, db if db is not None else weight.new_zeros(weight.shape[0])


@_conv1d_bwd.register_fake
def _(dout, x, weight, bias, pos, activation):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            weight.new_empty(weight.shape[0]))


def _conv1d_setup(ctx, inputs, output):
    x, weight, bias, pos, activation = inputs
    ctx.save_for_backward(x, weight, bias, pos)
    ctx.activation = activation


def _conv1d_backward(ctx, dout):
    x, weight, bias, pos = ctx.saved_tensors
    dx, dw, db = _conv1d_bwd(dout, x, weight, bias, pos, ctx.activation)
    return dx, dw, (db if bias is not None else None), None, None


_conv1d_fwd.register_autograd(_conv1d_backward, setup_context=_conv1d_setup)


def causal_conv1d(x, weight, bias=None, pos=None, activation=True):
    """Packed depthwise causal conv1d (+ SiLU). x (B, L, D), weight (D, W), bias (D,), pos (B, L) int32."""
    return _conv1d_fwd(x, weight, bias, pos, activation)


def _n_chunks(L):
    return (L + CHUNK - 1) // CHUNK


@torch.library.custom_op("packmamba::scan_fwd", mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], pos: Optional[Tensor],
              delta_softplus: bool) -> tuple[Tensor, Tensor]:
    if u.is_cuda:
        return scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, pos, delta_softplus)
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, pos, delta_softplus, return_states=True)


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, pos, delta_softplus):
    Bb, L, Dm = u.shape
    states = u.new_empty(Bb, _n_chunks(L), A.shape[1], Dm, dtype=torch.float32)
    return torch.empty_like(u, memory_format=torch.contiguous_format), states


@torch.library.custom_op("packmamba::scan_bwd", mutates_args=())
def _scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], pos: Optional[Tensor], states: Tensor,
              delta_softplus: bool) -> list[Tensor]:
    """Returns [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]; absent inputs get zero-size tensors."""
    if u.is_cuda:
        grads = scan_bwd_triton(dout, u, delta, A, B, C, D, z, delta_bias, pos, states, delta_softplus)
    else:
        grads = selective_scan_bwd_ref(dout, u, delta, A, B, C, D, z, delta_bias, pos, delta_softplus)
    return [u.new_empty(0) if g is None else g for g in grads]


@_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, pos, states, delta_softplus):
    like = lambda t: u.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
    return [like(t) for t in (u, delta, A, B, C, D, z, delta_bias)]


def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, pos, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, pos, output[1])
    ctx.delta_softplus = delta_softplus


def _scan_backward(ctx, dout, dstates):
    u, delta, A, B, C, D, z, delta_bias, pos, states = ctx.saved_tensors
    grads = _scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, pos, states, ctx.delta_softplus)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return (*[None if t is None else g for t, g in zip(inputs, grads)], None, None)


_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, pos=None, delta_softplus=True):
    """Packed selective scan. u, delta, z (B, L, Dm); A (Dm, N) fp32; B, C (B, L, N); D, delta_bias (Dm,) fp32;
    pos (B, L) int32 or None. Returns out (B, L, Dm) in u.dtype."""
    return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, pos, delta_softplus)[0]


# -----------------------------------------------------------------------------
# The LM head's loss: lm_head matmul + cross-entropy, a chunk of rows at a time
#
# Formed whole, the logits of a step are large (8 x 2048 tokens x 50,264 vocab: 1.65 GB in bf16, and the
# gradient as much again), and they are alive at the start of the backward, when every layer's
# activations are too: the peak. linear_cross_entropy never forms them whole. It walks CE_CHUNK_ELEMS
# logits (rows x vocab) at a time and forms the gradients of x and of the weight in the forward, where
# the softmax is at hand: the same three matmuls as lm_head + F.cross_entropy, and the memory of one
# chunk of logits. The backward only scales the two gradients by the incoming one.

CE_CHUNK_ELEMS = 1 << 26  # logits per chunk: 1335 rows at vocab 50,264 (134 MB in bf16)


def cross_entropy_rows_ref(logits, targets, n, need_grad):
    """Reference twin of cross_entropy_rows_triton. logits (T, V) (overwritten by their gradient
    (softmax - onehot(target)) / n where need_grad), targets (T,) int64 (-1 = ignore), n () the number of
    targets != -1 in the whole batch. Returns the loss of each row (T,), 0 where ignored, in fp32
    (fp64 for fp64 logits)."""
    lf = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(lf, -1)  # (T,)
    valid = targets != -1
    t = targets.clamp(min=0)[:, None]  # (T, 1)
    loss = torch.where(valid, lse - lf.gather(1, t)[:, 0], 0.0)
    if need_grad:
        g = torch.exp(lf - lse[:, None]).scatter_add(1, t, -torch.ones_like(lf[:, :1]))  # (T, V)
        logits.copy_(g * (valid.to(lf.dtype) / n)[:, None])
    return loss


@triton.jit
def _ce_rows_kernel(lg_ptr, tgt_ptr, n_ptr, loss_ptr, V, stride, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One row of logits: an online max and sum of exp over the vocabulary, then (NEED_GRAD) a second pass
    that overwrites the row with its gradient. Two reads and one write of the row."""
    row = tl.program_id(0)
    p = lg_ptr + row.to(tl.int64) * stride
    cols = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), -1e30, tl.float32)  # finite: exp(m - m_new) stays defined where every value is -inf
    s = tl.zeros((BLOCK,), tl.float32)
    for v0 in range(0, V, BLOCK):
        x = tl.load(p + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    mx = tl.max(m, 0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != -1
    t = tl.where(valid, tgt, 0)
    tl.store(loss_ptr + row, tl.where(valid, lse - tl.load(p + t).to(tl.float32), 0.0))
    if NEED_GRAD:
        scale = tl.where(valid, 1.0 / tl.load(n_ptr).to(tl.float32), 0.0)
        for v0 in range(0, V, BLOCK):
            c = v0 + cols
            x = tl.load(p + c, mask=c < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(c == t, 1.0, 0.0)) * scale
            tl.store(p + c, g.to(lg_ptr.dtype.element_ty), mask=c < V)


def cross_entropy_rows_triton(logits, targets, n, need_grad):
    """As cross_entropy_rows_ref; logits (T, V) with unit stride along V, loss in fp32."""
    T, V = logits.shape
    loss = torch.empty(T, device=logits.device, dtype=torch.float32)
    if T:
        _ce_rows_kernel[(T,)](logits, targets, n, loss, V, logits.stride(0), NEED_GRAD=need_grad, BLOCK=2048,
                              num_warps=8)
    return loss


@torch.library.custom_op("packmamba::linear_cross_entropy", mutates_args=())
def _linear_ce(x: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype,
               need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """x (T, C), weight (V, C), targets (T,) int64 (-1 = ignore); the matmuls in `dtype`, the softmax in fp32
    or wider. Returns the mean loss over the targets != -1 (), and where need_grad its gradients for x
    (T, C) and weight (V, C) (else empty tensors)."""
    T, V = x.shape[0], weight.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)
    n = (targets != -1).sum().clamp(min=1)  # stays on the device: no host sync
    loss = x.new_zeros((), dtype=acc)
    dx = torch.empty_like(x) if need_grad else x.new_empty(0)
    dw = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, acc)) if need_grad else x.new_empty(0)
    w = weight.to(dtype)
    rows_ce = cross_entropy_rows_triton if x.is_cuda else cross_entropy_rows_ref
    rows = max(1, CE_CHUNK_ELEMS // V)
    with torch.autocast(x.device.type, enabled=False):  # the casts are explicit here
        for s in range(0, T, rows):
            xc = x[s:s + rows].to(dtype)  # (rows, C)
            logits = xc @ w.t()  # (rows, V)
            loss += rows_ce(logits, targets[s:s + rows], n, need_grad).sum()
            if need_grad:  # logits now hold their gradient
                dx[s:s + rows] = logits @ w
                dw += logits.t() @ xc
    return loss / n, dx, dw


@_linear_ce.register_fake
def _(x, weight, targets, dtype, need_grad):
    acc = torch.promote_types(x.dtype, torch.float32)
    if not need_grad:
        return x.new_empty((), dtype=acc), x.new_empty(0), x.new_empty(0)
    return (x.new_empty((), dtype=acc), torch.empty_like(x),
            torch.empty_like(weight, dtype=torch.promote_types(weight.dtype, acc)))


def _linear_ce_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _linear_ce_backward(ctx, dloss, ddx, ddw):
    dx, dw = ctx.saved_tensors
    return dx * dloss, dw * dloss, None, None, None


_linear_ce.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup)


def linear_cross_entropy(x, weight, targets, dtype=None):
    """Mean cross-entropy of the logits x @ weight.T against targets (-1 = ignore), without forming the
    logits whole. x (T, C), weight (V, C), targets (T,) int64; dtype: that of the matmuls (default x's)."""
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _linear_ce(x, weight, targets, dtype or x.dtype, need_grad)[0]

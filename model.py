"""
Mamba-1 language model (Gu & Dao, 2023) that trains on packed rows.

Documents packed back to back in a row stay independent: every layer passes the
per-token position index pos (B, L) int32 (0 at each document start) to the two
sequence-mixing ops in kernels.py, the causal conv1d and the selective scan,
which reset there. Everything else in the model works token by token, so the
packed model computes for each document exactly what it computes for that
document alone.

    from model import MambaConfig, MambaLM
    model = MambaLM(MambaConfig.from_preset("130m", vocab_size=50257))
    _, loss = model(idx, targets, pos)   # idx, targets (B, L) int64, pos (B, L) int32 or None
    logits, _ = model(idx, pos=pos)      # (B, L, V); with targets they are never formed whole

config.ops picks the sequence ops and the loss: "kernels" (torch custom ops: Triton on CUDA,
the PyTorch reference on CPU; the loss through kernels.linear_cross_entropy) or "ref" (the plain
PyTorch references and F.cross_entropy, for tests).

config.recompute turns on selective activation checkpointing per Block (recompute_policy): the
backward keeps only the block's input (the fp32 residual), the matmul outputs xz (in_proj) and
x_dbl (x_proj), the scan's output and chunk states, and recomputes the rest (RMSNorm, the conv
output, delta = dt_proj, the bf16 weight casts), as the paper's mamba_inner_fn does. At d_model 2048
in bf16 a layer then saves 34 KB per token instead of 54 (compiled) or 62 (eager). Same loss and
gradients (bit for bit in CPU eager); eager and under torch.compile(fullgraph=True).
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import kernels

# dense bf16 tensor-core peaks (FLOP/s), for MFU in train.py and bench.py
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# (d_model, n_layer) of the state-spaces Mamba checkpoints, plus small ones for CPU runs and tests.
PRESETS = {
    "tiny": (128, 4),
    "small": (384, 8),
    "130m": (768, 24),
    "370m": (1024, 48),
    "790m": (1536, 48),
    "1.4b": (2048, 48),
    "2.8b": (2560, 64),
}


@dataclass
class MambaConfig:
    vocab_size: int = 50257  # the tokenizer's; the embedding is padded to a multiple of pad_vocab
    d_model: int = 768
    n_layer: int = 24
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int = 0  # 0: ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    pad_vocab: int = 8
    norm_eps: float = 1e-5
    ops: str = "kernels"  # "kernels" or "ref"
    # True: each Block recomputes its cheap activations in the backward instead of saving them
    # (selective activation checkpointing, see Block); less memory, same math, a little more compute
    recompute: bool = False

    def __post_init__(self):
        if self.dt_rank == 0:
            self.dt_rank = math.ceil(self.d_model / 16)
        if self.ops not in ("kernels", "ref"):
            raise ValueError(f"MambaConfig.ops must be 'kernels' or 'ref', got {self.ops!r}")

    @property
    def d_inner(self):
        return self.expand * self.d_model

    @property
    def padded_vocab(self):
        return (self.vocab_size + self.pad_vocab - 1) // self.pad_vocab * self.pad_vocab

    @classmethod
    def from_preset(cls, name, vocab_size, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        d_model, n_layer = PRESETS[name]
        return cls(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 math for bf16/fp16
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Mamba(nn.Module):
    """The Mamba-1 mixer: in_proj -> conv1d + SiLU -> x_proj -> dt_proj -> selective scan (D skip,
    SiLU(z) gate) -> out_proj."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        D, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * D, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(D, cfg.d_conv))
        self.conv_bias = nn.Parameter(torch.empty(D))
        self.x_proj = nn.Linear(D, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, D, bias=True)  # its bias is added (and softplus applied) inside the scan
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(D, 1))  # (D, N)
        self.D = nn.Parameter(torch.ones(D))
        self.out_proj = nn.Linear(D, cfg.d_model, bias=False)
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        cfg = self.cfg
        # conv1d as nn.Conv1d(D, D, d_conv, groups=D) initialises it
        bound = 1 / math.sqrt(cfg.d_conv)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        # dt_proj: weights ~ U(+-dt_rank^-0.5); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        std = cfg.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(cfg.d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x, pos=None):
        return self.out_proj(self.mix(x, pos))  # (B, L, d_model)

    def mix(self, x, pos=None):
        """Everything but out_proj: x (B, L, d_model) -> the gated scan output y (B, L, d_inner)."""
        cfg = self.cfg
        R, N = cfg.dt_rank, cfg.d_state
        xz = self.in_proj(x)  # (B, L, 2*D)
        x, z = xz.chunk(2, dim=-1)  # (B, L, D) each, strided views
        ops = kernels if cfg.ops == "kernels" else _REF_OPS
        x = ops.causal_conv1d(x, self.conv_weight, self.conv_bias, pos, activation=True)  # (B, L, D)
        x_dbl = self.x_proj(x)  # (B, L, R + 2N)
        dt, Bm, Cm = torch.split(x_dbl, [R, N, N], dim=-1)  # (B, L, R), (B, L, N), (B, L, N)
        delta = F.linear(dt, self.dt_proj.weight)  # (B, L, D); bias and softplus happen in the scan
        A = -torch.exp(self.A_log)  # (D, N), fp32 (parameters stay fp32 under autocast)
        return ops.selective_scan(x, delta, A, Bm, Cm, self.D, z, self.dt_proj.bias, pos,
                                  delta_softplus=True)  # (B, L, D)


class _RefOps:
    causal_conv1d = staticmethod(kernels.causal_conv1d_ref)
    selective_scan = staticmethod(kernels.selective_scan_ref)


_REF_OPS = _RefOps()


# what nn.Linear reaches the dispatcher as, eager and under torch.compile (mm; addmm with a bias)
_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def recompute_policy(cfg):
    """Selective checkpointing policy for Block.mix (RMSNorm, then Mamba.mix: in_proj ... scan): save the
    outputs of the expensive ops that the backward needs, in_proj's xz, x_proj's x_dbl (both aten.mm
    under autocast, told from dt_proj's by their weight's (in, out) shape, the op's last argument) and
    the scan forward's (y, chunk states); recompute the rest from those and the block input: the norm,
    the bf16 casts, the conv output u and delta (dt_proj is a matmul with K = dt_rank, cheap).
    Under torch.compile the partitioner recomputes what is PREFER_RECOMPUTE (and needed) and saves what
    is MUST_SAVE. With ops="ref" the scan is many small ops, recomputed too: right, but slow."""
    keep = [(cfg.d_model, 2 * cfg.d_inner), (cfg.d_inner, cfg.dt_rank + 2 * cfg.d_state)]  # in_proj, x_proj

    def policy(ctx, op, *args, **kwargs):
        if op == torch.ops.packmamba.scan_fwd.default:
            return CheckpointPolicy.MUST_SAVE
        if op in _MATMULS and tuple(args[-1].shape[-2:]) in keep:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return policy


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba(cfg)
        self.recompute = cfg.recompute
        self._context_fn = functools.partial(create_selective_checkpoint_contexts, recompute_policy(cfg))

    def _mix(self, x, pos):
        return self.mixer.mix(self.norm(x), pos)

    def forward(self, x, pos=None):
        if self.recompute and torch.is_grad_enabled():
            # out_proj and the residual add stay outside the checkpoint: the compiled backward would
            # otherwise recompute the block's output (the next block's input), out_proj's matmul with it
            y = checkpoint(self._mix, x, pos, use_reentrant=False, context_fn=self._context_fn,
                           preserve_rng_state=False)  # nothing random in a block
        else:
            y = self._mix(x, pos)
        return x + self.mixer.out_proj(y)


class MambaLM(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)
        self.lm_head.weight = self.embedding.weight  # tied
        nn.init.normal_(self.embedding.weight, std=0.02)
        for layer in self.layers:
            # the residual output projection is rescaled by the depth (GPT-2 / Mamba init)
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            layer.mixer.out_proj.weight.data /= math.sqrt(cfg.n_layer)

    def forward(self, idx, targets=None, pos=None):
        """idx (B, L) int64, targets (B, L) int64 with -1 = ignore, pos (B, L) int32 or None.
        Returns (logits (B, L, padded_vocab), None) without targets; with them (None, the mean loss over
        targets != -1), the logits never formed whole (kernels.linear_cross_entropy)."""
        x = self.embedding(idx)  # (B, L, d_model)
        for layer in self.layers:
            x = layer(x, pos)
        return self.head(x, targets)

    def head(self, x, targets=None):
        """The final norm, lm_head and the loss: x (B, L, d_model) -> (logits, None) without targets,
        (None, loss) with them. A method of its own so that bench.py --compile blocks can compile it."""
        x = self.norm_f(x)
        if targets is None:
            return self.lm_head(x), None  # (B, L, V)
        x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)  # (B*L, d_model), (B*L,)
        if self.cfg.ops == "ref":
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                                   ignore_index=-1)
        else:  # the same without the (B*L, V) logits: a chunk of rows at a time, the matmuls in the autocast dtype
            dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            loss = kernels.linear_cross_entropy(x, self.lm_head.weight, targets, dt)
        return None, loss

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied embedding counts once

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight of every matmul (lm_head included) plus the scan
        (about 9 FLOPs per state element forward, twice that backward)."""
        cfg = self.cfg
        matmul = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and "A_log" not in n
                     and "conv_weight" not in n)
        scan = 27 * cfg.d_inner * cfg.d_state * cfg.n_layer
        return 6 * matmul + scan

    def optimizer_groups(self, weight_decay):
        """AdamW parameter groups: weight decay on matrices and the embedding, not on norms, biases,
        A_log and D."""
        decay, no_decay = [], []
        for p in self.parameters():
            (decay if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

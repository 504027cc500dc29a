"""Training with recomputed activations (`WanBlock.recompute_hidden`, turned on by selective AC).

Autograd keeps, per block, about 22 (tokens, width) tensors plus two (tokens, ffn) ones. These functions
give the same forward (the same operations on the same tensors) but keep only what is expensive to
recompute: norm outputs are recomputed from the norm inputs, the MLP's hidden activations from its input,
and the attention output is kept once (as the kernel keeps it) instead of twice. Gradients equal
autograd's up to float rounding. A prologue `norm = (fn, args)` is a row-wise fn(x, *args) (a modulated
LayerNorm) recomputed in backward under the forward's autocast state.

Single-device autograd functions on plain tensors only: a tensor-parallel plan hands them this rank's
shards and reduces their outputs itself (the block's `lean_tp` hooks, `parallel/plans/wan.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def row_chunks(n: int, chunk: int) -> list[slice]:
    """`n` rows cut into ceil(n / chunk) near-equal slices of at most `chunk` rows."""
    k = max(1, -(-n // chunk))
    return [slice(i * n // k, (i + 1) * n // k) for i in range(k)]


def _renorm(ctx, x: torch.Tensor, args: tuple, need: tuple) -> tuple[torch.Tensor, list]:
    """The prologue recomputed with autograd on fresh leaves: (normed, leaves of x and args)."""
    leaves = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip((x, *args), need)]
    dev, enabled, dtype = ctx.amp
    with torch.enable_grad(), torch.autocast(dev, dtype, enabled=enabled):
        y = ctx.norm(*leaves)
    return y, leaves


def _renorm_grads(y: torch.Tensor, leaves: list, gy: torch.Tensor) -> list:
    """Gradients of the prologue's inputs from the gradient of its output (None where not needed)."""
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(y, wanted, gy.view(y.shape).to(y.dtype)) if wanted else ())
    return [next(got) if t is not None and t.requires_grad else None for t in leaves]


def _amp(x: torch.Tensor) -> tuple[str, bool, torch.dtype]:
    dev = x.device.type
    return dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)


class NormedLinears(torch.autograd.Function):
    """[F.linear(fn(x, *args), w_i, b_i)] keeping x (not the normed tensor) for backward."""

    @staticmethod
    def forward(ctx, fn, n_args: int, x, *tensors):
        args, wbs = tensors[:n_args], tensors[n_args:]
        y = fn(x, *args)
        ctx.norm, ctx.n_args, ctx.amp = fn, n_args, _amp(x)
        ctx.save_for_backward(x, *tensors)
        return tuple(F.linear(y, w, b) for w, b in zip(wbs[0::2], wbs[1::2]))

    @staticmethod
    def backward(ctx, *grads):
        x, *tensors = ctx.saved_tensors
        n = ctx.n_args
        need = ctx.needs_input_grad[2:]  # x, args..., w0, b0, w1, b1, ...
        y, leaves = _renorm(ctx, x, tuple(tensors[:n]), need[: n + 1])
        y2 = y.detach().reshape(-1, y.shape[-1])  # (N, D)
        gy, wgrads = None, []
        for i, g in enumerate(grads):
            w, b = tensors[n + 2 * i], tensors[n + 2 * i + 1]
            need_w, need_b = need[n + 1 + 2 * i], need[n + 2 + 2 * i]
            g2 = g.reshape(-1, g.shape[-1])  # (N, D_i) in the matmul's compute dtype
            wgrads.append((g2.t() @ y2.to(g.dtype)).to(w.dtype) if need_w else None)
            wgrads.append(g2.sum(0).to(b.dtype) if need_b else None)
            part = (g2 @ w.to(g.dtype)).to(y2.dtype)  # (N, D), summed in the normed tensor's dtype
            gy = part if gy is None else gy.add_(part)
        return (None, None, *_renorm_grads(y, leaves, gy), *wgrads)


class HeadsLinear(torch.autograd.Function):
    """F.linear(o.transpose(1, 2).reshape(B, S, H * Dh), w, b) keeping o, which the attention kernel
    keeps anyway, instead of the (B, S, H * Dh) copy."""

    @staticmethod
    def forward(ctx, o, w, b):
        B, H, S, Dh = o.shape
        ctx.save_for_backward(o, w)
        return F.linear(o.transpose(1, 2).reshape(B, S, H * Dh), w, b)

    @staticmethod
    def backward(ctx, g):
        o, w = ctx.saved_tensors
        B, H, S, Dh = o.shape
        need_o, need_w, need_b = ctx.needs_input_grad
        g2 = g.reshape(B * S, -1)  # (N, D_out)
        dw = (g2.t() @ o.transpose(1, 2).reshape(B * S, H * Dh).to(g.dtype)).to(w.dtype) if need_w else None
        db = g2.sum(0).to(w.dtype) if need_b else None
        do = (g2 @ w.to(g.dtype)).view(B, S, H, Dh).transpose(1, 2).to(o.dtype) if need_o else None
        return do, dw, db


class RMSNormKeepInput(torch.autograd.Function):
    """F.rms_norm keeping its input only (autograd's decomposition also keeps the normalized tensor)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.rms_norm(x, x.shape[-1:], weight, eps)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        xf = x.float()
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + ctx.eps)  # (..., 1)
        xh = xf * r  # normalized input
        gf = g.float()
        dw = (gf * xh).flatten(0, -2).sum(0).to(w.dtype) if ctx.needs_input_grad[1] else None
        gxh = gf * w.float()
        dx = gxh.addcmul_(xh, (gxh * xh).mean(-1, keepdim=True), value=-1).mul_(r)
        return dx.to(x.dtype), dw, None


class RecomputedMLP(torch.autograd.Function):
    """fc2(gelu_tanh(fc1(fn(x, *args)))) keeping only x for backward.

    Autograd would keep fc1's output and the GELU output, two (tokens, ffn) tensors: at ffn = 5.8 x
    width they are most of a block's activations. Here the forward and the backward run in row chunks
    of `chunk` tokens, so no (tokens, ffn) tensor ever exists (the backward recomputes fc1 and the
    GELU chunk by chunk; cost: fc1 once more). Weight gradients are summed over the chunks.
    """

    @staticmethod
    def forward(ctx, fn, n_args: int, chunk: int, x, *tensors):
        args, (w1, b1, w2, b2) = tensors[:n_args], tensors[n_args:]
        y = fn(x, *args)
        yf = y.reshape(-1, y.shape[-1])  # (N, D)
        outs = []
        for rows in row_chunks(yf.shape[0], chunk):
            h = F.linear(yf[rows], w1, b1)  # (n, ffn)
            torch.ops.aten.gelu_(h, approximate="tanh")
            outs.append(F.linear(h, w2, b2))  # (n, D_out)
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        ctx.norm, ctx.n_args, ctx.chunk, ctx.amp, ctx.dtype = fn, n_args, chunk, _amp(x), h.dtype
        ctx.save_for_backward(x, *tensors)
        return out.view(*y.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, *tensors = ctx.saved_tensors
        n = ctx.n_args
        w1, b1, w2, _ = tensors[n:]
        need = ctx.needs_input_grad[3:]  # x, args..., w1, b1, w2, b2
        need_w1, need_b1, need_w2, need_b2 = need[n + 1 :]
        y, leaves = _renorm(ctx, x, tuple(tensors[:n]), need[: n + 1])
        cd = ctx.dtype  # the forward's matmul dtype (autocast's, or the weights')
        W1, B1, W2 = w1.to(cd), b1.to(cd), w2.to(cd)  # no copies without autocast
        yf, gf = y.detach().reshape(-1, y.shape[-1]), grad.reshape(-1, grad.shape[-1])  # (N, D), (N, D_out)
        dy = torch.empty(yf.shape, dtype=cd, device=yf.device)
        dw1, db1, dw2 = (torch.zeros_like(p) for p in (w1, b1, w2))
        db2 = torch.zeros(gf.shape[-1], dtype=w2.dtype, device=w2.device)

        def acc(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:  # total += a @ b
            if a.dtype == total.dtype:
                total.addmm_(a, b)
            else:
                total.add_(a @ b)

        for rows in row_chunks(yf.shape[0], ctx.chunk):
            yc, gc = yf[rows].to(cd), gf[rows].to(cd)  # (n, D), (n, D_out)
            h = F.linear(yc, W1, B1)  # (n, ffn), recomputed
            if need_w2:
                acc(dw2, gc.t(), F.gelu(h, approximate="tanh"))
            if need_b2:
                db2 += gc.sum(0)
            dh = torch.ops.aten.gelu_backward(gc @ W2, h, approximate="tanh")  # (n, ffn)
            del h
            if need_w1:
                acc(dw1, dh.t(), yc)
            if need_b1:
                db1 += dh.sum(0)
            torch.mm(dh, W1, out=dy[rows])
        grads = (dw1 if need_w1 else None, db1 if need_b1 else None, dw2 if need_w2 else None)
        return (None, None, None, *_renorm_grads(y, leaves, dy), *grads, db2 if need_b2 else None)

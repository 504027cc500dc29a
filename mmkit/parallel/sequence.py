"""Context-parallel attention over torch.distributed process groups: Ulysses, ring and hybrid (USP).

Each cp rank holds one contiguous shard of the sequence; `ContextParallel.attention` returns that
rank's shard of the output of full attention over the whole (gathered) sequence, exact to float
round-off, with autograd:

- Ulysses: one all-to-all turns sequence shards into head shards (every rank sees the whole
  sequence for H/u heads), attention runs locally, a second all-to-all turns the result back.
- Ring: q stays put, k/v blocks travel around the ring; block outputs merge through their
  log-sum-exp. Backward sends k/v around again and the dk/dv accumulators back to their owner.
  `ring_window` w splits the ring into R/w inner rings of w consecutive ranks (the double ring:
  inner hops intra-node, outer hops across), with the same result and the same volume.
- Hybrid: Ulysses inside each Ulysses group, then ring attention across the ring group.

Ring merge (`merge`): "online" merges each block's output through its log-sum-exp as it arrives
(compute overlaps the transfers, each rank holds two k/v blocks). Its numbers differ from one
kernel call over all keys by float rounding (~2e-7 max abs per fp32 attention), which a sampler and
a VAE then amplify. "gather" (padding masks only, no causal or segment mask; meant for inference)
sends the same blocks around the same ring, keeps them, and attends once over all keys in global
order with the kernel one process uses: the numbers of one process, bit for bit (measured on CPU fp32
with head dim >= 32 and >= 4 real query rows per rank; 1-3 query rows take other GEMM kernels that
round differently), at the cost of holding the whole sequence's k/v (for this rank's heads) and no
overlap.

Masks are described, not materialized: padding at the end (`valid_len`), a global causal mask,
packed samples (`segment_ids`) and per-sample key padding anywhere in the sequence (`key_mask`, e.g. the
padded latents of variable-size clips batched together). Blocks a mask hides entirely are skipped; a dense mask is built
only for blocks that need one (segment ids, or a causal block not on the diagonal).

Only torch.distributed calls are used (all_to_all_single, batched isend/irecv): tested on gloo/CPU,
written to run unchanged on nccl/CUDA (where the block kernel is the math fallback). Not here: the zigzag layout that balances causal work across the ring (shards are
contiguous, so with causal=True the last ring rank does the most work).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

__all__ = ["ContextParallel"]

KERNELS = ("auto", "fused", "math")
MERGES = ("online", "gather")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# P2P tags keep concurrent messages between the same pair of ranks apart on gloo.
_TAG_KV_INNER, _TAG_KV_OUTER, _TAG_ACC_INNER, _TAG_ACC_OUTER, _TAG_ACC_FINAL = 11, 12, 13, 14, 15


class ContextParallel:
    """Attention over a sequence sharded across `ulysses_group` x `ring_group` processes.

    cp degree = ulysses_size * ring_size; global cp rank = ring_rank * ulysses_size + ulysses_rank
    (Ulysses groups are the inner, contiguous mesh dimension). Pass None for a group that is not
    used: ulysses-only has ring_group None, ring-only has ulysses_group None. `ring_window` w (must
    divide the ring size) selects the double ring; None is a single ring. `kernel` picks the block
    kernel: "fused" (torch's CPU flash op), "math" (explicit softmax, any device) or "auto"
    (fused on CPU for fp32/bf16/fp16, math elsewhere). `merge`: "online" or "gather" (module docstring).

    `bytes_sent` counts the bytes this rank sent to other ranks (all-to-all chunks that leave the
    rank, send/recv payloads), forward and backward, for benchmarks.

    Example:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp_ring", "cp_ulysses"))
        cp = ContextParallel(mesh.get_group("cp_ulysses"), mesh.get_group("cp_ring"))
        out = cp.attention(q, k, v, causal=True)  # q (B, Hq, S/4, D) -> out (B, Hq, S/4, D)
    """

    def __init__(
        self,
        ulysses_group: ProcessGroup | None,
        ring_group: ProcessGroup | None,
        ring_window: int | None = None,
        *,
        kernel: str = "auto",
        merge: str = "online",
    ):
        if kernel not in KERNELS:
            raise ValueError(f"ContextParallel kernel={kernel!r}: choose one of {', '.join(KERNELS)}")
        if merge not in MERGES:
            raise ValueError(f"ContextParallel merge={merge!r}: choose one of {', '.join(MERGES)}")
        self.merge = merge
        self.ulysses_group = ulysses_group
        self.ring_group = ring_group
        self.kernel = kernel
        self.ulysses_size = dist.get_world_size(ulysses_group) if ulysses_group is not None else 1
        self.ulysses_rank = dist.get_rank(ulysses_group) if ulysses_group is not None else 0
        self.ring_size = dist.get_world_size(ring_group) if ring_group is not None else 1
        self.ring_rank = dist.get_rank(ring_group) if ring_group is not None else 0
        w = self.ring_size if ring_window is None else ring_window
        if w < 1 or self.ring_size % w:
            raise ValueError(
                f"parallel.ring_window={ring_window}: must divide the ring size {self.ring_size}; "
                f"use a divisor of {self.ring_size} or leave it unset for a single ring"
            )
        self.ring_window = w
        self.size = self.ulysses_size * self.ring_size
        self.rank = self.ring_rank * self.ulysses_size + self.ulysses_rank
        self.bytes_sent = 0

    def check_heads(self, num_heads: int, num_kv_heads: int) -> None:
        """Raise a clear ValueError when the heads cannot be split over the Ulysses degree.

        Example: `cp.check_heads(12, 4)` passes for a Ulysses degree of 1, 2 or 4 and raises for 3.
        """
        u = self.ulysses_size
        if num_heads % num_kv_heads:
            raise ValueError(
                f"attention heads={num_heads} are not a multiple of kv heads={num_kv_heads}; "
                "grouped-query attention needs num_heads % num_kv_heads == 0"
            )
        if num_heads % u == 0 and num_kv_heads % u == 0:
            return
        field = "parallel.cp" if self.ring_group is None else "parallel.ulysses_degree"
        good = [d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0]
        raise ValueError(
            f"{field}: the Ulysses degree {u} must divide the attention heads ({num_heads}) and the "
            f"kv heads ({num_kv_heads}); use a Ulysses degree in {good}, or put the rest of the "
            "context parallelism on the ring (parallel.cp_algo=ring or hybrid with a smaller "
            "parallel.ulysses_degree)"
        )

    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        valid_len: int | None = None,
        causal: bool = False,
        segment_ids: Tensor | None = None,
        key_mask: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        """This rank's shard of attention over the whole sequence (differentiable).

        q (B, Hq, S_loc, D) and k/v (B, Hkv, S_loc, D) hold global tokens [r*S_loc, (r+1)*S_loc)
        of a sequence of S_pad = size * S_loc tokens, r = `self.rank`; Hkv divides Hq (GQA).
        Keys at index >= `valid_len` are never attended, and rows of padded queries come out zero
        (with zero gradient). `causal` applies the global causal mask; `segment_ids` (S_pad,) int,
        identical on all ranks, restricts attention to keys of the same packed sample (padding may
        use -1). `key_mask` (B, S) bool, S <= S_pad, identical on all ranks: False keys are never attended
        by that sample's queries (keys past S count as False). `scale` defaults to 1/sqrt(D).

        Example: `out = cp.attention(q, k, v, valid_len=13, causal=True)`  # (B, Hq, S_loc, D)
        """
        B, Hq, L, D = q.shape
        if k.shape != v.shape or k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (B, L, D):
            raise ValueError(
                f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                "(B, H, S_loc, D) with equal B, S_loc and D (and k, v of one shape)"
            )
        if len({(t.dtype, t.device) for t in (q, k, v)}) != 1:
            raise ValueError(
                f"attention: q, k, v must share dtype and device, got {[(t.dtype, str(t.device)) for t in (q, k, v)]}"
            )
        self.check_heads(Hq, k.shape[1])
        s_pad = self.size * L
        valid = s_pad if valid_len is None else int(valid_len)
        if not 1 <= valid <= s_pad:
            raise ValueError(f"attention: valid_len={valid_len} must lie in [1, {s_pad}] (cp size x S_loc)")
        if segment_ids is not None:
            if tuple(segment_ids.shape) != (s_pad,):
                raise ValueError(
                    f"attention: segment_ids shape {tuple(segment_ids.shape)} must be ({s_pad},), "
                    "the padded global sequence length (identical on every cp rank)"
                )
            segment_ids = segment_ids.to(q.device)
        if key_mask is not None:
            if key_mask.dim() != 2 or key_mask.shape[0] != B or key_mask.shape[1] > s_pad:
                raise ValueError(
                    f"attention: key_mask shape {tuple(key_mask.shape)} must be (B={B}, S <= {s_pad}), "
                    "the keys of the global sequence (identical on every cp rank)"
                )
            key_mask = torch.nn.functional.pad(
                key_mask.to(q.device, torch.bool), (0, s_pad - key_mask.shape[1])
            )
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

        u = self.ulysses_size
        if u > 1:  # (B, H, S_loc, D) -> (B, H/u, u*S_loc, D): this ring position's chunk, H/u heads
            q, k, v = _SeqToHeads.apply(self, q, k, v)
        ring = _Ring(
            self,
            chunk=u * L,
            valid_len=valid,
            causal=causal,
            segment_ids=segment_ids,
            key_mask=key_mask,
            scale=scale,
            device=q.device,
        )
        out = _RingAttention.apply(q, k, v, ring)  # (B, Hq/u, u*S_loc, D)
        if u > 1:
            (out,) = _HeadsToSeq.apply(self, out)  # (B, Hq, S_loc, D)
        return out


# ---------------------------------------------------------------- Ulysses all-to-all


def _all_to_all(cp: ContextParallel, send: Tensor) -> Tensor:
    """all_to_all_single over the Ulysses group; send (u, ...) chunk j goes to group rank j."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=cp.ulysses_group)
    cp.bytes_sent += send.numel() // send.shape[0] * (send.shape[0] - 1) * send.element_size()
    return recv


def _seq_to_heads(cp: ContextParallel, xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """(B, H_i, L, D) sequence shards -> (B, H_i/u, u*L, D) head shards, one all-to-all for all."""
    u = cp.ulysses_size
    B, _, L, D = xs[0].shape
    heads = [x.shape[1] // u for x in xs]
    # (u, B, sum H_i/u, L, D): chunk j holds head group j of every tensor
    send = torch.cat([x.reshape(B, u, h, L, D) for x, h in zip(xs, heads)], dim=2).transpose(0, 1)
    recv = _all_to_all(cp, send.contiguous())  # chunk j = sequence shard j of my head group
    return tuple(
        y.permute(1, 2, 0, 3, 4).reshape(B, h, u * L, D) for y, h in zip(recv.split(heads, 2), heads)
    )


def _heads_to_seq(cp: ContextParallel, ys: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """(B, h_i, u*L, D) head shards -> (B, u*h_i, L, D) sequence shards; inverse of _seq_to_heads."""
    u = cp.ulysses_size
    B, _, uL, D = ys[0].shape
    L = uL // u
    heads = [y.shape[1] for y in ys]
    # (u, B, sum h_i, L, D): chunk j holds sequence shard j of my heads
    send = torch.cat([y.reshape(B, h, u, L, D).permute(2, 0, 1, 3, 4) for y, h in zip(ys, heads)], dim=2)
    recv = _all_to_all(cp, send.contiguous())  # chunk j = head group j of my sequence shard
    return tuple(x.transpose(0, 1).reshape(B, u * h, L, D) for x, h in zip(recv.split(heads, 2), heads))


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cp, *xs):
        ctx.cp = cp
        return _seq_to_heads(cp, xs)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_heads_to_seq(ctx.cp, grads))


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cp, *ys):
        ctx.cp = cp
        return _heads_to_seq(cp, ys)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_seq_to_heads(ctx.cp, grads))


# ---------------------------------------------------------------- block masks and kernels


class _Block:
    """What one (query chunk, key chunk) pair computes: the first nq query rows (the rest are
    padding) against the first nk keys, with top-left causal and/or a dense bool mask (nq, nk), and
    per sample a key mask `kmask` (B, nk) (None: every key)."""

    __slots__ = ("nq", "nk", "causal", "mask", "kmask")

    def __init__(self, nq: int, nk: int, causal: bool, mask: Tensor | None, kmask: Tensor | None = None):
        self.nq, self.nk, self.causal, self.mask, self.kmask = nq, nk, causal, mask, kmask

    def full_mask(self, device) -> tuple[Tensor | None, bool]:
        """(bool mask broadcastable to (B, H, nq, nk) or None, causal flag left to the kernel)."""
        if self.kmask is None:
            return self.mask, self.causal
        m = self.kmask[:, None, None, :]  # (B, 1, 1, nk)
        if self.causal:
            m = m & torch.ones(self.nq, self.nk, dtype=torch.bool, device=device).tril()
        if self.mask is not None:
            m = m & self.mask
        return m, False


def _plan_block(
    q0: int, k0: int, n: int, valid: int, causal: bool, seg: Tensor | None, device: torch.device
) -> _Block | None:
    """Mask of queries [q0, q0+n) vs keys [k0, k0+n) (global indices); None when fully masked."""
    nq, nk = min(max(valid - q0, 0), n), min(max(valid - k0, 0), n)  # padding is a suffix: slice it off
    if nq == 0 or nk == 0 or (causal and k0 > q0 + nq - 1):
        return None
    top_left = causal and k0 == q0  # the diagonal block: key j <= query i in local indices
    dense = causal and not top_left and k0 + nk - 1 > q0  # a causal edge crosses the block
    if seg is None and not dense:
        return _Block(nq, nk, top_left, None)
    mask = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if causal and (top_left or dense):
        qi = torch.arange(q0, q0 + nq, device=device)[:, None]
        mask &= torch.arange(k0, k0 + nk, device=device)[None, :] <= qi
    if seg is not None:
        mask &= seg[q0 : q0 + nq, None] == seg[None, k0 : k0 + nk]
    if not mask.any():
        return None
    return _Block(nq, nk, False, None if mask.all() else mask)


def _use_fused(kernel: str, q: Tensor) -> bool:
    if kernel == "fused":
        return True
    return kernel == "auto" and q.device.type == "cpu" and q.dtype in _FUSED_DTYPES


def _additive(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """Bool mask (True = attend) -> additive mask of `like`'s dtype (the fused op wants that)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill_(~mask, float("-inf"))


def _math_scores(q: Tensor, k: Tensor, blk: _Block, scale: float) -> Tensor:
    """fp32 scores (B, Hkv, g, nq, nk) with masked entries at -inf; q (B, Hq, nq, D), k (B, Hkv, nk, D)."""
    B, Hq, nq, D = q.shape
    Hkv = k.shape[1]
    s = torch.einsum("bhgqd,bhkd->bhgqk", q.float().reshape(B, Hkv, Hq // Hkv, nq, D), k.float()) * scale
    mask, causal = blk.full_mask(q.device)
    if causal:
        mask = torch.ones(nq, blk.nk, dtype=torch.bool, device=q.device).tril()
    if mask is not None and mask.dim() == 4:  # (B, 1, nq | 1, nk) -> (B, 1, 1, nq | 1, nk)
        mask = mask[:, :, None]
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def block_forward(q: Tensor, k: Tensor, v: Tensor, blk: _Block, scale: float, fused: bool):
    """Attention of q (B, Hq, nq, D) over k/v (B, Hkv, nk, D) -> (out (B, Hq, nq, D), lse (B, Hq, nq)
    fp32). Rows with no key to attend get out 0 and lse -inf.

    Example: `out, lse = block_forward(q, k, v, _Block(8, 8, True, None), 0.125, fused=False)`
    """
    if fused:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        mask, causal = blk.full_mask(q.device)
        out, lse = op(q, k, v, 0.0, causal, attn_mask=_additive(mask, q), scale=scale)
        lse = lse.float()
        if mask is not None:  # the op reports lse 0 for a fully masked row; make it -inf
            lse = lse.masked_fill(~mask.any(-1), float("-inf"))
        return out, lse
    B, Hq, nq, D = q.shape
    s = _math_scores(q, k, blk, scale)  # (B, Hkv, g, nq, nk)
    lse = torch.logsumexp(s, dim=-1)  # -inf on fully masked rows
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # those rows: exp(-inf) = 0
    out = torch.einsum("bhgqk,bhkd->bhgqd", p, v.float())
    return out.reshape(B, Hq, nq, D), lse.reshape(B, Hq, nq)


def block_backward(dout, q, k, v, out, lse, blk: _Block, scale: float, fused: bool):
    """Gradients of one block given the GLOBAL out (B, Hq, nq, D) and finite lse (B, Hq, nq):
    returns dq (B, Hq, nq, D), dk, dv (B, Hkv, nk, D).

    Example: `dq, dk, dv = block_backward(do, q, k, v, out, lse, blk, 0.125, fused=True)`
    """
    if fused:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        mask, causal = blk.full_mask(q.device)
        return op(dout, q, k, v, out, lse, 0.0, causal, attn_mask=_additive(mask, q), scale=scale)
    B, Hq, nq, D = q.shape
    Hkv = k.shape[1]
    g5 = (B, Hkv, Hq // Hkv, nq, D)
    p = torch.exp(_math_scores(q, k, blk, scale) - lse.reshape(g5[:-1])[..., None])  # (B, Hkv, g, nq, nk)
    do, o = dout.float().reshape(g5), out.float().reshape(g5)
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, do)
    dp = torch.einsum("bhgqd,bhkd->bhgqk", do, v.float())
    ds = p * (dp - (do * o).sum(-1, keepdim=True))  # softmax backward, row term D_i = dout_i . out_i
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, k.float()).reshape(B, Hq, nq, D) * scale
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, q.float().reshape(g5)) * scale
    return dq, dk, dv


# ---------------------------------------------------------------- ring


class _Ring:
    """One ring-attention call: peers, masks and the step schedule shared by forward and backward.

    Ring rank r = i*w + p: inner ring i (w consecutive ranks), position p. At outer step o, inner
    step t the rank holds the k/v block of ring rank ((i-o) % n)*w + (p-t) % w, n = R/w. The block
    it holds at the start of an outer step is forwarded to the next inner ring (outer hop) while
    the inner ring rotates; w = R is the single ring (no outer hops).
    """

    def __init__(
        self,
        cp: ContextParallel,
        chunk: int,
        valid_len: int,
        causal: bool,
        segment_ids,
        scale,
        device,
        key_mask: Tensor | None = None,
    ):
        self.cp, self.chunk, self.valid, self.causal, self.seg = cp, chunk, valid_len, causal, segment_ids
        self.key_mask = key_mask  # (B, S_pad) bool or None
        self.scale, self.device = scale, device
        R, w, r = cp.ring_size, cp.ring_window, cp.ring_rank
        self.R, self.w, self.n = R, w, R // w
        self.i, self.p = divmod(r, w)

    def rank_at(self, i: int, p: int) -> int:
        return (i % self.n) * self.w + p % self.w

    def owner(self, o: int, t: int) -> int:
        return self.rank_at(self.i - o, self.p - t)

    def block(self, owner: int) -> _Block | None:
        c = self.chunk
        blk = _plan_block(self.cp.ring_rank * c, owner * c, c, self.valid, self.causal, self.seg, self.device)
        if blk is not None and self.key_mask is not None:
            km = self.key_mask[:, owner * c : owner * c + blk.nk]  # (B, nk)
            if not km.any():
                return None
            if not km.all():
                blk.kmask = km
        return blk

    def post(self, sends: list[tuple[Tensor, int, int]], recvs: list[tuple[Tensor, int, int]]):
        """Start sends/recvs of (tensor, ring rank, tag); returns the works to wait on."""
        ops = [
            dist.P2POp(dist.isend, t, group=self.cp.ring_group, group_peer=peer, tag=tag)
            for t, peer, tag in sends
        ]
        ops += [
            dist.P2POp(dist.irecv, t, group=self.cp.ring_group, group_peer=peer, tag=tag)
            for t, peer, tag in recvs
        ]
        self.cp.bytes_sent += sum(t.numel() * t.element_size() for t, _, _ in sends)
        return dist.batch_isend_irecv(ops) if ops else []

    def rotate(self, buf: Tensor, outer: bool):
        """Send `buf` one hop (inner or outer ring) and receive the next one; returns (recv, works)."""
        nxt = torch.empty_like(buf)
        if outer:
            peers, tag = (self.rank_at(self.i + 1, self.p), self.rank_at(self.i - 1, self.p)), _TAG_KV_OUTER
        else:
            peers, tag = (self.rank_at(self.i, self.p + 1), self.rank_at(self.i, self.p - 1)), _TAG_KV_INNER
        return nxt, self.post([(buf, peers[0], tag)], [(nxt, peers[1], tag)])

    def forward(self, q: Tensor, k: Tensor, v: Tensor):
        """q (B, Hq, C, D), k/v (B, Hkv, C, D) -> out (B, Hq, C, D) in q's dtype, lse (B, Hq, C) fp32."""
        fused = _use_fused(self.cp.kernel, q)
        q = q.contiguous()  # sliced per block below: slicing a contiguous prefix copies nothing
        B, Hq, C, D = q.shape
        out = torch.zeros(B, Hq, C, D, dtype=torch.float32, device=q.device)
        lse = torch.full((B, Hq, C), float("-inf"), device=q.device)
        outer_kv = torch.stack([k, v])  # (2, B, Hkv, C, D): one message per hop
        gather = self.cp.merge == "gather"
        if gather and (self.causal or self.seg is not None or self.key_mask is not None):
            raise ValueError(
                "ContextParallel merge='gather' supports end padding only (no causal / segment_ids / key_mask); "
                "use merge='online'"
            )
        kept: dict[int, Tensor] = {}  # gather: ring rank -> its k/v block
        for o in range(self.n):
            outer_works = []
            if o < self.n - 1:
                next_outer, outer_works = self.rotate(outer_kv, outer=True)
            kv = outer_kv
            for t in range(self.w):
                works = []
                if t < self.w - 1:
                    next_kv, works = self.rotate(kv, outer=False)
                if gather:
                    kept[self.owner(o, t)] = kv
                    blk = None
                else:
                    blk = self.block(self.owner(o, t))
                if blk is not None:
                    qb = q[:, :, : blk.nq].contiguous()  # (B, Hq, nq, D)
                    kb, vb = kv[0, :, :, : blk.nk].contiguous(), kv[1, :, :, : blk.nk].contiguous()
                    ob, lb = block_forward(qb, kb, vb, blk, self.scale, fused)
                    _merge(out[:, :, : blk.nq], lse[:, :, : blk.nq], ob, lb)
                for work in works:
                    work.wait()
                if works:
                    kv = next_kv
            for work in outer_works:
                work.wait()
            if outer_works:
                outer_kv = next_outer
        if gather:
            self._attend_gathered(q, kept, out, lse, fused)
        return out.to(q.dtype), lse

    def _attend_gathered(self, q: Tensor, kept: dict[int, Tensor], out: Tensor, lse: Tensor, fused: bool):
        """merge="gather": this rank's real queries against every real key, in global order, in one
        kernel call (as one process attends); writes `out` / `lse` in place."""
        kv = torch.cat([kept[r] for r in range(self.R)], dim=3)[:, :, :, : self.valid]  # (2, B, Hkv, S, D)
        nq = min(max(self.valid - self.cp.ring_rank * self.chunk, 0), self.chunk)  # padding rows stay 0
        if nq:
            blk = _Block(nq, self.valid, False, None)
            ob, lb = block_forward(
                q[:, :, :nq].contiguous(), kv[0].contiguous(), kv[1].contiguous(), blk, self.scale, fused
            )
            out[:, :, :nq] = ob.float()
            lse[:, :, :nq] = lb

    def backward(self, dout, q, k, v, out, lse):
        """Gradients (dq, dk, dv) for this rank's q, k, v. The dk/dv accumulator of a block travels
        with it: inner hops, at the end of an inner sweep an outer hop, and finally one hop home."""
        fused = _use_fused(self.cp.kernel, q)
        lse = torch.where(torch.isinf(lse), 0.0, lse)  # rows masked everywhere: p = exp(-inf - 0) = 0
        q, dout = q.contiguous(), dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        outer_kv = torch.stack([k, v])  # (2, B, Hkv, C, D)
        acc_in = acc_outer = None  # (accumulator, works) received for the next block / the next sweep
        for o in range(self.n):
            outer_works = []
            if o < self.n - 1:
                next_outer, outer_works = self.rotate(outer_kv, outer=True)
            kv = outer_kv
            for t in range(self.w):
                works = []
                if t < self.w - 1:
                    next_kv, works = self.rotate(kv, outer=False)
                acc = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # (2, B, Hkv, C, D)
                blk = self.block(self.owner(o, t))
                if blk is not None:
                    nq, nk = blk.nq, blk.nk
                    kb, vb = kv[0, :, :, :nk].contiguous(), kv[1, :, :, :nk].contiguous()
                    qb, dob = q[:, :, :nq].contiguous(), dout[:, :, :nq].contiguous()
                    ob, lb = out[:, :, :nq].contiguous(), lse[:, :, :nq].contiguous()
                    dqb, dkb, dvb = block_backward(dob, qb, kb, vb, ob, lb, blk, self.scale, fused)
                    dq[:, :, :nq] += dqb
                    acc[0, :, :, :nk] += dkb
                    acc[1, :, :, :nk] += dvb
                if t > 0:  # contributions of the earlier ranks of this inner sweep
                    acc += _wait(acc_in)
                if t == self.w - 1 and o > 0:  # contributions of the earlier inner rings
                    acc += _wait(acc_outer)
                if self.R > 1:
                    dst, src, tag = self._acc_route(o, t)
                    got = torch.empty_like(acc)
                    works_acc = self.post([(acc, dst, tag)], [(got, src, tag)])
                    if tag == _TAG_ACC_INNER:
                        acc_in = (got, works_acc)
                    else:
                        acc_outer = (got, works_acc)
                else:
                    acc_outer = (acc, [])
                for work in works:
                    work.wait()
                if works:
                    kv = next_kv
            for work in outer_works:
                work.wait()
            if outer_works:
                outer_kv = next_outer
        dkv = _wait(acc_outer)  # the last message is this rank's own block, complete
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)

    def _acc_route(self, o: int, t: int) -> tuple[int, int, int]:
        """(send to, receive from, tag) of the dk/dv accumulator after inner step t of outer step o."""
        i, p = self.i, self.p
        if t < self.w - 1:  # follow the block around the inner ring
            return self.rank_at(i, p + 1), self.rank_at(i, p - 1), _TAG_ACC_INNER
        if o < self.n - 1:  # sweep done: hand it to the next inner ring's last holder of the block
            return self.rank_at(i + 1, p), self.rank_at(i - 1, p), _TAG_ACC_OUTER
        # last step: the block belongs to ring rank (i+1, p+1); mine is held by (i-1, p-1)
        return self.rank_at(i + 1, p + 1), self.rank_at(i - 1, p - 1), _TAG_ACC_FINAL


def _wait(pending: tuple[Tensor, list]) -> Tensor:
    """Wait once for a batch (its sends and the recv into `tensor`; a second wait on gloo hangs)."""
    tensor, works = pending
    for work in works:
        work.wait()
    return tensor


def _merge(out: Tensor, lse: Tensor, ob: Tensor, lb: Tensor) -> None:
    """In place: (out, lse) <- softmax-weighted union of two partial attentions over disjoint keys.
    out (B, H, n, D) fp32 view, lse (B, H, n); -inf lse (no keys yet / none in the block) is safe."""
    new = torch.logaddexp(lse, lb)
    safe = torch.where(torch.isinf(new), 0.0, new)  # both -inf: weights exp(-inf) = 0, no NaN
    out.mul_(torch.exp(lse - safe)[..., None]).add_(ob.float() * torch.exp(lb - safe)[..., None])
    lse.copy_(new)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring):
        out, lse = ring.forward(q, k, v)
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        dq, dk, dv = ctx.ring.backward(dout, *ctx.saved_tensors)
        return dq, dk, dv, None

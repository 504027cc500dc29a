"""Worker of tests/distributed/test_pp.py, run by `torch.distributed.run --nproc_per_node 2`.

`python -m torch.distributed.run --nproc_per_node 2 _pp_worker.py wan|qwen`: every rank builds the same
tiny model (fixed seed, weights perturbed off their init) and the same random micro-batches; the
reference is the whole model on one process (every micro-batch, summed loss, backward). The pipelined
run must give the same summed loss and count on every rank, the same gradient for every parameter its
stages own (and none for the others) and the same global gradient norm. Rank 0 prints one
"PASS <case> ..." line per case with the measured errors; any mismatch raises (non-zero exit).
"""

from __future__ import annotations

import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
from mmkit.models.qwen2_5_vl.tiny import perturbed_init, tiny_config
from mmkit.models.qwen2_5_vl.tokenizer import build_tiny_tokenizer
from mmkit.models.wan.config import WanConfig
from mmkit.models.wan.model import WanTransformer
from mmkit.models.wan.tiny import TINY_DIT
from mmkit.parallel.pp import Pipeline, split_stages

LOSS_RTOL, GRAD_TOL = 1e-5, 1e-5
PATCH_DIM = 3 * 2 * 14 * 14


# ---- reference and comparison ----------------------------------------------------------------------
def reference(model, family: str, mbs: list[dict]) -> tuple[float, int, dict]:
    """Summed loss, count and grads (by every parameter name, tied ones under both) of the whole model;
    grads are ADDED to what .grad already holds (callers zero them)."""
    total, count = 0.0, 0
    for mb in mbs:
        if family == "wan":
            pred = model(mb["latents"], mb["timestep"], mb["text_context"], mb.get("image_context"))
            loss = (pred.float() - mb["target"]).pow(2).sum()
            count += mb["target"].numel()
        else:
            media = {k: mb[k] for k in ("pixel_values", "image_grid_thw") if k in mb}
            hidden = model(
                mb["input_ids"],
                position_ids=mb["position_ids"],
                cu_seqlens=mb["cu_seqlens"],
                return_hidden=True,
                **media,
            )
            targets = mb["labels"][:, 1:]
            keep = targets != -100
            logits = model.language.lm_head(hidden[:, :-1][keep])
            loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
            count += int(keep.sum())
        loss.backward()
        total += float(loss.detach().double())
    grads = {
        n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None
    }
    return total, count, grads


def grad_norm(grads: dict, model) -> float:
    names = {n for n, _ in model.named_parameters()}  # each parameter once
    return float(sum(g.double().pow(2).sum() for n, g in grads.items() if n in names) ** 0.5)


def check(case: str, model, pipe: Pipeline, got: tuple, ref: tuple, ref_norm: float) -> str:
    """Compare one pipelined step with the reference on this rank; returns the measured errors."""
    loss, count = got
    ref_loss, ref_count, ref_grads = ref
    assert loss.dtype == torch.float64 and loss.ndim == 0, (case, loss)
    loss_err = abs(float(loss) - ref_loss) / abs(ref_loss)
    assert loss_err <= LOSS_RTOL, f"{case}: loss {float(loss)} vs reference {ref_loss}"
    assert count == ref_count, f"{case}: count {count} vs reference {ref_count}"
    owned, max_abs = set(), 0.0
    for st in pipe.stages:
        for name, p in st.named_parameters(remove_duplicate=False):
            owned.add(id(p))
            want = ref_grads.get(name, torch.zeros_like(p))
            have = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(
                have, want, atol=GRAD_TOL, rtol=GRAD_TOL, msg=f"{case}: grad of {name}"
            )
            max_abs = max(max_abs, float((have - want).abs().max()))
    assert owned, case
    stray = [n for n, p in model.named_parameters() if id(p) not in owned and p.grad is not None]
    assert not stray, f"{case}: this rank computed grads of parameters it does not own: {stray[:3]}"
    norm = float(pipe.grad_norm())
    norm_err = abs(norm - ref_norm) / ref_norm
    assert norm_err <= GRAD_TOL, f"{case}: grad norm {norm} vs reference {ref_norm}"
    return f"loss rel err {loss_err:.1e}, max grad abs err {max_abs:.1e}, grad-norm rel err {norm_err:.1e}"


def expect_error(case: str, pipe: Pipeline, mbs: list[dict], match: str) -> str:
    """A bad step raises the same ValueError on every rank before any compute (no rank is left waiting)."""
    try:
        pipe.step(mbs)
    except ValueError as e:
        assert match in str(e), (case, str(e))
        return f"raises {match!r}"
    raise AssertionError(f"{case}: no error for a bad step ({match})")


def report(case: str, msgs: list[str]) -> None:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, msgs)
    if dist.get_rank() == 0:
        for r, m in enumerate(out):
            print(f"PASS {case} rank {r}: " + " | ".join(m), flush=True)


# ---- Wan ---------------------------------------------------------------------------------------------
def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init (constant ones by N(0, 0.1), random ones by 25% of their std)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            spread = float(p.std()) if p.numel() > 1 else 0.0
            p.add_((0.1 if spread < 1e-8 else 0.25 * spread) * noise)


def wan_model(num_layers: int, i2v: bool = False) -> WanTransformer:
    torch.manual_seed(0)
    kw = dict(TINY_DIT, num_layers=num_layers, patch_size=tuple(TINY_DIT["patch_size"]))
    if i2v:
        kw.update(in_channels=36, image_dim=32, added_kv_proj_dim=64)
    model = WanTransformer(WanConfig(**kw))
    perturb(model, 1)
    return model


def wan_batches(model, n: int, B: int, thw: tuple[int, int, int], seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    mbs = []
    for _ in range(n):
        mb = {
            "latents": torch.randn(B, cfg.in_channels, *thw, generator=gen),
            "timestep": torch.rand(B, generator=gen) * 1000,
            "text_context": torch.randn(B, 12, cfg.text_dim, generator=gen),
            "target": torch.randn(B, cfg.out_channels, *thw, generator=gen),
        }
        if cfg.image_dim is not None:
            mb["image_context"] = torch.randn(B, 257, cfg.image_dim, generator=gen)
        mbs.append(mb)
    return mbs


def run_wan_case(case, schedule, num_layers, pp_layers, steps, i2v=False):
    """`steps`: list of (B, (T, H, W), seed); grads are zeroed between steps."""
    model = wan_model(num_layers, i2v)
    rank = dist.get_rank()
    stages = split_stages(model, "wan", 2, rank, pp_layers)
    pipe = Pipeline(stages, "wan", dist.group.WORLD, schedule, 4, torch.device("cpu"))
    msgs = []
    for B, thw, seed in steps:
        mbs = wan_batches(model, 4, B, thw, seed)
        model.zero_grad(set_to_none=True)
        ref = reference(model, "wan", mbs)
        ref_norm = grad_norm(ref[2], model)
        model.zero_grad(set_to_none=True)
        msgs.append(check(case, model, pipe, pipe.step(mbs), ref, ref_norm))
    if case == "wan-uneven":  # micro-batches of one step with different grids
        mbs = wan_batches(model, 3, 1, (2, 4, 4), 16) + wan_batches(model, 1, 1, (2, 4, 6), 17)
        msgs.append(expect_error(case, pipe, mbs, "differs from micro_batches[0]"))
    report(case, msgs)


def wan_cases():
    run_wan_case("wan-gpipe", "gpipe", 2, None, [(2, (2, 4, 4), 10)])
    run_wan_case("wan-1f1b", "1f1b", 2, [1, 1], [(1, (2, 4, 4), 11), (1, (2, 4, 4), 12)])
    run_wan_case(
        "wan-interleaved-i2v", "interleaved_1f1b", 4, [[1, 1], [1, 1]], [(1, (1, 4, 4), 13)], i2v=True
    )
    # uneven stages; the second step has another grid, so the schedule is rebuilt for it
    run_wan_case("wan-uneven", "1f1b", 4, [1, 3], [(1, (2, 4, 4), 14), (1, (1, 4, 6), 15)])


# ---- Qwen2.5-VL --------------------------------------------------------------------------------------
def qwen_model(ids: dict, num_layers: int, tie: bool) -> Qwen2_5_VLModel:
    cfg = tiny_config(ids, num_hidden_layers=num_layers)
    cfg.tie_word_embeddings = tie
    torch.manual_seed(0)
    model = Qwen2_5_VLModel(cfg)
    perturbed_init(model, seed=3)
    return model


def packed_row(model, gen: torch.Generator, samples: list[list]) -> dict:
    """One packed micro-batch from samples, each a list of pieces: n random text tokens or ("image", grid)."""
    cfg = model.cfg
    ids_all, pos_all, labels_all, grids, cu = [], [], [], [], [0]
    for pieces in samples:
        ids, sample_grids = [], []
        for p in pieces:
            if isinstance(p, int):
                ids += torch.randint(0, 300, (p,), generator=gen).tolist()
            else:
                t, h, w = p[1]
                ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4)
                ids += [cfg.vision_end_token_id]
                sample_grids.append(p[1])
        row = torch.tensor([ids])
        grid = torch.tensor(sample_grids) if sample_grids else None
        pos, _ = model.rope_index(row, grid)  # (3, 1, n), restarting per sample
        labels = row.clone()
        labels[torch.rand(row.shape, generator=gen) < 0.3] = -100  # unsupervised positions
        labels[row == cfg.image_token_id] = -100
        labels[0, 0] = -100  # a sample's first label is never predicted from the previous sample
        ids_all.append(row)
        pos_all.append(pos)
        labels_all.append(labels)
        grids += sample_grids
        cu.append(cu[-1] + row.shape[1])
    mb = {
        "input_ids": torch.cat(ids_all, 1),
        "position_ids": torch.cat(pos_all, 2),
        "cu_seqlens": cu,
        "labels": torch.cat(labels_all, 1),
    }
    if grids:
        n = sum(t * h * w for t, h, w in grids)
        mb["pixel_values"] = torch.randn(n, PATCH_DIM, generator=gen)
        mb["image_grid_thw"] = torch.tensor(grids)
    return mb


def qwen_cases(ids: dict):
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(20)

    # pp 2, 1F1B, tied embeddings; text-only micro-batch first (the one shapes are inferred from),
    # rows of different lengths padded to seq_len; two steps WITHOUT zeroing (gradient accumulation)
    case = "qwen-1f1b-tied"
    model = qwen_model(ids, 2, tie=True)
    pipe = Pipeline(
        split_stages(model, "qwen2_5_vl", 2, rank, None), "qwen2_5_vl", None, "1f1b", 2, "cpu", 64
    )
    step1 = [
        packed_row(model, gen, [[9], [14]]),
        packed_row(model, gen, [[3, ("image", (1, 4, 8)), 6], [11]]),
    ]
    step2 = [packed_row(model, gen, [[5, ("image", (1, 4, 4)), 4]]), packed_row(model, gen, [[20], [7], [4]])]
    model.zero_grad(set_to_none=True)
    ref1 = reference(model, "qwen", step1)
    norm1 = grad_norm(ref1[2], model)
    ref2 = reference(model, "qwen", step2)  # grads: steps 1 + 2 accumulated
    norm12 = grad_norm(ref2[2], model)
    model.zero_grad(set_to_none=True)
    msgs = [check(case, model, pipe, pipe.step(step1), ref1, norm1)]
    msgs.append(check(case, model, pipe, pipe.step(step2), ref2, norm12))
    too_long = [step1[0], packed_row(model, gen, [[40], [30]])]
    msgs.append(expect_error(case, pipe, too_long, "exceeds seq_len=64"))
    no_pixels = {k: v for k, v in step2[0].items() if k not in ("pixel_values", "image_grid_thw")}
    msgs.append(expect_error(case, pipe, [step1[0], no_pixels], "placeholder tokens but no pixel_values"))
    report(case, msgs)

    # pp 2 x virtual 2, interleaved 1F1B, untied, seq_len inferred from the step
    case = "qwen-interleaved"
    model = qwen_model(ids, 4, tie=False)
    stages = split_stages(model, "qwen2_5_vl", 2, rank, [[1, 1], [1, 1]])
    pipe = Pipeline(stages, "qwen2_5_vl", None, "interleaved_1f1b", 2, "cpu")
    mbs = [packed_row(model, gen, [[4, ("image", (1, 8, 4)), 3], [6]]), packed_row(model, gen, [[17]])]
    model.zero_grad(set_to_none=True)
    ref = reference(model, "qwen", mbs)
    norm = grad_norm(ref[2], model)
    model.zero_grad(set_to_none=True)
    report(case, [check(case, model, pipe, pipe.step(mbs), ref, norm)])


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        if sys.argv[1] == "wan":
            wan_cases()
        else:
            with tempfile.TemporaryDirectory() as tmp:
                qwen_cases(build_tiny_tokenizer(tmp))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

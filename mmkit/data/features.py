"""Precomputed Wan training features: run the frozen VAE / umT5 / CLIP once, train many epochs.

`extract_features` walks a `VideoDataset` once (a tqdm bar with ETA) and writes one safetensors
file per clip under `OUTDIR/features/`:
- `latents` (C, T_lat, H_lat, W_lat) float32, normalized as the DiT sees them;
- `text_context` (L_i, text_dim): the umT5 features of the prompt's real tokens only (the
  zero padding to 512 is restored at load time, exactly as the pipeline pads);
- i2v: `cond` (4 + C, T_lat, H_lat, W_lat) and `image_context` (N, image_dim) (Wan); whatever else the
  task's `feature_extras(video, index)` returns (OpenSoraPlan: the masked videos' latents per mask type).
plus `null_text.safetensors` (the empty prompt, used for caption dropout) and `index.json`.

`FeatureDataset` reads them back with the same item keys the task's precomputed path takes, and
works with `ResumableSampler` like the video dataset, so resume stays exact. A damaged file or one
holding NaN/inf is skipped and counted (the next sample stands in), never trained on.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mmkit.checkpoint.files import DamagedFileError, load_safetensors
from mmkit.data.video import SampleKey
from mmkit.models.common.hf_io import read_json
from mmkit.outputs import claim_output_dir

logger = logging.getLogger(__name__)


def _keep(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.bool)  # "drop no caption"


@torch.no_grad()
def extract_features(
    task, dataset, outdir: str | os.PathLike, progress: bool = True, overwrite: bool = False
) -> Path:
    """Encode every clip of `dataset` with the frozen parts of a `WanTask`; returns OUTDIR.

    Example: `extract_features(build_task(cfg, dev), VideoDataset("data.txt", 17, 64, 64), "feats")`.
    """
    out = claim_output_dir(outdir, "data features", overwrite)  # replaces only an earlier features set
    (out / "features").mkdir()
    text_len = task.model.cfg.text_len

    def trimmed(ctx: torch.Tensor, caption: str) -> torch.Tensor:
        if hasattr(task, "text_length"):  # a task whose text encoder is not `task.enc.tokenizer`'s
            n = task.text_length(caption)
        else:
            n = len(task.enc.tokenizer(caption, add_special_tokens=True).input_ids)
        return ctx[
            : min(n, text_len)
        ].contiguous()  # the encoder's dtype: training matches on-the-fly exactly

    null = task.encode_text([""], _keep(1))[0]
    save_file({"text_context": trimmed(null, "")}, str(out / "null_text.safetensors"))
    records = []
    for i in tqdm(range(len(dataset)), desc="features", unit="clip", disable=not progress):
        item = dataset[i]
        if item.get("index", i) != i:  # clip i was unreadable and the dataset handed the next one: skip it
            continue
        video = item["video"][None]  # (1, 3, T, H, W)
        tensors = {
            "latents": task.encode_video(video)[0].contiguous(),
            "text_context": trimmed(task.encode_text([item["caption"]], _keep(1))[0], item["caption"]),
        }
        if task.cfg.task == "i2v" and hasattr(task, "image_condition"):  # (OpenSoraPlan: from the latents)
            cond, clip = task.image_condition(video, video.shape[2])
            tensors["cond"], tensors["image_context"] = cond[0].contiguous(), clip[0].contiguous()
        if hasattr(task, "feature_extras"):  # keyed on the index the sample gets in the features
            tensors.update({k: v.contiguous() for k, v in task.feature_extras(video, len(records)).items()})
        name = f"features/{i:06d}.safetensors"
        save_file(tensors, str(out / name))
        records.append({"file": name, "caption": item["caption"], "source": item["path"]})
    index = {"task": task.cfg.task, "text_len": text_len, "samples": records}
    if hasattr(dataset, "report"):
        index["skipped"] = dataset.report()
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return out


class FeatureDataset(torch.utils.data.Dataset):
    """Items {"latents", "text_context" (text_len, D), "text_mask" (text_len,) bool, "null_text_context",
    "null_text_mask", "caption", "data_state"[, "cond", "image_context"]}.

    Example: `ds = FeatureDataset("feats"); batch = collate_features([ds[0], ds[1]])`.
    """

    def __init__(self, root: str | os.PathLike, max_samples: int | None = None):
        self.root = Path(root)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(
                f"data.precomputed_dir: {index_path} not found; write it with `mmkit data features`"
            )
        index = read_json(index_path, "features index")
        if not isinstance(index.get("samples"), list) or "task" not in index or "text_len" not in index:
            raise ValueError(
                f"{index_path}: not a features index (needs task, text_len, samples); write it again"
            )
        self.samples = index["samples"][:max_samples] if max_samples else index["samples"]
        if not self.samples:
            raise ValueError(f"data.precomputed_dir: {self.root} holds no samples")
        self.task, self.text_len = index["task"], index["text_len"]
        self.null_text = load_safetensors(self.root / "null_text.safetensors")["text_context"]
        self.bad: dict[int, str] = {}  # index -> reason, each bad file counted once
        self.stats: Counter = Counter()

    def __len__(self) -> int:
        return len(self.samples)

    def pad_text(self, ctx: torch.Tensor) -> torch.Tensor:
        """(L_i, D) -> (text_len, D) float32, zeros after the prompt (as the pipeline pads)."""
        full = ctx.new_zeros(self.text_len, ctx.shape[1], dtype=torch.float32)
        full[: len(ctx)] = ctx.float()
        return full

    def _read(self, index: int) -> dict | None:
        """The tensors of sample `index`, or None (counted, warned once per file) when the file is damaged
        or holds NaN/inf: one bad latent would otherwise turn every later step's loss into NaN."""
        if index in self.bad:
            return None
        path = self.root / self.samples[index]["file"]
        try:
            t = load_safetensors(path, fix="recompute it with `mmkit data features`")
        except (DamagedFileError, FileNotFoundError) as e:
            return self._skip(index, "damaged", str(e))
        bad = [k for k, v in t.items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:
            return self._skip(index, "nonfinite", f"{path}: {', '.join(bad)} hold NaN/inf")
        return t

    def _skip(self, index: int, reason: str, detail: str) -> None:
        self.bad[index] = reason
        self.stats[reason] += 1
        if self.stats[reason] <= 5:
            logger.warning("precomputed features: skipping sample %d (%s): %s", index, reason, detail)
        return None

    def report(self) -> dict:
        """Log and return {"samples", "skipped": {reason: n}}. Example: `ds.report()["skipped"]`."""
        skipped = dict(self.stats)
        if skipped:
            logger.warning(
                "precomputed features: %d samples, skipped %d (%s)", len(self.samples), sum(skipped.values()),
                ", ".join(f"{r}: {n}" for r, n in skipped.items()),
            )  # fmt: skip
        return {"samples": len(self.samples), "skipped": skipped}

    def __getitem__(self, key: int | SampleKey) -> dict:
        index = key.index if isinstance(key, SampleKey) else key
        n = len(self.samples)
        for attempt in range(n):  # a bad sample: the next index stands in, so the batch keeps its size
            t = self._read((index + attempt) % n)
            if t is not None:
                index = (index + attempt) % n
                break
        else:
            raise ValueError(
                f"data.precomputed_dir: none of the {n} samples in {self.root} is usable "
                f"(skipped: {dict(self.stats)}); recompute them with `mmkit data features`"
            )
        rec = self.samples[index]
        item = {k: v for k, v in t.items() if k != "text_context"}
        item["text_context"] = self.pad_text(t["text_context"])
        item["null_text_context"] = self.pad_text(self.null_text)  # for caption dropout
        # 1 over the prompt's real tokens (a text encoder's attention mask; Wan attends to the padding)
        item["text_mask"] = torch.arange(self.text_len) < len(t["text_context"])
        item["null_text_mask"] = torch.arange(self.text_len) < len(self.null_text)
        item["caption"] = str(rec.get("caption", ""))
        item["index"] = torch.tensor(index)  # with "epoch": the sample visit training keys its noise on
        item["epoch"] = torch.tensor(key.epoch if isinstance(key, SampleKey) else 0)
        item["data_state"] = (
            {"epoch": key.epoch, "consumed": key.consumed} if isinstance(key, SampleKey) else None
        )
        return item


def _pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the trailing dims of `t` up to `shape` (same rank)."""
    pad = []
    for n, want in zip(reversed(t.shape), reversed(shape)):
        pad += [0, want - n]
    return torch.nn.functional.pad(t, pad)


def collate_features(items: list[dict], pad: bool = False) -> dict:
    """Stack FeatureDataset items; `data_state` is the last item's position.

    With `pad`, clips of different latent sizes are zero-padded to the batch's largest (T, H, W) and the
    batch gains `video_mask` (B, T, H, W), 1 over each clip's real latents (as the original OpenSoraPlan
    collate pads variable-size videos); without it, sizes must agree.
    Example: `batch = collate_features([ds[0], ds[1]], pad=True)`.
    """
    keys = [k for k in items[0] if isinstance(items[0][k], torch.Tensor)]
    sizes = [tuple(it["latents"].shape[1:]) for it in items] if "latents" in items[0] else []
    if pad and len(set(sizes)) > 1:
        batch = {}
        for k in keys:
            shape = tuple(max(n) for n in zip(*(it[k].shape for it in items)))
            batch[k] = torch.stack([_pad_to(it[k], shape) for it in items])
        mask = torch.zeros(len(items), *batch["latents"].shape[2:])
        for i, (t, h, w) in enumerate(sizes):
            mask[i, :t, :h, :w] = 1
        batch["video_mask"] = mask
    else:
        batch = {k: torch.stack([it[k] for it in items]) for k in keys}
    batch["caption"] = [it["caption"] for it in items]
    batch["data_state"] = items[-1]["data_state"]
    return batch

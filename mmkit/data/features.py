"""Precomputed Wan training features: run the frozen VAE / umT5 / CLIP once, train many epochs.

`extract_features` walks a `VideoDataset` once (a tqdm bar with ETA) and writes one safetensors
file per clip under `OUTDIR/features/`:
- `latents` (C, T_lat, H_lat, W_lat) float32, normalized as the DiT sees them;
- `text_context` (L_i, text_dim): the umT5 features of the prompt's real tokens only (the
  zero padding to 512 is restored at load time, exactly as the pipeline pads);
- i2v: `cond` (4 + C, T_lat, H_lat, W_lat) and `image_context` (N, image_dim).
plus `null_text.safetensors` (the empty prompt, used for caption dropout) and `index.json`.

`FeatureDataset` reads them back with the same item keys the task's precomputed path takes, and
works with `ResumableSampler` like the video dataset, so resume stays exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mmkit.data.video import SampleKey


def _keep(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.bool)  # "drop no caption"


@torch.no_grad()
def extract_features(task, dataset, outdir: str | os.PathLike, progress: bool = True) -> Path:
    """Encode every clip of `dataset` with the frozen parts of a `WanTask`; returns OUTDIR.

    Example: `extract_features(build_task(cfg, dev), VideoDataset("data.txt", 17, 64, 64), "feats")`.
    """
    out = Path(outdir)
    (out / "features").mkdir(parents=True, exist_ok=True)
    text_len = task.model.cfg.text_len

    def trimmed(ctx: torch.Tensor, caption: str) -> torch.Tensor:
        n = len(task.enc.tokenizer(caption, add_special_tokens=True).input_ids)
        return ctx[
            : min(n, text_len)
        ].contiguous()  # the encoder's dtype: training matches on-the-fly exactly

    null = task.encode_text([""], _keep(1))[0]
    save_file({"text_context": trimmed(null, "")}, str(out / "null_text.safetensors"))
    records = []
    for i in tqdm(range(len(dataset)), desc="features", unit="clip", disable=not progress):
        item = dataset[i]
        video = item["video"][None]  # (1, 3, T, H, W)
        tensors = {
            "latents": task.encode_video(video)[0].contiguous(),
            "text_context": trimmed(task.encode_text([item["caption"]], _keep(1))[0], item["caption"]),
        }
        if task.cfg.task == "i2v":
            cond, clip = task.image_condition(video, video.shape[2])
            tensors["cond"], tensors["image_context"] = cond[0].contiguous(), clip[0].contiguous()
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
        index = json.loads(index_path.read_text())
        self.samples = index["samples"][:max_samples] if max_samples else index["samples"]
        if not self.samples:
            raise ValueError(f"data.precomputed_dir: {self.root} holds no samples")
        self.task, self.text_len = index["task"], index["text_len"]
        self.null_text = load_file(str(self.root / "null_text.safetensors"))["text_context"]

    def __len__(self) -> int:
        return len(self.samples)

    def pad_text(self, ctx: torch.Tensor) -> torch.Tensor:
        """(L_i, D) -> (text_len, D) float32, zeros after the prompt (as the pipeline pads)."""
        full = ctx.new_zeros(self.text_len, ctx.shape[1], dtype=torch.float32)
        full[: len(ctx)] = ctx.float()
        return full

    def __getitem__(self, key: int | SampleKey) -> dict:
        index = key.index if isinstance(key, SampleKey) else key
        rec = self.samples[index]
        t = load_file(str(self.root / rec["file"]))
        item = {k: v for k, v in t.items() if k != "text_context"}
        item["text_context"] = self.pad_text(t["text_context"])
        item["null_text_context"] = self.pad_text(self.null_text)  # for caption dropout
        # 1 over the prompt's real tokens (a text encoder's attention mask; Wan attends to the padding)
        item["text_mask"] = torch.arange(self.text_len) < len(t["text_context"])
        item["null_text_mask"] = torch.arange(self.text_len) < len(self.null_text)
        item["caption"] = rec["caption"]
        item["index"] = torch.tensor(index)  # with "epoch": the sample visit training keys its noise on
        item["epoch"] = torch.tensor(key.epoch if isinstance(key, SampleKey) else 0)
        item["data_state"] = (
            {"epoch": key.epoch, "consumed": key.consumed} if isinstance(key, SampleKey) else None
        )
        return item


def collate_features(items: list[dict]) -> dict:
    """Stack FeatureDataset items; `data_state` is the last item's position."""
    batch = {
        k: torch.stack([it[k] for it in items]) for k in items[0] if isinstance(items[0][k], torch.Tensor)
    }
    batch["caption"] = [it["caption"] for it in items]
    batch["data_state"] = items[-1]["data_state"]
    return batch

"""Supervised fine-tuning data for Qwen2.5-VL: messages-format records -> training tensors.

A record (JSON list or JSONL, as written by `mmkit data convert llava`):
    {"messages": [{"role": "system"|"user"|"assistant", "content": "<image>What is it?" | [parts]}, ...],
     "images": ["a.jpg", ...], "videos": ["v.mp4", ...]}
String content marks media with <image> / <video> tags (one per entry of "images"/"videos", in
order); list content uses transformers-style parts ({"type": "image"}, {"type": "text", "text": ...}).
Relative media paths are resolved against `media_root`, else against the data file's folder.

Each item: input_ids (L,), labels (L,) = -100 except assistant replies and their end token,
attention_mask (L,), mm_token_type_ids (L,), position_ids (3, L) M-RoPE, and pixel_values +
image_grid_thw / pixel_values_videos + video_grid_thw + second_per_grid_ts when the record has media.
Samples are skipped (never a crash) with a warning and a counter in `dataset.stats`:
missing_media / malformed at load time; bad_media (undecodable), too_long (cutoff_len would cut
through a vision block), no_target (nothing to learn after truncation) when an item is built
(`__getitem__` then returns None, which `SFTCollator` drops). Counters live in the process that
built the item (each DataLoader worker has its own).

Training reads items by `SampleKey` (from `mmkit.data.video.ResumableSampler`): a skipped sample is
then replaced by the next readable index (so a batch keeps its size) and each item carries the
sampler position as "data_state", which the collators pass on as `batch["data_state"]` for exact
resume. `PackingCollator` packs a batch's samples into rows of at most `cutoff_len` tokens.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from mmkit.common import IGNORE_INDEX
from mmkit.data.formats import read_records
from mmkit.models.qwen2_5_vl.processor import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    Qwen2_5_VLProcessor,
    check_placeholders,
    load_video,
    process_image,
    process_video,
)
from mmkit.models.qwen2_5_vl.rope import get_rope_index

logger = logging.getLogger(__name__)

_MEDIA_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)
_TAG_RE = re.compile(r"(<image>|<video>)")
_ROLES = ("system", "user", "assistant")
_RESERVED = (IMAGE_TOKEN, VIDEO_TOKEN, "<|vision_start|>", "<|vision_end|>")


def _validate(rec) -> tuple[list[dict], list[str], list[str]]:
    """(messages, images, videos) of a record, or ValueError saying what is wrong with it."""
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not rec["messages"]:
        raise ValueError('record needs a non-empty "messages" list')
    media = {}
    for key in ("images", "videos"):
        val = rec.get(key) or []
        if isinstance(val, str):
            val = [val]
        if not isinstance(val, list) or not all(isinstance(p, str) and p for p in val):
            raise ValueError(f'"{key}" must be a list of paths')
        media[key] = val
    counts = {"image": 0, "video": 0}
    for j, m in enumerate(rec["messages"]):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ValueError(f"message {j}: needs a role in {_ROLES}, got {m!r:.80}")
        c = m.get("content")
        if isinstance(c, str):
            n_img, n_vid = c.count("<image>"), c.count("<video>")
        elif isinstance(c, list) and all(isinstance(p, dict) for p in c):
            n_img = sum(p.get("type") == "image" for p in c)
            n_vid = sum(p.get("type") == "video" for p in c)
        else:
            raise ValueError(f"message {j}: content must be a string or a list of parts")
        text = c if isinstance(c, str) else " ".join(str(p.get("text", "")) for p in c)
        if any(tok in text for tok in _RESERVED):
            raise ValueError(
                f"message {j}: contains a raw vision token; mark media with <image>/<video> instead"
            )
        if (n_img or n_vid) and m["role"] != "user":
            raise ValueError(f"message {j}: media can only be in user messages, found in {m['role']!r}")
        counts["image"] += n_img
        counts["video"] += n_vid
    for kind in ("image", "video"):
        if counts[kind] != len(media[kind + "s"]):
            raise ValueError(f"{counts[kind]} <{kind}> tag(s) but {len(media[kind + 's'])} {kind} path(s)")
    if not any(m["role"] == "assistant" for m in rec["messages"]):
        raise ValueError("no assistant message: nothing to learn")
    return rec["messages"], media["images"], media["videos"]


def _text_of(content) -> str:
    """The text of a message's content (a string, or the text parts of a parts list)."""
    if isinstance(content, str):
        return content
    return " ".join(str(p.get("text", "")) for p in content if p.get("type", "text") == "text")


def _to_template_messages(messages: list[dict]) -> list[dict]:
    """String content with <image>/<video> tags -> the parts list Qwen's chat template renders."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, str) and _TAG_RE.search(c):
            parts = []
            for piece in _TAG_RE.split(c):
                if piece in ("<image>", "<video>"):
                    parts.append({"type": piece[1:-1]})
                elif piece:
                    parts.append({"type": "text", "text": piece})
            c = parts
        out.append({"role": m["role"], "content": c})
    return out


class SFTDataset(torch.utils.data.Dataset):
    """Messages-format SFT records (one or more JSON/JSONL files) -> Qwen2.5-VL training items.

    Args:
        data_files: a path, a comma-separated list of paths, or a list of paths.
        processor: a `Qwen2_5_VLProcessor` (or the model folder to load one from).
        cutoff_len: maximum tokens per item; longer items are cut at the end unless that would cut
            through a vision block (then the item is dropped and counted as too_long).
        max_samples: keep only the first N records (over all files, in order).
        media_root: folder relative media paths are resolved against (default: each file's folder).
        tokens_per_second: config.json `vision_config.tokens_per_second` (2 for every Qwen2.5-VL).

    Example:
        >>> ds = SFTDataset("a.jsonl,b.json", "Qwen2.5-VL-3B-Instruct", cutoff_len=2048, max_samples=1000)
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=SFTCollator(ds.pad_token_id))
    """

    def __init__(
        self,
        data_files: str | Sequence[str],
        processor: Qwen2_5_VLProcessor | str | Path,
        cutoff_len: int = 4096,
        max_samples: int | None = None,
        media_root: str | Path | None = None,
        tokens_per_second: float = 2.0,
        progress: bool = True,
    ):
        if cutoff_len <= 0:
            raise ValueError(f"cutoff_len={cutoff_len} must be positive")
        if max_samples is not None and max_samples <= 0:
            raise ValueError(f"max_samples={max_samples} must be positive (or None for all)")
        if not isinstance(processor, Qwen2_5_VLProcessor):
            processor = Qwen2_5_VLProcessor.from_pretrained(processor)
        self.processor = processor
        self.cutoff_len = cutoff_len
        self.tokens_per_second = tokens_per_second
        self.stats: Counter = Counter()
        tok = processor.tokenizer
        self.pad_token_id = processor.pad_token_id
        self.eos_token = tok.eos_token  # end of an assistant turn: supervised with the reply
        self.vision_ids = {
            processor.image_token_id,
            processor.video_token_id,
            tok.convert_tokens_to_ids("<|vision_start|>"),
            tok.convert_tokens_to_ids("<|vision_end|>"),
        }

        files = (
            [p.strip() for p in data_files.split(",")] if isinstance(data_files, str) else list(data_files)
        )
        if not files or not all(files):
            raise ValueError(f"data_files={data_files!r}: give one or more paths (comma-separated)")
        raw = []  # (name for messages, record, folder for relative media)
        for f in files:
            root = Path(media_root) if media_root is not None else Path(f).parent
            for j, rec in enumerate(read_records(f)):
                raw.append((f"{f}:{j}", rec, root))
                if max_samples is not None and len(raw) >= max_samples:
                    break
            if max_samples is not None and len(raw) >= max_samples:
                break

        self.samples = []  # (name, messages, image paths, video paths)
        self.empty_answers = 0  # records kept with an empty or whitespace assistant answer
        for name, rec, root in tqdm(raw, desc="sft data", unit="rec", disable=not progress):
            try:
                messages, images, videos = _validate(rec)
            except ValueError as e:
                self._skip("malformed", name, str(e))
                continue
            images = [str(p if Path(p).is_absolute() else root / p) for p in images]
            videos = [str(p if Path(p).is_absolute() else root / p) for p in videos]
            missing = [p for p in images + videos if not Path(p).is_file()]
            if missing:
                self._skip("missing_media", name, f"media file {missing[0]} not found")
                continue
            if any(m["role"] == "assistant" and not _text_of(m["content"]).strip() for m in messages):
                self.empty_answers += 1  # kept: the model learns to answer with nothing but the end token
            self.samples.append((name, messages, images, videos))
        if self.empty_answers:
            logger.warning(
                "SFTDataset: %d of %d records have an empty assistant answer; the model learns to stop "
                "at once there. Fix the data if that is not intended.",
                self.empty_answers,
                len(self.samples),
            )
        skipped = {k: v for k, v in self.stats.items() if v}
        if skipped:
            logger.warning(
                "SFTDataset: %d of %d records kept; skipped %s", len(self.samples), len(raw), skipped
            )

    def _skip(self, reason: str, name: str, detail: str) -> None:
        self.stats[reason] += 1
        logger.warning(
            "skipping %s (%s): %s [%s so far: %d]", name, reason, detail, reason, self.stats[reason]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> dict[str, torch.Tensor] | None:
        """`ds[i]`: the item, or None if the sample is skipped. `ds[SampleKey]`: the item of the first
        readable index from key.index on, with "data_state" = {"epoch", "consumed"} of the key."""
        from mmkit.data.video import SampleKey

        if not isinstance(key, SampleKey):
            return self._build(key)
        n = len(self.samples)
        for attempt in range(n):  # a skipped sample: the next index stands in, the batch keeps its size
            item = self._build((key.index + attempt) % n)
            if item is not None:
                item["data_state"] = {"epoch": key.epoch, "consumed": key.consumed}
                return item
        raise ValueError(
            f"sft data: none of the {n} samples could be built (skipped: {dict(self.stats)}); "
            "the warnings above name the records and reasons"
        )

    def _build(self, i: int) -> dict[str, torch.Tensor] | None:
        name, messages, images, videos = self.samples[i]
        proc = self.processor
        item: dict[str, torch.Tensor] = {}
        image_grids, video_grids = [], []
        try:
            if images:
                rows = []
                for p in images:
                    r, g = process_image(p, proc.image_cfg)
                    rows.append(torch.from_numpy(r))
                    image_grids.append(g)
                item["pixel_values"] = torch.cat(rows)  # (sum of t*h*w, 1176)
                item["image_grid_thw"] = torch.tensor(image_grids, dtype=torch.long)
            if videos:
                rows, secs = [], []
                vc = proc.video_cfg
                for p in videos:
                    vid = load_video(p, vc.fps, vc.max_frames, vc.min_frames, vc.temporal_patch_size)
                    r, g, s = process_video(vid, vc)
                    rows.append(torch.from_numpy(r))
                    video_grids.append(g)
                    secs.append(s)
                item["pixel_values_videos"] = torch.cat(rows)
                item["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
                item["second_per_grid_ts"] = torch.tensor(secs, dtype=torch.float32)
        except Exception as e:  # undecodable / corrupt / oversized media (any decoder error): skip, count
            self._skip("bad_media", name, f"{type(e).__name__}: {e}")
            return None

        try:  # placeholders that don't match the features: skip the sample, don't stop the run
            ids, labels = self.tokenize(messages, image_grids, video_grids)
            check_placeholders(
                ids,
                proc.image_token_id,
                proc.video_token_id,
                item.get("image_grid_thw"),
                item.get("video_grid_thw"),
                proc.image_cfg.merge_size,
                name=name,
            )
            pos, _ = get_rope_index(
                ids[None],
                item.get("image_grid_thw"),
                item.get("video_grid_thw"),
                item.get("second_per_grid_ts"),
                image_token_id=proc.image_token_id,
                video_token_id=proc.video_token_id,
                spatial_merge_size=proc.image_cfg.merge_size,
                tokens_per_second=self.tokens_per_second,
            )
        except ValueError as e:
            self._skip("malformed", name, str(e))
            return None
        pos = pos[:, 0]  # (3, L)

        if len(ids) > self.cutoff_len:
            cut_vision = any(int(t) in self.vision_ids for t in ids[self.cutoff_len :])
            if cut_vision:
                self._skip(
                    "too_long", name, f"{len(ids)} tokens; cutoff_len={self.cutoff_len} cuts a vision block"
                )
                return None
            ids, labels, pos = ids[: self.cutoff_len], labels[: self.cutoff_len], pos[:, : self.cutoff_len]
        if not (labels != IGNORE_INDEX).any():
            self._skip("no_target", name, f"no assistant token left within cutoff_len={self.cutoff_len}")
            return None

        types = torch.zeros_like(ids)
        types[ids == proc.image_token_id] = 1
        types[ids == proc.video_token_id] = 2
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": types,
            "position_ids": pos,
            **item,
        }

    def tokenize(self, messages: list[dict], image_grids: list, video_grids: list):
        """(input_ids (L,), labels (L,)) of a conversation rendered with the folder's chat template.

        Labels keep the tokens of each assistant reply and its end token (<|im_end|>); everything
        else (system, user turns, the "<|im_start|>assistant\\n" header, the newline after the end
        token) is -100. Spans come from rendering the conversation prefix by prefix, so the ids
        equal tokenizing the whole rendered text in one go. Example:
            >>> ids, labels = ds.tokenize([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], [], [])
        """
        proc = self.processor
        tmsgs = _to_template_messages(messages)
        full = self._expand(
            proc.apply_chat_template(tmsgs, add_generation_prompt=False), image_grids, video_grids
        )
        spans = []  # [start, end) character spans of supervised text in `full`
        for k, m in enumerate(tmsgs):
            if m["role"] != "assistant":
                continue
            head = self._expand(
                proc.apply_chat_template(tmsgs[:k], add_generation_prompt=True), image_grids, video_grids
            )
            upto = self._expand(
                proc.apply_chat_template(tmsgs[: k + 1], add_generation_prompt=False),
                image_grids,
                video_grids,
            )
            if not (full.startswith(upto) and upto.startswith(head)):
                raise ValueError(
                    "chat template is not prefix-stable; cannot locate assistant replies for labels"
                )
            end = upto.rfind(self.eos_token)
            end = len(upto) if end < len(head) else end + len(self.eos_token)
            spans.append((len(head), end))
        enc = proc.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            if any(a <= s and e <= b for a, b in spans):
                labels[t] = ids[t]
        return ids, labels

    def _expand(self, text: str, image_grids: list, video_grids: list) -> str:
        """Expand the placeholders of a (prefix) text with the first grids it needs."""
        n_img, n_vid = text.count(IMAGE_TOKEN), text.count(VIDEO_TOKEN)
        return self.processor.expand_placeholders([text], image_grids[:n_img], video_grids[:n_vid])[0]


class SFTCollator:
    """Pad a list of SFTDataset items into a batch; None items (skipped samples) are dropped.

    Pads input_ids with `pad_token_id`, labels with -100, attention_mask / mm_token_type_ids /
    position_ids with 0; concatenates pixel rows and grids in item order. Returns None if every item
    was skipped. Example:
        >>> batch = SFTCollator(ds.pad_token_id)([ds[0], ds[1]])   # batch["position_ids"]: (3, B, L)
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: use 'left' or 'right'")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict | None]) -> dict[str, torch.Tensor] | None:
        items = [it for it in items if it is not None]
        if not items:
            return None
        length = max(len(it["input_ids"]) for it in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fills = {
            "input_ids": self.pad_token_id,
            "labels": IGNORE_INDEX,
            "attention_mask": 0,
            "mm_token_type_ids": 0,
        }
        batch = {}
        for key, fill in fills.items():
            batch[key] = torch.stack([self._pad(it[key], length, fill) for it in items])  # (B, L)
        batch["position_ids"] = torch.stack([self._pad(it["position_ids"], length, 0) for it in items], dim=1)
        for key in _MEDIA_KEYS:
            parts = [it[key] for it in items if key in it]
            if parts:
                batch[key] = torch.cat(parts)
        if "data_state" in items[-1]:
            batch["data_state"] = items[-1]["data_state"]
        return batch

    def _pad(self, x: torch.Tensor, length: int, fill: int) -> torch.Tensor:
        pad = x.new_full((*x.shape[:-1], length - x.shape[-1]), fill)
        return torch.cat([x, pad] if self.padding_side == "right" else [pad, x], dim=-1)


class PackingCollator:
    """Pack a list of SFTDataset items into rows of at most `max_len` tokens (greedy first fit).

    Each item goes into the first row it still fits in, else opens a new row; rows are padded to
    the longest row (only the last rows can be short). Inside a row the samples follow each other;
    their M-RoPE positions restart at each sample (they are the items' own), and the first label of
    every sample is -100, so no token learns to predict the next sample's first token.

    Returns the SFTCollator keys (input_ids / labels / attention_mask / mm_token_type_ids (R, L),
    position_ids (3, R, L), media concatenated in packed order) plus
    "cu_seqlens": (n + 1,) long, sample boundaries in the stream of REAL tokens read row by row
    (`input_ids[attention_mask.bool()]`), which is what the packed model path consumes, and
    "data_state" when the items carry one. Example:
        >>> batch = PackingCollator(ds.pad_token_id, max_len=4096)([ds[0], ds[1], ds[2]])
        >>> flat = batch["input_ids"][batch["attention_mask"].bool()]   # (N,), N = cu_seqlens[-1]
    """

    def __init__(self, pad_token_id: int, max_len: int):
        if max_len < 1:
            raise ValueError(f"data.cutoff_len={max_len}: packing needs rows of at least 1 token")
        self.pad_token_id = pad_token_id
        self.max_len = max_len

    def __call__(self, items: list[dict | None]) -> dict[str, torch.Tensor] | None:
        items = [it for it in items if it is not None]
        if not items:
            return None
        rows: list[list[int]] = []  # item indices per row
        fill: list[int] = []  # tokens used per row
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            if n > self.max_len:
                raise ValueError(
                    f"packing: a sample has {n} tokens > data.cutoff_len={self.max_len}; the dataset must cut "
                    "samples at cutoff_len"
                )
            r = next((r for r in range(len(rows)) if fill[r] + n <= self.max_len), len(rows))
            if r == len(rows):
                rows.append([])
                fill.append(0)
            rows[r].append(i)
            fill[r] += n
        length = max(fill)
        order = [i for row in rows for i in row]
        batch: dict = {}
        for key, fill_value in (
            ("input_ids", self.pad_token_id),
            ("labels", IGNORE_INDEX),
            ("attention_mask", 0),
            ("mm_token_type_ids", 0),
        ):
            out = torch.full((len(rows), length), fill_value, dtype=torch.long)
            for r, row in enumerate(rows):
                vals = [items[i][key] for i in row]
                if key == "labels":  # a sample's first token is never a target
                    vals = [torch.cat([v.new_full((1,), IGNORE_INDEX), v[1:]]) for v in vals]
                cat = torch.cat(vals)
                out[r, : len(cat)] = cat
            batch[key] = out
        pos = torch.zeros(3, len(rows), length, dtype=torch.long)
        for r, row in enumerate(rows):
            cat = torch.cat([items[i]["position_ids"] for i in row], dim=1)  # (3, fill[r])
            pos[:, r, : cat.shape[1]] = cat
        batch["position_ids"] = pos
        lens = torch.tensor([len(items[i]["input_ids"]) for i in order])
        batch["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        for key in _MEDIA_KEYS:  # in packed order, so features meet their placeholders
            parts = [items[i][key] for i in order if key in items[i]]
            if parts:
                batch[key] = torch.cat(parts)
        if "data_state" in items[-1]:
            batch["data_state"] = items[-1]["data_state"]
        return batch

"""Fine-tuning data format converters: LLaVA / ShareGPT records -> mmkit's messages format.

Input (one record of a JSON list or a JSONL line):
    {"id": "...", "image": "x.jpg" | ["a.jpg", "b.jpg"], "video": "v.mp4" | [...],
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}
Output:
    {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A cat."}],
     "images": ["<root>/x.jpg"]}          # "videos": [...] for video records; neither for text-only ones

Rules: roles human/user -> user, gpt/assistant -> assistant, system -> system; the newline LLaVA puts
after a <image>/<video> tag is dropped (Qwen's template puts text right after the vision block); a
record with media but no tag gets the tags prepended to its first user turn (LLaVA's convention).
Records with unknown roles or a malformed shape are reported with their index and skipped; the run
goes on. Reading the media files is the dataset's job, not the converter's.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MEDIA_TAGS = {"images": "<image>", "videos": "<video>"}


@dataclass
class ConvertReport:
    """What a conversion did: records in, records written, and (index, reason) for each one skipped."""

    total: int = 0
    converted: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        return f"converted {self.converted}/{self.total} records, skipped {len(self.problems)}"


def _media_list(value, key: str) -> list[str]:
    """A record's "image"/"video" field as a list of paths (a string, a list of strings, or absent)."""
    if value is None:
        return []
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError(f'"{key}" must be a path or a non-empty list of paths, got {value!r:.80}')


def _join(root: str | None, path: str) -> str:
    return path if root is None or os.path.isabs(path) else os.path.join(root, path)


def convert_llava_record(record, image_root: str | None = None) -> dict:
    """One LLaVA/ShareGPT record -> one messages-format record; ValueError (the reason) if it can't.

    Example:
        >>> convert_llava_record({"image": "x.jpg", "conversations": [
        ...     {"from": "human", "value": "<image>\\nWhat?"}, {"from": "gpt", "value": "A cat."}]}, "/data")
        {'messages': [{'role': 'user', 'content': '<image>What?'}, {'role': 'assistant', 'content': 'A cat.'}],
         'images': ['/data/x.jpg']}
    """
    if record is None:
        raise ValueError("record is null or its JSONL line is not valid JSON")
    if not isinstance(record, dict):
        raise ValueError(f"record is a {type(record).__name__}, not an object")
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError('"conversations" is missing or not a non-empty list')
    media = {
        "images": _media_list(record.get("image", record.get("images")), "image"),
        "videos": _media_list(record.get("video", record.get("videos")), "video"),
    }
    messages = []
    for t, turn in enumerate(conv):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise ValueError(f'turn {t} must be {{"from": str, "value": str}}, got {turn!r:.80}')
        role = ROLE_MAP.get(turn["from"].lower())
        if role is None:
            raise ValueError(f"turn {t}: unknown role {turn['from']!r} (known: {', '.join(ROLE_MAP)})")
        content = turn["value"]
        for tag in MEDIA_TAGS.values():  # "<image>\n" -> "<image>"
            content = re.sub(re.escape(tag) + r"[ \t]*\n", tag, content)
        messages.append({"role": role, "content": content})

    # Roles: an optional system turn, then user/assistant alternating, ending on the assistant.
    body = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or [m["role"] for m in body] != expected[: len(body)] or body[-1]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise ValueError(f"turns must alternate user/assistant and end on assistant, got {roles}")

    out: dict = {"messages": messages}
    for key, tag in MEDIA_TAGS.items():
        n_tags = sum(m["content"].count(tag) for m in messages)
        in_reply = sum(m["content"].count(tag) for m in messages if m["role"] == "assistant")
        if in_reply:
            raise ValueError(f"{tag} appears in an assistant turn; media can only be in user turns")
        paths = media[key]
        if n_tags == 0 and paths:
            body[0]["content"] = tag * len(paths) + body[0]["content"]
        elif n_tags != len(paths):
            raise ValueError(f"{n_tags} {tag} tag(s) but {len(paths)} {key[:-1]} path(s)")
        if paths:
            out[key] = [_join(image_root, p) for p in paths]
    return out


def convert_llava(records: list, image_root: str | None = None, progress: bool = True):
    """Convert a list of LLaVA records; bad ones are skipped and reported by index.

    Returns (converted records, ConvertReport). Example:
        >>> out, report = convert_llava(json.load(open("llava.json")), image_root="/data/coco")
        >>> report.problems   # [(17, 'turn 2: unknown role ...'), ...]
    """
    report = ConvertReport(total=len(records))
    out = []
    for i, rec in enumerate(tqdm(records, desc="convert llava", unit="rec", disable=not progress)):
        try:
            out.append(convert_llava_record(rec, image_root))
        except ValueError as e:
            report.problems.append((i, str(e)))
    report.converted = len(out)
    return out, report


def read_records(path: str | Path) -> list:
    """Records of a JSON list file or a JSONL file (one object per line; bad lines become None).

    A JSONL line that does not parse is kept as None so that it is reported with its index.
    Example: `records = read_records("train.jsonl")`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); expected a JSON list of records or JSONL") from e
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected a list of records or JSONL") from e
        return data
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append(None)
    return records


def write_records(records: list[dict], path: str | Path) -> None:
    """Write records as a JSON list (".json") or one per line (".jsonl"). Example: `write_records(out, "sft.jsonl")`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            json.dump(records, f, ensure_ascii=False, indent=1)
            f.write("\n")


def convert_llava_file(
    src: str | Path, dst: str | Path, image_root: str | None = None, progress: bool = True
) -> ConvertReport:
    """Read LLaVA records from `src`, write the messages-format records to `dst`, return the report.

    Example: `report = convert_llava_file("llava_v1_5_mix665k.json", "sft.json", image_root="/data")`.
    """
    records = read_records(src)
    if not isinstance(records, list):
        raise ValueError(f"{src}: top level must be a list of records, got {type(records).__name__}")
    out, report = convert_llava(records, image_root, progress)
    write_records(out, dst)
    return report

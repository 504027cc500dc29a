"""transformers <-> mmkit state dicts for Qwen2.5-VL: pure name maps (plus one reshape).

`from_hf` accepts both layouts found in the wild: transformers >= 4.52 / 5.x
(`model.visual.*`, `model.language_model.*`, `lm_head.*`) and the original Qwen release on the Hub
(`visual.*`, `model.layers.*`, `model.embed_tokens.*`). `to_hf` writes the 5.x layout, or the
original one with `legacy=True`. The model never imports this file.

`ADAPTER` (`Qwen2_5_VLHF`, named by the registry spec's `hf` field) reads and writes whole transformers
folders with these maps: config.json, sharded safetensors + index, and the tokenizer / chat template /
processor / generation files, which travel with a converted checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mmkit.models.common.hf_io import (
    HFModel,
    check_keys,
    copy_side_files,
    load_state_dict,
    read_json,
    save_state_dict,
)
from mmkit.models.qwen2_5_vl.config import Qwen2_5_VLConfig

# (transformers name, mmkit name); "{}" is the block/layer index.
_VISION = [
    (
        "patch_embed.proj.weight",
        "patch_embed.weight",
    ),  # Conv3d kernel (D, C, T, P, P) <-> Linear (D, C*T*P*P)
    ("blocks.{}.norm1.weight", "blocks.{}.norm1.weight"),
    ("blocks.{}.norm2.weight", "blocks.{}.norm2.weight"),
    ("blocks.{}.attn.qkv.weight", "blocks.{}.attn.qkv.weight"),
    ("blocks.{}.attn.qkv.bias", "blocks.{}.attn.qkv.bias"),
    ("blocks.{}.attn.proj.weight", "blocks.{}.attn.proj.weight"),
    ("blocks.{}.attn.proj.bias", "blocks.{}.attn.proj.bias"),
    *[
        (f"blocks.{{}}.mlp.{p}.{t}", f"blocks.{{}}.mlp.{p}.{t}")
        for p in ("gate_proj", "up_proj", "down_proj")
        for t in ("weight", "bias")
    ],
    ("merger.ln_q.weight", "merger.norm.weight"),
    ("merger.mlp.0.weight", "merger.fc1.weight"),
    ("merger.mlp.0.bias", "merger.fc1.bias"),
    ("merger.mlp.2.weight", "merger.fc2.weight"),
    ("merger.mlp.2.bias", "merger.fc2.bias"),
]
_TEXT = [
    ("embed_tokens.weight", "embed_tokens.weight"),
    ("norm.weight", "norm.weight"),
    ("layers.{}.input_layernorm.weight", "layers.{}.attn_norm.weight"),
    ("layers.{}.post_attention_layernorm.weight", "layers.{}.mlp_norm.weight"),
    *[
        (f"layers.{{}}.self_attn.{p}.{t}", f"layers.{{}}.attn.{p}.{t}")
        for p in ("q_proj", "k_proj", "v_proj")
        for t in ("weight", "bias")
    ],
    ("layers.{}.self_attn.o_proj.weight", "layers.{}.attn.o_proj.weight"),
    *[
        (f"layers.{{}}.mlp.{p}.weight", f"layers.{{}}.mlp.{p}.weight")
        for p in ("gate_proj", "up_proj", "down_proj")
    ],
]


def _name_map(legacy: bool = False) -> list[tuple[str, str]]:
    vis, txt = ("visual.", "model.") if legacy else ("model.visual.", "model.language_model.")
    pairs = [(vis + h, "visual." + m) for h, m in _VISION]
    pairs += [(txt + h, "language." + m) for h, m in _TEXT]
    pairs.append(("lm_head.weight", "language.lm_head.weight"))
    return pairs


def _compile(pairs: list[tuple[str, str]], reverse: bool) -> list[tuple[re.Pattern, str]]:
    out = []
    for hf, mm in pairs:
        src, dst = (mm, hf) if reverse else (hf, mm)
        pattern = re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$")
        out.append((pattern, dst))
    return out


def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, dst in rules:
        m = pattern.match(name)
        if m:
            return dst.replace("{}", m.group(1)) if m.groups() else dst
    return None


def _is_legacy(sd: dict) -> bool:
    return any(k.startswith("visual.") or k.startswith("model.layers.") for k in sd)


def expected_hf_keys(cfg: Qwen2_5_VLConfig, legacy: bool = False) -> list[str]:
    """Every tensor name a transformers checkpoint of this config holds (lm_head absent when tied)."""
    keys = []
    for hf, _ in _name_map(legacy):
        if "{}" not in hf:
            keys.append(hf)
            continue
        n = cfg.vision.depth if "blocks.{}" in hf else cfg.text.num_hidden_layers
        keys += [hf.replace("{}", str(i)) for i in range(n)]
    if cfg.tie_word_embeddings:
        keys.remove("lm_head.weight")
    return keys


def from_hf(sd: dict[str, torch.Tensor], cfg: Qwen2_5_VLConfig) -> dict[str, torch.Tensor]:
    """transformers state dict -> mmkit `Qwen2_5_VLModel` state dict.

    Raises one clear error listing missing/unexpected keys. A tied `lm_head.weight` present in the
    file is dropped (mmkit ties it to the embedding). Example: `model.load_state_dict(from_hf(sd, cfg))`.
    """
    legacy = _is_legacy(sd)
    sd = dict(sd)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    check_keys(expected_hf_keys(cfg, legacy), sd.keys(), "Qwen2.5-VL checkpoint (transformers layout)")
    rules = _compile(_name_map(legacy), reverse=False)
    out = {}
    for name, t in sd.items():
        new = _rename(name, rules)
        assert new is not None, name  # check_keys covered every name
        if new == "visual.patch_embed.weight":
            t = t.reshape(t.shape[0], -1)
        out[new] = t
    if cfg.tie_word_embeddings:
        out["language.lm_head.weight"] = out["language.embed_tokens.weight"]
    return out


def to_hf(
    sd: dict[str, torch.Tensor], cfg: Qwen2_5_VLConfig, legacy: bool = False
) -> dict[str, torch.Tensor]:
    """mmkit state dict -> transformers state dict (5.x names, or the original Qwen names if `legacy`).

    Example: `save_state_dict(to_hf(model.state_dict(), cfg), "out", "model")`.
    """
    v = cfg.vision
    rules = _compile(_name_map(legacy), reverse=True)
    out, unknown = {}, []
    for name, t in sd.items():
        if cfg.tie_word_embeddings and name == "language.lm_head.weight":
            continue
        new = _rename(name, rules)
        if new is None:
            unknown.append(name)
            continue
        if name == "visual.patch_embed.weight":
            t = t.reshape(t.shape[0], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        out[new] = t
    if unknown:
        raise ValueError(
            f"to_hf: {len(unknown)} mmkit tensor(s) have no transformers name: {', '.join(unknown[:20])}"
        )
    check_keys(expected_hf_keys(cfg, legacy), out.keys(), "to_hf output")
    return out


# ---------------------------------------------------------------------------------------------------
# Whole folders: the family's HF adapter
# ---------------------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class Qwen2_5_VLHF:
    """transformers Qwen2.5-VL folders <-> mmkit (either key layout in, the 5.x layout out).

    Example: `m = ADAPTER.read(Path("Qwen2.5-VL-3B-Instruct"))`; `m.state["language.norm.weight"]`.
    """

    tied = ("language.lm_head.weight", "language.embed_tokens.weight")  # (head, embedding) when tied
    side_files = True  # config, tokenizer and processor files travel with a converted checkpoint

    def task(self, cfg: Qwen2_5_VLConfig) -> str:
        return "sft"

    def read_config(self, folder: Path) -> tuple[Qwen2_5_VLConfig, dict]:
        """(config, config.json dict), without reading weights."""
        d = read_json(folder / "config.json")
        return Qwen2_5_VLConfig.from_hf_dict(d), d

    def read(self, folder: Path, progress: bool = False, config=None) -> HFModel:
        """The model of `folder` as mmkit state; `config` = what `read_config` returned (not read again)."""
        cfg, d = config if config is not None else self.read_config(folder)
        state = from_hf(load_state_dict(folder, progress=progress), cfg)
        src = folder.resolve()
        return HFModel(cfg, d, state, f"{folder} (transformers layout)", source=src, hf_files=src)

    def run_config(self, src: Path | None, flavor: str, config_file: Path) -> tuple[Qwen2_5_VLConfig, dict]:
        """The model config of a training run that started from `src` (model.init_from), else from `flavor`."""
        if src is not None:
            d = read_json(src / "config.json", "config of model.init_from")
            return Qwen2_5_VLConfig.from_hf_dict(d), d
        cfg = _flavor(flavor)
        return cfg, cfg.to_hf_dict()

    def writer(self, src, *, layout: str, task: str, flavor: str | None, tokenizer_from, config_file: Path):
        """A `_QwenWriter`: config from `src` (or the run's `flavor`), tokenizer files from `tokenizer_from`
        or `src`; every source file is checked here, before any tensor is read."""
        return _QwenWriter(src, flavor, tokenizer_from, config_file)


def _flavor(name: str) -> Qwen2_5_VLConfig:
    from mmkit.models.qwen2_5_vl.config import flavor
    from mmkit.models.qwen2_5_vl.tiny import tiny_config

    return tiny_config() if name == "tiny" else flavor(name)


class _QwenWriter:
    """Qwen2.5-VL state -> transformers folder (config, shards, tokenizer/processor files)."""

    def __init__(self, src: Path | None, flavor: str | None, tokenizer_from, config_file: Path):
        self.src = src
        if src is None and flavor is None:  # a converted checkpoint of a flavor run: nothing to copy
            raise ValueError(
                f"{config_file.parent}: no config/tokenizer files are recorded for this Qwen2.5-VL checkpoint "
                "(its run started from a flavor); pass --init-from DIR, a Qwen2.5-VL folder with config.json "
                "and tokenizer files"
            )
        if src is not None:
            if not src.is_dir():
                raise FileNotFoundError(
                    f"model.init_from of {config_file} folder not found: {src}; pass --init-from DIR"
                )
            self.hf_config = read_json(src / "config.json", "config")
            self.cfg = Qwen2_5_VLConfig.from_hf_dict(self.hf_config)
        else:  # a run from a named flavor: the architecture is the flavor's
            self.cfg = _flavor(flavor)
            self.hf_config = self.cfg.to_hf_dict()
        self.checked_against = f"Qwen2.5-VL checkpoint vs {src / 'config.json' if src else 'its flavor'}"
        self.tok = Path(tokenizer_from) if tokenizer_from is not None else None
        if self.tok is not None and not self.tok.is_dir():
            raise FileNotFoundError(
                f"--tokenizer-from folder not found: {self.tok}; pass a folder with tokenizer.json / "
                "tokenizer_config.json"
            )
        tok_src = self.tok or self.src
        if tok_src is None:
            raise ValueError(
                f"{config_file}: the run started from flavor {flavor!r} without model.init_from, so "
                "there are no tokenizer files to copy; pass --tokenizer-from DIR (tokenizer_from=...), a "
                "Qwen2.5-VL folder whose tokenizer matches the model's vocabulary"
            )
        if not any((tok_src / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{tok_src} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass --tokenizer-from DIR"
            )

    def write(self, sd, out: Path, dtype, max_shard_bytes: int, progress: bool) -> None:
        save_state_dict(to_hf(sd, self.cfg), out, "model", max_shard_bytes, dtype, progress, "write model")
        config = dict(self.hf_config)
        # transformers 5 loads in the dtype config.json names: make it the one written
        if dtype is None:
            dtype = next(v.dtype for v in sd.values() if v.is_floating_point())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        for src in (self.src, self.tok):  # the tokenizer folder's files win over init_from's
            if src is not None:
                copy_side_files(src, out, skip=("config.json",))
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not (out / "generation_config.json").is_file():
            gen = {"bos_token_id": self.cfg.bos_token_id, "pad_token_id": self.cfg.pad_token_id}
            gen["eos_token_id"] = self.cfg.eos_token_ids
            (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


ADAPTER = Qwen2_5_VLHF()

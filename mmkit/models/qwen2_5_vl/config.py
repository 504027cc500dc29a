"""Qwen2.5-VL configuration: one dataclass per tower, read from a transformers `config.json`.

`Qwen2_5_VLConfig.from_hf_dict(json.load(...))` accepts both layouts transformers writes: the
original one (text fields at the top level, `rope_scaling`) and the 5.x one (`text_config`,
`rope_parameters`). `FLAVORS` holds the public sizes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mmkit.models.common.hf_io import read_json


@dataclass
class VisionConfig:
    """The ViT encoder (same for every flavor; only `out_hidden_size` follows the LLM width)."""

    depth: int = 32  # number of ViT blocks
    hidden_size: int = 1280  # ViT width
    intermediate_size: int = 3420  # SwiGLU hidden width
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14  # pixels per patch side
    temporal_patch_size: int = 2  # frames per patch (images are repeated to 2 frames)
    spatial_merge_size: int = 2  # 2x2 patches -> one LLM token
    window_size: int = 112  # window attention side, in pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # blocks with full (per-frame) attention
    out_hidden_size: int = 3584  # merger output = LLM hidden size
    tokens_per_second: int = 2  # M-RoPE time units per second of video
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6  # fixed in the reference code

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class TextConfig:
    """The Qwen2 decoder."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # rotary pairs given to (t, h, w); sums to head_dim/2
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class Qwen2_5_VLConfig:
    """Top level: both towers plus the special token ids."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise one clear error for an impossible config, naming the config.json field."""
        v, t = self.vision, self.text

        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"Qwen2.5-VL config: {msg}")

        need(
            v.hidden_size % v.num_heads == 0,
            f"vision_config.hidden_size={v.hidden_size} not divisible by num_heads={v.num_heads}",
        )
        need(
            v.head_dim % 4 == 0,
            f"vision head_dim={v.head_dim} must be a multiple of 4 (2-D rotary over h and w)",
        )
        need(
            all(0 <= i < v.depth for i in v.fullatt_block_indexes),
            f"vision_config.fullatt_block_indexes={list(v.fullatt_block_indexes)} must lie in [0, depth={v.depth})",
        )
        unit = v.spatial_merge_size * v.patch_size
        need(
            v.window_size % unit == 0,
            f"vision_config.window_size={v.window_size} must be a multiple of patch*merge={unit}",
        )
        need(
            v.out_hidden_size == t.hidden_size,
            f"vision_config.out_hidden_size={v.out_hidden_size} must equal text hidden_size={t.hidden_size}",
        )
        need(
            t.hidden_size % t.num_attention_heads == 0,
            f"hidden_size={t.hidden_size} not divisible by num_attention_heads={t.num_attention_heads}",
        )
        need(
            t.num_attention_heads % t.num_key_value_heads == 0,
            f"num_attention_heads={t.num_attention_heads} not divisible by num_key_value_heads={t.num_key_value_heads}",
        )
        need(
            len(t.mrope_section) == 3 and sum(t.mrope_section) * 2 == t.head_dim,
            f"rope mrope_section={list(t.mrope_section)} must have 3 entries summing to head_dim/2={t.head_dim // 2}",
        )
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            tok = getattr(self, name)
            need(
                0 <= tok < t.vocab_size, f"{name}={tok} is outside the vocabulary (vocab_size={t.vocab_size})"
            )

    @property
    def eos_token_ids(self) -> list[int]:
        """EOS ids as a list (config.json may hold an int or a list)."""
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @classmethod
    def from_hf_dict(cls, d: dict) -> Qwen2_5_VLConfig:
        """Build from a transformers config.json dict (either layout).

        Example: `cfg = Qwen2_5_VLConfig.from_hf_dict(json.load(open("Qwen2.5-VL-3B-Instruct/config.json")))`.
        """
        if d.get("model_type") not in (None, "qwen2_5_vl"):
            raise ValueError(f"config.json: model_type={d.get('model_type')!r}, expected 'qwen2_5_vl'")
        vd = dict(d.get("vision_config") or {})
        td = {
            **{k: v for k, v in d.items() if k not in ("vision_config", "text_config")},
            **(d.get("text_config") or {}),
        }
        rope = td.get("rope_parameters") or td.get("rope_scaling") or {}
        vrope = vd.get("rope_parameters") or {}
        vision = VisionConfig(
            **_pick(VisionConfig, vd, skip=("rope_theta", "fullatt_block_indexes")),
            fullatt_block_indexes=tuple(vd.get("fullatt_block_indexes", VisionConfig.fullatt_block_indexes)),
            rope_theta=float(vrope.get("rope_theta", VisionConfig.rope_theta)),
        )
        if "in_chans" in vd and "in_channels" not in vd:  # original Qwen naming
            vision.in_channels = int(vd["in_chans"])
        text = TextConfig(
            **_pick(TextConfig, td, skip=("rope_theta", "mrope_section")),
            rope_theta=float(rope.get("rope_theta", td.get("rope_theta", TextConfig.rope_theta))),
            mrope_section=tuple(rope.get("mrope_section", TextConfig.mrope_section)),
        )
        if text.num_key_value_heads is None:
            text.num_key_value_heads = text.num_attention_heads
        top = _pick(cls, td, skip=("vision", "text"))
        tie = d.get("tie_word_embeddings", (d.get("text_config") or {}).get("tie_word_embeddings", False))
        top["tie_word_embeddings"] = bool(tie)
        return cls(vision=vision, text=text, **top)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Qwen2_5_VLConfig:
        """Read `<path>/config.json`. Example: `Qwen2_5_VLConfig.from_pretrained("Qwen2.5-VL-7B-Instruct")`."""
        path = Path(path)
        return cls.from_hf_dict(read_json(path / "config.json" if path.is_dir() else path, "config"))

    def to_hf_dict(self) -> dict:
        """The transformers 5.x config.json dict (text_config / vision_config / rope_parameters).

        Example: `json.dump(cfg.to_hf_dict(), open("out/config.json", "w"))`.
        """
        v, t = self.vision, self.text
        vision = {k: getattr(v, k) for k in _fields(VisionConfig) if k not in ("rope_theta", "rms_norm_eps")}
        vision.update(
            model_type="qwen2_5_vl_vision",
            hidden_act="silu",
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            rope_parameters={"rope_theta": v.rope_theta, "rope_type": "axial"},
        )
        text = {k: getattr(t, k) for k in _fields(TextConfig) if k not in ("rope_theta", "mrope_section")}
        text.update(
            model_type="qwen2_5_vl_text",
            rope_parameters={
                "rope_type": "default",
                "type": "mrope",
                "mrope_section": list(t.mrope_section),
                "rope_theta": t.rope_theta,
            },
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text,
            "vision_config": vision,
            "tie_word_embeddings": self.tie_word_embeddings,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }


def _fields(klass) -> list[str]:
    return [f.name for f in dataclasses.fields(klass)]


def _pick(klass, d: dict, skip=()) -> dict:
    """The entries of `d` that are fields of `klass` (minus `skip`); unknown keys are ignored."""
    return {k: d[k] for k in _fields(klass) if k in d and k not in skip and d[k] is not None}


def _flavor(hidden, inter, layers, heads, kv, vocab, tie) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        vision=VisionConfig(out_hidden_size=hidden),
        text=TextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
        ),
        tie_word_embeddings=tie,
    )


# Public sizes, from each checkpoint's config.json on the Hugging Face Hub:
#   3B:  Qwen/Qwen2.5-VL-3B-Instruct   hidden 2048, inter 11008, 36 layers, 16 heads, 2 KV, vocab 151936, tied
#   7B:  Qwen/Qwen2.5-VL-7B-Instruct   hidden 3584, inter 18944, 28 layers, 28 heads, 4 KV, vocab 152064
#   32B: Qwen/Qwen2.5-VL-32B-Instruct  hidden 5120, inter 27648, 64 layers, 40 heads, 8 KV, vocab 152064
#   72B: Qwen/Qwen2.5-VL-72B-Instruct  hidden 8192, inter 29568, 80 layers, 64 heads, 8 KV, vocab 152064
# Vision tower for all: depth 32, width 1280, inter 3420, 16 heads, full attention in blocks 7/15/23/31,
# window 112 px, patch 14, temporal patch 2, merge 2, tokens_per_second 2; mrope_section [16, 24, 24].
FLAVORS: dict[str, callable] = {
    "3B": lambda: _flavor(2048, 11008, 36, 16, 2, 151936, True),
    "7B": lambda: _flavor(3584, 18944, 28, 28, 4, 152064, False),
    "32B": lambda: _flavor(5120, 27648, 64, 40, 8, 152064, False),
    "72B": lambda: _flavor(8192, 29568, 80, 64, 8, 152064, False),
}


def flavor(name: str) -> Qwen2_5_VLConfig:
    """A fresh config for a named public size. Example: `cfg = flavor("7B")`."""
    if name not in FLAVORS:
        raise ValueError(f"unknown Qwen2.5-VL flavor {name!r}; choose one of {', '.join(FLAVORS)}")
    return FLAVORS[name]()

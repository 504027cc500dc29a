"""Wan2.1 checkpoint layouts <-> mmkit, as pure state-dict maps.

Two external layouts are understood:
- diffusers (`WanTransformer3DModel`, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers/transformer);
- the original Wan2.1 release (`WanModel`, keys like `blocks.0.self_attn.q.weight`).

Each map is a table from an mmkit module to the external module(s) it is made of (today one
each: mmkit keeps q/k/v separate so tensor parallelism can shard them by heads; a list of several
would be a fused projection, concatenated along dim 0 on the way in and split evenly on the way out).
`{i}` is the block index. Nothing here builds a model.

`ADAPTER` (`WanHF`, named by the registry spec's `hf` field) reads and writes whole Hugging Face
folders with these maps: a diffusers pipeline (its trained `transformer/` plus the frozen VAE, umT5,
scheduler copied from the source pipeline) or the DiT alone in the original release layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmkit.models.common.hf_io import HFModel, load_state_dict, read_json, save_state_dict
from mmkit.models.wan.config import WanConfig

# mmkit module -> external module(s); applied to every `.weight` / `.bias` found.
_DIFFUSERS_TOP = {
    "patch_embed": ["patch_embedding"],
    "text_embed.fc1": ["condition_embedder.text_embedder.linear_1"],
    "text_embed.fc2": ["condition_embedder.text_embedder.linear_2"],
    "time_embed.fc1": ["condition_embedder.time_embedder.linear_1"],
    "time_embed.fc2": ["condition_embedder.time_embedder.linear_2"],
    "time_proj": ["condition_embedder.time_proj"],
    "image_embed.norm1": ["condition_embedder.image_embedder.norm1"],
    "image_embed.fc1": ["condition_embedder.image_embedder.ff.net.0.proj"],
    "image_embed.fc2": ["condition_embedder.image_embedder.ff.net.2"],
    "image_embed.norm2": ["condition_embedder.image_embedder.norm2"],
    "head.proj": ["proj_out"],
}
_DIFFUSERS_BLOCK = {
    "attn.q": ["attn1.to_q"],
    "attn.k": ["attn1.to_k"],
    "attn.v": ["attn1.to_v"],
    "attn.norm_q": ["attn1.norm_q"],
    "attn.norm_k": ["attn1.norm_k"],
    "attn.out": ["attn1.to_out.0"],
    "cross.q": ["attn2.to_q"],
    "cross.k": ["attn2.to_k"],
    "cross.v": ["attn2.to_v"],
    "cross.norm_q": ["attn2.norm_q"],
    "cross.norm_k": ["attn2.norm_k"],
    "cross.out": ["attn2.to_out.0"],
    "cross.k_img": ["attn2.add_k_proj"],
    "cross.v_img": ["attn2.add_v_proj"],
    "cross.norm_k_img": ["attn2.norm_added_k"],
    "norm_cross": ["norm2"],
    "mlp.fc1": ["ffn.net.0.proj"],
    "mlp.fc2": ["ffn.net.2"],
}
# bare parameters (no .weight/.bias suffix)
_DIFFUSERS_PARAMS = {
    "head.modulation": "scale_shift_table",
    "image_embed.pos_embed": "condition_embedder.image_embedder.pos_embed",
    "blocks.{i}.modulation": "blocks.{i}.scale_shift_table",
}
# diffusers keys that carry no weights mmkit uses (diffusers itself ignores them on load)
_DIFFUSERS_DROP = ("norm_added_q",)

_ORIGINAL_TOP = {
    "patch_embed": ["patch_embedding"],
    "text_embed.fc1": ["text_embedding.0"],
    "text_embed.fc2": ["text_embedding.2"],
    "time_embed.fc1": ["time_embedding.0"],
    "time_embed.fc2": ["time_embedding.2"],
    "time_proj": ["time_projection.1"],
    "image_embed.norm1": ["img_emb.proj.0"],
    "image_embed.fc1": ["img_emb.proj.1"],
    "image_embed.fc2": ["img_emb.proj.3"],
    "image_embed.norm2": ["img_emb.proj.4"],
    "head.proj": ["head.head"],
}
_ORIGINAL_BLOCK = {
    "attn.q": ["self_attn.q"],
    "attn.k": ["self_attn.k"],
    "attn.v": ["self_attn.v"],
    "attn.norm_q": ["self_attn.norm_q"],
    "attn.norm_k": ["self_attn.norm_k"],
    "attn.out": ["self_attn.o"],
    "cross.q": ["cross_attn.q"],
    "cross.k": ["cross_attn.k"],
    "cross.v": ["cross_attn.v"],
    "cross.norm_q": ["cross_attn.norm_q"],
    "cross.norm_k": ["cross_attn.norm_k"],
    "cross.out": ["cross_attn.o"],
    "cross.k_img": ["cross_attn.k_img"],
    "cross.v_img": ["cross_attn.v_img"],
    "cross.norm_k_img": ["cross_attn.norm_k_img"],
    "norm_cross": ["norm3"],  # the original calls its norms norm1 (attn), norm3 (cross), norm2 (ffn)
    "mlp.fc1": ["ffn.0"],
    "mlp.fc2": ["ffn.2"],
}
_ORIGINAL_PARAMS = {
    "head.modulation": "head.modulation",
    "image_embed.pos_embed": "img_emb.emb_pos",
    "blocks.{i}.modulation": "blocks.{i}.modulation",
}

LAYOUTS = {
    "diffusers": (_DIFFUSERS_TOP, _DIFFUSERS_BLOCK, _DIFFUSERS_PARAMS, _DIFFUSERS_DROP),
    "original": (_ORIGINAL_TOP, _ORIGINAL_BLOCK, _ORIGINAL_PARAMS, ()),
}


def _name_pairs(num_layers: int, layout: str) -> list[tuple[str, list[str]]]:
    """Every (mmkit param, [external params]) pair a model of `num_layers` blocks can have."""
    top, block, params, _ = LAYOUTS[layout]
    mods = list(top.items())
    for i in range(num_layers):
        mods += [(f"blocks.{i}.{m}", [f"blocks.{i}.{s}" for s in srcs]) for m, srcs in block.items()]
    pairs = [(f"{m}.{suf}", [f"{s}.{suf}" for s in srcs]) for m, srcs in mods for suf in ("weight", "bias")]
    for m, s in params.items():
        if "{i}" in m:
            pairs += [(m.format(i=i), [s.format(i=i)]) for i in range(num_layers)]
        else:
            pairs.append((m, [s]))
    return pairs


def _num_layers(sd: dict, prefix: str = "blocks.") -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def detect_layout(sd: dict) -> str:
    """'diffusers' or 'original', from the key names of a Wan DiT state dict."""
    keys = list(sd)
    if any(".self_attn." in k or k.startswith("text_embedding.") for k in keys):
        return "original"
    if any(".attn1." in k or k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    raise ValueError(
        "not a Wan2.1 DiT checkpoint: found neither original keys (blocks.N.self_attn.*) "
        f"nor diffusers keys (blocks.N.attn1.*); first keys: {keys[:5]}"
    )


def _to_mm(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    drop = LAYOUTS[layout][3]
    out, used = {}, set()
    for mm, srcs in _name_pairs(_num_layers(sd), layout):
        if all(s in sd for s in srcs):
            out[mm] = sd[srcs[0]] if len(srcs) == 1 else torch.cat([sd[s] for s in srcs], dim=0)
            used.update(srcs)
    unexpected = sorted(k for k in sd if k not in used and not any(d in k for d in drop))
    if unexpected:
        shown = ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else "")
        raise ValueError(
            f"{layout} Wan checkpoint: {len(unexpected)} unexpected key(s) mmkit cannot map: {shown}"
        )
    return out


def _from_mm(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    out = {}
    for mm, srcs in _name_pairs(_num_layers(sd), layout):
        if mm in sd:
            parts = sd[mm].chunk(len(srcs), dim=0) if len(srcs) > 1 else [sd[mm]]
            out.update({s: p.clone() if len(srcs) > 1 else p for s, p in zip(srcs, parts)})
    missing = sorted(set(sd) - {mm for mm, _ in _name_pairs(_num_layers(sd), layout)})
    if missing:
        raise ValueError(f"mmkit Wan state dict has key(s) with no {layout} name: {', '.join(missing[:20])}")
    return out


def from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `WanTransformer3DModel` state dict -> mmkit `WanTransformer` state dict.

    Example: `model.load_state_dict(from_hf(load_state_dict("Wan2.1-T2V-1.3B-Diffusers/transformer")))`.
    """
    return _to_mm(sd, "diffusers")


def to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmkit `WanTransformer` state dict -> diffusers `WanTransformer3DModel` state dict.

    Example: `save_state_dict(to_hf(model.state_dict()), "out/transformer", "diffusion_pytorch_model")`.
    """
    return _from_mm(sd, "diffusers")


def from_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan2.1 release (`WanModel`) state dict -> mmkit. Example: `from_original(load_file(p))`."""
    return _to_mm(sd, "original")


def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmkit state dict -> original Wan2.1 release key names. Example: `to_original(model.state_dict())`."""
    return _from_mm(sd, "original")


def config_from_original(d: dict, sd: dict | None = None) -> WanConfig:
    """Original release config.json (`WanModel`: dim, num_heads, in_dim, model_type, ...) -> WanConfig.

    The release config does not list the text/time/CLIP widths (they are fixed in its code: 4096,
    256, 1280); when the original-layout state dict `sd` is given they are read off its shapes.
    Example: `config_from_original({"dim": 1536, "num_heads": 12, "model_type": "t2v", ...})`.
    """
    needed = ("dim", "num_heads", "ffn_dim", "num_layers")
    lacking = [k for k in needed if k not in d]
    if lacking:
        raise ValueError(f"original Wan config.json lacks field(s) {lacking}; expected a WanModel config")
    model_type = d.get("model_type", "t2v")
    image = model_type in ("i2v", "flf2v")
    d = dict(d)
    if sd is not None:  # widths the release config leaves implicit
        d.setdefault("text_dim", sd["text_embedding.0.weight"].shape[1])
        d.setdefault("freq_dim", sd["time_embedding.0.weight"].shape[1])
        if "img_emb.proj.0.weight" in sd:
            d.setdefault("image_dim", sd["img_emb.proj.0.weight"].shape[0])
    return WanConfig(
        num_attention_heads=d["num_heads"],
        attention_head_dim=d["dim"] // d["num_heads"],
        in_channels=d.get("in_dim", 36 if image else 16),
        out_channels=d.get("out_dim", 16),
        text_dim=d.get("text_dim", 4096),
        freq_dim=d.get("freq_dim", 256),
        ffn_dim=d["ffn_dim"],
        num_layers=d["num_layers"],
        cross_attn_norm=d.get("cross_attn_norm", True),
        eps=d.get("eps", 1e-6),
        image_dim=d.get("image_dim", 1280) if image else None,
        added_kv_proj_dim=d["dim"] if image else None,
        pos_embed_seq_len=2 * 257 if model_type == "flf2v" else None,
        text_len=d.get("text_len", 512),
    ).validate()


def config_to_original(cfg: WanConfig) -> dict:
    """WanConfig -> original release config.json dict."""
    model_type = "flf2v" if cfg.pos_embed_seq_len else ("i2v" if cfg.image_dim else "t2v")
    return {
        "_class_name": "WanModel",
        "model_type": model_type,
        "dim": cfg.dim,
        "num_heads": cfg.num_attention_heads,
        "in_dim": cfg.in_channels,
        "out_dim": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "eps": cfg.eps,
        "text_len": cfg.text_len,
        "patch_size": list(cfg.patch_size),
    }


# ---------------------------------------------------------------------------------------------------
# Whole folders: the family's HF adapter
# ---------------------------------------------------------------------------------------------------
DIT_STEM = "diffusion_pytorch_model"  # diffusers' weight file name


def _need_folder(path: Path | None, what: str, fix: str) -> Path:
    if path is None:
        raise ValueError(f"{what} is not set; {fix}")
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}; {fix}")
    return path


class WanHF:
    """Wan2.1 Hugging Face folders <-> mmkit: a diffusers pipeline folder, its `transformer/` folder, or an
    original-release DiT folder. Example: `m = ADAPTER.read(Path("Wan2.1-T2V-1.3B-Diffusers"))`."""

    tied = None  # no tied weights
    side_files = False  # the frozen parts stay in the source pipeline folder, referenced by path

    def task(self, cfg: WanConfig) -> str:
        """The task a DiT config is for: i2v when it has image cross-attention."""
        return "i2v" if cfg.image_dim is not None else "t2v"

    @staticmethod
    def _dit(folder: Path) -> Path:
        return folder / "transformer" if (folder / "model_index.json").is_file() else folder

    def read_config(self, folder: Path) -> tuple[WanConfig, dict] | None:
        """(config, config.json dict) without reading weights; None for an original-release folder, whose
        config leaves some widths to the weights' shapes."""
        d = read_json(self._dit(folder) / "config.json", "Wan transformer config")
        if d.get("_class_name") == "WanModel":
            return None
        return WanConfig.from_dict(d).validate(), d

    def read(self, folder: Path, progress: bool = False, config=None) -> HFModel:
        """The DiT of `folder` as mmkit state; `config` = what `read_config` returned (not read again)."""
        pipeline = (folder / "model_index.json").is_file()
        dit = self._dit(folder)
        source = (
            folder
            if pipeline
            else (folder.parent if (folder.parent / "model_index.json").is_file() else None)
        )
        sd = load_state_dict(dit, progress=progress)
        layout = detect_layout(sd)
        cfg, d = (
            config if config is not None else (None, read_json(dit / "config.json", "Wan transformer config"))
        )
        if layout == "original" or d.get("_class_name") == "WanModel":
            cfg = config_from_original(d, sd)  # widths the release config leaves to the weights
            d = cfg.to_dict()
        elif cfg is None:
            cfg = WanConfig.from_dict(d).validate()
        state = from_hf(sd) if layout == "diffusers" else from_original(sd)
        return HFModel(cfg, d, state, f"{dit} ({layout} layout)", source.resolve() if source else None)

    def run_config(self, src: Path | None, flavor: str, config_file: Path) -> tuple[WanConfig, dict]:
        """The model config of a training run that started from `src` (its model.init_from pipeline)."""
        if src is None:
            raise ValueError(f"{config_file}: model.init_from is not set; pass --init-from DIR")
        d = read_json(src / "transformer" / "config.json", "Wan transformer config of model.init_from")
        return WanConfig.from_dict(d).validate(), d

    def writer(self, src, *, layout: str, task: str, flavor: str, tokenizer_from, config_file: Path):
        """A `_WanWriter` for a DiT trained from pipeline `src`; every source file is checked here, before
        any tensor is read. `tokenizer_from` / `flavor` do not apply to Wan."""
        return _WanWriter(src, layout, task, config_file)


class _WanWriter:
    """Wan DiT state -> diffusers pipeline folder (or the DiT alone in the original layout)."""

    def __init__(self, src: Path | None, layout: str, task: str, config_file: Path):
        self.layout = layout
        fix = "pass --init-from DIR (init_from=...): the diffusers Wan folder the run started from"
        self.src = _need_folder(src, f"model.init_from of {config_file}", fix)
        self.index = read_json(
            self.src / "model_index.json", "pipeline index (model_index.json) of model.init_from"
        )
        # components = model_index entries of the form [library, class]; transformer is the trained part
        self.components = [k for k, v in self.index.items() if isinstance(v, list) and k != "transformer"]
        missing = [c for c in self.components if not (self.src / c).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{self.src}: model_index.json lists component folder(s) {missing} that are missing"
            )
        self.dit_config = read_json(self.src / "transformer" / "config.json", "Wan transformer config")
        self.cfg = WanConfig.from_dict(self.dit_config)
        self.checked_against = f"Wan DiT checkpoint vs {self.src / 'transformer' / 'config.json'}"
        if (task == "i2v") != (self.cfg.image_dim is not None):
            raise ValueError(
                f"{config_file}: model.task={task!r} but {self.src}/transformer is a "
                f"{'t2v' if self.cfg.image_dim is None else 'i2v'} DiT; --init-from must be the run's folder"
            )

    def write(self, sd, out: Path, dtype, max_shard_bytes: int, progress: bool) -> None:
        if self.layout == "original":
            save_state_dict(to_original(sd), out, DIT_STEM, max_shard_bytes, dtype, progress, "write DiT")
            (out / "config.json").write_text(json.dumps(config_to_original(self.cfg), indent=2) + "\n")
            return
        dit = out / "transformer"
        save_state_dict(to_hf(sd), dit, DIT_STEM, max_shard_bytes, dtype, progress, "write transformer")
        (dit / "config.json").write_text(json.dumps(self.dit_config, indent=2) + "\n")
        for name in tqdm(self.components, desc="copy frozen components", disable=not progress):
            shutil.copytree(self.src / name, out / name)
        shutil.copy2(self.src / "model_index.json", out / "model_index.json")


ADAPTER = WanHF()

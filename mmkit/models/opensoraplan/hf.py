"""OpenSoraPlan 1.3 DiT checkpoints <-> mmkit, as pure state-dict maps, and the family's HF adapter.

The release layout (LanguageBind/Open-Sora-Plan-v1.3.0, `any93x640x640/`, `any93x640x640_i2v/`) is a
diffusers-style folder: `config.json` (`_class_name` OpenSoraT2V_v1_3 / OpenSoraInpaint_v1_3) and
`diffusion_pytorch_model.safetensors` with the original module names (`transformer_blocks.N.attn1.to_q`,
`adaln_single.linear`, ...). A pipeline folder (`model_index.json` with the DiT under `transformer/`,
beside vae/, text_encoder/, tokenizer/, scheduler/) holds the same DiT folder.

Each map is a table from an mmkit module to the release module; `{i}` is the block index. Nothing
here builds a model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmkit.models.common.hf_io import HFModel, load_state_dict, read_json, save_state_dict
from mmkit.models.opensoraplan.config import I2V_CLASS, T2V_CLASS, OSPConfig

CLASSES = (T2V_CLASS, I2V_CLASS)
DIT_STEM = "diffusion_pytorch_model"

# mmkit module -> release module; applied to `.weight` / `.bias` when present
_TOP = {
    "patch_embed.proj": "pos_embed.proj",
    "masked_embed.proj": "pos_embed_masked_hidden_states.0.proj",
    "masked_embed.fc": "pos_embed_masked_hidden_states.1",
    "mask_embed.proj": "pos_embed_mask.0.proj",
    "mask_embed.fc": "pos_embed_mask.1",
    "text_embed.fc1": "caption_projection.linear_1",
    "text_embed.fc2": "caption_projection.linear_2",
    "time_embed.fc1": "adaln_single.emb.timestep_embedder.linear_1",
    "time_embed.fc2": "adaln_single.emb.timestep_embedder.linear_2",
    "time_proj": "adaln_single.linear",
    "head.proj": "proj_out",
}
_BLOCK = {
    "attn.q": "attn1.to_q",
    "attn.k": "attn1.to_k",
    "attn.v": "attn1.to_v",
    "attn.out": "attn1.to_out.0",
    "cross.q": "attn2.to_q",
    "cross.k": "attn2.to_k",
    "cross.v": "attn2.to_v",
    "cross.out": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
# bare parameters (no .weight/.bias suffix)
_PARAMS = {
    "head.modulation": "scale_shift_table",
    "blocks.{i}.modulation": "transformer_blocks.{i}.scale_shift_table",
}


def _name_pairs(num_layers: int) -> list[tuple[str, str]]:
    """Every (mmkit name, release name) pair a model of `num_layers` blocks can have."""
    mods = list(_TOP.items())
    for i in range(num_layers):
        mods += [(f"blocks.{i}.{m}", f"transformer_blocks.{i}.{s}") for m, s in _BLOCK.items()]
    pairs = [(f"{m}.{suf}", f"{s}.{suf}") for m, s in mods for suf in ("weight", "bias")]
    for m, s in _PARAMS.items():
        pairs += [(m.format(i=i), s.format(i=i)) for i in range(num_layers)] if "{i}" in m else [(m, s)]
    return pairs


def _num_layers(sd: dict, prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def _convert(sd: dict[str, torch.Tensor], pairs: list[tuple[str, str]], what: str) -> dict[str, torch.Tensor]:
    out = {dst: sd[src] for src, dst in pairs if src in sd}
    unexpected = sorted(set(sd) - {src for src, _ in pairs})
    if unexpected:
        shown = ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else "")
        raise ValueError(f"{what}: {len(unexpected)} key(s) with no OpenSoraPlan 1.3 name: {shown}")
    return out


def from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release (`OpenSoraT2V_v1_3` / `OpenSoraInpaint_v1_3`) state dict -> mmkit `OpenSoraPlanTransformer`.

    Example: `model.load_state_dict(from_hf(load_state_dict("any93x640x640")))`.
    """
    pairs = [(s, m) for m, s in _name_pairs(_num_layers(sd, "transformer_blocks."))]
    return _convert(sd, pairs, "release OpenSoraPlan checkpoint")


def to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmkit state dict -> release key names. Example: `save_state_dict(to_hf(model.state_dict()), out, DIT_STEM)`."""
    return _convert(sd, _name_pairs(_num_layers(sd, "blocks.")), "mmkit OpenSoraPlan state dict")


def dit_folder(folder: Path) -> Path:
    """The DiT folder of a release DiT folder or of a pipeline folder (its `transformer/`)."""
    return folder / "transformer" if (folder / "model_index.json").is_file() else folder


def is_osp_dit(folder: Path) -> bool:
    """Does `folder` (a DiT folder) hold an OpenSoraPlan 1.3 DiT config?"""
    f = folder / "config.json"
    return f.is_file() and read_json(f).get("_class_name") in CLASSES


# ---------------------------------------------------------------------------------------------------
# Whole folders: the family's HF adapter
# ---------------------------------------------------------------------------------------------------
class OpenSoraPlanHF:
    """OpenSoraPlan release folders <-> mmkit: the DiT folder alone (`config.json` +
    `diffusion_pytorch_model.safetensors`) or a pipeline folder with the DiT under `transformer/`.
    Example: `m = ADAPTER.read(Path("Open-Sora-Plan-v1.3.0/any93x640x640"))`."""

    tied = None  # no tied weights
    side_files = False  # frozen parts (VAE, mT5) stay in the source pipeline folder, referenced by path

    def task(self, cfg: OSPConfig) -> str:
        """The task a DiT config is for: i2v for the inpainting class."""
        return "i2v" if cfg.i2v else "t2v"

    def read_config(self, folder: Path) -> tuple[OSPConfig, dict]:
        d = read_json(dit_folder(folder) / "config.json", "OpenSoraPlan transformer config")
        return OSPConfig.from_dict(d), d

    def read(self, folder: Path, progress: bool = False, config=None) -> HFModel:
        """The DiT of `folder` as mmkit state; `config` = what `read_config` returned (not read again)."""
        dit = dit_folder(folder)
        cfg, d = config if config is not None else self.read_config(folder)
        state = from_hf(load_state_dict(dit, stem=DIT_STEM, progress=progress))
        pipeline = (folder / "model_index.json").is_file() or (dit.parent / "model_index.json").is_file()
        source = (dit.parent if dit.name == "transformer" else folder) if pipeline else dit
        return HFModel(cfg, d, state, f"{dit} (release layout)", source.resolve())

    def run_config(self, src: Path | None, flavor: str, config_file: Path) -> tuple[OSPConfig, dict]:
        """The model config of a training run: its model.init_from folder's config, else its flavor."""
        if src is not None:
            return self.read_config(src)
        from mmkit import registry

        cfg = registry.get("opensoraplan").flavor(flavor)
        return cfg, cfg.to_dict()

    def writer(self, src, *, layout: str, task: str, flavor: str, tokenizer_from, config_file: Path):
        """A `_OSPWriter` for a DiT trained from folder `src` (or from `flavor` when src is None)."""
        return _OSPWriter(src, task, flavor, config_file)


class _OSPWriter:
    """OSP DiT state -> the release DiT folder, or a whole pipeline folder when the source is one."""

    def __init__(self, src: Path | None, task: str, flavor: str | None, config_file: Path):
        self.src = Path(src) if src is not None else None
        if self.src is not None and not self.src.is_dir():
            raise FileNotFoundError(
                f"model.init_from of {config_file} ({self.src}) is not a folder; pass --init-from DIR: the "
                "OpenSoraPlan folder the run started from"
            )
        self.pipeline = self.src is not None and (self.src / "model_index.json").is_file()
        if self.src is not None:
            self.cfg, self.dit_config = OpenSoraPlanHF().read_config(self.src)
            self.checked_against = f"OpenSoraPlan DiT checkpoint vs {dit_folder(self.src) / 'config.json'}"
        else:
            from mmkit import registry

            if not flavor:
                raise ValueError(
                    f"{config_file}: neither model.init_from nor model.flavor is set; pass --init-from DIR"
                )
            self.cfg = registry.get("opensoraplan").flavor(flavor)
            self.dit_config = self.cfg.to_dict()
            self.checked_against = f"OpenSoraPlan DiT checkpoint vs flavor {flavor!r}"
        if task != ("i2v" if self.cfg.i2v else "t2v"):
            raise ValueError(
                f"{config_file}: model.task={task!r} but the config is a {'i2v' if self.cfg.i2v else 't2v'} "
                "OpenSoraPlan DiT; --init-from must be the run's folder"
            )

    def write(self, sd, out: Path, dtype, max_shard_bytes: int, progress: bool) -> None:
        dit = out / "transformer" if self.pipeline else out
        save_state_dict(to_hf(sd), dit, DIT_STEM, max_shard_bytes, dtype, progress, "write DiT")
        (dit / "config.json").write_text(json.dumps(self.dit_config, indent=2) + "\n")
        if not self.pipeline:
            return
        index = read_json(self.src / "model_index.json", "pipeline index (model_index.json)")
        parts = [k for k, v in index.items() if isinstance(v, list) and k != "transformer"]
        for name in tqdm(parts, desc="copy frozen components", disable=not progress):
            if (self.src / name).is_dir():
                shutil.copytree(self.src / name, out / name)
        shutil.copy2(self.src / "model_index.json", out / "model_index.json")


ADAPTER = OpenSoraPlanHF()

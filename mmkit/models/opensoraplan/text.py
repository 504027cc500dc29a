"""OpenSoraPlan 1.3 text encoder: mT5 (XXL in the release) through transformers, with its tokenizer.

Prompts are tokenized to exactly `max_length` (512) tokens with padding and truncation, as the
release pipeline does; the encoder sees the attention mask and its `last_hidden_state` (B, 512, 4096)
goes to the DiT together with the mask (the DiT turns it into a cross-attention bias). The release
folder holds `text_encoder/` (an `MT5EncoderModel`, or a full T5 checkpoint whose encoder is read) and
`tokenizer/` (a T5 / mT5 sentencepiece tokenizer).

Example:
    >>> enc = MT5TextEncoder.from_folder("Open-Sora-Plan-v1.3.0")   # text_encoder/ + tokenizer/
    >>> feats, mask = enc(["a red panda climbs a tree"])           # (1, 512, 4096), (1, 512)
"""

from __future__ import annotations

from pathlib import Path

import torch

MAX_LENGTH = 512  # the release pipeline's max_sequence_length


class MT5TextEncoder(torch.nn.Module):
    """mT5 encoder + tokenizer: prompts -> (features (B, L, D), attention mask (B, L) int64).

    A module (the encoder is its submodule), so `.to()`, `.eval()` and `.requires_grad_(False)` apply.
    """

    def __init__(self, model, tokenizer, max_length: int = MAX_LENGTH):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    @classmethod
    def from_folder(cls, folder, device="cpu", dtype=torch.float32, max_length: int = MAX_LENGTH):
        """Load `text_encoder/` and `tokenizer/` of a pipeline folder (or a folder holding both files).

        Example: `MT5TextEncoder.from_folder("osp_tiny", device="cuda", dtype=torch.bfloat16)`.
        """
        from transformers import AutoConfig, AutoTokenizer, MT5EncoderModel, T5EncoderModel

        folder = Path(folder)
        enc_dir = folder / "text_encoder" if (folder / "text_encoder").is_dir() else folder
        tok_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
        for d, what in ((enc_dir, "config.json"), (tok_dir, None)):
            if not d.is_dir() or (what and not (d / what).is_file()):
                raise FileNotFoundError(
                    f"{d}: the mT5 {'text encoder' if what else 'tokenizer'} folder is missing; an "
                    "OpenSoraPlan folder holds text_encoder/ (config.json + weights) and tokenizer/"
                )
        model_type = AutoConfig.from_pretrained(enc_dir).model_type
        if model_type not in ("mt5", "t5", "umt5"):
            raise ValueError(
                f"{enc_dir / 'config.json'}: model_type={model_type!r}; the OpenSoraPlan text encoder is mT5"
            )
        cls_ = MT5EncoderModel if model_type == "mt5" else T5EncoderModel
        model = cls_.from_pretrained(enc_dir, torch_dtype=dtype).to(device)
        return cls(model, AutoTokenizer.from_pretrained(tok_dir), max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (last_hidden_state (B, max_length, D), mask (B, max_length) int64, 1 = real token)."""
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        return self.model(ids, attention_mask=mask).last_hidden_state, mask

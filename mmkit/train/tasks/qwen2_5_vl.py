"""Qwen2.5-VL supervised fine-tuning task: a batch of conversations (+ images/videos) in, next-token
cross-entropy on the assistant tokens out.

The trainer only sees `task.model` and `task.loss(batch, g)`. Two batch layouts:
- padded (`SFTCollator`): rows (B, L) with an attention_mask; the model masks the padding.
- packed (`PackingCollator`, `data.packing = true`): rows plus "cu_seqlens". The real tokens of all
  rows are read into one flat row (1, N), and the model attends causally inside each sample only
  (M-RoPE positions restart per sample, each sample's first label is -100). No padding token is
  embedded, projected or attended: this is the throughput lever.
Either way the LM head runs only at positions whose next label is supervised: the loss needs no
other logits, and at a 150k vocabulary the head is the largest matmul of a short-answer SFT batch.
The loss equals `losses.next_token_ce_sum(full_logits, labels)` (the unit tests check it).

Freeze switches (`model.freeze_vision` / `freeze_merger` / `freeze_llm`) set requires_grad False on
the vision blocks (+ patch embedding), the patch merger, and the language model (embeddings, decoder,
final norm, LM head); the optimizer builder only takes trainable parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmkit.common import LossOut
from mmkit.train import losses as L

_MEDIA = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass
class VLMTaskConfig:
    freeze_vision: bool = False  # patch embedding + ViT blocks
    freeze_merger: bool = False  # 2x2 patch merger (vision -> LLM projector)
    freeze_llm: bool = False  # embeddings, decoder layers, final norm, LM head


def freeze_parts(model, cfg: VLMTaskConfig) -> dict[str, int]:
    """Set requires_grad on every parameter from the switches; returns trainable counts per part.

    Example: `freeze_parts(model, VLMTaskConfig(freeze_vision=True))` -> `{"vision": 0, "merger": ..., "llm": ...}`.
    """
    parts = {
        "vision": ([model.visual.patch_embed, model.visual.blocks], cfg.freeze_vision),
        "merger": ([model.visual.merger], cfg.freeze_merger),
        "llm": ([model.language], cfg.freeze_llm),
    }
    counts = {}
    for name, (modules, frozen) in parts.items():
        n = 0
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(not frozen)
                n += 0 if frozen else p.numel()
        counts[name] = n
    return counts


class VLMSFTTask:
    """Example:
    task = VLMSFTTask(model, VLMTaskConfig(freeze_vision=True))
    out = task.loss(batch, torch.Generator())      # batch from SFTCollator or PackingCollator
    (out.loss_sum / out.count).backward()
    """

    # the cross-entropy every Qwen2.5-VL training forward reduces to (here, under a parallel plan
    # without tensor parallelism, in pipeline stages): `loss_fn(hidden, targets, head) -> (sum, count)`
    loss_fn = staticmethod(L.supervised_ce_sum)

    def __init__(self, model, cfg: VLMTaskConfig | None = None, processor=None):
        self.model, self.cfg = model, cfg or VLMTaskConfig()
        self.processor = processor  # tokenizer + image processor of the run (for build_data)
        freeze_parts(model, self.cfg)
        c, lang = model.cfg.text, model.language
        # Parameters a token passes through as matmuls: the LLM without its input lookup table
        # (parameters() yields a tied head/embedding once, and then it is the head's matmul).
        self._llm_matmul_params = sum(p.numel() for p in lang.parameters())
        if not model.cfg.tie_word_embeddings:
            self._llm_matmul_params -= lang.embed_tokens.weight.numel()
        self._attn_width = c.num_hidden_layers * c.num_attention_heads * c.head_dim

    def train_flops(self, samples: int, tokens: int) -> float:
        """Analytic FLOPs of forward + backward for `tokens` LLM tokens in `samples` samples:
        6 * (LLM matmul parameters) * tokens + 6 * layers * width * (tokens per sample) * tokens
        (causal attention scores and values, forward 2 matmuls x 2 flops x S/2, times 3 for backward).
        The vision tower is not counted. Example: `task.train_flops(8, 2048)`."""
        seq = tokens / max(samples, 1)
        return 6.0 * self._llm_matmul_params * tokens + 6.0 * self._attn_width * seq * tokens

    def prepare(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Model inputs + labels on the model's device. Packed (`cu_seqlens` in the batch): the real
        tokens of all rows as one flat row, {"input_ids" (1, N), "position_ids" (3, 1, N), "cu_seqlens"
        [ints], "labels" (1, N), media...}; padded: {"input_ids", "attention_mask", "position_ids",
        "labels", media...}. `generator` is unused (SFT has no randomness)."""
        dev = self.model.language.embed_tokens.weight.device
        prep = {k: batch[k].to(dev) for k in _MEDIA if k in batch}
        valid = batch["attention_mask"].bool()
        if "cu_seqlens" in batch:  # packed: the real tokens of all rows as one flat row (1, N)
            prep["input_ids"] = batch["input_ids"][valid][None].to(dev)
            prep["labels"] = batch["labels"][valid][None].to(dev)
            prep["position_ids"] = batch["position_ids"][:, valid][:, None].to(dev)  # (3, 1, N)
            prep["cu_seqlens"] = [int(c) for c in batch["cu_seqlens"].tolist()]
        else:
            for k in ("input_ids", "labels", "attention_mask", "position_ids"):
                prep[k] = batch[k].to(dev)
        return prep

    def forward(self, prep: dict) -> torch.Tensor:
        """Final-normed hidden states (B, S, D) of the prepared inputs."""
        kw = {k: v for k, v in prep.items() if k != "labels"}
        return self.model(**kw, return_hidden=True)

    def criterion(self, hidden: torch.Tensor, prep: dict, head_weight: torch.Tensor | None = None) -> LossOut:
        """Summed CE at supervised positions (the LM head runs only there) and its counters.

        `head_weight`: the LM head weight (vocab, D) to use instead of the module (`loss` passes the
        tied-weight alias of `_tied_head`)."""
        labels = prep["labels"]
        head = self.model.language.lm_head
        if head_weight is not None:  # W @ h^T: W is the matmul's first operand, so its gradient is new

            def head(h):  # (K, D) -> (K, vocab), a transposed view
                return torch.mm(head_weight, h.t()).t()

        # position i predicts token i + 1
        total, count = self.loss_fn(hidden[:, :-1], labels[:, 1:], head)
        if "cu_seqlens" in prep:
            samples, tokens = len(prep["cu_seqlens"]) - 1, labels.shape[1]
        else:
            samples, tokens = labels.shape[0], int(prep["attention_mask"].sum())
        return LossOut(total, count, samples, tokens)

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> LossOut:
        """Summed next-token CE over supervised positions and its count (`prepare`, model, `criterion`)."""
        prep = self.prepare(batch, generator)
        head = self._tied_head()
        if head is None:
            return self.criterion(self.forward(prep), prep)
        emb = self.model.language.embed_tokens
        sparse, emb.sparse = emb.sparse, True  # see `_tied_head`
        try:
            hidden = self.forward(prep)
        finally:
            emb.sparse = sparse
        return self.criterion(hidden, prep, head)

    def _tied_head(self) -> torch.Tensor | None:
        """An autograd alias of the tied embedding / LM head weight, made before the forward, or None.

        Why: the tied weight gets two gradients, a dense (vocab, D) one from the head and one from the
        token lookup; autograd sums them before they reach `.grad`. Left alone, the lookup's dense
        (vocab, D) gradient and the out-of-place sum are two more 1.2 GB tensors at a 151936 x 2048
        vocabulary, at the end of backward when every other gradient and the Adam state are alive (the
        step's memory peak). Instead the lookup runs with a sparse gradient (only its N rows), and the
        head reads the weight through this alias: made before the lookup, its backward runs after the
        lookup's, so the sparse rows are waiting when the dense gradient arrives and are added into it in
        place. Same sum, float rounding aside. Single-process plain tensors with gradients only (a
        parallel plan runs its own forward); None otherwise.
        """
        lang = self.model.language
        w = lang.embed_tokens.weight
        if not (
            lang.lm_head.weight is w
            and isinstance(lang.embed_tokens, torch.nn.Embedding)
            and type(w) is torch.nn.Parameter
            and w.requires_grad
            and torch.is_grad_enabled()
        ):
            return None
        return torch.ops.aten.alias.default(w)  # its backward passes the gradient on unchanged

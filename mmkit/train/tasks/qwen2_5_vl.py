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


# ---------------------------------------------------------------------------------------------------
# Builders named by the family spec (models/qwen2_5_vl/spec.py)


def build_task(cfg, device: torch.device) -> VLMSFTTask:
    """VLMSFTTask over a model loaded from `model.init_from` (transformers folder) or, for flavor "tiny"
    only, a random tiny model with a freshly built tiny tokenizer."""
    from mmkit.models.qwen2_5_vl.processor import Qwen2_5_VLProcessor
    from mmkit.train.build import mm_checkpoint

    m = cfg.model
    mm = mm_checkpoint(m.init_from) if m.init_from else None
    if mm is not None:  # an mmkit checkpoint: config + state from it, tokenizer from its HF side files
        from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel

        model = Qwen2_5_VLModel(mm.model_cfg)
        missing, unexpected = model.load_state_dict(mm.state, strict=False)
        tied = {"language.lm_head.weight"} if mm.model_cfg.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise ValueError(
                f"model.init_from={m.init_from}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        model.to(device)
        processor = Qwen2_5_VLProcessor.from_pretrained(str(mm.hf_files))
    elif m.init_from:
        from mmkit.models.qwen2_5_vl.load import load_model

        model = load_model(m.init_from, device=str(device), dtype="fp32")  # fp32 master weights
        processor = Qwen2_5_VLProcessor.from_pretrained(m.init_from)
    elif m.flavor == "tiny":
        import tempfile

        from mmkit.models.qwen2_5_vl.model import Qwen2_5_VLModel
        from mmkit.models.qwen2_5_vl.tiny import perturbed_init, tiny_config
        from mmkit.models.qwen2_5_vl.tokenizer import build_tiny_tokenizer

        with tempfile.TemporaryDirectory(prefix="mmkit-tiny-qwen-tokenizer-") as tok_dir:
            model = Qwen2_5_VLModel(tiny_config(build_tiny_tokenizer(tok_dir)))
            processor = Qwen2_5_VLProcessor.from_pretrained(tok_dir)  # read fully into memory
        perturbed_init(model, seed=cfg.train.seed)
        model.to(device)
    else:
        raise ValueError(
            f"model.flavor={m.flavor!r} without model.init_from: Qwen2.5-VL SFT needs a transformers folder "
            "(weights + tokenizer), e.g. --model.init_from /path/Qwen2.5-VL-7B-Instruct; only flavor 'tiny' "
            "can start from random weights"
        )
    model.train()
    tcfg = VLMTaskConfig(
        freeze_vision=m.freeze_vision, freeze_merger=m.freeze_merger, freeze_llm=m.freeze_llm
    )
    return VLMSFTTask(model, tcfg, processor=processor)


def build_data(cfg, task, rank: int = 0, world_size: int = 1):
    """(SFTDataset, ResumableSampler, DataLoader) with the padding or the packing collator."""
    from torch.utils.data import DataLoader

    from mmkit.data.sft import PackingCollator, SFTCollator, SFTDataset
    from mmkit.data.video import ResumableSampler

    d = cfg.data
    if not d.paths:
        raise ValueError(
            "data.paths: give SFT JSON/JSONL files, e.g. --data.paths outputs/shapes_qa/qa.json "
            "(`mmkit data synth shapes-qa outputs/shapes_qa` writes a synthetic set)"
        )
    ds = SFTDataset(
        d.paths,
        task.processor,
        cutoff_len=d.cutoff_len,
        max_samples=d.max_samples,
        media_root=d.media_root,
        tokens_per_second=task.model.cfg.vision.tokens_per_second,
        progress=False,
    )
    pad = ds.pad_token_id
    collate = PackingCollator(pad, max_len=d.cutoff_len) if d.packing else SFTCollator(pad)
    sampler = ResumableSampler(len(ds), seed=cfg.train.seed, rank=rank, world_size=world_size)
    loader = DataLoader(
        ds, batch_size=cfg.train.micro_batch, sampler=sampler, collate_fn=collate, num_workers=d.num_workers
    )
    return ds, sampler, loader

"""Chat turns with a vision-language model: the messages, the chat template, the streamed text.

`ChatSession` holds a model, its processor, the conversation so far and the images/videos the
conversation refers to; `ask` adds one user turn, generates the reply and keeps both. The CLI
(`mmkit chat`) and a server share it: neither holds chat logic of its own. Token generation itself
is `vlm.generate`; this file only turns text into its inputs and tokens back into text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mmkit.infer.vlm import Generation, SamplingParams, generate


def user_message(text: str, n_images: int = 0, n_videos: int = 0) -> dict:
    """A user turn: its images, then its videos, then the text (the processor expands the placeholders).

    Example: `user_message("What is shown?", n_images=1)`.
    """
    parts = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


class TextStream:
    """Incremental detokenization: `push(token_id)` returns the text the new token adds.

    The whole reply is decoded again at each token and only text past what was already given out is
    returned; a byte-level BPE token may end in half a character (decoded as U+FFFD), which is held
    back until a later token completes it.
    Example: `stream = TextStream(processor.decode); print(stream.push(tok), end="")`.
    """

    def __init__(self, decode: Callable[..., str]):
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""  # given out so far

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids, skip_special_tokens=True)
        # An incomplete character decodes to U+FFFD: hold it back until a later token completes it.
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        new, self.text = text[len(self.text) :], text
        return new


@dataclass
class ChatReply:
    """One answer: its text and the engine's output (token ids, prompt length, timings)."""

    text: str
    generation: Generation

    @property
    def token_ids(self) -> list[int]:
        return self.generation.tokens[0]

    @property
    def prompt_tokens(self) -> int:
        return self.generation.prompt_tokens[0]


class ChatSession:
    """A conversation with a VLM about images and videos.

    `params.eos_token_ids` empty: the model's `cfg.eos_token_ids` end each reply. Images and videos
    are file paths or what the processor takes (PIL images, frame arrays); a turn's media stay
    attached to the conversation for the turns after it.
    Example:
        >>> model, processor = load_vlm("Qwen2.5-VL-3B-Instruct")
        >>> chat = ChatSession(model, processor, SamplingParams(max_new_tokens=256))
        >>> chat.ask("What is in this picture?", images=["cat.png"], on_text=print).text
        >>> chat.ask("And its colour?").text  # the picture and the first answer are context
    """

    def __init__(self, model, processor, params: SamplingParams | None = None):
        params = params or SamplingParams()
        params.validate()
        if not params.eos_token_ids:
            params = dataclasses.replace(params, eos_token_ids=tuple(model.cfg.eos_token_ids))
        self.model, self.processor, self.params = model, processor, params
        self.messages: list[dict] = []
        self.images: list = []
        self.videos: list = []

    def ask(
        self,
        text: str,
        images: Sequence = (),
        videos: Sequence = (),
        on_text: Callable[[str], None] | None = None,
    ) -> ChatReply:
        """Add a user turn with `images`/`videos`, generate the reply, keep both in the conversation.

        `on_text(piece)` gets the reply's text as it is generated. If anything raises (an unreadable
        image, say), the conversation stays as it was.
        Example: `reply = chat.ask("Describe the video.", videos=["clip.mp4"])`.
        """
        turn = [*self.messages, user_message(text, len(images), len(videos))]
        all_images, all_videos = [*self.images, *images], [*self.videos, *videos]
        batch = self.processor(
            self.processor.apply_chat_template(turn), images=all_images or None, videos=all_videos or None
        )
        on_token = None
        if on_text is not None:
            stream = TextStream(self.processor.decode)

            def on_token(_row: int, token_id: int) -> None:
                piece = stream.push(token_id)
                if piece:
                    on_text(piece)

        out = generate(self.model, batch, self.params, on_token=on_token)
        reply = self.processor.decode(out.tokens[0], skip_special_tokens=True)
        self.messages = [*turn, {"role": "assistant", "content": reply}]
        self.images, self.videos = all_images, all_videos
        return ChatReply(reply, out)

    def reset(self) -> None:
        """Forget the conversation and its media."""
        self.messages, self.images, self.videos = [], [], []

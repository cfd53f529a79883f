"""The LLaMA-2 chat template and the ``<image>`` splice, as the reference produces them.

The checkpoint's ``tokenizer_config.json`` has no chat template, so the reference fell back to
transformers 4.36's class default for ``LlamaTokenizer`` (docs/model.md, "Prompt and chat template"), which later transformers
releases removed. It is written out here:

* a leading system message is folded into the first user turn as
  ``"<<SYS>>\\n" + system + "\\n<</SYS>>\\n\\n" + content``;
* user turn:      ``"<s>[INST] " + content.strip() + " [/INST]"``;
* assistant turn: ``" " + content.strip() + " </s>"``.

The rendered string is split on the literal ``<image>`` and each chunk is tokenized with BOS
(docs/model.md, "The image in the prompt"); the first chunk keeps its BOS, later chunks lose theirs, and the sentinel
``IMAGE_TOKEN_INDEX`` (-200) marks where the 1024 image embeddings go. Because chunk 0 starts
with a literal ``<s>`` that the tokenizer also maps to BOS, prompts begin with two BOS ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model.tokenizer import LlamaTokenizer

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


def render_llama2(messages: Sequence[Message], bos: str = "<s>", eos: str = "</s>") -> str:
    """Render a chat with transformers 4.36's default LLaMA template (no default system prompt)."""
    if not messages:
        raise ValueError("a chat needs at least one user message.")
    system: str | None = None
    turns = list(messages)
    if turns[0].role == "system":
        system, turns = turns[0].content, turns[1:]
    out = []
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg.role != expected:
            raise ValueError(
                f"chat roles must alternate user/assistant after the optional system message; "
                f"message {i} is {msg.role!r}, expected {expected!r}."
            )
        content = msg.content
        if i == 0 and system is not None:
            content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content
        if msg.role == "user":
            out.append(bos + "[INST] " + content.strip() + " [/INST]")
        else:
            out.append(" " + content.strip() + " " + eos)
    return "".join(out)


def tokenize_with_image(prompt: str, tokenizer: LlamaTokenizer) -> list[int]:
    """Ids of ``prompt`` with ``IMAGE_TOKEN_INDEX`` where each ``<image>`` was (reference rules)."""
    chunks = [tokenizer.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
    # The reference keeps chunk 0's BOS once, then drops the first id (BOS) of every chunk.
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids: list[int] = chunks[0][:offset]
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids

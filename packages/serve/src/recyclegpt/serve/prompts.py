"""Turning a completion prompt or a chat into token ids."""

from __future__ import annotations

from typing import Any

# Used when the tokenizer ships no chat template: one "role: content" line per message, then the
# assistant's turn is opened with "assistant:" for the model to continue.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat rendered with the tokenizer's template, or PLAIN_CHAT_TEMPLATE when it has none."""
    template = None if getattr(tokenizer, "chat_template", None) else PLAIN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    # Templates write special tokens (BOS and the like) as text themselves.
    return tokenizer(chat_text(tokenizer, messages), add_special_tokens=False)["input_ids"]


def encode_completion(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):  # already token ids
        return prompt
    return tokenizer(prompt)["input_ids"]

"""Conversations -> token ids with a mask of the assistant's tokens, through the model's own chat template.

Training (SFT, CMAT) and difficulty scoring compute loss on assistant turns only: user turns and
environment observations are context, not targets. The mask comes from character offsets of each
assistant message inside the rendered template, so it works for any chat template that writes message
contents verbatim, and it does not rely on the pad id (SmolLM2's pad token is its end-of-turn token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from cmat_pipeline.errors import DataError


@dataclass
class EncodedChat:
    input_ids: list[int]
    assistant_mask: list[int]  # 1 where the token is (part of) an assistant turn's content or its end-of-turn
    assistant_turn: list[int] | None = None  # which trained assistant turn (0, 1, ...) a token belongs to; -1 elsewhere

    @property
    def assistant_tokens(self) -> int:
        return sum(self.assistant_mask)

    def turn_starts(self) -> list[int]:
        """Index of each trained assistant turn's first token: the critic reads the state s_t just before it."""
        starts: dict[int, int] = {}
        for i, turn in enumerate(self.assistant_turn or []):
            if turn >= 0:
                starts.setdefault(turn, i)
        return [starts[t] for t in sorted(starts)]


def fixed_protocol_turns(messages: Sequence[dict[str, str]]) -> int:
    """Leading messages that are protocol, not decisions: AgentBench's prompt and its fixed "Ok." reply.

    They are context, never targets: a model trained on "Ok." learns to answer a long task with "Ok.".
    The OS and KG prompts end in a one-shot example, the same in every conversation: context as well."""
    from cmat_pipeline.envs import kg, os_interaction
    from cmat_pipeline.envs.dbbench import FIRST_REPLY, SYSTEM_PROMPT

    if len(messages) > 1 and messages[0].get("content") == SYSTEM_PROMPT and messages[1].get("content") == FIRST_REPLY:
        return 2
    return os_interaction.protocol_turns(messages) or kg.protocol_turns(messages)


def render(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False)


def assistant_spans(text: str, messages: Sequence[dict[str, str]], end_marker: str = "") -> list[tuple[int, int]]:
    """Character spans of each assistant message in the rendered `text` (plus the end-of-turn marker),
    leaving out the fixed protocol turns."""
    spans, cursor, skip = [], 0, fixed_protocol_turns(messages)
    for index, msg in enumerate(messages):
        pos = text.find(msg["content"], cursor)
        if pos < 0:
            raise DataError(f"chat template does not write message contents verbatim (role {msg['role']}); "
                            "cannot find the assistant turns to train on")
        end = pos + len(msg["content"])
        if msg["role"] == "assistant" and index >= skip:
            if end_marker and text.startswith(end_marker, end):
                end += len(end_marker)
            spans.append((pos, end))
        cursor = end
    return spans


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]], end_marker: str | None = None) -> EncodedChat:
    """Token ids of the templated conversation and the assistant-token mask."""
    text = render(tokenizer, messages)
    marker = tokenizer.eos_token if end_marker is None else end_marker
    spans = assistant_spans(text, messages, marker or "")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    turns, s = [], 0
    for start, end in enc["offset_mapping"]:
        while s < len(spans) and spans[s][1] <= start:
            s += 1
        inside = s < len(spans) and start < spans[s][1] and end > spans[s][0]
        turns.append(s if inside else -1)
    return EncodedChat(list(enc["input_ids"]), [int(t >= 0) for t in turns], turns)

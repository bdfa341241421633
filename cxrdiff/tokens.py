"""Which of the 77 text positions belong to a word: the bridge from "cardiomegaly" to attention maps.

CLIP's tokenizer lower-cases, splits letters, digits and punctuation into separate pieces and never
merges across whitespace, so the tokens of a prompt are the tokens of its whitespace-separated words
laid end to end after the start token. Each word is therefore tokenised alone (as the paper's code
did) and its span found by a running offset; we check that this reproduces the tokenised prompt.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from cxrdiff.errors import InputError

_EDGE = re.compile(r"^([^0-9a-z]*)(.*?)([^0-9a-z]*)$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class WordTokens:
    """One whitespace word of a prompt: its text, its bare form, and its token positions."""

    text: str  # as written, e.g. "effusion."
    bare: str  # lower-case, edge punctuation removed, e.g. "effusion"
    start: int  # first token position of the bare word in the padded sequence (1 = after SOT)
    stop: int  # one past its last token position

    @property
    def positions(self) -> list[int]:
        return list(range(self.start, self.stop))


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's token ids without start/end tokens (empty text: none)."""
    return list(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]) if text else []


def context_length(tokenizer: Any) -> int:
    """Positions the text encoder sees (77 for CLIP), start and end token included."""
    return int(tokenizer.model_max_length)


def prompt_words(tokenizer: Any, prompt: str) -> list[WordTokens]:
    """Every word of `prompt` with the token positions of its bare form (punctuation excluded)."""
    words: list[WordTokens] = []
    offset = 1  # position 0 is the start-of-text token
    for text in prompt.split():
        prefix, bare, suffix = _EDGE.match(text.lower()).groups()  # type: ignore[union-attr]
        n_prefix, n_bare, n_suffix = (len(_token_ids(tokenizer, part)) for part in (prefix, bare, suffix))
        n_word = len(_token_ids(tokenizer, text))
        if not bare or n_prefix + n_bare + n_suffix != n_word:  # punctuation only, or pieces interact
            n_prefix, n_bare = 0, n_word
        words.append(WordTokens(text, bare or text.lower(), offset + n_prefix, offset + n_prefix + n_bare))
        offset += n_word
    expected = _token_ids(tokenizer, prompt)
    if offset - 1 != len(expected):
        raise AssertionError(f"word-wise tokenisation of {prompt!r} differs from the whole prompt's")
    return words


def prompt_token_count(tokenizer: Any, prompt: str) -> int:
    """Tokens of `prompt` without start and end tokens (more than context - 2 means truncation)."""
    return len(_token_ids(tokenizer, prompt))


def word_token_spans(
    tokenizer: Any,
    prompt: str,
    word: str,
    *,
    missing: Literal["error", "empty"] = "error",
    truncation: Literal["error", "drop"] = "error",
) -> list[list[int]]:
    """Token positions of every occurrence of `word` (case-insensitive; a phrase matches whole words).

    Returns one list of positions per occurrence. Occurrences cut off by the context length raise,
    or with ``truncation="drop"`` are left out; never is a span silently clipped.
    """
    target = [_EDGE.match(w.lower()).group(2) for w in word.split()]  # type: ignore[union-attr]
    if not target or not all(target):
        raise InputError(f"--word {word!r}: no letters or digits to look for")
    words = prompt_words(tokenizer, prompt)
    limit = context_length(tokenizer) - 1  # the end token takes the last position
    spans: list[list[int]] = []
    for i in range(len(words) - len(target) + 1):
        window = words[i : i + len(target)]
        if [w.bare for w in window] != target:
            continue
        positions = [p for w in window for p in w.positions]
        if positions and positions[-1] >= limit:
            if truncation == "error":
                raise InputError(
                    f"word {word!r} lies at token {positions[-1]}, beyond the {limit - 1} text tokens the "
                    f"encoder sees in {prompt[:60]!r}...; shorten the prompt or drop truncated words"
                )
            continue
        spans.append(positions)
    if not spans and missing == "error":
        raise InputError(f"word {word!r} does not occur in the prompt {prompt!r}")
    return spans


def content_positions(tokenizer: Any, prompt: str) -> list[int]:
    """All word tokens of the prompt (no start, end or padding), within the context length."""
    limit = context_length(tokenizer) - 1
    return [p for p in range(1, 1 + prompt_token_count(tokenizer, prompt)) if p < limit]

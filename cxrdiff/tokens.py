"""Which text positions belong to a word: the bridge from "cardiomegaly" to attention maps.

Every tokenizer here is asked the same question: which positions of the encoded prompt (start token, word
pieces, end token, padding up to the encoder's context length) hold the pieces of each whitespace word. A fast
(Rust) tokenizer answers it directly with each piece's character span (its offset mapping), whatever its
vocabulary does inside a word: CLIP's BPE ("cardi ome gal y</w>"), BERT's WordPiece ("card ##iom ##egal ##y")
or SentencePiece. A tokenizer without offsets (a slow, Python-only one) is asked word by word, as the paper's
code did: CLIP's and BERT's tokenizers never merge across whitespace, so the tokens of a prompt are its words'
tokens laid end to end, which is checked against the whole prompt's tokenisation. On CLIP both ways give the
same positions (tests/test_tokens.py). The start and end tokens are whatever the tokenizer adds around a text
(CLIP's <|startoftext|> / <|endoftext|>, BERT's [CLS] / [SEP]).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from cxrdiff.errors import InputError

_EDGE = re.compile(r"^([^0-9a-z]*)(.*?)([^0-9a-z]*)$", re.DOTALL)
_WORD = re.compile(r"\S+")


@dataclasses.dataclass(frozen=True)
class WordTokens:
    """One whitespace word of a prompt: its text, its bare form, and its token positions."""

    text: str  # as written, e.g. "effusion."
    bare: str  # lower-case, edge punctuation removed, e.g. "effusion"
    start: int  # first token position of the bare word in the padded sequence (1 = after the start token)
    stop: int  # one past its last token position

    @property
    def positions(self) -> list[int]:
        return list(range(self.start, self.stop))


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's token ids without start/end tokens (empty text: none)."""
    return list(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]) if text else []


def context_length(tokenizer: Any) -> int:
    """Positions the text encoder sees (77 for CLIP, BERT's 512), start and end token included."""
    return int(tokenizer.model_max_length)


def special_counts(tokenizer: Any) -> tuple[int, int]:
    """(leading, trailing): how many special tokens the tokenizer puts before and after a text (1, 1 for CLIP's
    start/end and BERT's [CLS]/[SEP])."""
    mask = tokenizer("a", add_special_tokens=True, return_special_tokens_mask=True)["special_tokens_mask"]
    if 0 not in mask:
        return 0, 0
    first = mask.index(0)
    last = len(mask) - 1 - mask[::-1].index(0)
    return first, len(mask) - 1 - last


def text_limit(tokenizer: Any) -> int:
    """The first position a word token can no longer reach: the context less the end token(s) after the text."""
    return context_length(tokenizer) - special_counts(tokenizer)[1]


def prompt_words(tokenizer: Any, prompt: str) -> list[WordTokens]:
    """Every word of `prompt` with the token positions of its bare form (punctuation excluded): from the offset
    mapping where the tokenizer has one, else word by word."""
    if getattr(tokenizer, "is_fast", False):
        return prompt_words_by_offsets(tokenizer, prompt)
    return prompt_words_by_word(tokenizer, prompt)


def prompt_words_by_offsets(tokenizer: Any, prompt: str) -> list[WordTokens]:
    """Word positions from a fast tokenizer's offset mapping: a word's tokens are those whose character span
    overlaps it. Its bare form's tokens are those overlapping the bare span; when one of them reaches into
    the edge punctuation (a piece spans both), the whole word's tokens, as `prompt_words_by_word` does."""
    encoding = tokenizer(
        prompt, add_special_tokens=True, truncation=False, return_offsets_mapping=True, return_special_tokens_mask=True
    )
    content = [
        (i, int(s), int(e))
        for i, ((s, e), special) in enumerate(
            zip(encoding["offset_mapping"], encoding["special_tokens_mask"], strict=True)
        )
        if not special and e > s
    ]
    words: list[WordTokens] = []
    following = special_counts(tokenizer)[0]  # the position a word without tokens is given
    for match in _WORD.finditer(prompt):
        text, (low, high) = match.group(), match.span()
        prefix, bare, suffix = _EDGE.match(text.lower()).groups()  # type: ignore[union-attr]
        if len(text.lower()) != len(text):  # a character whose lower case is longer: no character arithmetic
            prefix, suffix = "", ""
        bare_low, bare_high = low + len(prefix), high - len(suffix)
        in_word = [i for i, s, e in content if s < high and e > low]
        in_bare = [(i, s, e) for i, s, e in content if s < bare_high and e > bare_low]
        positions = [i for i, _, _ in in_bare]
        if not bare or not positions or any(s < bare_low or e > bare_high for _, s, e in in_bare):
            positions = in_word
        if positions:
            words.append(WordTokens(text, bare or text.lower(), positions[0], positions[-1] + 1))
            following = in_word[-1] + 1
        else:
            words.append(WordTokens(text, bare or text.lower(), following, following))
    return words


def prompt_words_by_word(tokenizer: Any, prompt: str) -> list[WordTokens]:
    """Word positions by tokenising each word alone (the paper's code's way), for tokenizers without offsets;
    checked to reproduce the tokenised prompt."""
    words: list[WordTokens] = []
    offset = special_counts(tokenizer)[0]  # position 0 is the start-of-text token
    for text in prompt.split():
        prefix, bare, suffix = _EDGE.match(text.lower()).groups()  # type: ignore[union-attr]
        n_prefix, n_bare, n_suffix = (len(_token_ids(tokenizer, part)) for part in (prefix, bare, suffix))
        n_word = len(_token_ids(tokenizer, text))
        if not bare or n_prefix + n_bare + n_suffix != n_word:  # punctuation only, or pieces interact
            n_prefix, n_bare = 0, n_word
        words.append(WordTokens(text, bare or text.lower(), offset + n_prefix, offset + n_prefix + n_bare))
        offset += n_word
    expected = _token_ids(tokenizer, prompt)
    if offset - special_counts(tokenizer)[0] != len(expected):
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
    first, limit = special_counts(tokenizer)[0], text_limit(tokenizer)  # the end token takes the last position
    spans: list[list[int]] = []
    for i in range(len(words) - len(target) + 1):
        window = words[i : i + len(target)]
        if [w.bare for w in window] != target:
            continue
        positions = [p for w in window for p in w.positions]
        if positions and positions[-1] >= limit:
            if truncation == "error":
                raise InputError(
                    f"word {word!r} lies at token {positions[-1]}, beyond the {limit - first} text tokens the "
                    f"encoder sees in {prompt[:60]!r}...; shorten the prompt or drop truncated words"
                )
            continue
        spans.append(positions)
    if not spans and missing == "error":
        raise InputError(f"word {word!r} does not occur in the prompt {prompt!r}")
    return spans


def content_positions(tokenizer: Any, prompt: str) -> list[int]:
    """All word tokens of the prompt (no start, end or padding), within the context length."""
    first, limit = special_counts(tokenizer)[0], text_limit(tokenizer)
    return [p for p in range(first, first + prompt_token_count(tokenizer, prompt)) if p < limit]

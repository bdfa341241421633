"""Which tokens' maps make a phrase's heatmap (`choose_tokens`), and the Table 6 candidates (`word_positions`)."""

from __future__ import annotations

import re
from typing import Any

from cxrdiff.errors import InputError
from cxrdiff.ground.config import GroundingInput

SPECIAL = ("<SOS>", "<EOS>")


def choose_tokens(tokenizer: Any, sample: GroundingInput, words: tuple[str, ...] | None) -> tuple[list[int], str]:
    """Token positions whose maps are averaged, and where they came from ("word", "class" or "all").

    With `words`, every occurrence of each; otherwise a COCO row's matched word (its first occurrence), or
    the category's words matched by substring (the paper's rule); with no match, every word token of the
    phrase (no start, end or padding).
    """
    from cxrdiff.data import CLASS_WORDS
    from cxrdiff.tokens import content_positions, prompt_words, text_limit, word_token_spans

    limit = text_limit(tokenizer)
    if words:
        positions = sorted(
            {
                p
                for w in words
                for span in word_token_spans(tokenizer, sample.phrase, w, missing="empty", truncation="drop")
                for p in span
            }
        )
        if positions:
            return positions, "word"
    elif sample.word:  # COCO: the word of the caption that names the category
        spans = word_token_spans(tokenizer, sample.phrase, sample.word, missing="empty", truncation="drop")
        if spans:
            return spans[0], "word"
    elif sample.category in CLASS_WORDS:
        keys = CLASS_WORDS[sample.category]
        positions = sorted(
            {
                p
                for w in prompt_words(tokenizer, sample.phrase)
                if any(k in w.bare for k in keys)
                for p in w.positions
                if p < limit
            }
        )
        if positions:
            return positions, "class"
    positions = content_positions(tokenizer, sample.phrase)
    if not positions:
        raise InputError(f"phrase {sample.phrase!r} (sample {sample.sample}) has no word tokens to ground")
    return positions, "all"


def word_positions(tokenizer: Any, phrase: str) -> dict[str, int]:
    """Table 6 candidates: each distinct word as written (case kept, edge punctuation removed) at its first
    token, plus the start and end tokens (CLIP's start/end of text, BERT's [CLS] and [SEP]). "Small" and
    "small" are two words, as in the paper's table."""
    from cxrdiff.tokens import prompt_token_count, prompt_words, special_counts, text_limit

    leading, trailing = special_counts(tokenizer)
    limit = text_limit(tokenizer)
    found = {SPECIAL[0]: 0} if leading else {}
    for w in prompt_words(tokenizer, phrase):
        written = _AS_WRITTEN.match(w.text).group(1) or w.text  # type: ignore[union-attr]
        if written not in found and w.start < min(w.stop, limit):
            found[written] = w.start
    if trailing:
        found[SPECIAL[1]] = min(leading + prompt_token_count(tokenizer, phrase), limit)
    return found


_AS_WRITTEN = re.compile(r"^[^0-9A-Za-z]*(.*?)[^0-9A-Za-z]*$", re.DOTALL)


def ids_at(tokenizer: Any, phrase: str, positions: list[int]) -> list[int]:
    """The token ids at these positions of the phrase as the text encoder sees it (padded, truncated)."""
    ids = tokenizer(phrase, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    return [ids[p] for p in positions]

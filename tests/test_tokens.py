"""Word → token positions, checked against the tokenizer's own ids."""

import pytest

from cxrdiff.errors import InputError
from cxrdiff.tokens import content_positions, prompt_words, word_token_spans


def _ids(tokenizer, prompt):
    return tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids


def test_vocabulary_is_clip_bpe(tokenizer):
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 0)
    assert tokenizer.model_max_length == 77


def test_cardiomegaly_is_four_tokens_like_sd2(tokenizer):
    prompt = "Moderate cardiomegaly."
    (span,) = word_token_spans(tokenizer, prompt, "cardiomegaly")
    ids = _ids(tokenizer, prompt)
    assert span == [2, 3, 4, 5]
    assert tokenizer.convert_ids_to_tokens([ids[p] for p in span]) == ["cardi", "ome", "gal", "y</w>"]
    assert tokenizer.convert_ids_to_tokens([ids[6]]) == [".</w>"]  # punctuation is not in the span


def test_multi_word_phrase_case_insensitive(tokenizer):
    prompt = "Small LEFT Pleural Effusion, no pneumothorax"
    (span,) = word_token_spans(tokenizer, prompt, "pleural effusion")
    ids = _ids(tokenizer, prompt)
    decoded = tokenizer.decode([ids[p] for p in span]).strip()
    assert decoded == "pleural effusion"
    assert span == list(range(span[0], span[-1] + 1))


def test_repeated_word_gives_every_occurrence(tokenizer):
    prompt = "left lower lobe opacity and left effusion"
    spans = word_token_spans(tokenizer, prompt, "left")
    ids = _ids(tokenizer, prompt)
    assert len(spans) == 2
    assert all(tokenizer.decode([ids[p] for p in s]).strip() == "left" for s in spans)
    assert spans[0] == [1]


def test_absent_word_is_a_clear_error_or_empty(tokenizer):
    with pytest.raises(InputError, match="does not occur"):
        word_token_spans(tokenizer, "No acute cardiopulmonary process.", "effusion")
    assert word_token_spans(tokenizer, "No acute process.", "effusion", missing="empty") == []
    with pytest.raises(InputError, match="no letters"):
        word_token_spans(tokenizer, "anything", "...")


def test_word_beyond_context_is_never_silently_clipped(tokenizer):
    prompt = " ".join(["normal"] * 80) + " cardiomegaly"
    with pytest.raises(InputError, match="beyond"):
        word_token_spans(tokenizer, prompt, "cardiomegaly")
    assert word_token_spans(tokenizer, prompt, "cardiomegaly", truncation="drop", missing="empty") == []
    kept = word_token_spans(tokenizer, prompt, "normal", truncation="drop")
    assert len(kept) == 75 and kept[-1] == [75]


def test_prompt_words_match_whole_prompt_tokenisation(tokenizer):
    prompt = "Mild pulmonary edema; small bilateral effusions (R>L). ___ x-ray"
    words = prompt_words(tokenizer, prompt)
    ids = _ids(tokenizer, prompt)
    for word in words:
        decoded = tokenizer.decode([ids[p] for p in word.positions]).replace(" ", "")
        assert decoded == word.bare.replace(" ", "")
    n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert content_positions(tokenizer, prompt) == list(range(1, n + 1))
    assert ids[n + 1] == tokenizer.eos_token_id

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


# SD2's tokenizer pads with "!" (id 0), not with the end token as SD 1.x does: padding must never count as a
# word, and the end-of-text position is the first end token, not the first pad.
PAD_PROMPTS = ["small left pleural effusion", "Effusion! No pneumothorax!", "cardiomegaly"]


@pytest.mark.parametrize("prompt", PAD_PROMPTS)
def test_sd2_padding_is_never_a_word_token_and_eos_is_the_first_end_token(tokenizer, prompt):
    from cxrdiff.ground import SPECIAL, GroundingInput, choose_tokens, word_positions

    ids = _ids(tokenizer, prompt)
    eos = ids.index(tokenizer.eos_token_id)
    assert tokenizer.pad_token == "!" and set(ids[eos + 1 :]) == {0}  # "!" pads after the one end token
    assert content_positions(tokenizer, prompt) == list(range(1, eos))
    assert word_positions(tokenizer, prompt)[SPECIAL[1]] == eos
    positions, source = choose_tokens(tokenizer, GroundingInput("1", prompt, None, category="Atelectasis"), None)
    assert source == "all" and positions == list(range(1, eos))


def test_an_exclamation_mark_in_the_prompt_is_a_word_token_not_padding(tokenizer):
    prompt = "Effusion! No pneumothorax!"
    ids = _ids(tokenizer, prompt)
    bang = [i for i in content_positions(tokenizer, prompt) if ids[i] == tokenizer.pad_token_id]
    assert len(bang) == 2  # the two written "!"; the 68 pads after the end token are not word tokens
    assert bang == [3, 9]  # "ef fusion !" and "pneu mo thor ax !"
    assert [w.positions for w in prompt_words(tokenizer, prompt)][0] == [1, 2]  # "effusion" without its "!"


def test_sd15_padding_with_the_end_token_gives_the_same_positions(tokenizer):
    import copy

    from cxrdiff.ground import SPECIAL, word_positions

    sd15 = copy.deepcopy(tokenizer)
    sd15.pad_token = "<|endoftext|>"
    prompt = PAD_PROMPTS[0]
    ids = _ids(sd15, prompt)
    assert ids.count(sd15.eos_token_id) > 1  # every pad is an end token now
    assert word_positions(sd15, prompt)[SPECIAL[1]] == ids.index(sd15.eos_token_id) == 7  # ple ural ef fusion
    assert content_positions(sd15, prompt) == content_positions(tokenizer, prompt) == [1, 2, 3, 4, 5, 6]


# --- every tokenizer: the offset mapping, and BERT's WordPiece ---------------------------------------------

TRICKY = [
    "Mild pulmonary edema; small bilateral effusions (R>L). ___ x-ray",
    "Effusion! No pneumothorax!",
    "patient's right-sided PICC line tip; 2.5 cm nodule (new)",
    "  leading and  double   spaces  ",
    "ET-tube 3.4cm above the carina.",
    "Re-demonstrated L>R opacities, ?pneumonia vs. atelectasis",
    "café au lait, naïve İstanbul résumé",
    "...",
    "",
    "No acute cardiopulmonary process.\nStable cardiomegaly.",
]


def test_offsets_give_the_word_wise_positions_on_clip_exactly(tokenizer, phantom_texts, phantom_tree):
    """The fast tokenizers' offset mapping (used for every tokenizer that has one) reproduces the word-wise
    positions cxrdiff used for CLIP on every phantom impression and MS-CXR phrase and on hand-made hard cases."""
    from cxrdiff.data import read_ms_cxr
    from cxrdiff.tokens import prompt_words_by_offsets, prompt_words_by_word

    phrases = list(read_ms_cxr(phantom_tree / "MS_CXR_Local_Alignment_v1.0.0.csv")["label_text"])
    prompts = [*TRICKY, *phantom_texts, *phrases]
    assert tokenizer.is_fast and len(prompts) > 40
    for prompt in prompts:
        assert prompt_words_by_offsets(tokenizer, prompt) == prompt_words_by_word(tokenizer, prompt), prompt
    cardiomegaly = prompt_words_by_offsets(tokenizer, "Moderate cardiomegaly.")[1]
    assert (cardiomegaly.bare, cardiomegaly.positions) == ("cardiomegaly", [2, 3, 4, 5])


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_bert):
    from cxrdiff.text_encoders import load_tokenizer

    return load_tokenizer(tiny_bert)


def test_a_word_split_into_wordpiece_pieces(bert_tokenizer):
    """'cardiomegaly' in several WordPiece pieces (cardi ##ome ...): all its positions, its punctuation not;
    [CLS] and [SEP] play the start and end tokens."""
    from cxrdiff.ground import SPECIAL, word_positions
    from cxrdiff.tokens import prompt_words_by_word

    tok = bert_tokenizer
    prompt = "Moderate cardiomegaly, no effusion."
    (span,) = word_token_spans(tok, prompt, "cardiomegaly")
    ids = tok(prompt).input_ids
    pieces = tok.convert_ids_to_tokens([ids[p] for p in span])
    assert len(pieces) >= 3 and not pieces[0].startswith("##") and all(p.startswith("##") for p in pieces[1:])
    assert "".join(p.removeprefix("##") for p in pieces) == "cardiomegaly"
    assert tok.convert_ids_to_tokens([ids[span[-1] + 1]]) == [","]  # the comma follows, outside the span
    assert span[0] == len(tok("Moderate", add_special_tokens=False).input_ids) + 1
    assert prompt_words(tok, prompt) == prompt_words_by_word(tok, prompt)  # both ways agree on WordPiece too
    found = word_positions(tok, prompt)
    assert ids[found[SPECIAL[0]]] == tok.cls_token_id and ids[found[SPECIAL[1]]] == tok.sep_token_id
    assert found[SPECIAL[1]] == len(ids) - 1 and found["cardiomegaly"] == span[0]
    assert content_positions(tok, prompt) == list(range(1, len(ids) - 1))


def test_bert_context_is_its_own_and_truncation_is_never_silent(bert_tokenizer):
    tok = bert_tokenizer
    assert tok.model_max_length == 64
    prompt = " ".join(["normal"] * 70) + " cardiomegaly"
    with pytest.raises(InputError, match="beyond the 62 text tokens"):
        word_token_spans(tok, prompt, "cardiomegaly")
    assert word_token_spans(tok, prompt, "cardiomegaly", truncation="drop", missing="empty") == []
    per_word = len(tok("normal", add_special_tokens=False).input_ids)
    kept = word_token_spans(tok, prompt, "normal", truncation="drop")
    assert len(kept) == 62 // per_word and kept[-1][-1] <= 62

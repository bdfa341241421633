"""`cxrdiff model pretrain-bert`: BERT's masking (seeded, word tokens only), the run's record of its objective,
and its output as a `finetune --text-encoder` folder."""

from __future__ import annotations

import pytest
import torch

from cxrdiff.errors import InputError
from cxrdiff.model.pretrain_bert import OBJECTIVE, PretrainBertConfig, masked_batch, pretrain_bert


def test_masking_is_bert_s_and_depends_on_the_seed_only(tiny_bert):
    from cxrdiff.text_encoders import load_tokenizer

    tokenizer = load_tokenizer(tiny_bert)
    texts = ["moderate cardiomegaly with small bilateral pleural effusions"] * 40 + ["no acute process"] * 40
    batch = masked_batch(tokenizer, texts, 0.15, seed=11)
    again = masked_batch(tokenizer, texts, 0.15, seed=11)
    assert torch.equal(batch["input_ids"], again["input_ids"]) and torch.equal(batch["labels"], again["labels"])
    assert not torch.equal(masked_batch(tokenizer, texts, 0.15, seed=12)["labels"], batch["labels"])
    plain = tokenizer(texts, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    chosen = batch["labels"] != -100
    words = plain.special_tokens_mask == 0  # never [CLS], [SEP] or [PAD]
    assert not (chosen & ~words).any()
    assert torch.equal(batch["labels"][chosen], plain.input_ids[chosen])  # the answers are the original tokens
    share = chosen.sum() / words.sum()
    assert 0.10 < share < 0.20  # 15 % of the word tokens
    replaced = batch["input_ids"][chosen] == tokenizer.mask_token_id
    assert 0.7 < replaced.float().mean() < 0.9  # 80 % of the chosen become [MASK]
    assert torch.equal(batch["input_ids"][~chosen], plain.input_ids[~chosen])


def test_bad_values_are_refused_before_any_work(tmp_path):
    for change, message in (
        ({"width": 50, "heads": 3}, "--width 50: must be a multiple of --heads 3"),
        ({"mask_probability": 1.0}, r"--mask-probability 1.0: must be a finite number in \(0, 1\)"),
        ({"steps": 0}, "--steps 0: must be at least 1"),
    ):
        with pytest.raises(InputError, match=message):
            pretrain_bert(PretrainBertConfig(data=tmp_path / "nowhere", out=tmp_path / "out", **change))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pretraining_records_its_objective_lowers_the_loss_and_gives_a_text_encoder(phantom_tree, tmp_path):
    from cxrdiff.artifacts import read_manifest
    from cxrdiff.text_encoders import open_text_encoder

    config = PretrainBertConfig(data=phantom_tree, out=tmp_path / "bert", steps=40, batch_size=16, held_out=6,
                                checkpoint_every=20)  # fmt: skip
    result = pretrain_bert(config)
    manifest = read_manifest(tmp_path / "bert", "pretrain-bert")
    assert manifest["objective"] == OBJECTIVE == result["objective"]
    assert result["loss_last"] < result["loss_first"]
    accuracy = manifest["masked_accuracy"]
    assert accuracy["masked_tokens"] > 0 and 0.0 <= accuracy["majority"] <= 1.0
    assert not (tmp_path / "bert" / "checkpoint.pt").exists()
    parts = open_text_encoder(tmp_path / "bert", 32)  # a folder finetune --text-encoder takes as it is
    assert (parts.record.width, parts.record.context_length, parts.record.projection) == (48, 128, True)
    assert pretrain_bert(config) == result  # finished: returns at once

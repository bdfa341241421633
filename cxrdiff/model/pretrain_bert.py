"""`cxrdiff model pretrain-bert`: a tiny BERT pretrained on report text, for `finetune --text-encoder`.

The demo's second text encoder (`demo --text-encoders clip,bert`). Its objective was chosen before any run,
and the manifest records it (`objective`): masked language modelling, BERT's own (15 % of the word tokens
chosen, of those 80 % replaced by [MASK], 10 % by a random token, 10 % kept), on the report texts alone, no
image. That is how the BERT-family encoders of Generate to Ground's comparison are pretrained (BERT, RadBERT,
PubMedBERT, CXR-BERT's first stage), so the demo sets an encoder that learnt the reports' language beside the
CLIP-shaped one that `model pretrain-text` ties to the images contrastively. The WordPiece vocabulary is
trained on the same texts (`tokenizers`); held-out patients' texts measure masked-token accuracy before and
after, beside the accuracy of always guessing the most frequent training token.

Output: a local Hugging Face folder (config.json, model.safetensors, tokenizer files) plus the manifest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from cxrdiff.artifacts import StepFolder, atomic_dir, input_identity
from cxrdiff.config import Range, check_ranges, settings, to_dict
from cxrdiff.console import log
from cxrdiff.errors import InputError
from cxrdiff.model.pretrain import CHECKPOINT, PretrainConfig, batch_index, pretrain_loop, pretrain_result, write_losses

STEP = "pretrain-bert"
OBJECTIVE = "masked language modelling (BERT's: 15 % of word tokens; 80 % [MASK], 10 % random, 10 % kept)"


@dataclasses.dataclass(frozen=True)
class PretrainBertConfig(PretrainConfig):
    """Settings of one masked-language-model pretraining run: `PretrainConfig`'s (the reports alone are read, as
    `model pretrain-text` chooses them), the model's sizes and the masking."""

    weight_decay: Annotated[float, Range(ge=0.0)] = 0.01
    width: Annotated[int, Range(ge=2)] = 48  # differs from the tiny UNet's 32 on purpose: the runs learn the width map
    layers: Annotated[int, Range(ge=1)] = 2
    heads: Annotated[int, Range(ge=1)] = 2
    vocab_size: Annotated[int, Range(ge=16)] = 1000
    context_length: Annotated[int, Range(ge=8)] = 128
    mask_probability: Annotated[float, Range(gt=0.0, lt=1.0)] = 0.15


def check_config(config: PretrainBertConfig) -> None:
    """Every number in its range (`Range` beside each field), then what the ranges cannot say alone."""
    check_ranges(config)
    if config.width % config.heads:
        raise InputError(f"--width {config.width}: must be a multiple of --heads {config.heads}")


def masked_batch(tokenizer: Any, texts: list[str], probability: float, seed: int) -> dict[str, Any]:
    """Tokenised texts with BERT's masking drawn from `seed` alone (so a resumed run draws the same masks)."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt", return_special_tokens_mask=True)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability)
    collator.generator = torch.Generator().manual_seed(seed)  # its own `seed` only reaches calls of the collator
    ids, labels = collator.torch_mask_tokens(tokens.input_ids.clone(), tokens.special_tokens_mask)
    return {"input_ids": ids, "attention_mask": tokens.attention_mask, "labels": labels}


def masked_accuracy(model: Any, tokenizer: Any, texts: list[str], config: PretrainBertConfig) -> tuple[dict, Any]:
    """Top-1 accuracy at the masked positions of held-out texts (one fixed masking), and the answers there (to
    set the most frequent training token's accuracy beside it: what a model that learnt nothing reaches)."""
    import torch

    model.train(False)
    hits = total = 0
    answers = []
    with torch.no_grad():
        for start in range(0, len(texts), 128):
            batch = masked_batch(tokenizer, texts[start : start + 128], config.mask_probability, config.seed + 7)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            chosen = batch["labels"] != -100
            hits += int((logits.argmax(-1)[chosen] == batch["labels"][chosen]).sum())
            total += int(chosen.sum())
            answers.append(batch["labels"][chosen])
    model.train(True)
    return {"masked_tokens": total, "top1": hits / max(total, 1)}, torch.cat(answers)


def pretrain_bert(config: PretrainBertConfig) -> dict[str, Any]:
    """Pretrain, measure masked-token accuracy on held-out patients, write the Hugging Face folder + manifest."""
    import torch
    from transformers import BertForMaskedLM, BertModel

    from cxrdiff.data import find_table
    from cxrdiff.model.pretrain_text import ms_cxr_file, read_pairs, split_held_out
    from cxrdiff.text_encoders import tiny_bert_config, wordpiece_tokenizer

    check_config(config)
    out = Path(config.out)
    find_table(Path(config.data), "metadata")
    ms_cxr = ms_cxr_file(config)
    key = settings(config, data=input_identity(config.data), ms_cxr=input_identity(ms_cxr), objective=OBJECTIVE)
    folder = StepFolder.claim(out, STEP, key)
    if folder.finished:
        return _result(out, folder.manifest or {})
    pairs = read_pairs(config.data, 16, ms_cxr, config.max_pairs, config.text_fallback)  # images unused: 16 px
    train, held_out = split_held_out(pairs, config.held_out, config.seed)
    tokenizer = wordpiece_tokenizer(train.texts, config.vocab_size, config.context_length)
    torch.manual_seed(config.seed)
    model = BertForMaskedLM(tiny_bert_config(tokenizer, config.width, config.layers, config.heads))
    before, _ = masked_accuracy(model, tokenizer, held_out.texts, config)
    with torch.enable_grad():
        losses = _train(config, model, tokenizer, train.texts, out)
    after, answers = masked_accuracy(model, tokenizer, held_out.texts, config)
    train_ids = [i for ids in tokenizer(train.texts, add_special_tokens=False)["input_ids"] for i in ids]
    majority = float((answers == int(np.bincount(train_ids, minlength=len(tokenizer)).argmax())).double().mean())
    log.info("masked tokens of %d held-out texts: top-1 %.3f (untrained %.3f, most frequent token %.3f)",
             len(held_out.texts), after["top1"], before["top1"], majority)  # fmt: skip
    encoder = BertModel(model.config)  # with a pooler, so that AutoModel loads every weight it builds
    encoder.load_state_dict(model.bert.state_dict(), strict=False)
    with atomic_dir(out / ".encoder") as tmp:
        encoder.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    files = []
    for item in sorted((out / ".encoder").iterdir()):
        item.replace(out / item.name)
        files.append(item.name)
    (out / ".encoder").rmdir()
    loss = write_losses(out, losses)
    extra = {
        "objective": OBJECTIVE,
        "texts": {"train": len(train.texts), "held_out": len(held_out.texts)},
        "masked_accuracy": {**after, "majority": majority},
        "masked_accuracy_untrained": before,
        "vocabulary": len(tokenizer),
        "loss": loss,
    }
    manifest = folder.finish(to_dict(config), inputs={"data": config.data, "ms_cxr": ms_cxr}, seed=config.seed,
                             files=[*files, "losses.csv"], extra=extra)  # fmt: skip
    (out / CHECKPOINT).unlink(missing_ok=True)
    return _result(out, manifest)


def _train(config: PretrainBertConfig, model: Any, tokenizer: Any, texts: list[str], out: Path) -> list[float]:
    """The masked-token loss on each step's batch, its masks drawn from (seed, step), in the shared loop."""

    def loss(step: int) -> Any:
        index = batch_index(len(texts), config.batch_size, config.seed, step)
        seed = config.seed * 1_000_003 + step
        return model(**masked_batch(tokenizer, [texts[i] for i in index], config.mask_probability, seed)).loss

    model.train(True)
    return pretrain_loop(config, model.parameters(), model.state_dict, model.load_state_dict, loss, out, STEP)


def _result(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    return pretrain_result(
        out, manifest, objective="objective", masked_top1="masked_accuracy.top1", majority="masked_accuracy.majority",
        masked_top1_untrained="masked_accuracy_untrained.top1",
    )  # fmt: skip

"""Text encoders beyond CLIP: finding and checking a --text-encoder folder, remote code only when asked, the
width map, the model folder's record (and plain diffusers on it), and the chain prepare → finetune (frozen and
learnable) → sample → ground → model checkpoint → report with a tiny BERT."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from stand_ins import Brightness

from cxrdiff.errors import InputError
from cxrdiff.text_encoders import (
    RECORD,
    encode,
    find_source,
    open_text_encoder,
    source_identity,
)

PROMPT = "Moderate cardiomegaly, no pleural effusion."


def remote_code_copy(tiny_bert, folder):
    """The tiny BERT as a folder whose model code ships beside it (as CXR-BERT's modeling_cxrbert.py): a
    model type transformers does not know, and auto_map naming the folder's own classes."""
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="tiny-cxr-bert",
        architectures=["TinyCxrBertModel"],
        auto_map={"AutoConfig": "configuration_tiny.TinyCxrBertConfig", "AutoModel": "modeling_tiny.TinyCxrBertModel"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tiny.py").write_text(
        "from transformers import BertConfig\n\n\nclass TinyCxrBertConfig(BertConfig):\n"
        "    model_type = 'tiny-cxr-bert'\n"
    )
    (folder / "modeling_tiny.py").write_text(
        "from transformers import BertModel\n\nfrom .configuration_tiny import TinyCxrBertConfig\n\n\n"
        "class TinyCxrBertModel(BertModel):\n    config_class = TinyCxrBertConfig\n"
    )
    return folder


# --- finding and checking the folder ----------------------------------------------------------------


def test_a_missing_folder_and_a_hub_name_are_one_line_each(tmp_path):
    with pytest.raises(InputError) as missing:
        find_source(tmp_path / "nowhere")
    assert (
        str(missing.value)
        == f"--text-encoder {tmp_path / 'nowhere'}: folder not found (give a local Hugging Face text model folder)"
    )
    with pytest.raises(InputError) as hub:
        find_source("microsoft/BiomedVLP-CXR-BERT-specialized")
    assert str(hub.value) == (
        "--text-encoder microsoft/BiomedVLP-CXR-BERT-specialized: no such local folder; a Hugging Face hub name is "
        "not downloaded: fetch it first (e.g. `hf download microsoft/BiomedVLP-CXR-BERT-specialized --local-dir "
        "DIR`) and give DIR"
    )
    assert "\n" not in str(hub.value)


def test_a_folder_without_config_or_tokenizer_is_refused(tmp_path, tiny_bert):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        find_source(tmp_path / "empty")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_bert / "config.json", bare)
    with pytest.raises(InputError, match="no tokenizer files beside its config.json"):
        find_source(bare)


def test_remote_code_is_refused_without_the_flag_and_runs_with_it(tiny_bert, tmp_path):
    folder = remote_code_copy(tiny_bert, tmp_path / "cxr-bert-like")
    with pytest.raises(InputError) as refused:
        open_text_encoder(folder, 32)
    assert str(refused.value) == (
        f"--text-encoder {folder}: its model code is not part of transformers but ships in the folder "
        "(modeling_tiny.TinyCxrBertModel); pass --trust-remote-code to import and run that Python code"
    )
    trusted = open_text_encoder(folder, 32, trust_remote_code=True)
    plain = open_text_encoder(tiny_bert, 32)
    assert type(trusted.encoder).__name__ == "TinyCxrBertModel" and trusted.record.trust_remote_code
    assert trusted.record.model_type == "tiny-cxr-bert"
    ids = trusted.tokenizer([PROMPT], return_tensors="pt").input_ids
    with torch.no_grad():  # the same weights through the folder's own class
        assert torch.equal(trusted.encoder(ids).last_hidden_state, plain.encoder(ids).last_hidden_state)


def test_finetune_refuses_remote_code_without_the_flag_exit_2(tiny_bert, tiny_model, phantom_prepared, tmp_path):
    folder = remote_code_copy(tiny_bert, tmp_path / "cxr-bert-like")
    out = tmp_path / "run"
    argv = ["finetune", "--data", str(phantom_prepared), "--base-model", str(tiny_model), "--out", str(out)]
    argv += ["--frozen-text", "--text-encoder", str(folder), "--steps", "1", "--batch-size", "2"]
    result = subprocess.run([sys.executable, "-m", "cxrdiff", *argv], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --text-encoder {folder}: its model code is not part of transformers but ships in the folder "
        "(modeling_tiny.TinyCxrBertModel); pass --trust-remote-code to import and run that Python code"
    ]
    assert not out.exists()  # refused before anything was written


def test_the_encoder_record_and_the_width_map(tiny_bert):
    parts = open_text_encoder(tiny_bert, 32, seed=3)
    record = parts.record
    assert (record.kind, record.origin, record.model_type, record.name) == (
        "transformers",
        "transformers",
        "bert",
        "tiny-bert",
    )
    assert (record.width, record.cross_attention_dim, record.projection) == (24, 32, True)
    assert (record.context_length, record.attention_mask, record.trust_remote_code) == (64, True, False)
    assert parts.tokenizer.model_max_length == 64
    weight = parts.projection.weight.detach()  # (32, 24): semi-orthogonal, so it keeps every token's norm
    assert weight.shape == (32, 24) and torch.allclose(weight.T @ weight, torch.eye(24), atol=1e-5)
    assert torch.equal(parts.projection.bias.detach(), torch.zeros(32))
    assert torch.equal(open_text_encoder(tiny_bert, 32, seed=3).projection.weight, parts.projection.weight)
    assert not torch.equal(open_text_encoder(tiny_bert, 32, seed=4).projection.weight, parts.projection.weight)
    same_width = open_text_encoder(tiny_bert, 24)
    assert same_width.projection is None and not same_width.record.projection
    embeds = encode(parts, [PROMPT, ""], "cpu")
    assert embeds.shape == (2, 64, 32)


def test_the_identity_is_the_files_that_decide_the_encoder(tiny_bert, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert, copy)
    identity = source_identity(find_source(copy))
    assert identity == source_identity(find_source(tiny_bert)) and identity.startswith("sha256:")
    (copy / "README.md").write_text("notes")
    (copy / "manifest.json").write_text("{}")
    assert source_identity(find_source(copy)) == identity
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert source_identity(find_source(copy)) != identity


def test_the_diffusers_and_pretrain_text_layout_is_found(tiny_bert, tmp_path):
    nested = tmp_path / "nested"
    shutil.copytree(tiny_bert, nested / "text_encoder", ignore=shutil.ignore_patterns("tokenizer*"))
    shutil.copytree(tiny_bert, nested / "tokenizer", ignore=shutil.ignore_patterns("config.json", "model.*"))
    source = find_source(nested)
    assert (source.model_dir, source.tokenizer_dir) == (nested / "text_encoder", nested / "tokenizer")
    assert open_text_encoder(nested, 32).record.width == 24


def open_clip_folder(folder, text_cfg, tokenizer_from=None):
    """A tiny open_clip model saved as open_clip loads a local folder (`local-dir:`): open_clip_config.json,
    open_clip_model.safetensors and, for a Hugging Face tower, the tokenizer files beside them."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir()
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32,
                                          "patch_size": 16}, "text_cfg": text_cfg}  # fmt: skip
    model = (open_clip.CustomTextCLIP if "hf_model_name" in text_cfg else open_clip.CLIP)(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    for name in ("tokenizer.json", "tokenizer_config.json") if tokenizer_from else ():
        shutil.copy(tokenizer_from / name, folder / name)
    return model


def test_an_open_clip_tower_on_a_hugging_face_model_is_kept_in_hugging_face_form(tiny_bert, tmp_path):
    """BiomedCLIP's shape: an open_clip model whose text tower is a Hugging Face BERT (here the tiny one, named
    by its local folder); the tower's transformer is the encoder, at open_clip's context length."""
    text_cfg = {"hf_model_name": str(tiny_bert), "hf_tokenizer_name": str(tiny_bert), "hf_proj_type": "linear",
                "hf_pooler_type": "cls_pooler", "context_length": 48}  # fmt: skip
    model = open_clip_folder(tmp_path / "biomedclip-like", text_cfg, tokenizer_from=tiny_bert)
    parts = open_text_encoder(tmp_path / "biomedclip-like", 32)
    assert (parts.record.origin, parts.record.kind, parts.record.width, parts.record.context_length) == (
        "open_clip", "transformers", 24, 48,
    )  # fmt: skip
    tokens = parts.tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():  # the saved tower's weights (not the tiny BERT's own)
        theirs = model.text.transformer(**tokens).last_hidden_state
        assert torch.equal(parts.encoder(**tokens).last_hidden_state, theirs)
    native = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    open_clip_folder(tmp_path / "openclip-native", native)
    with pytest.raises(InputError, match="open_clip's own transformer, not a Hugging Face model"):
        open_text_encoder(tmp_path / "openclip-native", 32)


# --- the model folder ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_model(tiny_model, tiny_bert, tmp_path_factory):
    """The tiny model conditioned on the tiny BERT (with its width map), saved as a model folder."""
    from cxrdiff.models import load_components, save_components

    comps = load_components(tiny_model)
    comps.use_text(open_text_encoder(tiny_bert, comps.unet.config.cross_attention_dim, seed=1))
    return save_components(comps, tmp_path_factory.mktemp("bert-model") / "model")


def test_the_folder_records_the_encoder_and_loads_it_back(bert_model, tiny_bert):
    from cxrdiff.models import describe, load_components

    index = json.loads((bert_model / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    record = json.loads((bert_model / RECORD).read_text())
    assert record["name"] == "tiny-bert" and record["projection"] and record["width"] == 24
    assert json.loads((bert_model / "text_projection" / "config.json").read_text()) == {
        "in_features": 24, "out_features": 32, "bias": True,
    }  # fmt: skip
    comps = load_components(bert_model)
    assert type(comps.text_encoder).__name__ == "BertModel" and comps.tokenizer.model_max_length == 64
    fresh = open_text_encoder(tiny_bert, 32, seed=1)
    assert torch.equal(encode(comps.text, [PROMPT], "cpu"), encode(fresh, [PROMPT], "cpu"))
    info = describe(bert_model)
    assert (info["text_encoder"], info["text_projection"], info["context_length"]) == ("tiny-bert", True, 64)


def test_plain_diffusers_with_prompt_embeds_as_the_readme_shows(bert_model):
    """README, "Text encoders": the folder from plain diffusers and transformers, no cxrdiff."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from cxrdiff.models import load_components

    run = bert_model
    pipe = StableDiffusionPipeline.from_pretrained(run, text_encoder=None, tokenizer=None, safety_checker=None)
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    encoder = AutoModel.from_pretrained(run / "text_encoder").eval()
    projection = torch.nn.Linear(encoder.config.hidden_size, pipe.unet.config.cross_attention_dim)
    projection.load_state_dict(load_file(run / "text_projection" / "model.safetensors"))

    def embed(texts):
        tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            return projection(encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state)

    image = pipe(prompt_embeds=embed([PROMPT]), negative_prompt_embeds=embed([""]), num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert torch.equal(embed([PROMPT]), encode(load_components(run).text, [PROMPT], "cpu"))


def test_a_clip_folder_stays_plain_diffusers_and_encodes_as_diffusers_does(tiny_model):
    from diffusers import StableDiffusionPipeline

    from cxrdiff.models import load_components

    assert not (tiny_model / RECORD).exists()
    comps = load_components(tiny_model)
    assert comps.native and comps.text_projection is None
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    theirs, _ = pipe.encode_prompt([PROMPT, ""], "cpu", 1, False)
    assert torch.equal(encode(comps.text, [PROMPT, ""], "cpu"), theirs)


def test_a_remote_code_encoder_is_saved_with_its_code_and_loads_back(tiny_model, tiny_bert, tmp_path):
    from cxrdiff.models import load_components, save_components

    folder = remote_code_copy(tiny_bert, tmp_path / "cxr-bert-like")
    comps = load_components(tiny_model)
    comps.use_text(open_text_encoder(folder, 32, trust_remote_code=True))
    saved = save_components(comps, tmp_path / "model")
    assert (saved / "text_encoder" / "modeling_tiny.py").is_file()
    again = load_components(saved)  # the record says its code was trusted when the run was made
    assert type(again.text_encoder).__name__ == "TinyCxrBertModel"
    assert torch.equal(encode(again.text, [PROMPT], "cpu"), encode(comps.text, [PROMPT], "cpu"))


def test_bert_base_shape_for_full_size_checks():
    from cxrdiff.model.published import bert_base_tokenizer
    from cxrdiff.text_encoders import PUBLISHED_TEXT_ENCODERS, published_text_encoder

    encoder = published_text_encoder("bert-base")  # meta device: nothing allocated
    assert sum(p.numel() for p in encoder.parameters()) == PUBLISHED_TEXT_ENCODERS["bert-base"]["parameters"]
    tokenizer = bert_base_tokenizer()
    assert len(tokenizer) == 30522 and tokenizer.model_max_length == 512
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("pneumomediastinum").input_ids)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and len(pieces) > 3
    assert "".join(p.removeprefix("##") for p in pieces[1:-1]) == "pneumomediastinum"
    with pytest.raises(InputError, match="--text-encoder-like 'gpt'"):
        published_text_encoder("gpt")


# --- the chain ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bert_chain_prepare_finetune_sample_ground_checkpoint_report(phantom_prepared, tiny_model, tiny_bert, tmp_path):
    from cxrdiff.artifacts import read_manifest
    from cxrdiff.finetune import FinetuneConfig, export_checkpoint, finetune
    from cxrdiff.ground import GroundConfig, ground
    from cxrdiff.models import load_components
    from cxrdiff.report import ReportConfig, report
    from cxrdiff.sample import SampleConfig, sample

    def config(name, frozen, text_encoder=tiny_bert, steps=2):
        return FinetuneConfig(data=phantom_prepared, base_model=tiny_model, out=tmp_path / name, frozen_text=frozen,
                              steps=steps, batch_size=4, lr=1e-3, checkpoint_every=1, keep_checkpoints=2,
                              text_encoder=text_encoder)  # fmt: skip

    for name, frozen in (("bert-F", True), ("bert-L", False)):
        finetune(config(name, frozen))
    finetune(config("clip-F", True, text_encoder=None))
    frozen, learnable = tmp_path / "bert-F", tmp_path / "bert-L"
    for run, trained in ((frozen, "UNet + text projection"), (learnable, "UNet + text encoder + text projection")):
        manifest = read_manifest(run, "finetune")
        assert manifest["conditioning"]["trained"] == trained and manifest["conditioning"]["encoder"] == "tiny-bert"
        assert manifest["settings"]["text_encoder"] == source_identity(find_source(tiny_bert))
        assert "text_encoder" not in read_manifest(tmp_path / "clip-F")["settings"]  # CLIP runs keep their key
    base, tuned = open_text_encoder(tiny_bert, 32), load_components(frozen)
    assert torch.equal(
        tuned.text_encoder.embeddings.word_embeddings.weight, base.encoder.embeddings.word_embeddings.weight
    )
    assert not torch.equal(tuned.text_projection.weight, base.projection.weight)  # the width map was trained
    relearnt = load_components(learnable)
    assert not torch.equal(relearnt.text_encoder.embeddings.word_embeddings.weight,
                           base.encoder.embeddings.word_embeddings.weight)  # fmt: skip

    # another encoder for a finished run: refused, exit 2
    with pytest.raises(
        InputError, match=r"holds a finished 'finetune' run made with other settings \(text_encoder "
    ) as refused:
        finetune(config("bert-F", True, text_encoder=tiny_model))
    assert refused.value.exit_code == 2

    # model checkpoint: the step-1 state, its projection exactly the checkpoint's
    from safetensors.torch import load_file

    exported = export_checkpoint(learnable, 1, tmp_path / "bert-L-step1")
    state = load_file(learnable / "checkpoints" / "step-0000001" / "model.safetensors")
    step1 = load_components(exported["out"])
    assert torch.equal(step1.text_projection.weight, state["text_projection.weight"])
    assert torch.equal(step1.text_encoder.embeddings.word_embeddings.weight,
                       state["text_encoder.embeddings.word_embeddings.weight"])  # fmt: skip

    samples = tmp_path / "samples"
    sample(SampleConfig(model=learnable, out=samples, prompts=phantom_prepared / "test.parquet", limit=2, steps=2))
    table = pd.read_parquet(samples / "samples.parquet")
    assert len(table) == 2 and all((samples / f).is_file() for f in table["file"])
    assert not table["truncated"].any()
    long = tmp_path / "long"  # 70 words: past the tiny BERT's own 64-token context, recorded as truncated
    sample(SampleConfig(model=learnable, out=long, prompt=" ".join(["effusion"] * 70), steps=1))
    assert pd.read_parquet(long / "samples.parquet")["truncated"].tolist() == [True]

    out = tmp_path / "ground"
    ground(GroundConfig(model=frozen, out=out, data=phantom_prepared / "ms_cxr.parquet", steps=3, window=2, limit=4,
                        min_word_count=0))  # fmt: skip
    scores = pd.read_parquet(out / "scores.parquet")
    tokenizer = load_components(frozen).tokenizer
    for row in scores.itertuples():  # the grounded tokens are the phrase's word pieces, never [CLS]/[SEP]/[PAD]
        ids = tokenizer(row.phrase, padding="max_length", max_length=64, truncation=True).input_ids
        assert 0 not in row.tokens and all(ids[p] not in tokenizer.all_special_ids for p in row.tokens)
    words = pd.read_parquet(out / "words.parquet")
    assert {"<SOS>", "<EOS>"} <= set(words["word"])

    result = report(
        ReportConfig(runs=(frozen, learnable, tmp_path / "clip-F"), out=tmp_path / "report", real=phantom_prepared,
                     fid=False, fid_xrv=False, n_fid=2, diversity_prompts=1, sample_steps=2, ground_steps=3,
                     ground_window=2, ground_limit=4, min_word_count=0, table4_p19_only=True),
        classifier=Brightness(),
    )  # fmt: skip
    md = (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "text-encoders.png").is_file() and "![text-encoders](text-encoders.png)" in md
    section = md.split("\n## Text encoders")[1].split("\n## ")[0]
    assert "| tiny-bert | frozen | tiny-bert, frozen (1 training) | UNet + text projection |" in section
    assert (
        "| tiny-bert | learnable | tiny-bert, learnable (1 training) | UNet + text encoder + text projection |"
        in section
    )
    assert "| CLIP (base model's) | frozen | frozen (1 training) | UNet |" in section
    headline = md.split("\n## Headline")[1].split("\n## ")[0]
    assert "(text encoder tiny-bert, frozen)" in headline and "(text encoder tiny-bert, learnable)" in headline
    assert "with text encoder tiny-bert" in headline  # the verdict set frozen against learnable per encoder
    assert result["report"].endswith("report.html")

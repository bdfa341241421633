"""Text encoders a model is conditioned on, read from local folders (nothing is downloaded).

A model folder holds its text encoder in one of two ways. A plain diffusers Stable Diffusion folder holds a CLIP
text encoder of the UNet's cross-attention width (`text_encoder/` + `tokenizer/`, as SD2 ships them): no record
is needed and diffusers' `StableDiffusionPipeline` loads it. A folder that `finetune --text-encoder DIR` wrote
may hold any Hugging Face text model instead (the BERT family, CXR-BERT, RadBERT, BiomedCLIP's text tower), in
its own format, with a learned linear map to the UNet's width (`text_projection/`) where the widths differ, and
the record `cxrdiff_text_encoder.json` that says which (`TextEncoderRecord`). This module is the one reader and
writer of those parts: `models.load_components` and `models.save_components` call it, and so every step (sample,
ground, report, `model checkpoint`) reads the same encoder the run was trained with.

Each prompt becomes the encoder's last hidden states (`last_hidden_state`, one vector per token position,
padded to the encoder's own context length: CLIP 77, BERT 512), passed through the projection if there is one.
CLIP keeps SD's convention (no padding mask, as diffusers encodes prompts); every other encoder is given the
padding mask, as it was pretrained.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import CLAIM, MANIFEST, atomic_dir, read_manifest, write_json
from cxrdiff.errors import InputError, unsafe_pickle

RECORD = "cxrdiff_text_encoder.json"
PROJECTION = "text_projection"
CLIP_TYPES = ("clip_text_model", "clip")  # model types that load as transformers' CLIPTextModel
OPEN_CLIP_CONFIG = "open_clip_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TEXT_SUFFIXES = (".json", ".txt", ".model", ".py", ".tiktoken")  # configs, vocabularies, remote code
_OTHER_FRAMEWORKS = ("tf_model.h5", "flax_model.msgpack", "rust_model.ot", "model.onnx")
_UNBOUNDED = 1_000_000  # transformers gives tokenizers without a stated context 1e30


@dataclasses.dataclass(frozen=True)
class TextEncoderRecord:
    """What a model folder's text encoder is (`cxrdiff_text_encoder.json`)."""

    kind: str  # "clip": CLIPTextModel + CLIP tokenizer (SD's own); "transformers": AutoModel + AutoTokenizer
    name: str  # how reports name it: the --text-encoder folder's name
    origin: str  # "transformers", "open_clip" (a text tower taken out of an open_clip model) or "random"
    model_type: str  # the encoder config's model_type (bert, clip_text_model, ...)
    identity: str  # sha256 of the source's weights, config and tokenizer files (or what a random one was made of)
    width: int  # the encoder's hidden size
    cross_attention_dim: int  # the UNet's
    projection: bool  # a learned linear map width → cross_attention_dim (`text_projection/`)
    context_length: int  # token positions the UNet attends to, start and end tokens included
    attention_mask: bool  # whether the encoder is given the padding mask
    trust_remote_code: bool  # its model code lives in its folder (granted at finetune with --trust-remote-code)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> TextEncoderRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data))
        if missing:
            raise InputError(f"{source}: missing {', '.join(missing)}; not a cxrdiff text encoder record")
        return cls(**{k: data[k] for k in names})

    @property
    def native(self) -> bool:
        """Whether diffusers' StableDiffusionPipeline encodes prompts for this folder by itself."""
        return self.kind == "clip" and not self.projection


@dataclasses.dataclass
class TextParts:
    """A model's text side: encoder, tokenizer, optional projection and the record (None: a plain SD folder)."""

    encoder: Any
    tokenizer: Any
    projection: Any = None
    record: TextEncoderRecord | None = None


# --- finding a --text-encoder folder --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a --text-encoder folder keeps its parts (read from the file layout alone, no weights read)."""

    folder: Path
    origin: str  # "transformers" | "open_clip"
    model_dir: Path
    tokenizer_dir: Path
    model_type: str
    remote_code: bool  # config.json's auto_map names model code shipped in the folder

    @property
    def name(self) -> str:
        return self.folder.resolve().name

    @property
    def kind(self) -> str:
        return "clip" if self.origin == "transformers" and self.model_type in CLIP_TYPES else "transformers"


def find_source(folder: str | os.PathLike, option: str = "--text-encoder") -> Source:
    """A local Hugging Face text model folder (config.json and tokenizer files together, or `text_encoder/` +
    `tokenizer/` as a diffusers or `model pretrain-text` folder holds them) or an open_clip folder
    (open_clip_config.json). A missing folder or a hub name is one line: nothing is downloaded."""
    path = Path(folder)
    if not path.exists():
        text = os.fspath(folder)
        if text.count("/") == 1 and not text.startswith((".", "/", "~")):
            raise InputError(
                f"{option} {text}: no such local folder; a Hugging Face hub name is not downloaded: fetch it first "
                f"(e.g. `hf download {text} --local-dir DIR`) and give DIR"
            )
        raise InputError(f"{option} {text}: folder not found (give a local Hugging Face text model folder)")
    if not path.is_dir():
        raise InputError(f"{option} {path}: not a folder (give a local Hugging Face text model folder)")
    if (path / OPEN_CLIP_CONFIG).is_file():
        return Source(path, "open_clip", path, path, "open_clip", False)
    for model_dir, tokenizer_dir in ((path, path), (path / "text_encoder", path / "tokenizer")):
        if (model_dir / "config.json").is_file():
            config = _read_json(model_dir / "config.json")
            if not tokenizer_dir.is_dir() or not any(
                (tokenizer_dir / n).is_file()
                for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
            ):
                raise InputError(f"{option} {path}: no tokenizer files beside its config.json (tokenizer.json, "
                                 "vocab.txt, ...); the folder must hold the encoder's own tokenizer")  # fmt: skip
            auto_map = config.get("auto_map") or {}
            remote = any(k in auto_map for k in ("AutoModel", "AutoConfig"))
            for reference in auto_map.values():
                if "--" in str(reference):  # "org/repo--module.Class": code in another repository
                    raise InputError(
                        f"{option} {path}: config.json's auto_map takes model code from another repository "
                        f"({reference}); it cannot be loaded offline"
                    )
            return Source(path, "transformers", model_dir, tokenizer_dir, str(config.get("model_type", "")), remote)
    raise InputError(
        f"{option} {path}: no config.json (nor text_encoder/config.json, nor {OPEN_CLIP_CONFIG}); "
        "expected a Hugging Face text model folder"
    )


def check_remote_code(source: Source, trust_remote_code: bool, option: str = "--text-encoder") -> None:
    """A model whose code ships in its folder (CXR-BERT's modeling_cxrbert.py) runs only when asked to."""
    if source.remote_code and not trust_remote_code:
        auto_map = _read_json(source.model_dir / "config.json").get("auto_map", {})
        code = auto_map.get("AutoModel") or auto_map.get("AutoConfig")
        raise InputError(
            f"{option} {source.folder}: its model code is not part of transformers but ships in the folder "
            f"({code}); pass --trust-remote-code to import and run that Python code"
        )


def source_identity(source: Source) -> str:
    """sha256 over the files that decide the encoder: weights (safetensors when there are, as transformers
    prefers them), configs, vocabularies and shipped code; other frameworks' weights, manifests and hidden files
    are left out. This is the encoder's part of a run's settings key."""
    folders = list(dict.fromkeys((source.model_dir, source.tokenizer_dir)))
    digest = hashlib.sha256()
    for folder in folders:
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and _decides(p)]
        if any(p.suffix == ".safetensors" for p in files):
            files = [p for p in files if p.suffix not in (".bin", ".pt", ".pth")]
        for file in files:
            digest.update(f"{file.name}\0".encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()


def _decides(path: Path) -> bool:
    if path.name.startswith(".") or path.name in (MANIFEST, CLAIM, RECORD, *_OTHER_FRAMEWORKS):
        return False
    return path.suffix in _WEIGHT_SUFFIXES or path.suffix in _TEXT_SUFFIXES


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face libraries told not to reach the network, whatever the environment says."""
    import huggingface_hub.constants as hub

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    before = hub.HF_HUB_OFFLINE
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- loading -------------------------------------------------------------------------------------


def open_text_encoder(
    folder: str | os.PathLike, cross_attention_dim: int, trust_remote_code: bool = False, seed: int = 0
) -> TextParts:
    """A --text-encoder folder, loaded and checked: its forward gives `last_hidden_state` at its own context
    length; with a linear map to `cross_attention_dim` (seeded by `seed`) when its width differs."""
    source = find_source(folder)
    check_remote_code(source, trust_remote_code)
    identity = source_identity(source)
    if source.origin == "open_clip":
        encoder, tokenizer, context = _open_clip_tower(source)
    else:
        encoder = _load_model(source.kind, source.model_dir, source.remote_code, str(folder))
        tokenizer = load_tokenizer(
            source.tokenizer_dir, clip=source.kind == "clip", trust_remote_code=source.remote_code
        )
        context = _context_length(tokenizer, encoder.config, str(folder))
    tokenizer = _with_context(tokenizer, context, str(folder))
    mask = source.kind != "clip" or bool(getattr(encoder.config, "use_attention_mask", False))
    width = _probe(encoder, tokenizer, mask, str(folder))
    record = TextEncoderRecord(
        kind=source.kind,
        name=source.name,
        origin=source.origin,
        model_type=str(getattr(encoder.config, "model_type", source.model_type)),
        identity=identity,
        width=width,
        cross_attention_dim=int(cross_attention_dim),
        projection=width != cross_attention_dim,
        context_length=context,
        attention_mask=mask,
        trust_remote_code=source.remote_code,
    )
    encoder.eval().requires_grad_(False)
    projection = new_projection(width, cross_attention_dim, seed) if record.projection else None
    return TextParts(encoder, tokenizer, projection, record)


def _load_model(kind: str, model_dir: Path, remote: bool, name: str) -> Any:
    from transformers import AutoModel, CLIPTextModel

    try:
        with offline():
            if kind == "clip":
                return CLIPTextModel.from_pretrained(model_dir, local_files_only=True)
            return AutoModel.from_pretrained(model_dir, local_files_only=True, trust_remote_code=remote)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        raise InputError(f"{name}: cannot load the text encoder ({_first_line(exc)})") from None


def _open_clip_tower(source: Source) -> tuple[Any, Any, int]:
    """An open_clip model's text tower when it is a Hugging Face model (BiomedCLIP's PubMedBERT): its
    transformer and tokenizer, as transformers objects, and open_clip's context length. open_clip's own text
    transformer (OpenAI/OpenCLIP towers) has no Hugging Face form here: refused (those ship as CLIP folders)."""
    import open_clip

    name = f"local-dir:{source.folder}"
    try:
        with offline():
            model, _ = open_clip.create_model_from_pretrained(name, device="cpu")
            wrapped = open_clip.get_tokenizer(name)
    except Exception as exc:  # open_clip raises many types (its config names a hub model, missing weights, ...)
        raise InputError(
            f"--text-encoder {source.folder}: open_clip cannot load it offline ({_first_line(exc)}); a text tower "
            f"built on a Hugging Face model needs that model's config.json in a local folder named by "
            f"{OPEN_CLIP_CONFIG}'s hf_model_name, and its tokenizer files in {source.folder}"
        ) from None
    tower = getattr(model, "text", None)
    transformer = getattr(tower, "transformer", None)
    tokenizer = getattr(wrapped, "tokenizer", None)
    if transformer is None or not hasattr(transformer, "config") or not hasattr(tokenizer, "save_pretrained"):
        raise InputError(
            f"--text-encoder {source.folder}: its open_clip text tower is open_clip's own transformer, not a "
            "Hugging Face model; only Hugging Face based towers (BiomedCLIP) are supported"
        )
    return transformer, tokenizer, int(wrapped.context_length)


def _context_length(tokenizer: Any, config: Any, name: str) -> int:
    """The encoder's own context: its tokenizer's model_max_length, else its position embeddings."""
    stated = int(getattr(tokenizer, "model_max_length", _UNBOUNDED) or _UNBOUNDED)
    positions = getattr(config, "max_position_embeddings", None)
    if stated < _UNBOUNDED:
        return min(stated, int(positions)) if positions else stated
    if positions:
        return int(positions)
    raise InputError(f"--text-encoder {name}: no context length (set model_max_length in tokenizer_config.json)")


def _with_context(tokenizer: Any, context: int, name: str) -> Any:
    """A copy of the tokenizer (the loaded one is shared) with its context length stated (saved with it), and a
    padding token (its end token when it has none, as Generate to Ground does)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = int(context)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"--text-encoder {name}: its tokenizer has neither a padding nor an end token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _probe(encoder: Any, tokenizer: Any, mask: bool, name: str) -> int:
    """Run the encoder once on a full-length input: its forward must give per-token hidden states there."""
    import torch

    ids, attention = tokenize(tokenizer, ["a " * (tokenizer.model_max_length + 8)], mask)
    try:
        with torch.no_grad():
            hidden = hidden_states(encoder, ids, attention)
    except (TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
        raise InputError(
            f"--text-encoder {name}: its forward does not give per-token hidden states for "
            f"{tokenizer.model_max_length} tokens ({_first_line(exc)})"
        ) from None
    if hidden.ndim != 3 or hidden.shape[:2] != ids.shape:
        raise InputError(
            f"--text-encoder {name}: hidden states of shape {tuple(hidden.shape)}, not (batch, tokens, width)"
        )
    return int(hidden.shape[-1])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def new_projection(width: int, cross_attention_dim: int, seed: int) -> Any:
    """The learned map from the encoder's width to the UNet's (docs/method.md, "Text encoders"): a linear layer
    started semi-orthogonal (norm-preserving when it widens, as BERT-base 768 → SD2's 1024), bias zero."""
    import torch

    projection = torch.nn.Linear(width, cross_attention_dim)
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        torch.nn.init.orthogonal_(projection.weight, generator=generator)
        projection.bias.zero_()
    return projection


def read_record(model: str | os.PathLike) -> TextEncoderRecord | None:
    """A model folder's text encoder record, or None for a plain SD folder."""
    path = Path(model) / RECORD
    if not path.is_file():
        return None
    return TextEncoderRecord.from_dict(_read_json(path), path)


def load_text_parts(model: str | os.PathLike) -> TextParts:
    """The text side of a model folder: as its record says, or SD's CLIP pair when it has none."""
    from transformers import AutoModel, CLIPTextModel

    model = Path(model)
    record = read_record(model)
    part = model / "text_encoder"
    try:
        with offline():
            if record is None or record.kind == "clip":
                encoder = CLIPTextModel.from_pretrained(part, local_files_only=True)
            else:
                encoder = AutoModel.from_pretrained(
                    part, local_files_only=True, trust_remote_code=record.trust_remote_code
                )
    except pickle.UnpicklingError:  # weights_only refused a pickle that holds more than tensors
        raise unsafe_pickle(part) from None
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, json.JSONDecodeError) as exc:
        raise InputError(f"{part}: cannot load text_encoder ({_first_line(exc)})") from None
    try:
        tokenizer = load_tokenizer(model / "tokenizer")
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise InputError(f"{model / 'tokenizer'}: cannot load tokenizer ({_first_line(exc)})") from None
    projection = None
    if record is not None and record.projection:
        projection = load_projection(model / PROJECTION, record)
    return TextParts(encoder, tokenizer, projection, record)


def load_projection(folder: Path, record: TextEncoderRecord) -> Any:
    from safetensors.torch import load_file

    projection = new_projection(record.width, record.cross_attention_dim, seed=0)
    try:
        projection.load_state_dict(load_file(folder / "model.safetensors"))
    except (OSError, RuntimeError) as exc:
        raise InputError(f"{folder}: cannot load the text projection ({_first_line(exc)})") from None
    return projection


def save_text_parts(parts: TextParts, folder: Path, plain: bool) -> None:
    """Write the text side into a model folder being saved: the record always when there is one; the
    encoder and tokenizer in their own Hugging Face format, and the projection, unless `plain` (the pipeline's
    own save wrote the encoder and tokenizer)."""
    record = parts.record
    if record is None:
        return
    if not plain:
        parts.encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        parts.tokenizer.save_pretrained(folder / "tokenizer")
    if parts.projection is not None:
        from safetensors.torch import save_file

        (folder / PROJECTION).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in parts.projection.state_dict().items()}
        save_file(state, folder / PROJECTION / "model.safetensors")
        write_json(folder / PROJECTION / "config.json",
                   {"in_features": record.width, "out_features": record.cross_attention_dim, "bias": True})  # fmt: skip
    write_json(folder / RECORD, record.to_dict())


_TOKENIZERS: dict[tuple[str, bool], Any] = {}  # content digest of a tokenizer folder → the loaded tokenizer


def load_tokenizer(folder: str | os.PathLike, clip: bool | None = None, trust_remote_code: bool | None = None) -> Any:
    """A folder's tokenizer, loaded once per process for each distinct content: CLIP's as SD folders hold it
    (`clip`: None decides from tokenizer_config.json), any other through AutoTokenizer.

    Loading one takes about half a second (CLIP's vocabulary is parsed several times), and every fine-tuned
    run carries its own copy of the same files, so a report that samples and grounds many runs would
    otherwise spend minutes on it. The cache key is the files' bytes (a few ms to hash), so an edited
    tokenizer is loaded afresh. The tokenizer returned is shared: treat it as read-only.
    """
    from transformers import AutoTokenizer, CLIPTokenizer

    folder = Path(folder)
    if clip is None:
        config = folder / "tokenizer_config.json"
        named = json.loads(config.read_text()).get("tokenizer_class", "") if config.is_file() else ""
        clip = str(named).startswith("CLIPTokenizer") or ((folder / "merges.txt").is_file() and not named)
    if trust_remote_code is None:
        record = read_record(folder.parent)
        trust_remote_code = record is not None and record.trust_remote_code
    digest = hashlib.sha256()
    for file in sorted(f for f in folder.iterdir() if f.is_file()):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    key = (digest.hexdigest(), bool(clip))
    if key not in _TOKENIZERS:
        with offline():
            if clip:
                _TOKENIZERS[key] = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
            else:
                _TOKENIZERS[key] = AutoTokenizer.from_pretrained(
                    folder, local_files_only=True, trust_remote_code=trust_remote_code
                )
    return _TOKENIZERS[key]


# --- encoding ------------------------------------------------------------------------------------


def tokenize(tokenizer: Any, texts: list[str], mask: bool) -> tuple[Any, Any]:
    """Ids (batch, context) padded to the encoder's context length and truncated to it, and the padding mask
    when the encoder takes one (else None)."""
    tokens = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return tokens.input_ids, (tokens.attention_mask if mask else None)


def hidden_states(encoder: Any, input_ids: Any, attention_mask: Any = None) -> Any:
    """The encoder's last hidden states (batch, tokens, width): `last_hidden_state` where its output names one
    (transformers' models, CXR-BERT's own), else its first output."""
    output = encoder(input_ids, attention_mask=attention_mask)
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]


def condition(parts: TextParts, input_ids: Any, attention_mask: Any = None) -> Any:
    """What the UNet's cross-attention reads: hidden states, through the projection if there is one."""
    hidden = hidden_states(parts.encoder, input_ids, attention_mask)  # (batch, tokens, width)
    return hidden if parts.projection is None else parts.projection(hidden)  # (batch, tokens, cross dim)


def wants_mask(parts: TextParts) -> bool:
    """Whether the encoder is given the padding mask: as its record says; SD's CLIP as diffusers does."""
    if parts.record is not None:
        return parts.record.attention_mask
    return bool(getattr(parts.encoder.config, "use_attention_mask", False))


def encode(parts: TextParts, prompts: list[str], device: Any, dtype: Any = None) -> Any:
    """Prompts → (batch, tokens, cross-attention dim), without gradients."""
    import torch

    ids, mask = tokenize(parts.tokenizer, prompts, wants_mask(parts))
    with torch.no_grad():
        embeds = condition(parts, ids.to(device), None if mask is None else mask.to(device))
    return embeds if dtype is None else embeds.to(dtype)


def encode_text(comps: Any, prompts: list[str], device: Any) -> Any:
    """The UNet's context for `prompts` (batch, tokens, dim) from loaded components (`models.Components`): the
    model's text encoder as it was trained (SD's CLIP as diffusers, or the run's own encoder and projection).
    Shared by `ground` and the report's memorization scores."""
    return encode(comps.text, prompts, device)


def label(record: TextEncoderRecord | None) -> str:
    """How reports name a model's text encoder."""
    return "CLIP (base model's)" if record is None else record.name


def trained_parts(record: TextEncoderRecord | None, learnable: bool) -> str:
    """What fine-tuning trained, in words (the run table)."""
    parts = ["UNet"] + (["text encoder"] if learnable else [])
    if record is not None and record.projection:
        parts.append("text projection")
    return " + ".join(parts)


def state_part(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of a TextToNoise state dict under `prefix` (e.g. "text_projection."), prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def fresh_like(encoder: Any) -> Any:
    """A new encoder of the same class and config (weights to be loaded into it)."""
    return type(encoder)(encoder.config)


# --- `model pretrain-text` folders ---------------------------------------------------------------


def load_text_encoder(folder: str | os.PathLike, width: int | None = None) -> Any:
    """The pretrained `text_encoder/` of a pretrain-text folder (or any folder holding one), checked."""
    from transformers import CLIPTextModel

    folder = Path(folder)
    read_manifest(folder, "pretrain-text")
    try:
        encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    except pickle.UnpicklingError:
        raise unsafe_pickle(folder / "text_encoder") from None
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(
            f"{folder / 'text_encoder'}: cannot load the text encoder ({str(exc).splitlines()[0]})"
        ) from None
    if width is not None and encoder.config.hidden_size != width:
        raise InputError(
            f"--text-encoder {folder}: width {encoder.config.hidden_size} does not match --text-width {width}"
        )
    return encoder


# --- tiny BERTs (tests, the demo) and BERT-base's shape -------------------------------------------

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def wordpiece_tokenizer(texts: list[str], vocab_size: int, context_length: int) -> Any:
    """A lower-casing BERT WordPiece tokenizer trained on `texts` with the `tokenizers` library, as a fast
    transformers tokenizer ([CLS] text [SEP], padded with [PAD])."""
    from tokenizers import Tokenizer, models, trainers

    core = _bert_core(Tokenizer(models.WordPiece(unk_token="[UNK]")))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(BERT_SPECIALS), show_progress=False)
    core.train_from_iterator(texts, trainer)
    return _bert_tokenizer(core, context_length)


def vocabulary_tokenizer(vocabulary: list[str], context_length: int) -> Any:
    """A lower-casing BERT WordPiece tokenizer over a given vocabulary (its order is the ids)."""
    from tokenizers import Tokenizer, models

    vocab = {token: i for i, token in enumerate(vocabulary)}
    return _bert_tokenizer(_bert_core(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))), context_length)


def _bert_core(core: Any) -> Any:
    from tokenizers import decoders, normalizers, pre_tokenizers

    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    return core


def _bert_tokenizer(core: Any, context_length: int) -> Any:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    cls, sep = core.token_to_id("[CLS]"), core.token_to_id("[SEP]")
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        model_max_length=context_length,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


PUBLISHED_TEXT_ENCODERS: dict[str, dict[str, Any]] = {
    "bert-base": {  # google-bert/bert-base-uncased's config.json (the shape of CXR-BERT, RadBERT, PubMedBERT)
        "config": {
            "attention_probs_dropout_prob": 0.1,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": 768,
            "initializer_range": 0.02,
            "intermediate_size": 3072,
            "layer_norm_eps": 1e-12,
            "max_position_embeddings": 512,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "pad_token_id": 0,
            "type_vocab_size": 2,
            "vocab_size": 30522,
        },
        "parameters": 109_482_240,  # BertModel with its pooler
    },
}


def published_text_encoder(like: str) -> Any:
    """A BertModel of a published shape on the meta device (nothing allocated; `fill_random` of model.published
    fills it)."""
    from accelerate import init_empty_weights
    from transformers import BertConfig, BertModel

    if like not in PUBLISHED_TEXT_ENCODERS:
        raise InputError(f"--text-encoder-like {like!r}: expected one of {', '.join(PUBLISHED_TEXT_ENCODERS)}")
    with init_empty_weights():
        return BertModel(BertConfig(**PUBLISHED_TEXT_ENCODERS[like]["config"]))


def tiny_bert_config(tokenizer: Any, width: int, layers: int, heads: int) -> Any:
    """A BERT config of a tiny width over `tokenizer`'s vocabulary and context."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        max_position_embeddings=int(tokenizer.model_max_length),
        pad_token_id=tokenizer.pad_token_id,
    )


def write_tiny_bert(
    out: str | os.PathLike, texts: list[str], width: int = 24, layers: int = 2, heads: int = 2,
    vocab_size: int = 200, context_length: int = 64, seed: int = 0,
) -> Path:  # fmt: skip
    """A random tiny BERT with a WordPiece tokenizer trained on `texts`, as a local Hugging Face folder
    (config.json, model.safetensors, tokenizer files): what `finetune --text-encoder` takes."""
    import torch
    from transformers import BertModel

    tokenizer = wordpiece_tokenizer(texts, vocab_size, context_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(tiny_bert_config(tokenizer, width, layers, heads))
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out

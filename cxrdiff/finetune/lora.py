"""LoRA fine-tuning (`finetune --lora-rank R`): the training mode, and everything about the adapters, in one place.

The training mode (`TrainingMode`: full, or LoRA with its rank, alpha, dropout and targets) is a record with one
reader: built from the config here, it joins the run's settings key (LoRA fields only, so that full fine-tunes keep
the key they always had), is written to the manifest as `training_mode`, and is read back only by
`TrainingMode.of_manifest` (the report's groups and names, a kept checkpoint's export).

The adapters are peft's LoRA layers injected in place into the UNet (its attention projections by default) and,
with a learnable text encoder, into the text encoder's attention projections; every base weight is frozen. A run
folder holds them in diffusers' LoRA format (`pytorch_lora_weights.safetensors`, what
`StableDiffusionPipeline.save_lora_weights` writes), so `pipe.load_lora_weights(run)` on the base model gives the
trained model, and beside them the merged model that `sample`, `ground` and `report` read as any other run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cxrdiff.config import check_ranges
from cxrdiff.errors import InputError

LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "text_lora_rank")  # FinetuneConfig's
ADAPTERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name: load_lora_weights finds it
ADAPTER = "default"  # peft's adapter name; one adapter per module
# The text encoder's attention projections by family, the first family whose every name is found is used: CLIP
# (SD's text encoders) and BERT (e.g. CXR-BERT).
TEXT_TARGETS = {
    "CLIP": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "BERT": ("query", "key", "value", "attention.output.dense"),
}


@dataclasses.dataclass(frozen=True)
class TrainingMode:
    """What a run trains: every weight (`full`, the paper) or LoRA adapters (`lora`). `alpha` and `text_alpha` are
    resolved (the scale of an adapter is alpha / rank); `text_rank` is None when the text encoder has no adapters
    (frozen)."""

    kind: str = "full"
    rank: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    text_rank: int | None = None
    text_alpha: float | None = None

    @classmethod
    def of_config(cls, config: Any) -> TrainingMode:
        if config.lora_rank is None:
            return cls()
        text_rank = None if config.frozen_text else (config.text_lora_rank or config.lora_rank)
        alpha = config.lora_alpha
        return cls(
            kind="lora",
            rank=int(config.lora_rank),
            alpha=float(config.lora_rank if alpha is None else alpha),
            dropout=float(config.lora_dropout),
            targets=tuple(config.lora_targets),
            text_rank=text_rank,
            text_alpha=None if text_rank is None else float(text_rank if alpha is None else alpha),
        )

    @classmethod
    def of_manifest(cls, manifest: Mapping[str, Any]) -> TrainingMode:
        """The mode a finished run recorded (`training_mode`; without one, full fine-tuning)."""
        record = dict(manifest.get("training_mode") or {"kind": "full"})
        if record.get("kind", "full") == "full":
            return cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        record["targets"] = tuple(record.get("targets") or ())
        return cls(**{k: v for k, v in record.items() if k in fields})

    @property
    def lora(self) -> bool:
        return self.kind == "lora"

    def record(self, text_targets: Iterable[str] = ()) -> dict[str, Any]:
        """The manifest's `training_mode` (with the text encoder's targets, found in its modules)."""
        if not self.lora:
            return {"kind": "full"}
        record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        return record | ({"text_targets": list(text_targets)} if self.text_rank else {})

    def settings(self) -> dict[str, Any]:
        """What joins the settings key: nothing for full fine-tuning (its key holds no LoRA field), else the
        LoRA fields with alpha resolved, so an explicit alpha equal to the default is the same run."""
        if not self.lora:
            return {}
        return {
            "lora_rank": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "lora_targets": list(self.targets),
            "text_lora_rank": self.text_rank,
            "text_lora_alpha": self.text_alpha,
        }

    def label(self) -> str:
        """'' for full fine-tuning, else 'LoRA r16' (with the text encoder's rank when it differs)."""
        if not self.lora:
            return ""
        text = f", text r{self.text_rank}" if self.text_rank not in (None, self.rank) else ""
        return f"LoRA r{self.rank}{text}"


def check_values(config: Any) -> None:
    """Refuse LoRA values out of range, and LoRA options without --lora-rank, before anything is read."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    if config.lora_rank is None:
        given = [name for name in LORA_FIELDS if getattr(config, name) != defaults[name]]
        if given:
            option = "--lora-target" if given[0] == "lora_targets" else f"--{given[0].replace('_', '-')}"
            raise InputError(f"{option}: needs --lora-rank (without it every weight trains)")
        return
    check_ranges(config)  # rank ≥ 1, alpha > 0, dropout in [0, 1): the ranges beside the fields
    if not config.lora_targets or not all(str(t).strip() for t in config.lora_targets):
        raise InputError("--lora-target: give at least one module name (default: the UNet's attention projections)")
    if config.text_lora_rank is not None and config.frozen_text:
        raise InputError("--text-lora-rank: the text encoder is frozen (--frozen-text); give --learnable-text")


def check_targets(mode: TrainingMode, model_dir: Path) -> None:
    """Refuse a LoRA target that names no layer peft can adapt in the base model's UNet, and a text encoder whose
    attention projections are not known, from the configs alone (modules built on the meta device)."""
    if not mode.lora:
        return
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir / "unet"))
    for target in mode.targets:
        found = matching(unet, target)
        if not found:
            raise InputError(f"--lora-target {target}: no such module in the UNet of {model_dir}")
        if not all(adaptable(m) for m in found):
            kind = type(next(m for m in found if not adaptable(m))).__name__
            raise InputError(f"--lora-target {target}: matches a {kind}; LoRA adapts Linear and Conv2d layers")
    if mode.text_rank:
        from transformers import AutoConfig, AutoModel

        with init_empty_weights():
            text = AutoModel.from_config(AutoConfig.from_pretrained(model_dir / "text_encoder", local_files_only=True))
        text_targets(text, model_dir / "text_encoder")


def matching(module: Any, target: str) -> list[Any]:
    """The submodules a peft target string names: the module named so, or whose name ends with '.' + target."""
    return [m for name, m in module.named_modules() if name == target or name.endswith("." + target)]


def adaptable(module: Any) -> bool:
    """A layer LoRA adapts here (Linear or Conv2d), or one adapted already."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, torch.nn.Linear | torch.nn.Conv2d | BaseTunerLayer)


def text_targets(text_encoder: Any, where: Any = "the text encoder") -> tuple[str, ...]:
    """The text encoder's attention projections: the first known family (`TEXT_TARGETS`) found whole."""
    for names in TEXT_TARGETS.values():
        if all(matching(text_encoder, n) and all(adaptable(m) for m in matching(text_encoder, n)) for n in names):
            return names
    known = "; ".join(f"{family}: {', '.join(names)}" for family, names in TEXT_TARGETS.items())
    raise InputError(f"{where}: no known attention projections for LoRA ({known})")


def lora_config(rank: int, alpha: float, dropout: float, targets: Iterable[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))


def set_trainable(mode: TrainingMode, unet: Any, text_encoder: Any, train_text: bool, seed: int) -> None:
    """Mark what trains: full, the UNet and (learnable) the text encoder whole; LoRA, only the adapters, added
    here (their initial values drawn from `seed`, so a run's start does not depend on what ran before it)."""
    if not mode.lora:
        unet.requires_grad_(True)
        text_encoder.requires_grad_(train_text)
        return
    text_encoder.requires_grad_(False)  # frozen unless it gets adapters
    add_adapters(mode, unet, text_encoder if train_text else None, seed)


def add_adapters(mode: TrainingMode, unet: Any = None, text_encoder: Any = None, seed: int = 0) -> None:
    """LoRA: freeze every base weight of the modules given and inject their adapters (the text encoder's only when
    the mode has them); only adapter weights train. Full fine-tuning: nothing to add."""
    import torch
    from peft import inject_adapter_in_model

    if not mode.lora:
        return
    parts = []
    if unet is not None:
        parts.append((unet, lora_config(mode.rank, mode.alpha, mode.dropout, mode.targets)))  # type: ignore[arg-type]
    if text_encoder is not None and mode.text_rank:
        targets = text_targets(text_encoder)
        parts.append((text_encoder, lora_config(mode.text_rank, mode.text_alpha, mode.dropout, targets)))  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module, config in parts:
            module.requires_grad_(False)
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
            for name, param in module.named_parameters():
                param.requires_grad_(".lora_" in name)


def trainable(module: Any) -> list[tuple[str, Any]]:
    """A module's trained parameters, by name (full fine-tuning: all of the UNet's; LoRA: its adapters)."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def parameter_counts(unet: Any, text_encoder: Any) -> dict[str, Any]:
    """Trainable and total parameters of the UNet, the text encoder and both (adapters included in total)."""
    counts: dict[str, Any] = {}
    for part, module in (("unet", unet), ("text_encoder", text_encoder)):
        params = list(module.parameters())
        counts[part] = {"trainable": sum(p.numel() for p in params if p.requires_grad),
                        "total": sum(p.numel() for p in params)}  # fmt: skip
    counts["trainable"] = counts["unet"]["trainable"] + counts["text_encoder"]["trainable"]
    counts["total"] = counts["unet"]["total"] + counts["text_encoder"]["total"]
    return counts


def adapter_layers(module: Any) -> dict[str, Any]:
    """A module's adapters as diffusers' LoRA state dict, each adapter's scale (alpha / rank) folded into its up
    weight: diffusers reads a LoRA file without metadata as alpha = rank, in every version that loads one."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER).items()}
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer) and ADAPTER in layer.scaling:
            state[f"{name}.lora_B.weight"] *= layer.scaling[ADAPTER]
    return convert_state_dict_to_diffusers(state)


def write_adapters(folder: Path, unet: Any, text_encoder: Any = None) -> Path:
    """`folder/pytorch_lora_weights.safetensors` as `StableDiffusionPipeline.save_lora_weights` writes it (the
    caller's folder is a temporary one that lands whole)."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=adapter_layers(unet),
        text_encoder_lora_layers=adapter_layers(text_encoder) if text_encoder is not None else None,
        weight_name=ADAPTERS_FILE,
        safe_serialization=True,
    )
    return Path(folder) / ADAPTERS_FILE


def merged(module: Any) -> Any:
    """The module with its adapters merged into the base weights and the LoRA layers gone: a plain module that
    saves as the base architecture. Hand-written because peft's merge_and_unload needs a PeftModel wrapper and
    these adapters are injected in place; each layer's own `merge` does the arithmetic."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge(safe_merge=True, adapter_names=[ADAPTER])
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    return module


def export_adapters(folder: Path, mode: TrainingMode, unet: Any, text_encoder: Any) -> tuple[Any, Any]:
    """LoRA: write the adapters file into `folder` (the text encoder's too when it has adapters), then merge them
    into the weights; returns the plain UNet and text encoder to save. Full fine-tuning: the modules as given."""
    if not mode.lora:
        return unet, text_encoder
    with_text = bool(mode.text_rank)
    write_adapters(folder, unet, text_encoder if with_text else None)
    return merged(unet), merged(text_encoder) if with_text else text_encoder

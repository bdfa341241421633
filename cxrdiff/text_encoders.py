"""Text encoders a model is built around, read from local folders (nothing is downloaded).

Today: the tiny CLIP text encoder that `cxrdiff model pretrain-text` writes, checked for the width the model
wants. One reader per kind of encoder lives here, so that `models` and the steps never learn where one came from.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import read_manifest
from cxrdiff.errors import InputError, unsafe_pickle


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

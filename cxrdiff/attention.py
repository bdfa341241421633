"""Capture where the UNet looks for each text token: cross-attention maps summed while it runs.

`AttentionCapture` is a context manager that swaps a capturing processor into every cross-attention
layer (`attn2`) of a diffusers `UNet2DConditionModel` and puts the original processors back on exit,
even when the block raises. While `capture.active` is true, each layer's softmax probabilities are
averaged over heads, replicated (nearest) up to the latent grid and added to one running sum per
sample and token; `capture.maps()` divides by the number of maps added, which is the uniform average
over layers and active steps. Only sums are kept, so memory does not grow with the number of steps.
Self-attention, and cross-attention while inactive, keep the original (SDPA) processor.

Under bf16/fp16 the UNet's own output is computed as before, but the probabilities that are captured are the
float32 softmax of the same query-key scores, and the head mean and the sums are float32: the reference code
saved float32 maps, and bf16's 8-bit mantissa would otherwise round every probability before it is summed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from cxrdiff.errors import RunError


def layer_grid(tokens_hw: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a layer with `tokens_hw` positions in a UNet on a `latent_hw` grid (halved per level)."""
    height, width = latent_hw
    factor = 1
    while factor <= max(height, width):
        h, w = math.ceil(height / factor), math.ceil(width / factor)
        if h * w == tokens_hw:
            return h, w
        factor *= 2
    raise RunError(f"cross-attention layer with {tokens_hw} positions does not fit the latent grid {height}x{width}")


class CaptureProcessor:
    """Computes cross-attention with explicit probabilities (as diffusers' `AttnProcessor`) and hands them
    to the capture; delegates to the layer's original processor whenever the capture is inactive."""

    def __init__(self, capture: AttentionCapture, original: Any, name: str):
        self.capture = capture
        self.original = original
        self.name = name

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self.capture.active or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        grid = None
        if hidden_states.ndim == 4:
            batch, channels, height, width = hidden_states.shape
            grid = (height, width)
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (batch, hw, ch)
        batch, n_tokens, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, n_tokens, batch)  # (batch*heads, q|1, tokens)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states), out_dim=4)  # (batch, heads, hw, head_dim)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states), out_dim=4)  # (batch, heads, tokens, head_dim)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))  # (batch*heads, tokens, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        heads, head_dim = query.shape[1], query.shape[-1]
        query = query.reshape(batch * heads, -1, head_dim)  # (batch*heads, hw, head_dim)
        key = key.reshape(batch * heads, -1, head_dim)  # (batch*heads, tokens, head_dim)
        # get_attention_scores applies the layer's own scale, upcasting and additive mask
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch*heads, hw, tokens)
        captured = probs
        if probs.dtype != torch.float32:  # bf16/fp16: the captured copy is the float32 softmax of the same scores
            mask32 = None if attention_mask is None else attention_mask.float()
            captured = attn.get_attention_scores(query.float(), key.float(), mask32)  # (batch*heads, hw, tokens)
        self.capture.add(captured.view(batch, heads, probs.shape[1], probs.shape[2]), grid)

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))  # (batch, hw, heads*head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if grid is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, -1, *grid)  # (batch, ch, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionCapture:
    """`with AttentionCapture(unet, latent_hw) as capture:` run the UNet, set `capture.active` per step,
    read `capture.maps()` (batch, tokens, height, width).

    `drop_uncond=True` for a classifier-free-guidance batch [uncond, cond]: the first half is dropped
    explicitly; otherwise every sample in the batch is kept. `layers` picks cross-attention layers by a
    predicate on their module name (default: every `attn2`).
    """

    def __init__(
        self,
        unet: Any,
        latent_hw: tuple[int, int],
        drop_uncond: bool = False,
        layers: Callable[[str], bool] | None = None,
    ):
        self.unet = unet
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.drop_uncond = drop_uncond
        self.layers = layers
        self.active = False
        self.sums: torch.Tensor | None = None  # (batch, tokens, height, width), float32
        self.count = 0
        self.layer_names: list[str] = []
        self._original: dict[str, Any] | None = None

    def __enter__(self) -> AttentionCapture:
        original = dict(self.unet.attn_processors)
        swapped: dict[str, Any] = {}
        for key, processor in original.items():
            name = key.removesuffix(".processor")
            if name.split(".")[-1] == "attn2" and (self.layers is None or self.layers(name)):
                swapped[key] = CaptureProcessor(self, processor, name)
                self.layer_names.append(name)
            else:
                swapped[key] = processor
        if not self.layer_names:
            raise RunError("the UNet has no cross-attention (attn2) layer to capture")
        self._original = original
        self.unet.set_attn_processor(swapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._original is not None:
            self.unet.set_attn_processor(self._original)
            self._original = None
        self.active = False

    def reset(self) -> None:
        """Forget the sums (start of a new batch)."""
        self.sums, self.count = None, 0

    def add(self, probs: torch.Tensor, grid: tuple[int, int] | None = None) -> None:
        """Add one layer's probabilities (batch, heads, hw, tokens) to the running sums."""
        if self.drop_uncond:
            if probs.shape[0] % 2:
                raise RunError(f"guidance batch of {probs.shape[0]} cannot be split into [uncond, cond] halves")
            probs = probs[probs.shape[0] // 2 :]  # (batch, heads, hw, tokens): the conditional half
        batch, _, hw, tokens = probs.shape
        h, w = grid or layer_grid(hw, self.latent_hw)
        mean = probs.mean(dim=1, dtype=torch.float32)  # (batch, hw, tokens)
        maps = mean.transpose(1, 2).reshape(batch, tokens, h, w)  # (batch, tokens, h, w)
        if (h, w) != self.latent_hw:
            maps = F.interpolate(maps, size=self.latent_hw, mode="nearest")  # (batch, tokens, H, W)
        if self.sums is None:
            self.sums = maps.clone()
        elif self.sums.shape != maps.shape:
            raise RunError(f"captured maps changed shape from {tuple(self.sums.shape)} to {tuple(maps.shape)}")
        else:
            self.sums += maps
        self.count += 1

    def maps(self) -> torch.Tensor:
        """The average map per sample and token (batch, tokens, height, width)."""
        if self.sums is None or self.count == 0:
            raise RunError("no cross-attention was captured (was `capture.active` set during a UNet call?)")
        return self.sums / self.count

    def nbytes(self) -> int:
        """Bytes held by the capture's state: constant in the number of steps."""
        return 0 if self.sums is None else self.sums.numel() * self.sums.element_size()

"""Cross-attention capture: exact maps, restored processors, CFG halves, constant memory."""

import pytest
import torch

from cxrdiff.attention import AttentionCapture, CaptureProcessor, layer_grid
from cxrdiff.errors import RunError


@pytest.fixture(scope="module")
def comps(tiny_model):
    from cxrdiff.models import load_components

    return load_components(tiny_model)


def _inputs(comps, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    channels, height, width = comps.latent_shape
    latents = torch.randn(batch, channels, height, width, generator=g)  # (batch, C, H, W)
    context = torch.randn(batch, comps.tokenizer.model_max_length, comps.unet.config.cross_attention_dim, generator=g)
    return latents, context


def _run(comps, latents, context, t=500):
    with torch.no_grad():
        return comps.unet(latents, t, encoder_hidden_states=context).sample


def test_layer_grid_follows_the_latent_grid():
    assert layer_grid(16 * 16, (16, 16)) == (16, 16)
    assert layer_grid(8 * 8, (16, 16)) == (8, 8)
    assert layer_grid(4 * 3, (8, 5)) == (4, 3)  # odd sizes round up, as the UNet's strided convs do
    with pytest.raises(RunError, match="does not fit"):
        layer_grid(7, (16, 16))


def test_processors_restored_and_outputs_unchanged(comps):
    latents, context = _inputs(comps, batch=1)
    before_procs = dict(comps.unet.attn_processors)
    before = _run(comps, latents, context)
    with AttentionCapture(comps.unet, comps.latent_shape[1:]) as capture:
        capture.active = True
        during = _run(comps, latents, context)
        swapped = comps.unet.attn_processors
        assert all(isinstance(p, CaptureProcessor) for k, p in swapped.items() if "attn2" in k)
        assert all(p is before_procs[k] for k, p in swapped.items() if "attn1" in k)  # self-attention keeps SDPA
    assert comps.unet.attn_processors == before_procs
    assert torch.equal(_run(comps, latents, context), before)
    # the explicit-probability path computes the same attention as SDPA
    torch.testing.assert_close(during, before, atol=1e-5, rtol=1e-4)


def test_processors_restored_after_an_error(comps):
    latents, context = _inputs(comps, batch=1)
    before_procs = dict(comps.unet.attn_processors)
    before = _run(comps, latents, context)
    with pytest.raises(ValueError, match="boom"), AttentionCapture(comps.unet, comps.latent_shape[1:]) as capture:
        capture.active = True
        _run(comps, latents, context)
        raise ValueError("boom")
    assert comps.unet.attn_processors == before_procs
    assert torch.equal(_run(comps, latents, context), before)


def test_capture_equals_manual_softmax_of_one_layer(comps):
    """One layer, one step: the captured map equals softmax(q k^T · scale) from the layer's own weights."""
    latents, context = _inputs(comps)
    names = [n for n, _ in comps.unet.named_modules() if n.endswith("attn2")]
    name = names[0]
    module = dict(comps.unet.named_modules())[name]
    seen = {}
    hook = module.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(hidden=args[0], context=kwargs["encoder_hidden_states"]),
        with_kwargs=True,
    )
    try:
        with AttentionCapture(comps.unet, comps.latent_shape[1:], layers=lambda n: n == name) as capture:
            capture.active = True
            _run(comps, latents, context)
    finally:
        hook.remove()
    assert capture.layer_names == [name] and capture.count == 1
    got = capture.maps()  # (batch, tokens, H, W)

    hidden, ctx = seen["hidden"], seen["context"]  # (batch, hw, ch), (batch, tokens, dim)
    batch, hw, _ = hidden.shape
    heads = module.heads
    with torch.no_grad():
        q = module.to_q(hidden).view(batch, hw, heads, -1).permute(0, 2, 1, 3)  # (batch, heads, hw, d)
        k = module.to_k(ctx).view(batch, ctx.shape[1], heads, -1).permute(0, 2, 1, 3)  # (batch, heads, tokens, d)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (batch, heads, hw, tokens)
    _, height, width = comps.latent_shape
    side = int(round(hw**0.5))
    assert side * side == hw
    manual = probs.mean(1).transpose(1, 2).reshape(batch, -1, side, side)  # (batch, tokens, side, side)
    factor = height // side
    manual = manual.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)  # (batch, tokens, H, W)
    torch.testing.assert_close(got, manual, atol=1e-6, rtol=1e-5)


def test_maps_are_probabilities_averaged_over_layers(comps):
    latents, context = _inputs(comps)
    with AttentionCapture(comps.unet, comps.latent_shape[1:]) as capture:
        capture.active = True
        _run(comps, latents, context)
    maps = capture.maps()
    assert capture.count == len(capture.layer_names) == 4  # the tiny UNet has 4 cross-attention layers
    assert maps.shape == (latents.shape[0], context.shape[1], *comps.latent_shape[1:])
    torch.testing.assert_close(maps.sum(1), torch.ones_like(maps.sum(1)))  # softmax over tokens sums to 1


def test_guidance_batch_drops_exactly_the_unconditional_half(comps):
    latents, context = _inputs(comps, batch=1)
    uncond = torch.zeros_like(context)
    with AttentionCapture(comps.unet, comps.latent_shape[1:]) as capture:
        capture.active = True
        _run(comps, latents, context)
    alone = capture.maps()
    with AttentionCapture(comps.unet, comps.latent_shape[1:], drop_uncond=True) as capture:
        capture.active = True
        _run(comps, torch.cat([latents, latents]), torch.cat([uncond, context]))
    torch.testing.assert_close(capture.maps(), alone, atol=1e-6, rtol=1e-5)
    with AttentionCapture(comps.unet, comps.latent_shape[1:]) as capture:  # no guidance: nothing is dropped
        capture.active = True
        _run(comps, torch.cat([latents, latents]), torch.cat([uncond, context]))
    assert capture.maps().shape[0] == 2


def test_inactive_steps_add_nothing_and_memory_is_constant(comps):
    latents, context = _inputs(comps, batch=1)
    sizes = {}
    for steps in (2, 6):
        with AttentionCapture(comps.unet, comps.latent_shape[1:]) as capture:
            with pytest.raises(RunError, match="no cross-attention was captured"):
                _run(comps, latents, context)
                capture.maps()
            for i in range(steps):
                capture.active = i >= steps - 2  # a window of the last 2 steps
                _run(comps, latents, context, t=900 - 100 * i)
            assert capture.count == 2 * len(capture.layer_names)
            sizes[steps] = capture.nbytes()
    assert sizes[2] == sizes[6] > 0


def test_bf16_capture_matches_fp32_within_bf16_resolution(comps):
    """The same UNet (weights and inputs exactly representable in bf16) run in fp32 and in bf16: the summed
    maps differ by less than bf16's unit roundoff (2^-8) of the map's scale, and the bf16 run's captured
    probabilities are float32 softmaxes (each position's token probabilities sum to 1 to float32 precision,
    which bf16-rounded probabilities would miss by about 2^-8)."""
    import copy

    unet32 = copy.deepcopy(comps.unet)
    with torch.no_grad():
        for parameter in unet32.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    unet16 = copy.deepcopy(unet32).to(torch.bfloat16)
    latents, context = (x.to(torch.bfloat16).float() for x in _inputs(comps, batch=2))

    def summed(unet, dtype):
        with torch.no_grad(), AttentionCapture(unet, comps.latent_shape[1:]) as capture:
            capture.active = True
            for t in (900, 500, 100):
                unet(latents.to(dtype), t, encoder_hidden_states=context.to(dtype))
            return capture.sums, capture.count

    sums32, count = summed(unet32, torch.float32)
    sums16, count16 = summed(unet16, torch.bfloat16)
    assert sums16.dtype == torch.float32 and count16 == count
    unit_roundoff = torch.finfo(torch.bfloat16).eps / 2  # 2^-8
    assert (sums16 - sums32).abs().max() < unit_roundoff * sums32.abs().max()
    # every captured softmax row sums to 1: the token sums of the summed map equal the number of maps
    torch.testing.assert_close(sums16.sum(dim=1), torch.full_like(sums16[:, 0], float(count)), atol=1e-4, rtol=0)

"""Speed levers change speed, not numbers: --compile, --fused-adamw and --channels-last on the tiny model give
the losses and maps of the plain run; the capture does not break the compiled graph; CPU threads per process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_prepared import PINNED_FROZEN_LOSSES, build_prepared, logged_losses, tiny_run

from cxrdiff import speed
from cxrdiff.finetune import finetune


@pytest.fixture
def traced_compile(monkeypatch):
    """torch.compile through Dynamo and AOTAutograd (where graphs break), run eagerly: Inductor's C++
    kernels take minutes per graph on a CPU. bench/gpu.sh measures Inductor on a GPU."""
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model):

    return build_prepared(tmp_path_factory.mktemp("prep") / "prepared", model=tiny_model)


def _run(prepared: Path, model: Path, out: Path, **levers) -> list[float]:
    finetune(tiny_run(prepared, model, out, **levers))
    manifest = json.loads((out / "manifest.json").read_text())
    for name, value in levers.items():
        assert manifest["config"][name] == value  # recorded, so a reader knows how the run was made
    return logged_losses(out)


@pytest.mark.slow
def test_compiled_finetune_gives_the_plain_losses(tmp_path, prepared, tiny_model, traced_compile):
    losses = _run(prepared, tiny_model, tmp_path / "compiled", compile=True)
    assert losses == pytest.approx(PINNED_FROZEN_LOSSES, rel=1e-5)


def test_fused_adamw_and_channels_last_give_the_plain_losses(tmp_path, prepared, tiny_model):
    losses = _run(prepared, tiny_model, tmp_path / "levers", fused_adamw=True, channels_last=True, tf32=True)
    assert losses == pytest.approx(PINNED_FROZEN_LOSSES, rel=1e-5)


def test_a_run_stopped_plain_resumes_with_the_levers_to_the_plain_losses(tmp_path, prepared, tiny_model):
    """The levers change how fast, not what is trained: a run stopped after step 2 resumes with them on (the
    folder takes it as the same run) and ends with the uninterrupted plain run's losses."""
    from cxrdiff.errors import Stopped

    out = tmp_path / "resumed"
    with pytest.raises(Stopped, match="stopped by a signal after step 2"):
        finetune(tiny_run(prepared, tiny_model, out, stop_after_step=2))
    finetune(tiny_run(prepared, tiny_model, out, fused_adamw=True, channels_last=True, tf32=True))
    assert logged_losses(out) == pytest.approx(PINNED_FROZEN_LOSSES, rel=1e-5)


def _maps(comps, **levers):
    from cxrdiff.ground import GroundConfig, capture_maps

    speed.speed_up_unet(comps.unet, **levers)
    latents = torch.randn((2, *comps.latent_shape), generator=torch.Generator().manual_seed(0))
    ids = comps.tokenizer(["small left pleural effusion", "cardiomegaly"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        context = comps.text_encoder(ids.input_ids)[0]  # (batch, tokens, width)
        uncond = comps.text_encoder(comps.tokenizer([""], padding="max_length", return_tensors="pt").input_ids)[0]
    config = GroundConfig(steps=4, window=3, guidance=2.0)
    return capture_maps(comps, latents, context, config, [1, 2], uncond)  # (batch, tokens, H, W)


@pytest.mark.slow
def test_compiled_grounding_gives_the_plain_maps(traced_compile):
    from cxrdiff.model.tiny import tiny_components

    plain = _maps(tiny_components(seed=0))
    compiled = _maps(tiny_components(seed=0), compile=True, channels_last=True)
    assert torch.allclose(compiled, plain, rtol=1e-4, atol=1e-7)


def test_the_capture_does_not_break_the_compiled_graph():
    from cxrdiff.attention import AttentionCapture
    from cxrdiff.model.tiny import tiny_components

    unet = tiny_components(seed=0).unet.eval()
    latents = torch.randn(4, 4, 16, 16)  # a guidance batch: [uncond, uncond, cond, cond]
    context = torch.randn(4, 77, unet.config.cross_attention_dim)
    torch._dynamo.reset()
    with torch.no_grad(), AttentionCapture(unet, (16, 16), drop_uncond=True) as capture:
        capture.active = True
        explained = torch._dynamo.explain(unet)(latents, torch.tensor(10), encoder_hidden_states=context)
        assert capture.count >= 2  # the tiny UNet's two cross-attention layers were captured while traced
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_threads_per_process_keep_processes_times_threads_within_the_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(speed, "cpu_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    try:
        assert speed.limit_cpu_threads(torch.device("cpu")) == 5 == torch.get_num_threads()  # 3 × 5 ≤ 16
        assert speed.limit_cpu_threads(torch.device("cpu"), processes=32) == 1  # never 0
        assert speed.limit_cpu_threads(torch.device("cuda")) is None  # GPUs: the host threads are not the work
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert speed.limit_cpu_threads(torch.device("cpu")) is None  # alone: PyTorch's default
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        assert speed.limit_cpu_threads(torch.device("cpu")) is None  # the user's choice wins
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(speed.cpu_cores() < 2, reason="side by side needs two cores")
def test_side_by_side_keeps_the_order_and_gives_each_process_its_share_of_the_cores():
    assert speed.side_by_side(pow, [(2, 3), (3, 2), (2, 5)], workers=2) == [8, 9, 32]
    cores = speed.cpu_cores()
    assert speed.side_by_side(torch.get_num_threads, [(), ()], workers=2) == [cores // 2] * 2  # in 2 processes
    assert speed.side_by_side(torch.get_num_threads, [()], workers=2) == [torch.get_num_threads()]  # one: here

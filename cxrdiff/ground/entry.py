"""`cxrdiff ground`'s entry: check → samples → load → loop → merge. Per run and batch: capture the maps, score
them, draw the overlays (first run), save a part file (the resume point); rank 0 merges the parts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import StepFolder
from cxrdiff.console import log, progress
from cxrdiff.ground.capture import capture_batch, load_model
from cxrdiff.ground.config import STEP, GroundConfig, ground_settings
from cxrdiff.ground.inputs import check_inputs, check_words, load_samples
from cxrdiff.ground.overlays import write_overlays
from cxrdiff.ground.parts import merge, pending, save_part
from cxrdiff.ground.score import score_chunk
from cxrdiff.ground.tables import step_result


def ground(config: GroundConfig) -> dict[str, Any]:
    """Ground the phrases, score them, and write heatmaps, overlays, scores, summary and manifest."""
    from accelerate import PartialState

    check_inputs(config)
    out = Path(config.out)
    samples = load_samples(config)
    check_words(config, samples)
    state = PartialState()
    folder = StepFolder.claim(out, STEP, ground_settings(config), create=state.is_main_process)
    if folder.finished:
        log.info("%s: already complete; nothing to do", out)
        return step_result(out, json.loads((out / "summary.json").read_text()))
    parts = out / ".parts"
    if state.is_main_process:
        parts.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

    model = load_model(config, samples, state.device)
    tokenizer = model.comps.tokenizer
    chunks = [samples[i : i + config.batch_size] for i in range(0, len(samples), config.batch_size)]
    todo = pending(parts, config.noise_seeds, len(chunks), state.process_index, state.num_processes)
    for run, c in progress(todo, description="grounding"):
        maps, latents = capture_batch(chunks[c], run, model, config)  # (b, tokens, H, W), (b, C, H, W)
        result = score_chunk(chunks[c], maps, config, tokenizer, model.frame_size, run)
        if run == 0 and config.overlays:
            write_overlays(out, config, chunks[c], result["heatmaps"], latents, model.comps, model.frame_size)
        save_part(parts, run, c, result)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    return step_result(out, merge(folder, parts, config, len(chunks), samples, model.frame_size))

"""`cxrdiff ground`'s entry: check → samples → load → loop → merge. Per run and batch: capture the maps, score
them, draw the overlays (first run), save a part file (the resume point); rank 0 merges the parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrdiff.console import log, progress
from cxrdiff.distributed import process_state
from cxrdiff.ground.capture import capture_batch, load_model
from cxrdiff.ground.config import STEP, GroundConfig, ground_settings
from cxrdiff.ground.inputs import check_inputs, check_words, load_samples
from cxrdiff.ground.overlays import write_overlays
from cxrdiff.ground.parts import merge, pending, save_part
from cxrdiff.ground.score import score_chunk
from cxrdiff.ground.tables import read_summary, step_result
from cxrdiff.shards import claim_share, finish_share, label, share
from cxrdiff.stopping import stop_signals


def ground(config: GroundConfig) -> dict[str, Any]:
    """Ground the phrases, score them, and write heatmaps, overlays, scores, summary and manifest.

    The (run, batch) pairs are shared like `sample`'s images: rank p of P in shard i of N (`--shard`) takes
    every (i·P + p)-th of N·P. Whoever completes the last pair merges (or `--finalize` does). SIGTERM /
    SIGUSR1 stop after the current batch (exit 75); the same command resumes."""
    check_inputs(config)
    out = Path(config.out)
    samples = load_samples(config)
    check_words(config, samples)
    state = process_state(config.dist_timeout)
    settings = ground_settings(config)
    folder, part = claim_share(out, STEP, settings, config.shard, state.is_main_process, config.finalize)
    if folder.finished:
        log.info("%s: already complete; nothing to do", out)
        return step_result(out, read_summary(out))
    parts = out / ".parts"
    if state.is_main_process:
        parts.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

    model = load_model(config, samples, state.device)
    tokenizer = model.comps.tokenizer
    chunks = [samples[i : i + config.batch_size] for i in range(0, len(samples), config.batch_size)]
    mine = share(part, state.process_index, state.num_processes)
    todo = [] if config.finalize else pending(parts, config.noise_seeds, len(chunks), mine.index, mine.count)
    who = label(part, state.process_index, state.num_processes)
    with stop_signals("ground") as stop:
        for done, (run, c) in enumerate(progress(todo, description=f"grounding [{who}]" if who else "grounding")):
            stop.check(f"{done} of this share's {len(todo)} batches")
            maps, latents = capture_batch(chunks[c], run, model, config)  # (b, tokens, H, W), (b, C, H, W)
            result = score_chunk(chunks[c], maps, config, tokenizer, model.frame_size, run)
            if run == 0 and config.overlays:
                write_overlays(out, config, chunks[c], result["heatmaps"], latents, model.comps, model.frame_size)
            save_part(parts, run, c, result)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    missing = len(pending(parts, config.noise_seeds, len(chunks), 0, 1))
    write = lambda: merge(folder, parts, config, len(chunks), samples, model.frame_size)  # noqa: E731
    later, done = "merged when all exist", lambda: read_summary(out)
    summary = finish_share(folder, config.finalize, missing, noun="batches", later=later, write=write, done=done)
    if summary is None:
        return {"out": str(out), "complete": False, "missing_batches": missing}
    return step_result(out, summary)

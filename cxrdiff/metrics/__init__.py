"""Metric families, one module each: `localization` (grounding vs boxes), `fid` (fidelity), and so on."""

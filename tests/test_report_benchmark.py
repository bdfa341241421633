"""The benchmark's networks are the Fréchet distances' own: on torch-fidelity's InceptionV3 and the XRV DenseNet
(here untrained, seeded), its FD equals `fid` / `fid_xrv` on the same images, and every number is labelled."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrdiff.metrics import fid
from cxrdiff.metrics.score import UNTRAINED_LABEL
from cxrdiff.report import ReportConfig
from cxrdiff.report.benchmark import network_scores
from cxrdiff.report.features import cached_features, load_network, parse_spec


def _images(folder, seed: int, n: int = 6) -> list:
    rng = np.random.default_rng(seed)
    folder.mkdir()
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.slow  # two untrained InceptionV3 / DenseNet121 built and run twice each: 30-90 s on 2 shared cores
@pytest.mark.parametrize(
    ("kind", "reference", "name"),
    [("inception", fid.fid, "random InceptionV3"), ("xrv", fid.fid_xrv, "random DenseNet121")],
)
def test_benchmark_fd_is_the_reports_fd_on_the_same_network(tmp_path, kind, reference, name):
    default = fid.default_inception_path() if kind == "inception" else fid.default_xrv_path()
    if default.is_file():
        pytest.skip(f"{default} exists: the untrained network is not used")
    real, fake = _images(tmp_path / "real", 0), _images(tmp_path / "fake", 1)
    config = ReportConfig(out=tmp_path / "report", random_features=True, kid_subsets=3, prdc_k=2)
    network = load_network(parse_spec(kind), config)
    assert network.name == name and network.label == UNTRAINED_LABEL
    cache = tmp_path / "cache"
    real_f = cached_features(network, real, 32, "real", cache)
    fake_f = cached_features(network, fake, 32, "fake", cache)
    assert real_f.shape == (6, 2048 if kind == "inception" else 1024)
    np.testing.assert_array_equal(cached_features(network, real, 32, "real", cache), real_f)  # read back
    scores = {s["name"]: s for s in network_scores(network, real_f, fake_f, config)}
    assert set(scores) == {f"{m} ({name})" for m in ("FD", "KID", "precision", "recall", "density", "coverage")}
    assert all(s["label"] == UNTRAINED_LABEL for s in scores.values())  # never shown without the caveat
    expected = reference(real, fake, random_features=True, size=32, cache_root=tmp_path / "tf")
    assert scores[f"FD ({name})"]["value"] == pytest.approx(expected.value, rel=1e-4)

"""The result type the fidelity metrics share (fid, diversity, classifier).

A `Score` carries its name and a label next to its value, so that a number computed with untrained
features can never be shown without saying so: every writer prints `Score.text()` or `as_dict()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

UNTRAINED_LABEL = "untrained features, not FID"


@dataclasses.dataclass(frozen=True)
class Score:
    """One number and what it is: `name` (e.g. "FID_XRV"), `label` (a caveat that must travel with it)."""

    name: str
    value: float
    label: str = ""
    std: float | None = None
    unit: str = ""
    protocol: dict[str, Any] = dataclasses.field(default_factory=dict)
    interval: dict[str, Any] | None = None  # metrics.intervals.Interval.as_dict(): its bounds and how it was made

    def __post_init__(self) -> None:
        if self.protocol.get("random_features") and UNTRAINED_LABEL not in self.label:
            raise ValueError(f"{self.name}: a score from untrained features must carry the label {UNTRAINED_LABEL!r}")

    @property
    def title(self) -> str:
        """The name with its label, e.g. "FD (random InceptionV3) [untrained features, not FID]"."""
        return f"{self.name} [{self.label}]" if self.label else self.name

    def text(self, digits: int = 1) -> str:
        """The value as printed in tables: "± std" where the metric has one (MS-SSIM's over prompts), then its
        95% interval in brackets, always followed by the label when there is one."""
        number = f"{self.value:.{digits}f}" if self.value == self.value else "n/a"
        if self.std is not None:
            number += f" ± {self.std:.{digits}f}"
        low, high = (self.interval or {}).get("low"), (self.interval or {}).get("high")
        if low is not None and high is not None:
            number += f" [{low:.{digits}f}, {high:.{digits}f}]"
        return number + (f" ({self.label})" if self.label else "")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Score:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

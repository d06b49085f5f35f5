"""Which training metrics a DP site may send: only those that depend on its images through DP outputs.

Losses, clip fractions and image counts are computed from the images without noise; they stay on the
site (the federation's report shows epsilon per site instead).
"""

from __future__ import annotations

from collections.abc import Mapping

RELEASABLE_METRICS = (
    "epsilon",
    "delta",
    "epsilon_budget",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "lr",
    "teacher_temp",
    "teacher_momentum",
)


def releasable_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The privacy spending and schedule values of `metrics`, nothing computed from images without noise."""
    return {k: float(v) for k, v in metrics.items() if k in RELEASABLE_METRICS}

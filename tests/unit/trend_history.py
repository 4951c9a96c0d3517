"""Synthetic per-scanner history for the trend tests (built here, independent of reports.demo).

Per series: value = base * (1 + patient spread) * (1 + day shift); weekday volumes per protocol, weekends
at 50 %; 1 % outlier series (x1.4). Optionally a step factor on one protocol's noise from a given day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from reports.trend_settings import MetricLimits, TrendSettings
from storage.trends import protocol_key

START = datetime(2026, 1, 5, tzinfo=timezone.utc)  # a Monday

# name, kernel, kVp, thickness, weekday volume
PROTOCOLS = (
    ("Head routine", "H30s", 120, 5.0, 25),
    ("Abdomen portal venous", "B30f", 120, 3.0, 20),
    ("Chest routine", "B50f", 120, 1.0, 15),
    ("Abdomen arterial", "B30f", 100, 2.0, 12),
)
KEYS = tuple(protocol_key(n, None, k, kv, st) for n, k, kv, st, _ in PROTOCOLS)
# metric: (base value per protocol, patient CV, day-to-day CV)
METRICS = {
    "global_noise_hu": ((4.5, 11.0, 14.0, 9.0), 0.08, 0.015),
    "ssde_mgy": ((52.0, 14.0, 9.0, 20.0), 0.10, 0.015),
    "n2q_mean_quality": ((0.88, 0.84, 0.80, 0.86), 0.03, 0.005),
}
SETTINGS = TrendSettings(
    series_per_point=20,
    baseline_n=60,
    baseline_min_days=20,
    limits={
        "global_noise_hu": MetricLimits("global_noise_hu", tolerance=10.0, action=20.0),
        "ssde_mgy": MetricLimits("ssde_mgy", tolerance=15.0, action=30.0),
        "n2q_mean_quality": MetricLimits("n2q_mean_quality", tolerance=5.0, action=10.0),
    },
)


@dataclass(frozen=True)
class SynthSeries:
    uid: str
    protocol: str
    acquired_at: datetime
    day_index: int
    metrics: dict[str, float]


def make_history(seed: int, days: int = 90, step: tuple[int, int, float] | None = None) -> list[SynthSeries]:
    """``step = (protocol index, first day, factor)`` multiplies that protocol's global noise."""
    rng = np.random.default_rng(seed)
    out: list[SynthSeries] = []
    for d in range(days):
        day0 = START + timedelta(days=d)
        weekend = day0.weekday() >= 5
        shift = {m: rng.normal(0, spec[2]) for m, spec in METRICS.items()}
        for p, (_, _, _, _, vol) in enumerate(PROTOCOLS):
            for _ in range(int(rng.poisson(vol * (0.5 if weekend else 1.0)))):
                values = {}
                for m, (bases, cv, _) in METRICS.items():
                    v = bases[p] * (1 + rng.normal(0, cv)) * (1 + shift[m])
                    if rng.random() < 0.01:
                        v *= 1.4
                    values[m] = v
                if step is not None and p == step[0] and d >= step[1]:
                    values["global_noise_hu"] *= step[2]
                t = day0 + timedelta(hours=7 + float(rng.uniform(0, 12)))
                out.append(SynthSeries(f"2.25.7{seed}{len(out) + 1:08d}", KEYS[p], t, d, values))
    return out

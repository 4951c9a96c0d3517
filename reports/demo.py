"""A realistic synthetic trend history, so a physicist can see a report before real data exists
(``qa-node demo-history --scanner CT1 --days 90``). Use a throwaway database: the rows are fake.

Model (per series): the patient's water-equivalent diameter is drawn per protocol; the tube-current
modulation raises CTDIvol with size (CTDIvol ~ WED^1.4) but not enough to hold noise constant
(noise ~ WED^0.6); SSDE follows AAPM TG-204 (32 cm phantom, or 16 cm for heads); each series adds a
patient-to-patient spread, each day a small scanner-level shift; 2 % of series are outliers (a
misplaced patient, arms down). Weekends have fewer series. One service event (no re-baseline) in the
middle, and from 8 days before the end the chest protocol's noise rises by 12 % (so the demo shows
alerts). Metrics: ``global_noise_hu``, ``ctdivol_mgy``, ``ssde_mgy``, ``nps_f_avg_per_mm`` (trended) and
``wed_cm`` (stored only).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from reports.trend_settings import MetricLimits, TrendSettings
from reports.trends import reevaluate_scanner
from storage.db import Database
from storage.trends import add_service_event, protocol_key, record_series, size_band

log = logging.getLogger(__name__)

DEMO_METRICS = ("global_noise_hu", "ctdivol_mgy", "ssde_mgy", "nps_f_avg_per_mm")

DEMO_TREND_SETTINGS = TrendSettings(
    baseline_n=60,
    baseline_min_days=20,
    limits={
        "global_noise_hu": MetricLimits("global_noise_hu", tolerance=10.0, action=20.0),
        "ctdivol_mgy": MetricLimits("ctdivol_mgy", tolerance=20.0, action=35.0),
        "ssde_mgy": MetricLimits("ssde_mgy", tolerance=15.0, action=25.0),
        "nps_f_avg_per_mm": MetricLimits("nps_f_avg_per_mm", tolerance=5.0, action=10.0),
    },
)


@dataclass(frozen=True)
class DemoProtocol:
    name: str
    kernel: str
    kvp: float
    thickness_mm: float
    per_weekday: float  # mean number of series on a weekday
    wed_mean_cm: float
    wed_sd_cm: float
    noise_ref_hu: float  # at the reference WED
    ctdi_ref_mgy: float
    wed_ref_cm: float
    nps_favg: float
    head: bool = False


DEMO_PROTOCOLS: tuple[DemoProtocol, ...] = (
    DemoProtocol("Head routine", "Hr38s", 120, 5.0, 16, 16.5, 0.9, 4.2, 48.0, 16.5, 0.27, head=True),
    DemoProtocol("Abdomen pelvis", "Br40d", 120, 3.0, 18, 28.0, 3.5, 11.0, 11.0, 28.0, 0.33),
    DemoProtocol("Chest routine", "Br44d", 110, 1.5, 12, 27.0, 3.0, 13.0, 7.5, 27.0, 0.38),
    DemoProtocol("CTA pulmonary", "Bv36d", 100, 1.0, 8, 27.5, 3.2, 15.0, 5.5, 27.5, 0.35),
)


def _ssde(ctdi: float, wed_cm: float, head: bool) -> float:
    a, b = (1.874799, 0.03871313) if head else (3.704369, 0.03671937)
    return a * math.exp(-b * wed_cm) * ctdi


def generate_demo_history(
    db: Database, scanner: str, days: int, seed: int = 0, settings: TrendSettings | None = None
) -> int:
    """Fill ``db`` with ``days`` days of synthetic series for ``scanner`` ending yesterday (UTC), add a
    service event, and evaluate every chart (storing the alerts). Returns the number of series."""
    if not scanner:
        raise ValueError(f'Argument "scanner" must be a scanner name such as "CT1", got {scanner!r}')
    if not 1 <= days <= 3660:
        raise ValueError(f'Argument "days" must be 1-3660, got {days}')
    settings = settings or DEMO_TREND_SETTINGS
    rng = np.random.default_rng(seed)
    end = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    start = end - timedelta(days=days)
    step_from = days - 8 if days >= 40 else None
    n_series = 0
    with db.session() as s:
        for d in range(days):
            day0 = start + timedelta(days=d)
            weekend = day0.weekday() >= 5
            day_shift = {m: rng.normal(0.0, 0.012) for m in DEMO_METRICS}
            for p_idx, p in enumerate(DEMO_PROTOCOLS):
                n = int(rng.poisson(p.per_weekday * (0.35 if weekend else 1.0)))
                key = protocol_key(p.name, None, p.kernel, p.kvp, p.thickness_mm)
                for _ in range(n):
                    wed = float(np.clip(rng.normal(p.wed_mean_cm, p.wed_sd_cm), 10.0, 48.0))
                    rel = wed / p.wed_ref_cm
                    ctdi = p.ctdi_ref_mgy * rel**1.4 * (1 + rng.normal(0, 0.04)) * (1 + day_shift["ctdivol_mgy"])
                    noise = p.noise_ref_hu * rel**0.6 * (1 + rng.normal(0, 0.06)) * (1 + day_shift["global_noise_hu"])
                    if rng.random() < 0.02:
                        noise *= 1.35
                    if step_from is not None and d >= step_from and p_idx == 2:
                        noise *= 1.12
                    favg = p.nps_favg * (1 + rng.normal(0, 0.02)) * (1 + day_shift["nps_f_avg_per_mm"] / 3)
                    t = day0 + timedelta(hours=7 + float(rng.uniform(0, 12)))
                    n_series += 1
                    record_series(
                        s,
                        scanner=scanner,
                        protocol=key,
                        size_band=size_band(wed),
                        series_instance_uid=f"2.25.9{seed}{d:05d}{p_idx}{n_series:07d}",
                        acquired_at=t,
                        metrics={
                            "global_noise_hu": noise,
                            "ctdivol_mgy": ctdi,
                            "ssde_mgy": _ssde(ctdi, wed, p.head),
                            "nps_f_avg_per_mm": favg,
                            "wed_cm": wed,  # stored, not trended (a patient descriptor)
                        },
                    )
        if days >= 20:
            add_service_event(
                s,
                scanner=scanner,
                occurred_at=start + timedelta(days=days // 2, hours=6),
                text="demo: detector calibration (air scans)",
                rebaseline=False,
            )
        n_alerts = reevaluate_scanner(s, settings, scanner)
    log.info("demo history: %d series over %d days for scanner %s, %d alert(s)", n_series, days, scanner, n_alerts)
    return n_series

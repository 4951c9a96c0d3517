"""The basic measurement: slice count and HU statistics inside the body.

It is deliberately simple and always runs first: it proves the pipeline wiring end to end and
gives a physicist a sanity check (a water phantom should read about 0 HU inside the body).
"""

from __future__ import annotations

from analysis.models.spec import HU, SLICES, MetricSpec, ModelSpec, dcm, private

ALGORITHM = "CTQA basic body statistics"
VERSION = "1.0"


def run(volume, ctx, options=None):
    import numpy as np

    from analysis.mask import volume_body_masks
    from analysis.results import ModelOutput

    out = ModelOutput(name="basic", algorithm=ALGORITHM, version=VERSION)
    out.set_metric("n_slices", float(volume.n_slices))
    means = np.full(volume.n_slices, np.nan)
    sds = np.full(volume.n_slices, np.nan)
    total = 0
    acc_sum = 0.0
    acc_sq = 0.0
    masks = volume_body_masks(volume)  # computed once per volume, shared with the other models
    for i in range(volume.n_slices):
        m = masks[i]
        k = int(m.sum())
        if k == 0:
            continue
        vals = volume.hu[i][m].astype(np.float64)
        means[i] = vals.mean()
        sds[i] = vals.std()
        total += k
        acc_sum += vals.sum()
        acc_sq += np.square(vals).sum()
    out.slice_metrics["body_mean_hu"] = means
    out.slice_metrics["body_sd_hu"] = sds
    if total == 0:
        out.set_metric("body_mean_hu", None, "no body found in any slice")
        out.set_metric("body_sd_hu", None, "no body found in any slice")
    else:
        mean = acc_sum / total
        out.set_metric("body_mean_hu", mean)
        out.set_metric("body_sd_hu", float(np.sqrt(max(acc_sq / total - mean * mean, 0.0))))
    return out


SPEC = ModelSpec(
    name="basic",
    algorithm=ALGORITHM,
    version=VERSION,
    run=run,
    order=10,
    default=True,
    summary="slice count and CT-number statistics inside the body",
    metrics=(
        MetricSpec("body_mean_hu", dcm("112181", "Mean Attenuation Coefficient"), HU, "Body mean CT number"),
        MetricSpec("body_sd_hu", dcm("112183", "Standard Deviation of Attenuation Coefficient"), HU,
                   "Body CT number SD"),
        MetricSpec("n_slices", private("N_SLICES", "Number of slices analysed"), SLICES, "Slices analysed",
                   in_report=True, context=True),
    ),
)

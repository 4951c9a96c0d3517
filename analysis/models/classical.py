"""The classical patient-based metrics (global noise, WED, SSDE, NPS, tissue HU) as a model of the
platform. The measurement itself is ``analysis.classical`` (numpy/scipy only)."""

from __future__ import annotations

from analysis.models.spec import CM, HU, KV, MGY, MM, PER_MM, MapSpec, MetricSpec, ModelSpec, dcm, private

ALGORITHM = "CTQA classical patient-based metrics (global noise, WED, SSDE, NPS)"
VERSION = "1.0"


def run(volume, ctx, options=None):
    from analysis import classical

    return classical.run(volume, ctx)


SPEC = ModelSpec(
    name="classical",
    algorithm=ALGORITHM,
    version=VERSION,
    run=run,
    order=20,
    default=True,
    summary="global noise, water-equivalent diameter, SSDE, noise power spectrum, tissue CT numbers",
    metrics=(
        MetricSpec("global_noise_hu", private("GLOBAL_NOISE", "Global noise"), HU, "Global noise",
                   trended=True, in_report=True,
                   meaning="image noise in soft tissue (mode of the local SD); lower is less noisy, at equal dose"),
        MetricSpec("wed_cm", dcm("113980", "Water Equivalent Diameter"), CM, "Water-equivalent diameter",
                   in_report=True,
                   meaning="patient size as the water-equivalent diameter; describes the patient, neither better nor worse"),
        MetricSpec("ctdivol_mgy", dcm("113830", "Mean CTDIvol"), MGY, "CTDIvol", trended=True, in_report=True,
                   meaning="scanner-reported dose index; lower is less dose, for the same image quality"),
        MetricSpec("ssde_mgy", dcm("113930", "Size Specific Dose Estimate"), MGY, "SSDE", trended=True,
                   in_report=True,
                   meaning="size-specific dose estimate (CTDIvol corrected for patient size); lower is less dose"),
        MetricSpec("nps_f_peak_per_mm", private("NPS_F_PEAK", "NPS peak frequency"), PER_MM, "NPS peak frequency",
                   trended=True, in_report=True,
                   meaning="peak of the noise power spectrum; higher means finer-grained noise (sharper kernel)"),
        MetricSpec("nps_f_avg_per_mm", private("NPS_F_AVG", "NPS average frequency"), PER_MM, "NPS mean frequency",
                   trended=True, in_report=True,
                   meaning="mean frequency of the noise power spectrum; higher means finer-grained noise"),
        MetricSpec("nps_noise_hu", private("NPS_NOISE", "Noise from NPS integral"), HU, "Noise (NPS integral)",
                   trended=True),
        MetricSpec("mean_hu_tissue", private("TISSUE_MEAN", "Mean CT number in soft tissue"), HU,
                   "Soft-tissue mean CT number", trended=True, in_report=True,
                   meaning="mean CT number of soft tissue; should stay stable for the protocol"),
        MetricSpec("sd_hu_tissue", private("TISSUE_SD", "CT number SD in soft tissue"), HU,
                   "Soft-tissue CT number SD", trended=True),
        MetricSpec("scan_length_mm", dcm("113825", "Scanning Length"), MM, "Scan length", context=True),
        MetricSpec("kvp", dcm("113733", "KVP"), KV, "Tube voltage", in_report=True, context=True),
        MetricSpec("slice_thickness_mm", dcm("112225", "Slice Thickness"), MM, "Slice thickness", in_report=True,
                   context=True),
    ),
    maps=(MapSpec("local_noise_sd", private("LOCAL_NOISE_SD", "Local noise standard deviation"), HU,
                  "Local noise SD", detail_mm=3.0,
                  why="a local SD over a 6 mm box has no detail finer than about 3 mm"),),
)

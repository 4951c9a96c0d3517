"""Coverage-guided fuzzing of the C-STORE validation path for a bounded time (atheris; see
tests/unit/fuzz_store_target.py for the properties), seeded with real slices in every native syntax
and RLE. CTQA_FUZZ_SECONDS (default 30) sets the time; a crash leaves its input in the test's tmp dir
and is printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from tests.crafted import BIG_ENDIAN, DEFLATED, EXPLICIT, IMPLICIT, encode
from tests.helpers import PHANTOM_5MM, REPO, SHARED_DATA, require

TARGET = Path(__file__).with_name("fuzz_store_target.py")
SYNTAXES = [EXPLICIT, IMPLICIT, BIG_ENDIAN, DEFLATED, "1.2.840.10008.1.2.5"]  # as in the target
SOP_CLASSES = ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"]


def seeds(folder: Path) -> int:
    """Real headers with small real pixel data (32 x 32 crops keep the inputs short), UIDs as the
    target's request expects."""
    folder.mkdir()
    n = 0

    def add(ds: pydicom.Dataset, ts: str, sop_class: str) -> None:
        nonlocal n
        ds.SOPInstanceUID = "2.25.1"
        selector = SYNTAXES.index(ts) + len(SYNTAXES) * SOP_CLASSES.index(sop_class)
        (folder / f"seed{n}").write_bytes(bytes([selector]) + encode(ds, EXPLICIT if ts == SYNTAXES[4] else ts))
        n += 1

    for name in ("I10", "I100"):
        ds = pydicom.dcmread(require(PHANTOM_5MM) / name)
        crop = np.ascontiguousarray(ds.pixel_array[240:272, 240:272])
        ds.Rows = ds.Columns = 32
        ds.PixelData = crop.tobytes()
        for ts in SYNTAXES[:4]:
            add(ds, ts, SOP_CLASSES[0])
        ds.compress(RLELossless, crop, generate_instance_uid=False)
        add(ds, SYNTAXES[4], SOP_CLASSES[0])
    legacy = next((SHARED_DATA / "corpus" / "dcmqi" / "GE_LegacyConvertedEnhanced_tiny").glob("*.dcm"))
    add(pydicom.dcmread(legacy), EXPLICIT, SOP_CLASSES[2])
    return n


@pytest.mark.slow
def test_fuzz_validation_path_for_a_bounded_time(tmp_path):
    pytest.importorskip("atheris", reason="pip install '.[test]' installs atheris")
    corpus = tmp_path / "corpus"
    n = seeds(corpus)
    seconds = int(os.environ.get("CTQA_FUZZ_SECONDS", "30"))
    r = subprocess.run(
        [sys.executable, str(TARGET), str(corpus), f"-max_total_time={seconds}", "-timeout=20",
         "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", "-max_len=65536"],
        capture_output=True, text=True, cwd=REPO, timeout=seconds + 120,
        env=dict(os.environ, CTQA_FUZZ_SPOOL=str(tmp_path / "spool")))
    out = r.stdout + r.stderr
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*")) + sorted(tmp_path.glob("oom-*"))
    seed = re.search(r"INFO: Seed: (\d+)", out)  # rerun with -seed=N to replay the same mutations
    assert r.returncode == 0 and not crashes, \
        f"fuzzer (seed {seed and seed.group(1)}) found a failing input {crashes[:1]}:\n{out[-4000:]}"
    runs = int(re.search(r"stat::number_of_executed_units:\s*(\d+)", out).group(1))
    assert n == 11 and runs > 20 * n, out[-2000:]  # it really mutated and ran, not just loaded the seeds

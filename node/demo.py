"""The main job of the README: start the node, push a series to it with a real SCU (DCMTK storescu),
wait until the series is complete and analysed, print the results and where the outputs are."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TextIO

from sqlalchemy import select

from node.config import DestinationSettings, Settings
from node.service import Node
from storage.models import Delivery, DeliveryState, Job, JobState, OutputObject, Series
from storage.repo import current_metrics

log = logging.getLogger(__name__)


def push_with_storescu(folder: Path, *, calling_ae: str, called_ae: str, host: str, port: int) -> int:
    """Send every file under ``folder`` with DCMTK storescu. Returns storescu's exit code."""
    exe = shutil.which("storescu")
    if exe is None:
        raise FileNotFoundError("storescu (DCMTK) not found: install it with `apt-get install dcmtk`")
    env = dict(os.environ, TCP_NODELAY="1")
    cmd = [exe, "-aet", calling_ae, "-aec", called_ae, "+sd", "+r", "-nh", host, str(port), str(folder)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False).returncode


def wait_for_analysis(node: Node, timeout_s: float) -> list[int]:
    """Wait until every series has a finished job and none is receiving. Returns series ids."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with node.db.session() as s:
            series = s.scalars(select(Series)).all()
            jobs = s.scalars(select(Job)).all()
            if series and all(x.state == "complete" for x in series) and jobs and all(
                j.state in (JobState.DONE, JobState.FAILED) for j in jobs
            ):
                return [x.id for x in series]
        time.sleep(0.5)
    raise TimeoutError(f"analysis did not finish within {timeout_s:.0f} s")


def wait_for_deliveries(node: Node, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with node.db.session() as s:
            if not s.scalars(select(Delivery).where(Delivery.state == DeliveryState.PENDING)).first():
                return
        time.sleep(0.5)
    raise TimeoutError(f"results not delivered within {timeout_s:.0f} s (see `qa-node outbox`)")


def run_demo(settings: Settings, *, series_dir: Path, out: TextIO, stable_age_s: float = 3.0,
             timeout_s: float = 900.0) -> int:
    """Without configured destinations, and with Orthanc installed, the demo starts a local Orthanc on
    loopback as the PACS so that the results can be seen arriving in the source study."""
    orthanc = None
    if not settings.destinations and shutil.which("Orthanc"):
        from node.orthanc import LocalOrthanc

        orthanc = LocalOrthanc(known_aes={settings.node.ae_title: ("127.0.0.1", 104)})
        orthanc.start()
        out.write(f"local Orthanc PACS (AE ORTHANC) on 127.0.0.1:{orthanc.dicom_port}, REST {orthanc.url}\n")
        settings = dataclasses.replace(settings, destinations=[
            DestinationSettings("local-orthanc", "ORTHANC", "127.0.0.1", orthanc.dicom_port)])
    try:
        return _run_demo(settings, series_dir=series_dir, out=out, stable_age_s=stable_age_s,
                         timeout_s=timeout_s, orthanc=orthanc)
    finally:
        if orthanc is not None:
            orthanc.stop()
            out.write(f"(the local Orthanc has stopped; its database stays in {orthanc.workdir})\n")


def _run_demo(settings: Settings, *, series_dir: Path, out: TextIO, stable_age_s: float, timeout_s: float,
              orthanc) -> int:
    if not series_dir.is_dir():
        out.write(f"demo: series folder {series_dir} not found (give --series FOLDER)\n")
        return 2
    if not settings.scanners:
        out.write(f"demo: {settings.file} has no [[scanners]] entry to push as\n")
        return 2
    data_dir = Path(settings.node.data_dir) / "demo"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    node_settings = dataclasses.replace(
        settings.node, data_dir=str(data_dir), database=f"sqlite:///{data_dir / 'ctqa.sqlite'}", port=0,
        stable_age_s=stable_age_s,
    )
    settings = dataclasses.replace(settings, node=node_settings)
    scanner = settings.scanners[0]
    node = Node(settings)
    port = node.start()
    try:
        n_files = sum(1 for f in series_dir.rglob("*") if f.is_file())
        out.write(f"node {settings.node.ae_title} listening on {settings.node.host}:{port}; data in {data_dir}\n")
        out.write(f"pushing {n_files} files from {series_dir} with storescu as {scanner.ae_title} ...\n")
        t0 = time.monotonic()
        rc = push_with_storescu(series_dir, calling_ae=scanner.ae_title, called_ae=settings.node.ae_title,
                                host="127.0.0.1", port=port)
        t_push = time.monotonic() - t0
        out.write(f"storescu exit code {rc}, {t_push:.1f} s\n")
        ids = wait_for_analysis(node, timeout_s)
        out.write(f"series complete and analysed after {time.monotonic() - t0:.1f} s\n\n")
        outputs_failed = False
        with node.db.session() as s:
            for sid in ids:
                series = s.get(Series, sid)
                job = s.scalars(select(Job).where(Job.series_id == sid).order_by(Job.id.desc())).first()
                out.write(f"series {series.series_instance_uid}\n")
                out.write(f"  scanner   {series.scanner_name} ({series.manufacturer} {series.model_name}, "
                          f"station {series.station_name}, serial {series.device_serial})\n")
                out.write(f"  received  {series.n_instances} instances, stored under {data_dir / 'store'}\n")
                out.write(f"  analysis  {job.outcome}{'  (' + job.error + ')' if job.error else ''}\n")
                out.write(f"  outputs   {job.outputs or '-'}"
                          f"{'  (' + job.outputs_error + ')' if job.outputs_error else ''}\n")
                outputs_failed = outputs_failed or job.outputs in ("failed", "partial")
                for name, (value, reason) in current_metrics(s, sid).items():
                    shown = "-" if value is None else f"{value:.4g}"
                    out.write(f"  {name:<26} {shown:>12}{'   ' + reason if value is None and reason else ''}\n")
        out.write("\noutputs (written under " + str(data_dir / "outputs") + "):\n")
        if settings.destinations:
            wait_for_deliveries(node, 300)
        with node.db.session() as s:
            for o in s.scalars(select(OutputObject).order_by(OutputObject.id)):
                states = [f"{d.destination}: {d.state}" for d in s.scalars(select(Delivery).where(Delivery.output_id == o.id))]
                out.write(f"  {o.kind:<5} {data_dir / o.rel_path}  [{', '.join(states) or 'no destination'}]\n")
            study = s.scalars(select(Series)).first().study_instance_uid
        if orthanc is not None:
            found = orthanc.instances_in_study(study)
            kinds = sorted({i["modality"] for i in found})
            out.write(f"\nin Orthanc, study {study}: {len(found)} instances ({', '.join(kinds)}); "
                      f"browse {orthanc.url}/app/explorer.html while the demo runs, or list with "
                      f"{orthanc.url}/studies\n")
        return 0 if rc == 0 and not outputs_failed else 1
    finally:
        node.stop()

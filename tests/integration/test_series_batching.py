"""Series batching (docs/series_batching.md, issue 15 item 4): ``[analysis] series_batch``; a worker
claims further small pending jobs (``claim_job(..., max_frames=room)``) and runs N2Q, LDCTIQA and
Delta-IQA over their slices in shared passes of the full batch; every series' stored results are
bit-identical to the same series run one at a time with the switch on; a lost lease or a failing
series affects that job alone. CPU runs (``series_batch = "on"``); the CUDA comparison skips
without a GPU."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pydicom
import pytest
import torch
from sqlalchemy import select, update

from analysis import batching
from node.config import ConfigError, settings_from_dict
from node.worker import PARAMETERS_INFO_KEY, AnalysisWorker, run_context, series_batch_on
from storage.db import Database
from storage.models import AnalysisRun, Instance, Job, OutputObject, Series, SeriesMetric, SliceMetric
from storage.repo import claim_job, complete_due_series
from tests.helpers import PHANTOM_5MM, require, wait_until
from tests.integration.test_node_pipeline import make_node, push_files
from tests.integration.test_workers_postgres import make_series


def _settings(analysis: dict, tmp_path=None):
    folder = tmp_path or "/nonexistent"
    return settings_from_dict({"node": {"data_dir": f"{folder}/var", "database": f"sqlite:///{folder}/q.sqlite"},
                               "scanners": [{"name": "CT1", "ae_title": "CT1"}], "analysis": analysis}, "test.toml")


# ------------------------------------------------------------------------------ (1) the switch
def test_series_batch_key_values_and_error():
    assert _settings({}).analysis.series_batch == "auto"
    for mode in ("auto", "on", "off"):
        assert _settings({"series_batch": mode}).analysis.series_batch == mode
    with pytest.raises(ConfigError) as exc:
        _settings({"series_batch": "yes"})
    assert str(exc.value) == "test.toml: key 'analysis.series_batch' must be one of auto, on, off, got 'yes'"
    with pytest.raises(ConfigError) as exc:
        _settings({"series_batch": True})
    assert str(exc.value) == "test.toml: key 'analysis.series_batch' must be a string, got True"
    # auto: on only on CUDA, so the CPU path is unchanged
    assert [series_batch_on(m, "cpu") for m in ("auto", "on", "off")] == [False, True, False]
    assert [series_batch_on(m, "cuda") for m in ("auto", "on", "off")] == [True, True, False]
    assert run_context(_settings({"device": "cpu"})).series_batch is False
    assert run_context(_settings({"device": "cpu", "series_batch": "on"})).series_batch is True


def _add_series(s, uid: str, study: str, frames: tuple[int, ...]) -> None:
    """A receiving series whose instances have these frame counts (index rows only)."""
    series = Series(series_instance_uid=uid, study_instance_uid=study, state="receiving", n_instances=len(frames))
    s.add(series)
    s.flush()
    for k, f in enumerate(frames):
        s.add(Instance(series_id=series.id, sop_instance_uid=f"{uid}.{k + 1}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                       transfer_syntax_uid="1.2.840.10008.1.2.1", rel_path=f"x/{uid}/{k}.dcm", size_bytes=1,
                       sha256="0" * 64, number_of_frames=f))


@pytest.fixture()
def small_queue(tmp_path):
    """Three pending jobs (models basic + n2q) in an SQLite queue: a series of 2 classic instances,
    an enhanced one (1 instance of 3 frames) and another of 2 classic instances."""
    db = Database(f"sqlite:///{tmp_path / 'q.sqlite'}")
    db.create_all()
    with db.session() as s:
        for i, frames in enumerate(((1, 1), (3,), (1, 1))):
            _add_series(s, f"1.2.3.{i}", f"1.2.{i}", frames)
    assert len(complete_due_series(db, 0.0, ["basic", "n2q"])) == 3
    yield db
    db.dispose()


def test_fill_claims_small_pending_jobs_only_when_on(tmp_path, small_queue):
    def worker(mode: str) -> AnalysisWorker:
        s = _settings({"device": "cpu", "models": ["basic", "n2q"], "series_batch": mode, "n2q": {"batch": 4}},
                      tmp_path)
        return AnalysisWorker(s, small_queue, store=None)

    with small_queue.session() as s:
        jobs = s.scalars(select(Job.id).order_by(Job.id)).all()
    auto = worker("auto")  # auto on the CPU: one job at a time, as before
    first = claim_job(small_queue, auto.worker_id)
    assert first == jobs[0] and auto._fill(first) == [first]
    on = worker("on")
    # room 4 - 2 = 2: the enhanced series (1 instance, 3 frames) does not fit, the next 2-instance one does
    assert on._fill(first) == [first, jobs[2]]
    with small_queue.session() as s:
        state = {j.id: (j.state, j.worker) for j in s.scalars(select(Job))}
    assert state == {jobs[0]: ("running", auto.worker_id), jobs[1]: ("pending", None),
                     jobs[2]: ("running", on.worker_id)}


def test_claim_job_max_frames_on_postgresql(pg_cluster):
    db = Database(pg_cluster.fresh_database("series_batch_claim"))
    try:
        db.create_all()
        with db.session() as s:
            _add_series(s, "1.2.9.0", "1.2.90", (5,))  # enhanced: 1 instance, 5 frames
            _add_series(s, "1.2.9.1", "1.2.91", (1, 1))
        complete_due_series(db, 0.0, ["basic"])
        with db.session() as s:
            small = s.scalar(select(Job.id).join(Series).where(Series.n_instances == 2))
        assert claim_job(db, "w:1:a", max_frames=1) is None
        assert claim_job(db, "w:1:a", max_frames=4) == small
        assert claim_job(db, "w:1:a", max_frames=4) is None
        assert claim_job(db, "w:1:a") is not None  # the big one, without the bound
    finally:
        db.dispose()


# -------------------------------------------------------------------- weights and data of the runs
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from analysis import delta_iqa
    from analysis.ldctiqa import MultiHeadSwin

    folder = tmp_path_factory.mktemp("w")
    torch.manual_seed(15)
    ldct = folder / "ldct-iqa.pt"
    torch.save({"model_state_dict": MultiHeadSwin().state_dict()}, ldct)
    dq = folder / "delta.pt"
    delta_iqa.save_weights(dq, delta_iqa.build_network(0.125), width=0.125, labels="site")
    return {"ldctiqa": str(ldct), "delta_iqa": str(dq)}


def _analysis(weights, device: str, models=("basic", "n2q", "ldctiqa", "delta_iqa")) -> dict:
    return {"device": device, "models": list(models), "series_batch": "on", "torch_threads": 1,
            "n2q": {"batch": 4},
            "ldctiqa": {"weights": weights["ldctiqa"], "max_slices": 1, "batch": 2},
            "delta_iqa": {"weights": weights["delta_iqa"], "max_slices": 0, "batch": 4}}


@pytest.fixture()
def spy(monkeypatch):
    """Counts the passes of analysis.batching.run_across per model and the items in each."""
    passes: Counter = Counter()
    sizes: dict = defaultdict(set)
    real = batching.run_across

    def counting(counts, batch, device, prepare, forward, collect, what="model", pad=True):
        def fwd(x):
            passes[what] += 1
            sizes[what].add(int(x.shape[0]))
            return forward(x)
        return real(counts, batch, device, prepare, fwd, collect, what, pad)

    monkeypatch.setattr(batching, "run_across", counting)
    return passes, sizes


def _pending(node, files) -> list[int]:
    push_files(node, files)
    complete_due_series(node.db, 0.0, node.models)
    with node.db.session() as s:
        return s.scalars(select(Job.id).where(Job.state == "pending").order_by(Job.id)).all()


def _loop_until_closed(node, n: int, what: str) -> None:
    """The worker's own loop (claim, fill, analyse) in its thread until ``n`` jobs are closed."""
    def closed():
        with node.db.session() as s:
            return len(s.scalars(select(Job.id).where(Job.state.in_(("done", "failed")))).all()) >= n
    node.worker.poll_s = 0.05
    node.worker.start()
    try:
        wait_until(closed, timeout=120, what=what)
    finally:
        node.worker.stop(timeout=30)


def _stored(db) -> dict:
    """series UID -> {(model, metric): value}, {(model, metric, slice): value}, {model: parameters}."""
    out = {}
    with db.session() as s:
        for uid, sid in s.execute(select(Series.series_instance_uid, Series.id)).all():
            runs = s.scalars(select(AnalysisRun).where(AnalysisRun.series_id == sid,
                                                       AnalysisRun.current.is_(True))).all()
            series_m = {(r.model, m.name): m.value for r in runs for m in r.metrics}
            slice_m = {(r.model, m.name, m.slice_index): m.value for r in runs
                       for m in s.scalars(select(SliceMetric).where(SliceMetric.run_id == r.id))}
            params = {r.model: json.loads(r.info or "{}").get(PARAMETERS_INFO_KEY, "") for r in runs}
            out[uid] = (series_m, slice_m, params)
    return out


def _same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert (x is None and y is None) or (x == y) or (x != x and y != y), (k, x, y)


def _compare_joint_with_one_at_a_time(tmp_path, weights, spy, device: str) -> None:
    passes, sizes = spy
    make_series(require(PHANTOM_5MM), tmp_path / "push", 2, slices=2, distinct=True)
    files = sorted((tmp_path / "push").rglob("*.dcm"))
    # (a) both series pending: the worker's loop claims both and runs them together
    joint = make_node(tmp_path / "a", analysis=_analysis(weights, device))
    jobs = _pending(joint, files)
    assert len(jobs) == 2
    _loop_until_closed(joint, 2, "two series analysed together")
    joint_passes, joint_sizes = dict(passes), {k: set(v) for k, v in sizes.items()}
    passes.clear()
    sizes.clear()
    # (b) the same series in a second database, one at a time (each job claimed and run alone)
    alone = make_node(tmp_path / "b", analysis=_analysis(weights, device))
    assert len(_pending(alone, files)) == 2
    while (job_id := claim_job(alone.db, alone.worker.worker_id)) is not None:
        alone.worker.process(job_id)
    alone_passes, alone_sizes = dict(passes), {k: set(v) for k, v in sizes.items()}

    with joint.db.session() as s:
        closed = s.execute(select(Job.state, Job.outcome, Job.finished_by, Job.attempts)).all()
    assert sorted(closed) == [("done", "done", joint.worker.worker_id, 1)] * 2  # one worker closed both
    # 2 series x 2 slices: N2Q 4 slices in one pass of 4 (two padded passes alone), LDCTIQA one scored
    # slice each in one pass of 2, Delta-IQA 4 slices in one pass of 4
    assert joint_passes == {"N2Q": 1, "LDCTIQA": 1, "Delta-IQA": 1}
    assert alone_passes == {"N2Q": 2, "LDCTIQA": 2, "Delta-IQA": 2}
    # every pass at the batch's shape, a series alone too (its short pass padded)
    assert joint_sizes == alone_sizes == {"N2Q": {4}, "LDCTIQA": {2}, "Delta-IQA": {4}}

    a, b = _stored(joint.db), _stored(alone.db)
    assert a.keys() == b.keys() and len(a) == 2
    for uid in a:
        series_a, slices_a, params_a = a[uid]
        series_b, slices_b, params_b = b[uid]
        for key in ("n2q_mean_quality", "n2q_p05_quality"):
            assert series_a[("n2q", key)] is not None and 0.0 < series_a[("n2q", key)] <= 1.0
        assert series_a[("ldctiqa", "ldctiqa_expected_score")] is not None
        assert series_a[("delta_iqa", "delta_iqa_score")] is not None
        assert len([k for k in slices_a if k[0] == "n2q" and k[1] == "n2q_mean_quality"]) == 2
        _same_bits(series_a, series_b)
        _same_bits(slices_a, slices_b)
        assert params_a == params_b
        for model in ("n2q", "ldctiqa", "delta_iqa"):
            assert "series_batch=on" in params_a[model].split("\n")
        assert "series_batch=on" not in params_a["basic"]
    # the two series' results are not one another's (the comparison is not trivially equal)
    (u1, u2) = sorted(a)
    assert a[u1][0][("n2q", "n2q_mean_quality")] != a[u2][0][("n2q", "n2q_mean_quality")]


# ---------------------------------------------------- (2) and (3): joint = one at a time, bit for bit
def test_two_short_series_run_together_bit_identical_to_one_at_a_time(tmp_path, weights, spy):
    _compare_joint_with_one_at_a_time(tmp_path, weights, spy, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_short_series_run_together_bit_identical_to_one_at_a_time_cuda(tmp_path, weights, spy):
    _compare_joint_with_one_at_a_time(tmp_path, weights, spy, "cuda")


# --------------------------------------------------- (4) a lost lease discards that job's results alone
def test_lost_lease_on_one_job_of_a_group_discards_that_job_alone(tmp_path, weights, monkeypatch):
    from analysis import n2q

    make_series(require(PHANTOM_5MM), tmp_path / "push", 2, slices=2, distinct=True)
    node = make_node(tmp_path, analysis=_analysis(weights, "cpu", models=("basic", "n2q")))
    first, second = _pending(node, sorted((tmp_path / "push").rglob("*.dcm")))
    real = n2q.predict_quality_many
    taken = []

    def steal_second(hus, **kw):
        # meanwhile, another worker took the second job over (this one stalled past its lease)
        with node.db.session() as s:
            s.execute(update(Job).where(Job.id == second).values(worker="elsewhere:1:x"))
        taken.append(len(hus))
        return real(hus, **kw)

    monkeypatch.setattr(n2q, "predict_quality_many", steal_second)
    assert claim_job(node.db, node.worker.worker_id) == first
    group = node.worker._fill(first)
    assert group == [first, second]
    results = node.worker.process_group(group)
    assert taken == [2]  # both series in one N2Q run
    assert results[0] is not None and results[0].status == "done" and results[1] is None
    with node.db.session() as s:
        j1, j2 = s.get(Job, first), s.get(Job, second)
        assert (j1.state, j1.outcome, j1.outputs) == ("done", "done", "written")
        assert (j2.state, j2.worker, j2.outcome, j2.finished_by) == ("running", "elsewhere:1:x", None, None)
        runs = s.execute(select(AnalysisRun.job_id, AnalysisRun.model)).all()
        outputs = {o.job_id for o in s.scalars(select(OutputObject))}
        n2q_mean = s.scalar(select(SeriesMetric.value).join(AnalysisRun).where(
            AnalysisRun.job_id == first, SeriesMetric.name == "n2q_mean_quality"))
    assert sorted(runs) == [(first, "basic"), (first, "n2q")]  # nothing of the second job
    assert outputs == {first}
    assert n2q_mean is not None and 0.0 < n2q_mean <= 1.0


# ------------------------------------------------ (5) a series that fails in a joint run fails alone
def test_a_series_failing_in_a_joint_run_fails_alone(tmp_path, weights, monkeypatch, caplog):
    from analysis import n2q
    from analysis.pipeline import analyse_series

    uids = make_series(require(PHANTOM_5MM), tmp_path / "push", 2, slices=2, distinct=True)
    bad = tmp_path / "push" / "s01"
    for f in bad.iterdir():  # the second series' pixel values far beyond any CT's range
        ds = pydicom.dcmread(f)
        ds.RescaleIntercept = 60000
        ds.save_as(f, enforce_file_format=True)
    real = n2q.resize_to_model

    def refuse_out_of_range(hu, *a, **kw):
        if float(hu.max()) > 50000:
            raise FloatingPointError("HU beyond the model's range")
        return real(hu, *a, **kw)

    monkeypatch.setattr(n2q, "resize_to_model", refuse_out_of_range)
    settings = _analysis(weights, "cpu", models=("basic", "n2q"))
    node = make_node(tmp_path, analysis=settings)
    _pending(node, sorted((tmp_path / "push").rglob("*.dcm")))
    with node.db.session() as s:
        first, second = (s.scalar(select(Job.id).join(Series).where(Series.series_instance_uid == u)) for u in uids)
    with caplog.at_level("WARNING"):
        _loop_until_closed(node, 2, "both jobs closed")
    assert any("failed on 2 series run together" in r.getMessage() for r in caplog.records)
    with node.db.session() as s:
        j1, j2 = s.get(Job, first), s.get(Job, second)
        assert (j1.state, j1.outcome, j1.error) == ("done", "done", None)
        assert (j2.state, j2.outcome, j2.error) == ("failed", "failed", "n2q: HU beyond the model's range")
        assert j1.finished_by == j2.finished_by == node.worker.worker_id
        runs = sorted(s.execute(select(AnalysisRun.job_id, AnalysisRun.model)).all())
        got = {m.name: m.value for m in s.scalars(select(SeriesMetric).join(AnalysisRun).where(
            AnalysisRun.job_id == first, AnalysisRun.model == "n2q"))}
    # the failed series keeps what ran before the failing model (basic), as a series run alone does
    assert runs == [(first, "basic"), (first, "n2q"), (second, "basic")]
    # the good series' N2Q results are those of the series run alone (switch on), bit for bit
    alone = analyse_series(sorted((tmp_path / "push" / "s00").iterdir()), ["basic", "n2q"],
                           run_context(node.settings), series_instance_uid=uids[0])
    (n2q_out,) = [o for o in alone.outputs if o.name == "n2q"]
    assert got == n2q_out.series_metrics and got["n2q_mean_quality"] is not None


def test_fill_target_is_the_largest_batch_of_the_models_that_batch_series(weights):
    from node.worker import fill_target

    def target(models, analysis):
        return fill_target(models, run_context(_settings({"device": "cpu", "series_batch": "on", **analysis})))

    assert target(["basic", "classical", "d2iqa"], {}) == 0  # none of them batches series
    assert target(["basic", "n2q"], {}) == 1  # N2Q's CPU default
    assert target(["n2q", "ldctiqa", "delta_iqa"], {}) == 1  # LDCTIQA and Delta-IQA without weights score nothing
    assert target(["n2q", "ldctiqa", "delta_iqa"], {"ldctiqa": {"weights": weights["ldctiqa"]},
                                                    "delta_iqa": {"weights": weights["delta_iqa"]}}) == 8
    assert target(["n2q", "ldctiqa"], {"n2q": {"batch": 16}, "ldctiqa": {"weights": weights["ldctiqa"]}}) == 16

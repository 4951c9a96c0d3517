"""The SR code catalogue, assembled from the model specs (``analysis.models``) and installed into
``reports.codes``: the node is the layer that knows both the models and the report builders, so
``reports`` never imports ``analysis``. ``install()`` is idempotent and runs on import."""

from __future__ import annotations

from analysis import models as registry
from analysis.models.spec import Concept, Unit
from reports import codes

_installed = False


def _code(c: Concept):
    return codes.Code(c.value, c.scheme, c.meaning)


def _unit(u: Unit):
    return codes.ucum(u.code, u.meaning)


def metric_codes() -> list[codes.MetricCode]:
    from node.calibrate import likert_metric_codes  # <metric>_likert of the calibrated scores

    return [codes.MetricCode(m.key, _code(m.concept), _unit(m.unit), m.unit.display, m.label, trended=m.trended,
                             in_report=m.in_report, context=m.context, meaning=m.meaning)
            for _, m in registry.metrics()] + likert_metric_codes()


def map_codes() -> list[codes.MapCode]:
    return [codes.MapCode(m.name, _code(m.concept), _unit(m.unit), m.model_matrix, m.detail_mm, m.why)
            for _, m in registry.maps()]


def install() -> None:
    global _installed
    if not _installed:
        codes.install(metric_codes(), map_codes())
        _installed = True


install()

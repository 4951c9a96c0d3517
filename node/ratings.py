"""Ratings files: the CSV a site's raters' scores travel in (read and written by
``analysis.training.ratings_file``, re-exported here), and its import into / export from the node's
database (table ``ratings``).

The file's format (columns, score range, what makes a row bad) is described in
``analysis.training.ratings_file``; nothing is imported from a file with a bad row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

# the file format itself (reading, checking, writing) lives in analysis, where the trainers read it
from analysis.training.ratings_file import (  # noqa: F401  (re-exported: node.ratings is the node's API)
    COLUMNS,
    LIKERT,
    REQUIRED,
    SCORE_MAX,
    SCORE_MIN,
    RatingRow,
    RatingsFileError,
    parse_score,
    print_problems,
    read_ratings_csv,
    write_ratings_csv,
)
from storage.filestore import is_valid_uid

log = logging.getLogger(__name__)

# -- database ------------------------------------------------------------------------------------

def add_rating(db, *, rater: str | None, score: float, path: str | Path, sop_instance_uid: str | None,
               series_instance_uid: str | None = None, frame: int | None = None, source: str = "page",
               rated_at: datetime | None = None) -> int:
    """Store one rating; returns its id."""
    from storage.models import Rating

    score = parse_score(str(score))
    for uid in (sop_instance_uid, series_instance_uid):
        if uid is not None and not is_valid_uid(uid):
            raise ValueError(f"invalid UID {uid!r}")
    with db.session() as s:
        r = Rating(rater=(rater or None), score=score, path=str(path), sop_instance_uid=sop_instance_uid,
                   series_instance_uid=series_instance_uid, frame=frame, source=source,
                   rated_at=rated_at or datetime.now(timezone.utc))
        s.add(r)
        s.flush()
        return int(r.id)


def withdraw_rating(db, rating_id: int, rater: str | None = None) -> bool:
    """Undo: mark a rating withdrawn (only the rater's own, when ``rater`` is given). True if it was."""
    from storage.models import Rating

    with db.session() as s:
        r = s.get(Rating, int(rating_id))
        if r is None or r.withdrawn_at is not None or (rater is not None and r.rater != rater):
            return False
        r.withdrawn_at = datetime.now(timezone.utc)
        return True


def import_ratings(db, rows: Sequence[RatingRow]) -> int:
    """Store checked rows (source ``import``) in one transaction. Returns the number stored."""
    from storage.models import Rating

    now = datetime.now(timezone.utc)
    with db.session() as s:
        for r in rows:
            s.add(Rating(rater=r.rater, score=r.score, path=str(r.path), sop_instance_uid=r.sop_instance_uid,
                         series_instance_uid=r.series_instance_uid, frame=r.frame, source="import", rated_at=now))
    return len(rows)


def stored_ratings(db, rater: str | None = None) -> list[RatingRow]:
    """The ratings in the database (withdrawn ones left out), oldest first."""
    from sqlalchemy import select

    from storage.models import Rating

    with db.session() as s:
        q = select(Rating).where(Rating.withdrawn_at.is_(None)).order_by(Rating.id)
        if rater is not None:
            q = q.where(Rating.rater == rater)
        return [RatingRow(line=0, path=Path(r.path), score=float(r.score), rater=r.rater, frame=r.frame,
                          sop_instance_uid=r.sop_instance_uid, series_instance_uid=r.series_instance_uid)
                for r in s.scalars(q)]


def export_ratings(db, out: str | Path, rater: str | None = None) -> int:
    return write_ratings_csv(out, stored_ratings(db, rater))

"""The record store: SQLite (WAL) by default, PostgreSQL by URL, through SQLAlchemy 2.
Every status change is a compare-and-set ``UPDATE ... WHERE status = <expected>`` with its event in
the same transaction, so two API replicas (or a replica and its restarted self) never both apply one.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    Engine,
    Table,
    and_,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import sessionmaker, undefer

from service.models import RECORD_COLUMNS, Base, EventRow, ExperimentRow, MetaRow, RecordFields, utcnow
from service.states import ACTIVE, TERMINAL, Status, can_move

__all__ = ["Store", "IdTaken", "BadCursor", "aware"]


class IdTaken(Exception):
    """A row with this id exists already (an idempotent repeat, or a concurrent one)."""


class BadCursor(ValueError):
    """A pagination cursor this service did not make."""


def aware(dt: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back; every time the store writes is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=UTC)


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, future=True)
    path = url.split(":///", 1)[1] if ":///" in url else ""
    if path and path != ":memory:":
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # One connection per thread the API may run handlers in (anyio's pool has 40): with fewer, readers
    # queue for a connection behind the writers holding one, although WAL lets them read at once.
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20, max_overflow=30
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # WAL: readers never wait for the writer (GETs stay fast while the reconciler writes).
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


def encode_cursor(row: RecordFields) -> str:
    created = aware(row.created_at)
    assert created is not None
    raw = json.dumps([created.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, exp_id = json.loads(raw)
        return datetime.fromisoformat(created).astimezone(UTC), str(exp_id)
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError) as e:
        raise BadCursor(f"cursor {cursor!r} is not one this service returned") from e


class Store:
    """All reads and writes of the records. Methods open their own short transaction. Every write
    of a record sets its ``updated_at`` (the version :class:`service.schemas.RecordJson` keys on)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = _make_engine(url)
        Base.metadata.create_all(self.engine)
        self._add_columns()
        for table in Base.metadata.sorted_tables:  # indexes added since a database was made
            for index in table.indexes:
                index.create(self.engine, checkfirst=True)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def _add_columns(self) -> None:
        """Add the nullable columns a table gained since its database was made (``create_all``
        makes missing tables only)."""
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in inspect(self.engine).get_columns(table.name)}
            for column in table.columns:
                if column.name in have or not column.nullable:
                    continue
                kind = column.type.compile(self.engine.dialect)
                try:
                    with self.engine.begin() as conn:
                        conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))
                except (OperationalError, ProgrammingError):
                    # another replica added it first; anything else shows on the next check
                    names = {c["name"] for c in inspect(self.engine).get_columns(table.name)}
                    if column.name not in names:
                        raise

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def service_id(self) -> str:
        """The ``hdet.service`` of this database's jobs: made once, shared by every replica."""
        with self._session.begin() as s:
            row = s.get(MetaRow, "service_id")
            if row is not None:
                return row.value
        try:
            with self._session.begin() as s:
                s.add(MetaRow(key="service_id", value=f"hdet-{uuid.uuid4().hex[:12]}"))
        except IntegrityError:
            pass  # another replica made it first
        with self._session.begin() as s:
            made = s.get(MetaRow, "service_id")
            assert made is not None
            return made.value

    # ------------------------------------------------------------------ rows

    def insert_accepted(self, row: ExperimentRow, reason: str) -> None:
        """Store a new ``SUBMITTING`` record with its first event ``(none) -> SUBMITTING``;
        :class:`IdTaken` if the id exists."""
        row.status = Status.SUBMITTING
        row.created_at = row.updated_at = utcnow()
        try:
            with self._session.begin() as s:
                s.add(row)
                s.flush()  # the record before its event (the event's foreign key)
                s.add(
                    EventRow(
                        experiment_id=row.id,
                        seq=1,
                        at=row.created_at,
                        from_status=None,
                        to_status=Status.SUBMITTING,
                        reason=reason,
                    )
                )
        except IntegrityError as e:
            raise IdTaken(row.id) from e

    def get(self, exp_id: str, *, with_log: bool = False) -> ExperimentRow | None:
        """The record ``exp_id``; its kept log only ``with_log`` (up to 256 KiB a record does not show)."""
        with self._session() as s:
            return s.get(
                ExperimentRow, exp_id, options=[undefer(ExperimentRow.log_tail)] if with_log else None
            )

    def transition(self, exp_id: str, expected: str, to: str, reason: str, **fields: Any) -> bool:
        """Compare-and-set ``expected -> to`` with ``fields``, recording the event; False if the
        record was not in ``expected`` any more (someone else moved it first)."""
        if not can_move(expected, to):
            raise ValueError(f"{expected} -> {to} is not a transition of an experiment")
        now = utcnow()
        values: dict[str, Any] = {"status": to, "updated_at": now, **fields}
        if to == Status.RUNNING:
            values.setdefault("started_at", now)
        if to in TERMINAL:
            values.setdefault("ended_at", now)
        with self._session.begin() as s:
            res = s.execute(
                update(ExperimentRow)
                .where(ExperimentRow.id == exp_id, ExperimentRow.status == expected)
                .values(**values)
            )
            if getattr(res, "rowcount", 0) != 1:
                return False
            last = s.scalar(select(func.max(EventRow.seq)).where(EventRow.experiment_id == exp_id))
            s.add(
                EventRow(
                    experiment_id=exp_id,
                    seq=(last or 0) + 1,
                    at=now,
                    from_status=expected,
                    to_status=to,
                    reason=reason,
                )
            )
        return True

    def update_fields(self, exp_id: str, expected: str, **fields: Any) -> bool:
        """Set ``fields`` if the record is still in ``expected`` (never undoes a transition)."""
        with self._session.begin() as s:
            res = s.execute(
                update(ExperimentRow)
                .where(ExperimentRow.id == exp_id, ExperimentRow.status == expected)
                .values(updated_at=utcnow(), **fields)
            )
        return bool(getattr(res, "rowcount", 0))

    def update_many(self, changes: Sequence[tuple[str, str, dict[str, Any]]]) -> int:
        """:meth:`update_fields` for many records in one transaction (a reconciler pass), one
        executemany per set of fields (a statement per record took a tenth of the API process's
        time under load); how many applied."""
        if not changes:
            return 0
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
        for exp_id, expected, fields in changes:
            groups[tuple(sorted(fields))].append({"b_id": exp_id, "b_expected": expected, **fields})
        table = cast(Table, ExperimentRow.__table__)
        now = utcnow()
        applied = 0
        with self.engine.begin() as conn:
            for keys, params in groups.items():
                stmt = (
                    update(table)
                    .where(table.c.id == bindparam("b_id"), table.c.status == bindparam("b_expected"))
                    .values(updated_at=now, **{k: bindparam(k) for k in keys})
                )
                applied += int(conn.execute(stmt, params).rowcount)
        return applied

    # ------------------------------------------------------------------ queries

    def active(self) -> list[RecordFields]:
        """Records the reconciler follows, oldest first, as plain rows of :data:`RECORD_COLUMNS`
        (ORM objects cost a reconciler pass over 800 records 20-30 ms of the API process)."""
        q = select(*RECORD_COLUMNS).where(ExperimentRow.status.in_(list(ACTIVE)))
        with self.engine.connect() as conn:
            return list(conn.execute(q.order_by(ExperimentRow.created_at)).all())

    def count_active(self) -> int:
        """How many records are in Ray (:data:`ACTIVE`)."""
        q = select(func.count()).select_from(ExperimentRow).where(ExperimentRow.status.in_(list(ACTIVE)))
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def set_queued(self, waiting_for: str) -> int:
        """Say ``waiting_for`` on every ``SUBMITTING`` record that says something else (one
        statement); how many changed."""
        q = (
            update(ExperimentRow)
            .where(
                ExperimentRow.status == Status.SUBMITTING,
                or_(ExperimentRow.waiting_for.is_(None), ExperimentRow.waiting_for != waiting_for),
            )
            .values(updated_at=utcnow(), waiting_for=waiting_for)
        )
        with self.engine.begin() as conn:
            return int(getattr(conn.execute(q), "rowcount", 0))

    def submitting(self, limit: int = 100) -> list[ExperimentRow]:
        """Records accepted and not yet submitted to Ray, oldest first."""
        with self._session() as s:
            q = select(ExperimentRow).where(ExperimentRow.status == Status.SUBMITTING)
            return list(s.scalars(q.order_by(ExperimentRow.created_at).limit(limit)))

    def statuses(self, ids: Iterable[str]) -> dict[str, str]:
        """The status of each of ``ids`` that has a record."""
        wanted = list(ids)
        if not wanted:
            return {}
        with self._session() as s:
            q = select(ExperimentRow.id, ExperimentRow.status).where(ExperimentRow.id.in_(wanted))
            return {exp_id: status for exp_id, status in s.execute(q)}

    def page(
        self,
        *,
        limit: int,
        cursor: str | None = None,
        status: Sequence[str] = (),
        name: str | None = None,
        loss: str | None = None,
        arch: str | None = None,
    ) -> tuple[list[RecordFields], str | None]:
        """Newest first, ``limit`` at a time; the next page starts after the opaque ``cursor``.
        Without a status filter the query walks the ``(created_at, id)`` index and stops after a page
        (``status IN <every visible one>`` made SQLite read and sort every record first). The rows
        are plain rows of :data:`RECORD_COLUMNS`, not ORM objects."""
        q = select(*RECORD_COLUMNS)
        if status:
            q = q.where(ExperimentRow.status.in_(list(status)))
        if name is not None:
            q = q.where(ExperimentRow.name == name)
        if loss is not None:
            q = q.where(ExperimentRow.loss == loss)
        if arch is not None:
            q = q.where(ExperimentRow.arch == arch)
        if cursor:
            created, last_id = decode_cursor(cursor)
            q = q.where(
                or_(
                    ExperimentRow.created_at < created,
                    and_(ExperimentRow.created_at == created, ExperimentRow.id < last_id),
                )
            )
        q = q.order_by(ExperimentRow.created_at.desc(), ExperimentRow.id.desc()).limit(limit + 1)
        with self.engine.connect() as conn:
            rows: list[RecordFields] = list(conn.execute(q).all())
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (encode_cursor(rows[-1]) if more and rows else None)

    def events(self, exp_id: str, after: int = 0) -> list[EventRow]:
        with self._session() as s:
            q = (
                select(EventRow)
                .where(EventRow.experiment_id == exp_id, EventRow.seq > after)
                .order_by(EventRow.seq)
            )
            return list(s.scalars(q))

"""The database tables of the service: experiment records, their state transitions, service metadata.
SQLAlchemy 2 declarative models only; reading and writing them is :mod:`service.db`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "ExperimentRow", "RecordFields", "RECORD_COLUMNS", "EventRow", "MetaRow", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ExperimentRow(Base):
    """One experiment: what was asked (the resolved spec), where it runs, what became of it."""

    __tablename__ = "experiments"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # exp-<16 hex>, Ray's submission_id
    name: Mapped[str] = mapped_column(String(100), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # run | search
    loss: Mapped[str] = mapped_column(String(32), index=True)
    arch: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16))
    spec: Mapped[str] = mapped_column(Text)  # resolved spec, JSON
    body_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the resolved spec (idempotency)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    status_checked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ray_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    ray_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    ray_exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    mlflow_parent_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    progress: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON
    failure: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON {reason, exit_code, log_tail}
    # an ended job's last 256 KiB: loaded only by the logs route (a record or a page never shows it)
    log_tail: Mapped[str | None] = mapped_column(Text, nullable=True, deferred=True)
    submit_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # time Ray took to accept it
    # what the record waits for, while it waits: Ray (to submit it), or resources (to train)
    waiting_for: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        # newest first: the default listing walks this index and stops after a page
        Index("ix_experiments_keyset", "created_at", "id"),
        # a status filter, newest first, without sorting the matching records
        Index("ix_experiments_status_keyset", "status", "created_at", "id"),
    )


class RecordFields(Protocol):
    """What a public record is made of: an :class:`ExperimentRow`, or a row of :data:`RECORD_COLUMNS`
    (a list page reads those without building ORM objects, a fifth of the cost)."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def loss(self) -> str: ...
    @property
    def arch(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def spec(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def updated_at(self) -> datetime: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def ended_at(self) -> datetime | None: ...
    @property
    def status_checked_at(self) -> datetime | None: ...
    @property
    def ray_status(self) -> str | None: ...
    @property
    def ray_message(self) -> str | None: ...
    @property
    def ray_exit_code(self) -> int | None: ...
    @property
    def mlflow_experiment_id(self) -> str | None: ...
    @property
    def mlflow_parent_run_id(self) -> str | None: ...
    @property
    def progress(self) -> str | None: ...
    @property
    def failure(self) -> str | None: ...
    @property
    def submit_s(self) -> float | None: ...
    @property
    def waiting_for(self) -> str | None: ...


#: the columns of a record (every column but the kept log)
RECORD_COLUMNS = tuple(c for c in ExperimentRow.__table__.columns if c.key != "log_tail")


class EventRow(Base):
    """One state transition; ``(experiment_id, seq)`` is unique, so no transition is recorded twice."""

    __tablename__ = "events"

    experiment_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    from_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)


class MetaRow(Base):
    """Facts about the database itself (``service_id``: the ``hdet.service`` of its jobs)."""

    __tablename__ = "service_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)

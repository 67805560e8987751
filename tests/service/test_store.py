"""The record store on both of its databases: a SQLite file (WAL) and PostgreSQL (a throwaway
cluster made with initdb for this module). Compare-and-set transitions, one event per transition
even under concurrent writers, keyset pages, accepted (SUBMITTING) records, columns added to an older
database, the shared service id."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from svc_helpers import wait_for

from service.db import BadCursor, Store
from service.models import ExperimentRow
from service.stack import free_port
from service.states import Status


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    assert found, f"PostgreSQL's {name} is needed by the store tests (install postgresql)"
    return found


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server of our own on a free port; yields the URL of its ``postgres`` database."""
    import psycopg2

    root = Path(tempfile.mkdtemp(prefix="hdet-pg-"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    subprocess.run(
        [*as_user, _pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "hdet", "--no-sync"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        [*as_user, _pg_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(root), "-h", "127.0.0.1",
         "-c", "fsync=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def up() -> bool:
        try:
            psycopg2.connect(host="127.0.0.1", port=port, user="hdet", dbname="postgres").close()
            return True
        except psycopg2.OperationalError:
            return False

    try:
        wait_for(up, 60, "PostgreSQL to accept connections")
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'service.db'}"
    else:
        import psycopg2

        host = request.getfixturevalue("postgres")
        name = f"t_{uuid.uuid4().hex[:8]}"
        conn = psycopg2.connect(f"postgresql://hdet@{host}/postgres")
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {name}")
        conn.close()
        url = f"postgresql+psycopg2://hdet@{host}/{name}"
    s = Store(url)
    yield s
    s.close()


def _row(exp_id: str, name: str = "x") -> ExperimentRow:
    return ExperimentRow(
        id=exp_id, name=name, kind="run", loss="harmonicdet", arch="retinanet", spec="{}", body_hash="h",
        idempotency_key=None,
    )  # fmt: skip


def _pending(store: Store, exp_id: str, name: str = "x") -> None:
    store.insert_accepted(_row(exp_id, name), "accepted")
    assert store.transition(exp_id, Status.SUBMITTING, Status.PENDING, "submitted")


def test_an_accepted_record_is_listed_as_submitting_with_its_first_event_until_submitted(
    store: Store,
) -> None:
    store.insert_accepted(_row("exp-a"), "accepted; submitting to Ray")
    store.insert_accepted(_row("exp-b"), "accepted; submitting to Ray")
    row = store.get("exp-a")
    assert row is not None and row.status == Status.SUBMITTING
    assert [r.id for r in store.page(limit=10, status=[Status.SUBMITTING])[0]] == ["exp-b", "exp-a"]
    assert [r.id for r in store.submitting()] == ["exp-a", "exp-b"]  # oldest first
    assert [(e.seq, e.from_status, e.to_status, e.reason) for e in store.events("exp-a")] == [
        (1, None, "SUBMITTING", "accepted; submitting to Ray")
    ]
    assert store.transition("exp-a", Status.SUBMITTING, Status.PENDING, "submitted to Ray", waiting_for=None)
    assert [(e.seq, e.from_status, e.to_status) for e in store.events("exp-a")][1:] == [
        (2, "SUBMITTING", "PENDING")
    ]
    assert [r.id for r in store.submitting()] == ["exp-b"]
    assert store.statuses(["exp-a", "exp-b", "exp-c"]) == {"exp-a": "PENDING", "exp-b": "SUBMITTING"}


def test_an_id_is_taken_once_and_its_first_event_is_not_written_twice(store: Store) -> None:
    from service.db import IdTaken

    store.insert_accepted(_row("exp-a"), "accepted")
    with pytest.raises(IdTaken):
        store.insert_accepted(_row("exp-a"), "accepted")
    assert len(store.events("exp-a")) == 1


def test_a_column_added_since_a_database_was_made_is_added_to_it(store: Store) -> None:
    _pending(store, "exp-a")
    with store.engine.begin() as conn:  # the table as a database made before the column existed has it
        conn.exec_driver_sql("ALTER TABLE experiments DROP COLUMN waiting_for")
    reopened = Store(store.url)
    try:
        row = reopened.get("exp-a")
        assert row is not None and row.status == Status.PENDING and row.waiting_for is None
        assert reopened.update_fields("exp-a", Status.PENDING, waiting_for="2 CPU")
        assert reopened.get("exp-a").waiting_for == "2 CPU"  # type: ignore[union-attr]
    finally:
        reopened.close()


def test_concurrent_transitions_apply_once_with_one_event(store: Store) -> None:
    _pending(store, "exp-a")
    won: list[bool] = []
    barrier = threading.Barrier(8)

    def move() -> None:
        barrier.wait()
        won.append(store.transition("exp-a", Status.PENDING, Status.RUNNING, "Ray started the job"))

    threads = [threading.Thread(target=move) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 7 + [True]
    events = store.events("exp-a")
    assert [(e.seq, e.from_status, e.to_status) for e in events] == [
        (1, None, "SUBMITTING"),
        (2, "SUBMITTING", "PENDING"),
        (3, "PENDING", "RUNNING"),
    ]
    row = store.get("exp-a")
    assert row is not None and row.status == "RUNNING" and row.started_at is not None


def test_a_transition_outside_the_state_machine_is_refused(store: Store) -> None:
    _pending(store, "exp-a")
    assert store.transition("exp-a", Status.PENDING, Status.SUCCEEDED, "done")
    with pytest.raises(ValueError):
        store.transition("exp-a", Status.SUCCEEDED, Status.RUNNING, "no")
    row = store.get("exp-a")
    assert row is not None and row.ended_at is not None


def test_field_updates_never_undo_a_transition(store: Store) -> None:
    _pending(store, "exp-a")
    assert store.update_fields("exp-a", Status.PENDING, ray_status="PENDING")
    assert store.transition("exp-a", Status.PENDING, Status.CANCELLING, "cancel requested")
    assert not store.update_fields("exp-a", Status.PENDING, ray_status="RUNNING")
    row = store.get("exp-a")
    assert row is not None and row.status == "CANCELLING" and row.ray_status == "PENDING"


def test_keyset_pages_cover_every_row_once_newest_first_with_filters(store: Store) -> None:
    ids = [f"exp-{i:016x}" for i in range(7)]
    for i, exp_id in enumerate(ids):
        _pending(store, exp_id, name="even" if i % 2 == 0 else "odd")
    seen, cursor = [], None
    while True:
        rows, cursor = store.page(limit=3, cursor=cursor)
        seen += [r.id for r in rows]
        if cursor is None:
            break
    assert seen == ids[::-1]
    odd, _ = store.page(limit=10, name="odd")
    assert [r.id for r in odd] == [ids[5], ids[3], ids[1]]
    assert store.page(limit=10, status=["RUNNING"])[0] == []
    with pytest.raises(BadCursor):
        store.page(limit=3, cursor="garbage")


def test_the_service_id_is_made_once_and_shared_by_every_replica(store: Store) -> None:
    other = Store(store.url)
    try:
        assert store.service_id() == other.service_id() == store.service_id()
    finally:
        other.close()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    s = Store(f"sqlite:///{tmp_path / 'db' / 'service.db'}")
    with s.engine.connect() as conn:
        from sqlalchemy import text

        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    s.close()


def test_a_reconciler_pass_updates_only_the_records_still_where_it_saw_them(store: Store) -> None:
    for exp_id in ("exp-a", "exp-b", "exp-c"):
        _pending(store, exp_id)
    assert store.transition("exp-c", Status.PENDING, Status.CANCELLING, "cancel requested")
    before = store.get("exp-a")
    assert before is not None
    applied = store.update_many(
        [
            ("exp-a", Status.PENDING, {"ray_status": "PENDING"}),
            ("exp-b", Status.PENDING, {"ray_status": "RUNNING", "ray_message": "started"}),
            ("exp-c", Status.PENDING, {"ray_status": "RUNNING"}),  # moved on meanwhile: untouched
        ]
    )
    assert applied == 2
    a, b, c = (store.get(i) for i in ("exp-a", "exp-b", "exp-c"))
    assert a is not None and a.ray_status == "PENDING" and a.updated_at > before.updated_at
    assert b is not None and (b.ray_status, b.ray_message) == ("RUNNING", "started")
    assert c is not None and c.status == Status.CANCELLING and c.ray_status is None


def test_the_kept_log_is_read_only_when_asked_for(store: Store) -> None:
    from sqlalchemy.orm.exc import DetachedInstanceError

    _pending(store, "exp-a")
    assert store.transition("exp-a", Status.PENDING, Status.SUCCEEDED, "done", log_tail="epoch 2/2\n")
    row = store.get("exp-a", with_log=True)
    assert row is not None and row.log_tail == "epoch 2/2\n"
    plain = store.get("exp-a")
    with pytest.raises(DetachedInstanceError):
        _ = plain.log_tail  # type: ignore[union-attr]  # a record never loads up to 256 KiB it does not show


def test_a_page_reads_an_index_in_order_and_sorts_nothing(tmp_path: Path) -> None:
    """With a row per submission, a page that sorted every record cost a list request more the
    more experiments there were (SQLite read them all through the status index, then sorted)."""
    from sqlalchemy import event

    s = Store(f"sqlite:///{tmp_path / 'service.db'}")
    pages: list[str] = []

    @event.listens_for(s.engine, "before_cursor_execute")
    def _capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if "ORDER BY" in statement:
            pages.append(statement)

    s.page(limit=50)
    s.page(limit=50, status=["PENDING"])
    event.remove(s.engine, "before_cursor_execute", _capture)
    assert len(pages) == 2
    with s.engine.connect() as conn:
        for statement in pages:
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, ("x",) * statement.count("?"))
            details = " | ".join(str(r[-1]) for r in plan)
            assert "TEMP B-TREE" not in details and "USING INDEX ix_experiments_" in details, details
    s.close()

"""The public record's JSON, as the routes send it: kept per row version, so a page built from kept
answers is the page :class:`ExperimentList` would make, and any write of the row shows at once."""

from __future__ import annotations

import json
from pathlib import Path

from service.db import Store
from service.models import ExperimentRow
from service.schemas import ExperimentList, RecordJson, record
from service.states import Status


def _pending(store: Store, exp_id: str) -> None:
    spec = {"name": exp_id, "tracking": {"experiment": "records"}, "train": {"epochs": 2}}
    store.insert_accepted(
        ExperimentRow(
            id=exp_id,
            name=exp_id,
            kind="run",
            loss="harmonicdet",
            arch="ssdlite",
            spec=json.dumps(spec),
            body_hash="h",
            idempotency_key=None,
        ),  # fmt: skip
        "accepted",
    )
    assert store.transition(exp_id, Status.SUBMITTING, Status.PENDING, "submitted")


def test_kept_json_is_the_record_and_a_write_of_the_row_replaces_it(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'service.db'}")
    render = RecordJson(size=8)
    for i in range(3):
        _pending(store, f"exp-{i:016x}")
    rows, cursor = store.page(limit=2)
    page = json.loads(render.page([(r, None) for r in rows], cursor))
    assert page == ExperimentList(items=[record(r, None) for r in rows], next_cursor=cursor).model_dump(
        mode="json"
    )
    assert page["next_cursor"] is not None and [i["status"] for i in page["items"]] == ["PENDING"] * 2

    first = rows[0].id
    assert render(rows[0], None) is render(store.get(first), None)  # type: ignore[arg-type]  # kept
    store.update_many([(first, Status.PENDING, {"ray_status": "PENDING", "ray_message": "waiting"})])
    checked = store.get(first)
    assert checked is not None
    assert json.loads(render(checked, None))["ray"]["message"] == "waiting"
    assert store.transition(first, Status.PENDING, Status.CANCELLING, "cancel requested")
    rows, _ = store.page(limit=2)
    assert [i["status"] for i in json.loads(render.page([(r, None) for r in rows], None))["items"]] == [
        "CANCELLING",
        "PENDING",
    ]
    link = "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    assert json.loads(render(rows[0], link))["links"]["mlflow"] == link  # the link is part of the key
    assert len(render._cache) <= 8
    store.close()


def test_the_record_protocol_names_every_record_column() -> None:
    """:class:`RecordFields` types the plain rows a page reads: it must list the same columns."""
    from service.models import RECORD_COLUMNS, RecordFields

    declared = {name for name, value in vars(RecordFields).items() if isinstance(value, property)}
    used = {c.key for c in RECORD_COLUMNS} - {"body_hash", "idempotency_key"}
    assert declared == used

"""MLflow, as the service reads it: an experiment's parent run (found by ``Tag.EXPERIMENT_ID``), its
child runs, progress, results, the per-seed metrics a comparison needs, and closing orphaned runs.

The layout is :mod:`workers.tracking`'s: one parent run per experiment, one child run per training
run below it (``mlflow.parentRunId``), every tag name from :class:`workers.tracking.Tag`.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import urlencode

from workers.summary import collect_summary
from workers.summary.records import BASELINE_ID, TEST_PREFIX
from workers.tracking import CHILD_ROLE, PARENT_ROLE, Artifact, Tag, child_runs, close_running_runs

__all__ = ["MlflowView", "MlflowUnavailable", "finite", "has_test", "COMPARE_METRICS"]

#: the metrics ``/v1/compare`` puts side by side.
COMPARE_METRICS = ("AP", "AP50", "AP75", "AP90", "aic", "spearman")


class MlflowUnavailable(Exception):
    """The tracking server did not answer."""


def finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


class MlflowView:
    """Reads (and, for runs nobody else will end, closes) the runs of the service's experiments."""

    def __init__(self, tracking_uri: str, ui_url: str | None = None):
        self.tracking_uri = tracking_uri
        self.ui_url = ui_url
        # The client retries a dead server for minutes by default; the service would rather say so.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self._client: Any = None
        self._http: Any = None  # one HTTP client for the pings (thread-safe; a new one builds an SSL context)
        self._http_lock = threading.Lock()
        self._answered_at = -math.inf  # monotonic time of the last ping MLflow answered

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _http_client(self) -> Any:
        with self._http_lock:
            if self._http is None:
                import httpx

                self._http = httpx.Client()
            return self._http

    def ping(self, timeout_s: float = 3.0, *, max_age_s: float = 0.0) -> None:
        """Raise :class:`MlflowUnavailable` unless the tracking store answers; an answer less than
        ``max_age_s`` old counts (a submission under load need not ask again for each request)."""
        if max_age_s > 0 and time.monotonic() - self._answered_at < max_age_s:
            return
        try:
            if self.tracking_uri.startswith(("http://", "https://")):
                r = self._http_client().get(self.tracking_uri.rstrip("/") + "/health", timeout=timeout_s)
                r.raise_for_status()
            else:
                self.client.search_experiments(max_results=1)
        except Exception as e:
            self._answered_at = -math.inf
            raise MlflowUnavailable(
                f"MLflow at {self.tracking_uri} does not answer ({type(e).__name__})"
            ) from e
        self._answered_at = time.monotonic()

    def run_exists(self, run_id: str) -> bool:
        """Whether this MLflow has the run ``run_id``; :class:`MlflowUnavailable` if it does not answer."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise MlflowUnavailable(f"MLflow at {self.tracking_uri} does not answer ({e.error_code})") from e
        return True

    def link(self, experiment_id: str | None, run_id: str | None) -> str | None:
        """The MLflow UI page of a run."""
        if not (self.ui_url and experiment_id and run_id):
            return None
        return f"{self.ui_url}/#/experiments/{experiment_id}/runs/{run_id}"

    # ------------------------------------------------------------------ finding runs

    def find_parent(self, exp_id: str, experiment_name: str, mlflow_experiment_id: str | None = None) -> Any:
        """The parent run tagged ``Tag.EXPERIMENT_ID = exp_id`` (the newest), or None."""
        c = self.client
        eid = mlflow_experiment_id
        if eid is None:
            exp = c.get_experiment_by_name(experiment_name)
            if exp is None:
                return None
            eid = exp.experiment_id
        runs = c.search_runs(
            [eid],
            filter_string=f"tags.`{Tag.EXPERIMENT_ID}` = '{exp_id}' and tags.`{Tag.ROLE}` = '{PARENT_ROLE}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def children(self, parent: Any) -> list[Any]:
        """Every child run of ``parent``, oldest first."""
        return child_runs(self.client, parent.info.experiment_id, parent.info.run_id)

    # ------------------------------------------------------------------ progress and closing

    @staticmethod
    def progress(parent: Any, children: list[Any], epochs: int) -> dict[str, Any]:
        """How far an experiment got: its runs by status, the furthest epoch, the best AP so far."""
        aps = [r.data.metrics["AP"] for r in children if "AP" in r.data.metrics]
        trials = {r.data.tags.get(Tag.TRIAL_ID) for r in children} - {None}
        return finite(
            {
                "parent_status": parent.info.status,
                "runs": dict(Counter(r.info.status for r in children)),
                "trials": len(trials),
                "epoch": int(max((r.data.metrics.get("epoch", 0) for r in children), default=0)),
                "epochs": epochs,
                "best_AP": max(aps) if aps else None,
            }
        )

    def close_running(self, parent: Any, status: str, error: str | None) -> list[str]:
        """End the parent and child runs still RUNNING (their job is gone) with ``status``."""
        return close_running_runs(self.client, parent.info.experiment_id, parent.info.run_id, status, error)

    # ------------------------------------------------------------------ results

    def results(self, parent: Any, kind: str, name: str) -> dict[str, Any]:
        """The parent run, every child run (status, final metrics, seed, trial, checkpoint, link),
        and for a search its summary (``collect_summary``)."""
        children = self.children(parent)
        out: dict[str, Any] = {
            "parent": self._run(parent, checkpoint=False),
            "runs": [self._run(r, checkpoint=True) for r in children],
            "summary": None,
        }
        if kind == "search":
            out["summary"] = self.summary(parent, name).to_dict()
        return finite(out)

    def summary(self, parent: Any, name: str) -> Any:
        """The :class:`~workers.summary.SearchSummary` of a search's or comparison's parent run."""
        return collect_summary(self.client, parent.info.experiment_id, parent.info.run_id, experiment=name)

    def _run(self, run: Any, *, checkpoint: bool) -> dict[str, Any]:
        tags, info = run.data.tags, run.info
        view: dict[str, Any] = {
            "run_id": info.run_id,
            "name": info.run_name,
            "status": info.status,
            "role": tags.get(Tag.ROLE),
            "seed": _int(tags.get(Tag.SEED, run.data.params.get("train.seed"))),
            "trial_id": tags.get(Tag.TRIAL_ID),
            "arm": tags.get(Tag.ARM),
            "metrics": dict(run.data.metrics),
            "error": tags.get(Tag.ERROR),
            "link": self.link(info.experiment_id, info.run_id),
        }
        if checkpoint:
            view["checkpoint"] = self._checkpoint(info.run_id) if info.status == "FINISHED" else None
        return view

    def _checkpoint(self, run_id: str) -> str | None:
        try:
            names = {a.path for a in self.client.list_artifacts(run_id, Artifact.CHECKPOINT_DIR)}
        except Exception:
            return None
        path = f"{Artifact.CHECKPOINT_DIR}/{Artifact.MODEL_FILE}"
        return f"runs:/{run_id}/{path}" if path in names else None

    # ------------------------------------------------------------------ comparison

    def arm(self, parent: Any, kind: str, name: str) -> dict[str, Any]:
        """What an experiment contributes to a comparison: every metric of every finished seed
        (``test_`` ones beside the validation ones), the seeds' run ids, and which configuration
        that is. A single run: its training runs. A search: its best configuration, else (a
        comparison, whose space is empty) its confirmatory arm, else its best-ranked arm of
        ``search.arms`` (the arm's name)."""
        if kind != "search":
            per_seed: dict[int, dict[str, float]] = {}
            runs: dict[int, str] = {}
            for run in self.children(parent):
                if run.info.status != "FINISHED" or run.data.tags.get(Tag.ROLE) != CHILD_ROLE:
                    continue
                seed = _int(run.data.tags.get(Tag.SEED, run.data.params.get("train.seed")))
                if seed is not None:
                    per_seed[seed], runs[seed] = dict(run.data.metrics), run.info.run_id
            return {"arm": "run", "config": None, "per_seed": per_seed, "runs": runs}
        summary = collect_summary(self.client, parent.info.experiment_id, parent.info.run_id, experiment=name)
        rec = summary.best or summary.confirmatory
        if rec is None and summary.ranking:  # arms only: the best-ranked of them
            top = next((r["arm"] for r in summary.ranking if r["arm"] != BASELINE_ID), None)
            rec = next((a for a in summary.arms if a.trial_id == top), None)
        if rec is None:
            return {"arm": None, "config": None, "per_seed": {}, "runs": {}}
        metrics = {
            r.info.run_id: dict(r.data.metrics) for r in self.children(parent)
        }  # all, not the summary's
        runs = {int(s): r for s, r in rec.child_runs.items() if s in rec.per_seed}
        return {
            "arm": "best" if rec is summary.best else rec.trial_id,
            "config": dict(rec.params),
            "per_seed": {s: metrics.get(r, {}) for s, r in runs.items()},
            "runs": runs,
        }

    def compare_link(self, experiment_ids: list[str], run_ids: list[str]) -> str | None:
        """MLflow's own compare view of ``run_ids`` (None without a UI URL)."""
        if not (self.ui_url and run_ids):
            return None
        query = urlencode(
            {"runs": json.dumps(run_ids), "experiments": json.dumps(sorted(set(experiment_ids)))}
        )
        return f"{self.ui_url}/#/compare-runs?{query}"


def has_test(per_seed: dict[int, dict[str, float]]) -> bool:
    return bool(per_seed) and all(TEST_PREFIX + "AP" in m for m in per_seed.values())


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None

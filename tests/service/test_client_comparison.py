"""The main job through ``hdet serve``, as a user's shell runs it (``HDET_API_URL``,
``HDET_API_TOKEN``): ``hdet submit --follow`` of a 2-seed comparison (the standard-loss baseline
against HarmonicDet with the paper's defaults, ``search.space: {}``) ends SUCCEEDED; ``hdet results``
shows its paired table; ``hdet compare`` of it and a single run shows both with their params and
MLflow links that lead to their runs in the stack's MLflow. Beside them a comparison of 3 arms
(GIoU, quality focal, PISA) against the baseline on 2 seeds, whose results show the arms ranked with
intervals corrected across them. Real Ray, MLflow and SQLite; 13 trainings of the tiny spec (1 epoch).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml
from svc_helpers import REPO, Stack, tiny_spec

from service.client import Client
from workers.evidence.sequential import OUTCOMES
from workers.tracking import Tag

SEEDS = [0, 1]
#: the multi-arm comparison's arms (search.arms), each a loss section of its own
ARMS = {
    "giou": {"kind": "standard", "box": "giou"},
    "qfl": {"kind": "standard", "cls": "quality_focal"},
    "pisa": {"kind": "pisa"},
}
#: the primary metric's row of the paired table (AP in points): both arms' mean ± sd over the
#: paired seeds, their difference, n, the test, p, p adjusted, the interval, the verdict
PRIMARY_ROW = re.compile(
    r"^AP \(primary\)\s+(?P<treatment>[-\d.]+) ± [-\d.]+\s+(?P<baseline>[-\d.]+) ± [-\d.]+\s+"
    r"(?P<diff>[+-][\d.]+)\s+(?P<n>\d+)\s+(?P<test>\S+)\s+(?P<p>\S+)\s+(?P<p_adj>\S+)\s+"
    r"\[(?P<lo>[+-][\d.]+), (?P<hi>[+-][\d.]+)\]\s+(?P<verdict>\S.*)$",
    re.M,
)
ID = re.compile(r"Experiment '(exp-[0-9a-f]{16})'")


def _hdet(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``hdet ARGS`` as a user runs it: its exit code, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _write(folder: Path, spec: dict[str, Any]) -> Path:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def seen(
    stack: Stack, request: pytest.FixtureRequest, scratch: Callable[[pytest.FixtureRequest, str], Path]
) -> dict[str, Any]:
    """A single run (the standard loss, seed 0) submitted, then the comparison submitted and
    followed to its end; then what ``hdet results`` and ``hdet compare`` say of them."""
    tmp = scratch(request, "client-comparison")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HDET_", "RAY_", "MLFLOW_"))}
    # the token from the environment; HDET_HOME has no api-token file
    env.update(HDET_API_URL=stack.api_url, HDET_API_TOKEN=stack.token, HDET_HOME=str(tmp))
    # hdet_run.TINY's size (48 px, half a CPU per training): the five trainings run at once
    small = {"dataset.image_size": 48, "detector.image_size": 48, "scaling.cpus_per_worker": 0.5}
    comparison = tiny_spec(
        "client-comparison",
        search={"space": {}, "seeds": SEEDS, "baseline": True, "confirmatory": True, "confirm_best": False},
        **small,
    )
    single = tiny_spec("client-single", **{"loss.kind": "standard"}, **small)
    arms = tiny_spec(
        "client-arms", search={"space": {}, "seeds": SEEDS, "baseline": True, "arms": ARMS}, **small
    )
    out: dict[str, Any] = {}
    submitted = _hdet(env, "submit", str(_write(tmp, arms)))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    found = ID.search(submitted.stdout)
    assert found, submitted.stdout
    out["arms"] = found.group(1)
    submitted = _hdet(env, "submit", str(_write(tmp, single)))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    found = ID.search(submitted.stdout)
    assert found, submitted.stdout
    out["single"] = found.group(1)
    out["follow"] = _hdet(env, "submit", str(_write(tmp, comparison)), "--follow", timeout=600)
    found = ID.search(out["follow"].stdout)
    assert found, out["follow"].stdout + out["follow"].stderr
    out["comparison"] = cid = found.group(1)
    with Client(stack.api_url, stack.token) as c:
        out["record"] = c.get(cid)
        out["single_record"] = c.wait(out["single"], poll_s=1.0, timeout_s=300)
        out["arms_record"] = c.wait(out["arms"], poll_s=1.0, timeout_s=600)
    out["results"] = _hdet(env, "results", cid)
    out["results_json"] = _hdet(env, "results", cid, "--json")
    out["compare"] = _hdet(env, "compare", cid, out["single"])
    out["compare_json"] = _hdet(env, "compare", cid, out["single"], "--json")
    out["arms_json"] = _hdet(env, "results", out["arms"], "--json")
    r = httpx.get(
        f"{stack.api_url}/v1/experiments/{out['arms']}/results",
        params={"format": "markdown"},
        headers={"Authorization": f"Bearer {stack.token}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    out["arms_markdown"] = r.text
    return out


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def test_hdet_submit_follow_of_a_2_seed_comparison_ends_succeeded(seen: dict[str, Any]) -> None:
    out = _ok(seen["follow"])
    cid = seen["comparison"]
    assert out.rstrip().endswith(f"Experiment '{cid}' SUCCEEDED (Ray job SUCCEEDED)"), out[-3000:]
    assert f"Experiment '{cid}' accepted (SUBMITTING): client-comparison (search, harmonicdet loss" in out
    assert "paired over seeds [0, 1]" in out  # the job's own evidence table came through the log
    record = seen["record"]
    assert (record.status, record.kind, record.loss) == ("SUCCEEDED", "search", "harmonicdet")
    assert seen["single_record"].status == "SUCCEEDED"


def test_hdet_results_shows_the_paired_table_of_both_arms_on_2_seeds(seen: dict[str, Any]) -> None:
    body = json.loads(_ok(seen["results_json"]))
    assert body["id"] == seen["comparison"] and body["partial"] is False
    arms = sorted((r["arm"], r["seed"], r["status"]) for r in body["runs"])
    assert arms == [(a, s, "FINISHED") for a in ("baseline", "confirmatory") for s in SEEDS]
    summary = body["summary"]
    assert summary["baseline"]["params"] == {"loss.kind": "standard"}
    assert summary["trials"] == [] and summary["judged_on"] == "test"
    ap = summary["confirmatory_comparison"]["AP"]
    assert ap["role"] == "primary" and ap["n_pairs"] == 2 and ap["outcome"] in OUTCOMES
    estimate, lo, hi = ap["estimate"], ap["ci_low"], ap["ci_high"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in (estimate, lo, hi)), ap
    assert lo <= estimate <= hi

    text = _ok(seen["results"])
    assert text.startswith(f"Results of '{seen['comparison']}' (SUCCEEDED)")
    runs = [line.split() for line in text.splitlines() if line.startswith("client-comparison-")]
    assert sorted((r[1], r[2], r[3]) for r in runs) == [
        (a, str(s), "FINISHED") for a in ("baseline", "confirmatory") for s in SEEDS
    ]
    head = "confirmatory (the spec's loss) vs baseline (standard loss) on the test split, paired over seeds [0, 1]:"
    assert head in text
    columns = text.split(head, 1)[1].splitlines()[1].split()
    assert columns[:3] == ["metric", "confirm.", "baseline"] and columns[-1] == "verdict"
    row = PRIMARY_ROW.search(text)
    assert row, text
    values = {k: float(row[k]) for k in ("treatment", "baseline", "diff", "lo", "hi")}
    assert all(math.isfinite(v) for v in values.values())
    assert values["lo"] <= values["diff"] <= values["hi"]
    assert int(row["n"]) == 2 and row["test"] == "t"
    assert row["diff"] == f"{100 * estimate:+.1f}"
    assert (row["lo"], row["hi"]) == (f"{100 * lo:+.1f}", f"{100 * hi:+.1f}")
    assert row["verdict"].strip() == ap["verdict"]
    assert "verdict: On AP (the primary metric" in text


def test_hdet_compare_shows_the_comparison_and_a_single_run_with_their_params(seen: dict[str, Any]) -> None:
    cid, sid = seen["comparison"], seen["single"]
    comp = json.loads(_ok(seen["compare_json"]))
    by_id = {e["id"]: e for e in comp["experiments"]}
    assert [e["id"] for e in comp["experiments"]] == [cid, sid]
    c, s = by_id[cid], by_id[sid]
    assert (c["kind"], c["arm"], c["seeds"], c["loss"]) == ("search", "confirmatory", SEEDS, "harmonicdet")
    assert (s["kind"], s["arm"], s["seeds"], s["loss"]) == ("run", "run", [0], "standard")
    assert c["params"]["loss.kind"] == "harmonicdet" and s["params"]["loss.kind"] == "standard"
    assert c["params"]["search.seeds"] == "[0, 1]" and "search.seeds" not in s["params"]
    assert set(c["runs"]) == {"0", "1"} and set(s["runs"]) == {"0"}
    assert comp["judged_on"] == "test" and math.isfinite(c["mean"]["AP"]) and math.isfinite(s["mean"]["AP"])
    assert comp["paired"][sid]["shared_seeds"] == [0] and comp["paired"][sid]["comparison"] is None

    text = _ok(seen["compare"])
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("exp-")}
    assert rows[cid][1:6] == ["client-comparison", "harmonicdet", "confirmatory", "SUCCEEDED", "0,1"]
    assert rows[sid][1:6] == ["client-single", "standard", "run", "SUCCEEDED", "0"]
    table = text.split("Params that differ", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    params = {line.split()[0]: line.split()[1:] for line in table}
    assert params["param"] == [cid, sid]
    assert params["loss.kind"] == ["harmonicdet", "standard"]
    assert params["name"] == ["client-comparison", "client-single"]
    assert params["search.confirmatory"] == ["true", "-"]


def test_the_mlflow_links_of_compare_lead_to_the_runs_in_the_stacks_mlflow(
    stack: Stack, seen: dict[str, Any]
) -> None:
    comp = json.loads(_ok(seen["compare_json"]))
    text = _ok(seen["compare"])
    links = dict(re.findall(r"^  (exp-[0-9a-f]{16}|compare view)  (http\S+)$", text, re.M))
    assert set(links) == {seen["comparison"], seen["single"], "compare view"}, text
    mlflow = urlsplit(stack.mlflow_uri)
    assert httpx.get(stack.mlflow_uri, timeout=10).status_code == 200  # the UI the links open

    def run(run_id: str) -> dict[str, Any]:
        r = httpx.get(f"{stack.mlflow_uri}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=10)
        assert r.status_code == 200, (run_id, r.text)
        found: dict[str, Any] = r.json()["run"]
        return found

    for e in comp["experiments"]:
        link = urlsplit(links[e["id"]])
        assert (link.scheme, link.netloc) == (mlflow.scheme, mlflow.netloc)
        parts = re.fullmatch(r"/experiments/(\w+)/runs/([0-9a-f]{32})", link.fragment)
        assert parts, link.fragment
        parent = run(parts[2])
        assert parent["info"]["experiment_id"] == parts[1]
        tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
        assert tags[Tag.EXPERIMENT_ID] == e["id"]
        assert links[e["id"]] == e["link"]

    view = urlsplit(links["compare view"])
    assert (view.scheme, view.netloc) == (mlflow.scheme, mlflow.netloc)
    assert view.fragment.startswith("/compare-runs?")
    query = parse_qs(view.fragment.split("?", 1)[1])
    run_ids, experiments = json.loads(query["runs"][0]), json.loads(query["experiments"][0])
    assert sorted(run_ids) == sorted(r for e in comp["experiments"] for r in e["runs"].values())
    assert len(run_ids) == 3  # the comparison's confirmatory arm on 2 seeds, the single run's seed
    for run_id in run_ids:
        assert run(run_id)["info"]["experiment_id"] in experiments


def test_a_3_arm_comparison_ranks_its_arms_with_intervals_corrected_across_them(seen: dict[str, Any]) -> None:
    assert seen["arms_record"].status == "SUCCEEDED"
    body = json.loads(_ok(seen["arms_json"]))
    runs = sorted((r["trial_id"], r["arm"], r["seed"], r["status"]) for r in body["runs"])
    expected = [(a, "arm", s, "FINISHED") for a in ARMS for s in SEEDS]
    assert runs == sorted([*expected, *(("baseline", "baseline", s, "FINISHED") for s in SEEDS)])
    # the 8 trainings started as the stack's Ray had room for them (its capacity and one more)
    parent = body["parent"]["metrics"]
    assert parent["slots_capacity"] >= 1 and parent["slots_expired"] == 0
    assert 1 <= parent["slots_peak"] <= min(8, parent["slots_capacity"] + 1)
    summary = body["summary"]
    assert summary["family"] == {"arms": sorted(ARMS), "k": 3, "alpha": 0.05, "method": "bonferroni"}
    assert [a["trial_id"] for a in summary["arms"]] == sorted(ARMS) and summary["confirmatory"] is None
    for name in ARMS:  # each arm's primary at alpha / 3, its adjusted p three times its own
        ap = summary["arm_comparisons"][name]["AP"]
        assert ap["n_pairs"] == 2 and ap["test"] == "t" and ap["alpha"] == pytest.approx(0.05 / 3)
        assert ap["ci_confidence"] == pytest.approx(1 - 0.05 / 3)
        assert ap["p_adjusted"] == pytest.approx(min(1.0, 3 * ap["p_value"]))
        assert ap["ci_low"] <= ap["estimate"] <= ap["ci_high"]
    ranking = summary["ranking"]
    assert sorted(r["arm"] for r in ranking) == sorted([*ARMS, "baseline"])
    assert [r["rank"] for r in ranking] == [1, 2, 3, 4]
    means = [r["mean"] for r in ranking]
    assert means == sorted(means, reverse=True) and ranking[0]["in_best_set"]
    by_arm = {r["arm"]: r for r in ranking}
    for name in ARMS:
        assert by_arm[name]["ci_low"] == summary["arm_comparisons"][name]["AP"]["ci_low"]
    # the REST route's markdown: the ranked table, then each arm's own table
    md = seen["arms_markdown"]
    assert "## Arms ranked against the standard loss, on the test split" in md
    assert "| rank | arm | loss | n | AP mean ± sd | diff vs baseline | 98.3% CI | p adj |" in md
    for row in ranking:
        assert f"| {row['rank']} | {row['arm']} |" in md
    assert "## Arm qfl (standard+cls=quality_focal) vs the standard loss" in md
    assert "Bonferroni over the 3 arms, each at alpha 0.05/3 = 0.0167" in md

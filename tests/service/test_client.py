"""The Python client and the ``hdet submit/status/logs/cancel/results/compare`` commands against a
real service over HTTP.

Two APIs: a uvicorn process over the session's Ray and MLflow whose jobs ask for a resource no
node has (they stay PENDING: submission, listing, cancel, errors, the commands' exit codes), and
``hdet serve``'s own API, found as a user finds it (``HDET_API_URL`` and the token file in
``$HDET_HOME``), where ``hdet submit --follow`` trains the tiny spec to SUCCEEDED and a longer
one is cancelled while followed (under a minute of training on a small machine).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from svc_helpers import NEVER, REPO, TOKENS, ApiProcess, Stack, tiny_spec, wait_for

from service.client import ApiError, Client
from service.client_cli import (
    cancel_main,
    compare_main,
    logs_main,
    results_main,
    status_main,
    submit_main,
)
from service.stack import free_port

LONG_EPOCHS = 40


def _write_spec(folder: Path, spec: dict[str, Any]) -> Path:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ---------------------------------------------------------------------- an API whose jobs wait


@pytest.fixture(scope="module")
def api(
    stack: Stack, request: pytest.FixtureRequest, scratch: Callable[[pytest.FixtureRequest, str], Path]
) -> Iterator[ApiProcess]:
    tmp = scratch(request, "client-pending")
    proc = ApiProcess(stack, tmp / "service.db", tmp / "api.log")
    proc.env["HDET_ENTRYPOINT_RESOURCES"] = json.dumps(NEVER)
    proc.start()
    try:
        proc.wait_ready()
        yield proc
        # no job of this module stays behind on the shared cluster
        with Client(proc.url, TOKENS[0]) as c:
            for item in c.list(status=["SUBMITTING", "PENDING", "RUNNING"], limit=200).items:
                c.cancel(item.id)
    finally:
        proc.stop()


def _submitted(client: Client, exp_id: str) -> str:
    """Wait until the service has sent ``exp_id`` to Ray; its status then."""
    return str(
        wait_for(lambda: (s := client.get(exp_id).status) != "SUBMITTING" and s, 60, f"{exp_id} submitted")
    )


@pytest.fixture
def client(api: ApiProcess) -> Iterator[Client]:
    with Client(api.url, TOKENS[0], timeout=30) as c:
        yield c


@pytest.fixture
def conn(api: ApiProcess) -> list[str]:
    """The connection flags of a command against ``api``."""
    return ["--url", api.url, "--token", TOKENS[0]]


def test_a_submitted_spec_is_pending_listed_and_readable_through_the_client(client: Client) -> None:
    exp = client.submit(tiny_spec("client-a"))
    assert re.fullmatch(r"exp-[0-9a-f]{16}", exp.id) and exp.status == "SUBMITTING"
    assert _submitted(client, exp.id) == "PENDING"
    assert exp.spec["train"]["epochs"] == 1 and exp.ray.submission_id == exp.id
    again = client.get(exp.id)
    assert (again.id, again.name, again.kind, again.loss) == (exp.id, "client-a", "run", "harmonicdet")
    assert [e.id for e in client.list(name="client-a").items] == [exp.id]
    assert client.list(name="client-a", status=["SUCCEEDED", "FAILED"]).items == []
    assert [(e.seq, e.from_, e.to) for e in client.events(exp.id)] == [
        (1, None, "SUBMITTING"),
        (2, "SUBMITTING", "PENDING"),
    ]
    assert isinstance(client.logs(exp.id), str)
    results = client.results(exp.id)
    assert results["id"] == exp.id and results["partial"] is True
    assert results["parent"] is None and results["runs"] == []


def test_a_spec_file_is_sent_as_it_is_written(client: Client, tmp_path: Path) -> None:
    path = _write_spec(tmp_path, tiny_spec("client-file", **{"loss.alpha": 1.25}))
    exp = client.submit(path)
    assert exp.name == "client-file" and exp.spec["loss"]["alpha"] == 1.25
    same = client.submit(path, idempotency_key="client-file-key")
    assert client.submit(path, idempotency_key="client-file-key").id == same.id != exp.id


def test_cancel_is_cancelling_and_a_repeat_is_a_no_op(client: Client) -> None:
    exp = client.submit(tiny_spec("client-cancel"))
    _submitted(client, exp.id)
    assert client.cancel(exp.id).status == "CANCELLING"
    assert client.cancel(exp.id).status == "CANCELLING"
    assert [(e.from_, e.to) for e in client.events(exp.id, after=2)] == [("PENDING", "CANCELLING")]


def test_wait_gives_up_after_its_timeout_on_a_job_that_never_ends(client: Client) -> None:
    exp = client.submit(tiny_spec("client-wait"))
    _submitted(client, exp.id)
    with pytest.raises(TimeoutError, match="PENDING"):
        client.wait(exp.id, poll_s=0.2, timeout_s=1.0)
    client.cancel(exp.id)


def test_an_invalid_spec_is_an_api_error_naming_the_field_and_nothing_is_stored(client: Client) -> None:
    before = len(client.list(limit=200).items)
    with pytest.raises(ApiError) as caught:
        client.submit(tiny_spec("client-bad", **{"loss.gamma": 1.5}))
    e = caught.value
    assert e.status == 422 and e.title == "Invalid spec"
    assert "loss.gamma" in e.fields
    assert "loss.gamma" in str(e) and str(e).startswith("422 Invalid spec")
    assert e.type.endswith("/invalid-spec")
    assert len(client.list(limit=200).items) == before


def test_an_unknown_experiment_is_an_api_error_404(client: Client) -> None:
    with pytest.raises(ApiError, match="no experiment exp-0000000000000000") as caught:
        client.get("exp-0000000000000000")
    assert caught.value.status == 404


def test_a_wrong_token_is_an_api_error_401_that_says_so(api: ApiProcess) -> None:
    with Client(api.url, "wrong-token") as c, pytest.raises(ApiError) as caught:
        c.list()
    assert caught.value.status == 401
    assert "the token was refused" in str(caught.value)
    assert "wrong-token" not in str(caught.value)


def test_without_any_token_the_error_says_where_one_is_looked_for(
    api: ApiProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HDET_API_TOKEN", raising=False)
    monkeypatch.setenv("HDET_HOME", str(tmp_path))  # no api-token file there
    with Client(api.url) as c, pytest.raises(ApiError) as caught:
        c.list()
    assert c.token is None
    assert caught.value.status == 401 and "HDET_API_TOKEN" in str(caught.value)


def test_url_and_token_come_from_the_environment_when_not_given(
    api: ApiProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HDET_API_URL", api.url + "/")
    monkeypatch.setenv("HDET_API_TOKEN", f"{TOKENS[1]},{TOKENS[0]}")
    with Client() as c:
        assert (c.url, c.token) == (api.url, TOKENS[1])
        assert isinstance(c.list().items, list)


def test_an_api_that_does_not_answer_is_an_api_error_without_status() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, "t", timeout=5) as c, pytest.raises(ApiError, match="cannot reach") as caught:
        c.get("exp-0000000000000000")
    assert caught.value.status is None and url in str(caught.value)


def test_an_api_error_pickles_whole() -> None:
    import pickle

    e = ApiError(422, "Invalid spec", "bad", errors=[{"field": "loss.gamma", "message": "<= 1"}])
    back = pickle.loads(pickle.dumps(e))
    assert (back.status, back.fields, str(back)) == (422, ["loss.gamma"], str(e))


# ---------------------------------------------------------------------- the commands, exit codes


def test_hdet_submit_prints_the_id_and_how_to_follow_it(
    conn: list[str], client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_spec(tmp_path, tiny_spec("cli-submit"))
    assert submit_main([str(path), *conn]) == 0
    out = capsys.readouterr().out
    exp_id = re.search(r"Experiment '(exp-[0-9a-f]{16})' accepted \(SUBMITTING\)", out)
    assert exp_id, out
    assert f"hdet logs {exp_id.group(1)} --follow --url " in out
    assert client.get(exp_id.group(1)).name == "cli-submit"


def test_hdet_submit_refuses_an_invalid_spec_with_exit_1_naming_the_field(
    conn: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_spec(tmp_path, tiny_spec("cli-bad", **{"loss.bogus": 1}))
    assert submit_main([str(path), *conn]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hdet submit: 422 Invalid spec") and "\n  loss.bogus: " in err


def test_usage_errors_exit_2(conn: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert submit_main([str(tmp_path / "missing.yaml"), *conn]) == 2
    assert "no such spec file" in capsys.readouterr().err
    assert submit_main(["--bogus", *conn]) == 2
    assert status_main(["a", "b", *conn]) == 2
    assert compare_main(["exp-0000000000000000", *conn]) == 2
    assert results_main(["exp-0000000000000000", "--json", "--markdown", *conn]) == 2
    assert logs_main(["exp-0000000000000000", "--tail", "0", *conn]) == 2


def test_hdet_status_shows_one_or_the_list_and_404_exits_1(
    conn: list[str], client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = client.submit(tiny_spec("cli-status"))
    _submitted(client, exp.id)
    assert status_main([exp.id, *conn]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Status for experiment '{exp.id}': PENDING")
    assert "cli-status (run, harmonicdet loss, retinanet)" in out
    assert status_main(["--name", "cli-status", *conn]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split()[:3] == ["ID", "STATUS", "NAME"]
    assert [line.split()[:3] for line in listed[1:]] == [[exp.id, "PENDING", "cli-status"]]
    assert status_main([exp.id, "--json", *conn]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == exp.id
    assert status_main(["exp-0000000000000000", *conn]) == 1
    assert "hdet status: 404 Not Found: no experiment exp-0000000000000000" in capsys.readouterr().err


def test_a_wrong_token_makes_every_command_exit_1(
    api: ApiProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert status_main(["--url", api.url, "--token", "wrong-token"]) == 1
    assert "401 Unauthorized" in capsys.readouterr().err


def test_hdet_results_and_compare_of_experiments_without_runs(
    conn: list[str], client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = client.submit(tiny_spec("cli-res-a")), client.submit(tiny_spec("cli-res-b"))
    assert results_main([a.id, "--json", *conn]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["id"] == a.id and body["partial"] is True and body["runs"] == []
    assert results_main([a.id, *conn]) == 0
    assert "No MLflow run yet." in capsys.readouterr().out
    assert compare_main([a.id, b.id, *conn]) == 0
    out = capsys.readouterr().out
    assert a.id in out and b.id in out and "paired differences need at least 2 seeds" in out
    assert compare_main([a.id, "exp-0000000000000000", *conn]) == 1
    assert "no experiment exp-0000000000000000" in capsys.readouterr().err


def test_hdet_cancel_exits_0_and_on_an_unknown_id_1(
    conn: list[str], client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = client.submit(tiny_spec("cli-cancel"))
    _submitted(client, exp.id)
    assert cancel_main([exp.id, *conn]) == 0
    assert f"Experiment '{exp.id}' is CANCELLING" in capsys.readouterr().out
    assert client.get(exp.id).status == "CANCELLING"
    assert cancel_main(["exp-0000000000000000", *conn]) == 1


# ---------------------------------------------------------------------- hdet serve's API: training


def _hdet(env: dict[str, str], *args: str, out: Path) -> subprocess.Popen[bytes]:
    """``hdet ARGS`` as a user runs it, its stdout and stderr into ``out``."""
    with open(out, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *args],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


def _call(main: Callable[[list[str]], int], *args: str) -> tuple[int, str, str]:
    """``main(args)`` in this process: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(
    stack: Stack, request: pytest.FixtureRequest, scratch: Callable[[pytest.FixtureRequest, str], Path]
) -> Iterator[dict[str, Any]]:
    """``hdet submit --follow`` of the tiny spec (to SUCCEEDED) and of a long one cancelled while
    followed, side by side on ``hdet serve``'s API, then what the other commands say of them."""
    tmp = scratch(request, "client-trained")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HDET_", "RAY_", "MLFLOW_"))}
    env.update(HDET_API_URL=stack.api_url, HDET_HOME=str(stack.home))
    short = _write_spec(tmp, tiny_spec("client-follow"))
    long = _write_spec(tmp, tiny_spec("client-stopped", **{"train.epochs": LONG_EPOCHS, "dataset.seed": 1}))
    seen: dict[str, Any] = {}
    procs = {
        "a": _hdet(env, "submit", str(short), "--follow", out=tmp / "a.out"),
        "b": _hdet(env, "submit", str(long), "--follow", out=tmp / "b.out"),
    }
    try:
        for key in ("a", "b"):
            found = wait_for(
                lambda k=key: re.search(r"Experiment '(exp-[0-9a-f]{16})'", (tmp / f"{k}.out").read_text()),
                60,
                f"hdet submit {key} to print its id",
            )
            seen[key] = found.group(1)
        with Client(stack.api_url, stack.token) as c:
            wait_for(lambda: c.get(seen["b"]).status == "RUNNING", 300, "job B to run")
        with pytest.MonkeyPatch.context() as mp:  # the commands find hdet serve as a user's shell does
            mp.setenv("HDET_API_URL", stack.api_url)
            mp.setenv("HDET_HOME", str(stack.home))
            mp.delenv("HDET_API_TOKEN", raising=False)
            seen["cancel"] = _call(cancel_main, seen["b"], "--wait")
            seen["rc_b"] = procs["b"].wait(120)
            seen["rc_a"] = procs["a"].wait(600)
            seen["out_a"], seen["out_b"] = (tmp / "a.out").read_text(), (tmp / "b.out").read_text()
            seen["status_a"] = _call(status_main, seen["a"])
            seen["logs_a"] = _call(logs_main, seen["a"], "--tail", "50")
            seen["results_md"] = _call(results_main, seen["a"], "--markdown")
            seen["results_json"] = _call(results_main, seen["a"], "--json")
            seen["compare"] = _call(compare_main, seen["a"], seen["b"])
        yield seen
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)


def test_hdet_submit_follow_streams_the_log_and_exits_0_when_it_succeeded(trained: dict[str, Any]) -> None:
    out = trained["out_a"]
    assert trained["rc_a"] == 0, out[-3000:]
    assert "epoch 1/1" in out  # the job's own log came through the stream
    assert out.rstrip().endswith(f"Experiment '{trained['a']}' SUCCEEDED (Ray job SUCCEEDED)")


def test_hdet_submit_follow_of_a_cancelled_experiment_exits_1_saying_so(trained: dict[str, Any]) -> None:
    rc, out, err = trained["cancel"]
    assert rc == 0 and f"Experiment '{trained['b']}' CANCELLED" in out, (out, err)
    assert trained["rc_b"] == 1, trained["out_b"][-3000:]
    assert f"Experiment '{trained['b']}' ended CANCELLED (Ray job STOPPED)" in trained["out_b"]


def test_hdet_status_logs_and_results_of_a_trained_experiment(trained: dict[str, Any]) -> None:
    rc, out, _ = trained["status_a"]
    assert rc == 0 and out.startswith(f"Status for experiment '{trained['a']}': SUCCEEDED")
    assert "epoch 1/1; runs FINISHED=1; best AP " in out
    rc, out, _ = trained["logs_a"]
    assert rc == 0 and "epoch 1/1" in out and len(out.splitlines()) <= 50
    rc, out, _ = trained["results_json"]
    body = json.loads(out)
    (run,) = body["runs"]
    assert rc == 0 and body["partial"] is False and 0.0 <= run["metrics"]["AP"] <= 1.0
    rc, out, _ = trained["results_md"]
    assert rc == 0 and "| run | seed | status | AP |" in out
    assert f"| 0 | FINISHED | {run['metrics']['AP']:.4f} |" in out
    assert f"runs:/{run['run_id']}/checkpoint/model.pt" in out


def test_hdet_compare_puts_a_trained_and_a_cancelled_experiment_side_by_side(trained: dict[str, Any]) -> None:
    rc, out, err = trained["compare"]
    assert rc == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("exp-")}
    assert set(rows) == {trained["a"], trained["b"]}
    assert "SUCCEEDED" in rows[trained["a"]] and "CANCELLED" in rows[trained["b"]]

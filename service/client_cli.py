"""``hdet submit`` / ``status`` / ``logs`` / ``cancel`` / ``results`` / ``compare``: the REST
service from the command line, through :class:`service.client.Client`.

They behave as ``ray job submit`` / ``ray job status`` do: ``submit`` prints the experiment id and
the commands that follow it; ``submit --follow`` streams the log and exits 0 when the experiment
SUCCEEDED, 1 when it ended otherwise (FAILED, CANCELLED, LOST: the last line says which). An
error of the API is printed to stderr with every bad field, exit 1; a usage error exits 2.
Every command takes ``--url`` and ``--token`` (defaults: see :mod:`service.client`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from service.client import ApiError, Client, Comparison, Experiment, Results, RunView
from service.mlflow_view import COMPARE_METRICS
from service.states import Status

__all__ = ["submit_main", "status_main", "logs_main", "cancel_main", "results_main", "compare_main"]

#: exit codes: the experiment succeeded / it ended otherwise or the API refused / bad arguments
OK, FAILED, USAGE = 0, 1, 2
INTERRUPTED = 130


class _Command:
    """One sub-command: its parser (with the connection flags) and the error handling they share."""

    def __init__(self, name: str, description: str):
        self.prog = f"hdet {name}"
        self.parser = argparse.ArgumentParser(prog=self.prog, description=description)
        conn = self.parser.add_argument_group("connection")
        conn.add_argument("--url", help="the API (default: HDET_API_URL, else http://127.0.0.1:8000)")
        conn.add_argument(
            "--token",
            help="API token (default: HDET_API_TOKEN, else $HDET_HOME/api-token of hdet serve; a flag shows in ps)",
        )
        conn.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")

    def run(self, argv: Sequence[str] | None, body: Callable[[argparse.Namespace, Client], int]) -> int:
        try:
            args = self.parser.parse_args(sys.argv[1:] if argv is None else list(argv))
        except SystemExit as e:  # argparse's own exit: 0 for --help, 2 for a usage error
            return int(e.code or 0)
        try:
            with Client(args.url, args.token, args.timeout) as client:
                return body(args, client)
        except ApiError as e:
            self.error(str(e))
            return FAILED
        except KeyboardInterrupt:
            self.error("interrupted")
            return INTERRUPTED

    def error(self, message: str) -> None:
        print(f"{self.prog}: {message}", file=sys.stderr)


def _out(text: str = "", stream: TextIO | None = None) -> None:
    print(text, file=stream or sys.stdout, flush=True)


# ---------------------------------------------------------------------- submit


def submit_main(argv: Sequence[str] | None = None) -> int:
    cmd = _Command("submit", "Submit an experiment spec (YAML or JSON file) to the HarmonicDet API.")
    cmd.parser.add_argument("spec", help="the spec file (as `hdet spec check` takes it)")
    cmd.parser.add_argument(
        "--follow",
        action="store_true",
        help="stream the log until the experiment ends; exit 0 only if it SUCCEEDED",
    )
    cmd.parser.add_argument(
        "--idempotency-key", help="a repeat with the same key and spec gets the same record"
    )

    def body(args: argparse.Namespace, client: Client) -> int:
        path = Path(args.spec)
        if not path.is_file():
            cmd.error(f"no such spec file: {path}")
            return USAGE
        try:
            exp = client.submit(path, idempotency_key=args.idempotency_key)
        except OSError as e:
            cmd.error(f"cannot read {path}: {e.strerror or e}")
            return USAGE
        _out(f"Experiment '{exp.id}' accepted ({exp.status}): {_describe(exp)}")
        if not args.follow:
            _next_steps(exp, args)
            return OK
        _out("Following its log until it ends (Ctrl-C stops following; the experiment goes on):")
        return _follow_to_end(client, exp.id, tail=1000)

    return cmd.run(argv, body)


def _describe(exp: Experiment) -> str:
    return f"{exp.name} ({exp.kind}, {exp.loss} loss, {exp.arch})"


def _next_steps(exp: Experiment, args: argparse.Namespace) -> None:
    conn = f" --url {args.url}" if args.url else ""
    _out("Next steps")
    _out(f"  Follow its log:      hdet logs {exp.id} --follow{conn}")
    _out(f"  Query its status:    hdet status {exp.id}{conn}")
    _out(f"  Stop it:             hdet cancel {exp.id}{conn}")
    _out(f"  Read its results:    hdet results {exp.id}{conn}")


def _follow_to_end(client: Client, exp_id: str, tail: int) -> int:
    """Stream the log, then wait for the record's final status: 0 if SUCCEEDED, else 1."""
    try:
        if not _stream(client.follow_logs(exp_id, tail=tail)):
            _out()  # the log's last line had no newline: the verdict goes on a line of its own
        final = client.wait(exp_id, poll_s=1.0)
    except KeyboardInterrupt:
        _out(f"\nStopped following; {exp_id} goes on (hdet cancel {exp_id} stops it).", sys.stderr)
        return INTERRUPTED
    return _report_end(final)


def _stream(chunks: Iterator[str]) -> bool:
    """Write ``chunks`` to stdout as they come; whether the text ended a line (or was empty)."""
    last = "\n"
    for chunk in chunks:
        if chunk:
            sys.stdout.write(chunk)
            sys.stdout.flush()
            last = chunk[-1]
    return last == "\n"


def _report_end(exp: Experiment) -> int:
    ray = f" (Ray job {exp.ray.status})" if exp.ray.status else ""
    if exp.status == Status.SUCCEEDED:
        _out(f"Experiment '{exp.id}' SUCCEEDED{ray}")
        return OK
    why = ""
    if exp.failure is not None:
        code = f", exit code {exp.failure.exit_code}" if exp.failure.exit_code is not None else ""
        why = f": {exp.failure.reason}{code}"
    _out(f"Experiment '{exp.id}' ended {exp.status}{ray}{why}", sys.stderr)
    return FAILED


# ---------------------------------------------------------------------- status, logs, cancel


def status_main(argv: Sequence[str] | None = None) -> int:
    cmd = _Command("status", "One experiment's status, or the list of experiments (newest first).")
    cmd.parser.add_argument("id", nargs="?", help="an experiment id (exp-...); without it, the list")
    cmd.parser.add_argument("--json", action="store_true", help="the API's JSON")
    listing = cmd.parser.add_argument_group("the list")
    listing.add_argument("--status", help="only these statuses, comma-separated (e.g. RUNNING,PENDING)")
    listing.add_argument("--name", help="only experiments of this name")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--cursor", help="the page after this cursor (printed under a full page)")

    def body(args: argparse.Namespace, client: Client) -> int:
        if args.id:
            exp = client.get(args.id)
            _out(exp.model_dump_json(indent=2) if args.json else _status_text(exp))
            return OK
        page = client.list(status=args.status, name=args.name, limit=args.limit, cursor=args.cursor)
        if args.json:
            _out(page.model_dump_json(indent=2))
            return OK
        rows = [
            [e.id, e.status, e.name, e.kind, e.loss, e.arch, e.created_at.strftime("%Y-%m-%d %H:%M:%S")]
            for e in page.items
        ]
        _out(_table(["ID", "STATUS", "NAME", "KIND", "LOSS", "ARCH", "CREATED (UTC)"], rows))
        if page.next_cursor:
            _out(f"(more: --cursor {page.next_cursor})")
        return OK

    return cmd.run(argv, body)


def _status_text(exp: Experiment) -> str:
    lines = [f"Status for experiment '{exp.id}': {exp.status}", f"  name      {_describe(exp)}"]
    for label, at in (("created", exp.created_at), ("started", exp.started_at), ("ended", exp.ended_at)):
        if at is not None:
            lines.append(f"  {label:<9} {at.isoformat(timespec='seconds')}")
    if exp.ray.status:
        lines.append(f"  ray       {exp.ray.status}" + (f": {exp.ray.message}" if exp.ray.message else ""))
    if exp.progress:
        lines.append(f"  progress  {_progress(exp.progress)}")
    if exp.failure is not None:
        code = f" (exit code {exp.failure.exit_code})" if exp.failure.exit_code is not None else ""
        lines.append(f"  failure   {exp.failure.reason}{code}")
    if exp.mlflow.link:
        lines.append(f"  mlflow    {exp.mlflow.link}")
    return "\n".join(lines)


def _progress(p: dict[str, Any]) -> str:
    parts = []
    if p.get("epochs"):
        parts.append(f"epoch {p.get('epoch', 0)}/{p['epochs']}")
    if p.get("runs"):
        parts.append("runs " + ", ".join(f"{k}={v}" for k, v in sorted(p["runs"].items())))
    if p.get("best_AP") is not None:
        parts.append(f"best AP {p['best_AP']:.4f}")
    return "; ".join(parts) or "-"


def logs_main(argv: Sequence[str] | None = None) -> int:
    cmd = _Command("logs", "An experiment's log (its Ray job's driver log).")
    cmd.parser.add_argument("id", help="an experiment id (exp-...)")
    cmd.parser.add_argument("--follow", "-f", action="store_true", help="stream it until the experiment ends")
    cmd.parser.add_argument("--tail", type=int, default=1000, help="the last N lines (default 1000)")

    def body(args: argparse.Namespace, client: Client) -> int:
        if args.tail < 1:
            cmd.error(f"--tail: must be at least 1, got {args.tail}")
            return USAGE
        if args.follow:
            _stream(client.follow_logs(args.id, tail=args.tail))
        else:
            sys.stdout.write(client.logs(args.id, tail=args.tail))
            sys.stdout.flush()
        return OK

    return cmd.run(argv, body)


def cancel_main(argv: Sequence[str] | None = None) -> int:
    cmd = _Command("cancel", "Stop an experiment: CANCELLING now, CANCELLED once Ray stopped its job.")
    cmd.parser.add_argument("id", help="an experiment id (exp-...)")
    cmd.parser.add_argument(
        "--wait", action="store_true", help="wait until it ended; exit 0 only if it ended CANCELLED"
    )

    def body(args: argparse.Namespace, client: Client) -> int:
        exp = client.cancel(args.id)
        _out(f"Experiment '{exp.id}' is {exp.status}: Ray is asked to stop its job.")
        if not args.wait:
            return OK
        final = client.wait(exp.id, poll_s=1.0)
        if final.status == Status.CANCELLED:
            _out(f"Experiment '{exp.id}' CANCELLED")
            return OK
        return _report_end(final)

    return cmd.run(argv, body)


# ---------------------------------------------------------------------- results, compare


def _format_flags(cmd: _Command) -> None:
    fmt = cmd.parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the API's JSON")
    fmt.add_argument("--markdown", action="store_true", help="Markdown tables")


def results_main(argv: Sequence[str] | None = None) -> int:
    cmd = _Command("results", "An experiment's runs and final metrics, from MLflow.")
    cmd.parser.add_argument("id", help="an experiment id (exp-...)")
    _format_flags(cmd)

    def body(args: argparse.Namespace, client: Client) -> int:
        res = client.results(args.id)
        if args.json:
            _out(json.dumps(res, indent=2))
            return OK
        evidence = None  # a search's or comparison's: as `hdet run` prints it, or `hdet report` writes it
        if res["summary"]:
            evidence = client.results_text(args.id, markdown=args.markdown)
        _out(_results_text(res, markdown=args.markdown, evidence=evidence))
        return OK

    return cmd.run(argv, body)


def _results_text(res: Results, *, markdown: bool, evidence: str | None = None) -> str:
    partial = ", partial: it has not ended" if res["partial"] else ""
    lines = [f"Results of '{res['id']}' ({res['status']}{partial})"]
    parent = res["parent"]
    if parent is None:
        lines.append("No MLflow run yet.")
        return "\n".join(lines)
    lines.append(f"MLflow parent run {parent['run_id']} {parent['status']}" + _link(parent))
    runs = res["runs"]
    metrics = _metric_columns(runs)
    arms = any(r.get("arm") for r in runs)  # a search's or comparison's runs: which arm each is
    rows = [
        [r["name"] or r["run_id"], *([r.get("arm") or "-"] if arms else []), _cell(r["seed"]), r["status"],
         *(_cell(r["metrics"].get(m)) for m in metrics), r.get("checkpoint") or "-"]
        for r in runs
    ]  # fmt: skip
    header = ["run", *(["arm"] if arms else []), "seed", "status", *metrics, "checkpoint"]
    lines += ["", _table(header, rows, markdown=markdown)]
    if evidence:
        lines += ["", evidence]
    return "\n".join(lines)


def _metric_columns(runs: list[RunView]) -> list[str]:
    """The comparison metrics any run has, validation first, then the held-out ``test_`` ones."""
    have = {m for r in runs for m in r["metrics"]}
    return [m for m in COMPARE_METRICS if m in have] + [
        f"test_{m}" for m in COMPARE_METRICS if f"test_{m}" in have
    ]


def _link(run: RunView) -> str:
    return f"  {run['link']}" if run.get("link") else ""


def compare_main(argv: Sequence[str] | None = None) -> int:
    cmd = _Command("compare", "Experiments side by side, and paired differences against the first.")
    cmd.parser.add_argument(
        "ids", nargs="+", metavar="ID", help="2 to 10 experiment ids; the first is the reference"
    )
    _format_flags(cmd)

    def body(args: argparse.Namespace, client: Client) -> int:
        if len(args.ids) < 2:
            cmd.error("give at least 2 experiment ids")
            return USAGE
        comp = client.compare(args.ids)
        if args.json:
            _out(json.dumps(comp, indent=2))
            return OK
        metrics = comp["metrics"]
        rows = [
            [e["id"], e["name"], e["loss"], e.get("arm") or "-", e["status"], ",".join(map(str, e["seeds"])) or "-",
             *(_cell(e["mean"].get(m)) for m in metrics)]
            for e in comp["experiments"]
        ]  # fmt: skip
        header = ["experiment", "name", "loss", "arm", "status", "seeds", *(f"mean {m}" for m in metrics)]
        _out(f"Judged on {comp['judged_on']}\n")
        _out(_table(header, rows, markdown=args.markdown))
        _out(_params_text(comp, markdown=args.markdown))
        _out(_links_text(comp))
        for exp_id, pair in comp["paired"].items():
            seeds = ",".join(map(str, pair["shared_seeds"])) or "-"
            _out(f"\nPaired differences {exp_id} - {pair['against']} (seeds {seeds}):")
            if pair["comparison"] is None:
                _out(f"  {pair.get('note', 'no paired comparison')}")
                continue
            prow = [
                [m, _cell(c.get("mean_diff")), f"[{_cell(c.get('ci_low'))}, {_cell(c.get('ci_high'))}]",
                 _cell(c.get("p_adjusted")), str(c.get("verdict", ""))]
                for m, c in pair["comparison"].items()
            ]  # fmt: skip
            _out(
                _table(
                    ["metric", "mean diff", "interval", "p (Holm)", "verdict"], prow, markdown=args.markdown
                )
            )
        return OK

    return cmd.run(argv, body)


def _params_text(comp: Comparison, *, markdown: bool) -> str:
    """The parent runs' params that differ between the experiments (MLflow's "show diff only"),
    a row each; ``-`` where an experiment has no such param."""
    exps = comp["experiments"]
    params = [e.get("params") or {} for e in exps]
    names = sorted({k for p in params for k in p})
    differ = [k for k in names if len({p.get(k) for p in params}) > 1]
    same = len(names) - len(differ)
    head = f"\nParams that differ ({same} more are the same in all):"
    if not differ:
        return f"\nParams: {same}, the same in all."
    rows = [[k, *(p.get(k, "-") for p in params)] for k in differ]
    return head + "\n" + _table(["param", *(e["id"] for e in exps)], rows, markdown=markdown)


def _links_text(comp: Comparison) -> str:
    """Each experiment's parent run in the MLflow UI, and MLflow's compare view of their runs."""
    lines = ["\nIn MLflow:"]
    lines += [f"  {e['id']}  {e.get('link') or '- (no MLflow run)'}" for e in comp["experiments"]]
    if comp.get("mlflow_compare"):
        lines.append(f"  compare view  {comp['mlflow_compare']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- tables


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]], *, markdown: bool = False) -> str:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(out)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]
    )

"""``hdet``: the command line of HarmonicDet.

Each sub-command lives in the module that owns the feature and exposes ``main(argv)``; this file
only routes, and imports a feature's module (and so torch, Ray or MLflow) only when it is used.
``hdet bench ...`` routes to the top-level ``benchmarks`` package, by name only: no product module
imports it (tests/test_layers.py lists these names as the one exception).
"""

from __future__ import annotations

import importlib
import sys

# command words -> (module, function, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("run",): ("workers.run", "main", "train a spec end to end on Ray (one run or a Tune search)"),
    ("pretrain",): ("workers.pretrain", "main", "pretrain a spec's backbone body (cached, as in hdet run)"),
    ("predict",): ("workers.predict", "main", "draw a run's or checkpoint's detections on images"),
    ("report",): ("workers.report", "main", "render an experiment's evidence report from MLflow"),
    ("plan",): ("workers.evidence.plan", "main", "seeds, trainings and hours a comparison needs"),
    ("spec", "schema"): ("workers.spec", "schema_main", "print the experiment spec's JSON Schema"),
    ("spec", "check"): ("workers.spec", "check_main", "validate a spec file"),
    ("spec", "options"): ("workers.spec.cli", "options_main", "every spec option: type, default, meaning"),
    ("data", "synth"): ("harmonic.data.synth", "main", "write a synthetic COCO-format dataset"),
    ("data", "check"): ("harmonic.data.check", "main", "validate a dataset before training"),
    ("eval",): ("harmonic.eval_cli", "main", "evaluate a COCO results file against ground truth"),
    ("serve",): ("service.cli", "main", "the REST service, with a local Ray head and MLflow server"),
    ("submit",): ("service.client_cli", "submit_main", "submit a spec to the service; --follow to its end"),
    ("status",): ("service.client_cli", "status_main", "an experiment's status, or the list (service)"),
    ("logs",): ("service.client_cli", "logs_main", "an experiment's log (service); --follow streams it"),
    ("cancel",): ("service.client_cli", "cancel_main", "stop an experiment (service)"),
    ("results",): ("service.client_cli", "results_main", "an experiment's runs and metrics (service)"),
    ("compare",): ("service.client_cli", "compare_main", "experiments side by side, paired (service)"),
    ("bench", "api"): (
        "benchmarks.api",
        "main",
        "REST API latency under 32 concurrent clients (p50, p99, max)",
    ),
    ("bench", "loss"): ("benchmarks.loss", "loss_main", "step time with harmonicdet / with standard loss"),
    ("bench", "eval"): ("benchmarks.eval", "main", "evaluation time of this project / pycocotools"),
    ("bench", "train"): ("benchmarks.train", "train_main", "images/s of a Ray Train worker / a plain loop"),
    ("bench", "search"): (
        "benchmarks.search",
        "search_main",
        "ASHA+TPE vs grid search, and trial start cost",
    ),
    ("bench", "experiment"): (
        "benchmarks.experiment",
        "main",
        "a comparison's trainings alone / (wall x trainings at once)",
    ),
}


def _usage(group: str | None = None) -> str:
    """Every command, or those of ``group`` (``hdet bench --help``)."""
    shown = {w: c for w, c in COMMANDS.items() if group is None or w[0] == group}
    head = "COMMAND" if group is None else f"{group} COMMAND"
    lines = [f"usage: hdet {head} [ARGS...]", "", "commands:"]
    for words, (_, _, help_) in shown.items():
        lines.append(f"  {' '.join(words):<14} {help_}")
    lines.append("")
    lines.append(f"Run 'hdet {head} --help' for a command's options.")
    return "\n".join(lines)


#: the first word of every command of several words (``hdet bench``, ``hdet spec``, ``hdet data``)
GROUPS = {words[0] for words in COMMANDS if len(words) > 1}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    for n in (2, 1):
        words = tuple(args[:n])
        if words in COMMANDS:
            module_name, func_name, _ = COMMANDS[words]
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name is None or not f"{module_name}.".startswith(f"{e.name}."):
                    raise  # a module that the command imports is missing: its own error names it
                print(
                    f"hdet {' '.join(words)}: {module_name} is not installed here (the bench commands come "
                    "with a checkout of the repository, pip install -e . in it, not with the container image)",
                    file=sys.stderr,
                )
                return 2
            rc = getattr(module, func_name)(args[n:])
            return int(rc or 0)
    group = args[0] if args[0] in GROUPS else None
    if group is not None and (len(args) == 1 or args[1] in ("-h", "--help", "help")):
        print(_usage(group))
        return 0
    print(f"hdet: unknown command {' '.join(args[:2])!r}\n", file=sys.stderr)
    print(_usage(group), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

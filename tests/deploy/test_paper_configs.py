"""configs/paper/: the paper's experiments as specs, each with the numbers the paper reported beside
it (configs/paper/results/reported.yaml), every row of Tables 1-5 either reproduced by a spec or
listed with the reason it is not, data paths from the environment, and the GPU-hours table current."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import DEPLOY
from gpu_hours import PAPER, table

from workers.spec import Spec, resolve_param_path

REPORTED = PAPER / "results" / "reported.yaml"
#: Rows of each table of the paper (Table 2 counts its 3 state-of-the-art rows and the multi-scale row).
PAPER_ROWS = {1: 16, 2: 24, 3: 4, 4: 2, 5: 8}
COCO_METRICS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}
VOC_METRICS = {"voc_AP", "voc_AP50", "voc_AP60", "voc_AP70", "voc_AP80", "voc_AP90"}


@pytest.fixture(scope="module")
def reported() -> dict[str, Any]:
    return yaml.safe_load(REPORTED.read_text())


@pytest.fixture(scope="module")
def specs() -> dict[str, Spec]:
    return {p.stem: Spec.from_file(p, check_paths=False) for p in sorted(PAPER.glob("*.yaml"))}


def test_every_paper_spec_has_its_reported_numbers_and_back(
    specs: dict[str, Spec], reported: dict[str, Any]
) -> None:
    assert set(specs) == set(reported["specs"])
    assert all(spec.name == stem for stem, spec in specs.items())


def _grid(spec: Spec) -> dict[str, list[Any]]:
    assert spec.search is not None
    out = {}
    for name, entry in spec.search.space.items():
        ((kind, values),) = entry.items()
        assert kind == "grid", f"{spec.name}: a table's rows are fixed values, not samples"
        out[resolve_param_path(name)] = values
    return out


def test_each_reported_row_names_an_arm_its_spec_runs(
    specs: dict[str, Spec], reported: dict[str, Any]
) -> None:
    for name, entry in reported["specs"].items():
        spec = specs[name]
        assert spec.search is not None
        grid = _grid(spec)
        metrics = VOC_METRICS if spec.dataset.format == "voc" else COCO_METRICS
        arms = []
        for row in entry["rows"]:
            arm = row["arm"]
            if arm == "baseline":
                assert spec.search.baseline, f"{name}: {row['label']} needs the baseline arm"
            elif arm == "confirmatory":
                assert spec.search.confirmatory, f"{name}: {row['label']} needs the confirmatory arm"
            elif isinstance(arm, str):
                assert arm in spec.search.arms, (
                    f"{name}: {row['label']} names arm {arm!r}, not in search.arms"
                )
            else:
                ((param, value),) = arm.items()
                assert value in grid.get(resolve_param_path(param), []), f"{name}: {param}={value} is not run"
            arms.append(str(arm))
            values = {k: v for k, v in row.items() if k not in ("label", "arm")}
            assert set(values) == metrics, f"{name}: {row['label']}"
            assert all(0 < v < 100 for v in values.values())
        assert len(set(arms)) == len(arms), f"{name}: two rows on one arm"


def test_every_row_of_tables_1_to_5_is_reproduced_or_listed(reported: dict[str, Any]) -> None:
    counted = dict.fromkeys(PAPER_ROWS, 0)
    for entry in reported["specs"].values():
        counted[entry["table"]] += len(entry["rows"])
    for gap in reported["not_reproduced"]:
        assert gap["reason"]
        counted[gap["table"]] += gap["count"]
    assert counted == PAPER_ROWS


def test_paper_specs_read_data_paths_from_the_environment() -> None:
    for path in sorted(PAPER.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        root = {"coco": "${COCO_ROOT}", "voc": "${VOC_ROOT}"}[raw["dataset"]["format"]]
        assert raw["dataset"]["root"] == root, path.name
        assert raw["detector"]["pretrained_backbone"].startswith("${HDET_WEIGHTS}/"), path.name
        assert raw["scaling"]["use_gpu"] is True, path.name


def test_the_paper_specs_refuse_a_missing_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from workers.spec import SpecError

    monkeypatch.setenv("COCO_ROOT", str(tmp_path / "no-coco"))
    with pytest.raises(SpecError, match="dataset.root"):
        Spec.from_file(PAPER / "t2-coco-retinanet-r50fpn.yaml")


def test_the_gpu_hours_table_in_the_readme_section_is_current() -> None:
    text = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    current = text.split("<!-- gpu-hours:begin -->\n")[1].split("<!-- gpu-hours:end -->")[0]
    assert current == table(), "stale GPU-hours table: paste `python tests/deploy/gpu_hours.py` into it"

"""The report, the method map, ``autocomp pareto`` and optuna-dashboard on a real (small) search run."""

import csv
import json
import re
import shutil
from pathlib import Path

import optuna
import pytest

from autocomp.search.results.method_map import build_method_map, cell_text, layer_configs
from autocomp.search.results.pareto import TrialResult, pareto_front

RUN = "r"


@pytest.fixture
def runs(small_run: Path) -> Path:
    return small_run


def _complete(run: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=RUN, storage=f"sqlite:///{run / 'study.db'}")
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def test_report_is_written_and_self_contained(cli, runs: Path) -> None:
    code, out, err = cli("report", RUN, "--runs-dir", str(runs))
    assert code == 0, err
    run = runs / RUN
    assert f"wrote {run / 'report.md'}" in out and f"wrote {run / 'report.html'}" in out
    page = (run / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    images = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert len(images) >= 2 and all(src.startswith("data:image/png;base64,") for src in images)
    text = (run / "report.md").read_text()
    for section in ("## Run settings", "## Baseline", "## Final front", "## Best within budget",
                    "## Warm-start baselines", "## Pareto plot", "## Method map", "## Layer sensitivity",
                    "## Latency share per layer and target", "## Trial statistics", "## Export"):
        assert section in text, section
    provenance = _complete(run)[0].user_attrs["latency"]["provenance"]
    assert provenance in text and "untuned" in provenance
    assert f"autocomp export {RUN} --trial " in text


def test_method_map_matches_the_plans(runs: Path) -> None:
    from autocomp.search.results.report import load_run, write_report

    run = runs / RUN
    write_report(run)
    view = load_run(run)
    lines = (run / "method_map.md").read_text().splitlines()
    table = [line.strip("|").split("|") for line in lines if line.startswith("| ")]
    header = [cell.strip() for cell in table[0]]
    rows = {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in table[1:]}
    columns = [int(name.split()[0].lstrip("#")) for name in header[1:]]
    assert columns == [r.number for r in view.front]
    trials = {t.number: t for t in _complete(run)}
    for column, number in enumerate(columns):
        plan = trials[number].user_attrs["plan"]
        for layer, cells in rows.items():
            assert cells[column] == cell_text(layer_configs(plan, layer)), (number, layer)
        compressed = {layer for layer, cells in rows.items() if cells[column] != "keep"}
        assert compressed == set(plan["layers"])
    assert (run / "method_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cell_text_and_families() -> None:
    plan = {"layers": {"a": {"method": "prune", "ratio": 0.4, "criterion": "l1"},
                       "b": {"method": "lowrank", "kind": "svd", "rank": 0.5},
                       "c": [{"method": "prune", "ratio": 0.25},
                             {"method": "quant", "w_bits": 4, "a_bits": 8}],
                       "d": {"method": "quant", "w_bits": 8}}}
    found = build_method_map(["a", "b", "c", "d", "e"], [("#1", plan)])
    assert [row[0] for row in found.cells] == ["prune 0.4", "svd r0.5", "prune 0.25 + w4a8", "w8", "keep"]
    assert [row[0] for row in found.families] == ["prune", "low-rank", "prune+quantize", "quantize", "keep"]
    assert len(set(found.colours().values())) == 5


def test_pareto_json_matches_the_csv(cli, runs: Path) -> None:
    code, out, err = cli("pareto", RUN, "--json", "--runs-dir", str(runs))
    assert code == 0, err
    data = json.loads(out)
    with open(runs / RUN / "pareto.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and [entry["number"] for entry in data["front"]] == [int(row["number"]) for row in rows]
    for entry, row in zip(data["front"], rows, strict=True):
        assert entry["val_acc"] == pytest.approx(float(row["val_acc"]))
        assert entry["search_latency"]["median_s"] == pytest.approx(float(row["latency_s"]))
        assert entry["search_latency"]["provenance"] == row["provenance"]
        assert entry["size_bytes"] == int(row["size_bytes"])
        assert entry["plan_summary"] == row["plan_summary"]
        assert 0.0 <= entry["test_acc"] <= 1.0
        assert entry["remeasured_latency"]["kind"] == "measured"
    assert data["baseline"]["latency"]["provenance"] and data["remeasured_provenance"]

    code, out, err = cli("pareto", RUN, "--runs-dir", str(runs))
    assert code == 0, err
    assert "re-measured" in out and f"latency: {rows[0]['provenance']}" in out


def test_missing_optional_files_are_reported_not_fatal(cli, runs: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(runs / RUN, copy / RUN)
    for name in ("front.json", "sensitivity.json", "layer_shares.json", "pareto.png", "report.md"):
        (copy / RUN / name).unlink(missing_ok=True)
    code, out, err = cli("report", RUN, "--runs-dir", str(copy))
    assert code == 0, err
    text = (copy / RUN / "report.md").read_text()
    assert text.count("Not computed for this run.") == 2  # shares, plot
    assert "## Layer sensitivity" in text  # read back from the study, which holds it for every worker
    assert "front.json is missing" in text
    code, out, err = cli("pareto", RUN, "--json", "--runs-dir", str(copy))
    assert code == 0, err
    assert json.loads(out)["front"][0]["test_acc"] is None


def test_bad_runs_are_one_line_errors(cli, runs: Path, tmp_path: Path) -> None:
    code, _, err = cli("pareto", "nope", "--runs-dir", str(runs))
    assert code == 2 and "no search run" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("report", "../x", "--runs-dir", str(runs))
    assert code == 2 and "run name" in err
    empty = tmp_path / "empty"
    (empty / RUN).mkdir(parents=True)
    shutil.copy(runs / RUN / "run.json", empty / RUN / "run.json")
    code, _, err = cli("report", RUN, "--runs-dir", str(empty))
    assert code == 2 and "has no study" in err
    optuna.create_study(study_name=RUN, storage=f"sqlite:///{empty / RUN / 'study.db'}")
    code, _, err = cli("pareto", RUN, "--runs-dir", str(empty))
    assert code == 2 and "has no finished trial" in err


def test_front_uses_deployed_size_as_third_objective() -> None:
    def result(number: int, acc: float, latency: float, size: int, params: int) -> TrialResult:
        return TrialResult(number, acc, latency, latency, latency, "measured (test)", params, 0, size,
                           True, "plan")

    # same accuracy and latency: the smaller deployed model wins even with more parameters
    small, large = result(0, 0.9, 1e-3, 100, 500), result(1, 0.9, 1e-3, 400, 100)
    assert pareto_front([small, large]) == [small]


def test_the_study_opens_in_optuna_dashboard(small_run: Path) -> None:
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    app = wsgi(f"sqlite:///{small_run / 'r' / 'study.db'}")

    def get(path: str) -> dict:
        environ: dict = {"PATH_INFO": path}
        setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda code, *_: status.append(code)))
        assert status[0].startswith("200"), (status, environ["wsgi.errors"].getvalue()[-500:])
        return json.loads(body)

    studies = get("/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["r"]
    detail = get(f"/api/studies/{studies[0]['study_id']}")
    # the same trials in the same states as Optuna reads them (which of the three trials end
    # complete or pruned over budget depends on their measured latency)
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{small_run / 'r' / 'study.db'}")
    assert [t["state"] for t in detail["trials"]] == [t.state.name.title() for t in study.trials]
    assert [t["state"] for t in detail["trials"]].count("Complete") >= 1
    assert {attr["key"] for attr in detail["trials"][0]["user_attrs"]} >= {"plan_summary", "val_acc"}

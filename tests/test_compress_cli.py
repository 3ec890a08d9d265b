"""``autocomp compress``: a plan file applied to a trained model, figures before and after."""

import json
from pathlib import Path

import pytest


def _plan(tmp_path: Path, layers: dict) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"version": 1, "layers": layers}))
    return str(path)


def test_compress_writes_the_model_and_reports_before_and_after(cli, tmp_path: Path,
                                                                trained_resnet: Path) -> None:
    plan = _plan(tmp_path, {"layer1.conv1.0": {"method": "prune", "ratio": 0.5},
                            "layer3.conv2.0": {"method": "lowrank", "rank": 0.25}})
    code, out, err = cli("compress", "--model", "demo-resnet", "--weights", str(trained_resnet),
                         "--data", "fashion-mnist", "--plan", plan, "--out", "out",
                         "--finetune-steps", "30")
    assert code == 0, err
    assert "before" in out and "compressed" in out and "fine-tuned" in out
    report = json.loads((tmp_path / "out" / "compress.json").read_text())
    figures = report["figures"]
    assert figures["compressed"]["params"] < figures["before"]["params"]
    assert figures["compressed"]["macs"] < figures["before"]["macs"]
    assert figures["fine-tuned"]["params"] == figures["compressed"]["params"]
    assert figures["fine-tuned"]["val_acc"] > 0.5
    assert report["finetune"]["steps"] == 30
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"plan.json", "model.pt", "compress.json"}


@pytest.mark.parametrize(("layers", "message"), [
    ({"layer9.conv": {"method": "prune", "ratio": 0.5}}, "does not have"),
    ({"layer1.conv2.0": {"method": "prune", "ratio": 0.5}}, "coupled to stem.0"),
    ({"layer1.conv1.0": {"method": "prune", "ratio": 2}}, "outside"),
    ({"layer1.conv1.0": {"method": "origami"}}, "unknown method"),
])
def test_bad_plans_are_refused_before_any_work(cli, tmp_path: Path, trained_resnet: Path,
                                                layers: dict, message: str) -> None:
    plan = _plan(tmp_path, layers)
    code, _, err = cli("compress", "--model", "demo-resnet", "--weights", str(trained_resnet),
                       "--data", "fashion-mnist", "--plan", plan, "--out", "out")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()

"""Bad input: one line on stderr, exit status 2, nothing written."""

from pathlib import Path

import pytest


@pytest.mark.parametrize(("args", "message"), [
    (["search", "--model", "nosuchnet", "--data", "fashion-mnist"], "unknown model 'nosuchnet'"),
    (["search", "--target", "toaster"], "unknown target 'toaster'"),
    (["search", "--budget", "20 parsecs"], "cannot read budget '20 parsecs'"),
    (["search", "--data", "fashion-mnist:/no/such/dir"], "does not exist"),
    (["search", "--trials", "0"], "--trials must be positive"),
    (["search", "--name", "../escape"], "run name"),
    (["export", "ghost-run"], "no search run"),
    (["inspect", "--model", "demo-resnet", "--input-shape", "1,2,x"], "input shape"),
    (["inspect", "--model", "torchvision:resnet180", "--input-shape", "1,3,32,32"],
     "did you mean resnet18"),
    (["train", "--model", "demo-resnet", "--data", "cifar10:/nowhere", "--out", "w.pt"],
     "does not exist"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path: Path, args: list[str],
                                          message: str) -> None:
    code, out, err = cli(*args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autocomp: error: ")
    assert message in lines[0]
    assert "Traceback" not in err + out
    assert list(tmp_path.iterdir()) == []


def test_targets_lists_how_latency_is_obtained(cli) -> None:
    code, out, _ = cli("targets")
    assert code == 0 and "host" in out and "measured" in out
    code, out, _ = cli("targets", "--json")
    import json

    host = next(t for t in json.loads(out) if t["name"] == "host")
    assert host["latency"] == "measured" and "metaschedule" in host["how"]
    m7 = next(t for t in json.loads(out) if t["name"] == "cortex-m7")
    assert m7["latency"] == "estimated" and m7["memory"]["sram"] == 320 * 1024


def test_latency_on_a_target_without_a_device_says_it_is_estimated(cli) -> None:
    code, out, _ = cli("latency", "--model", "demo-resnet", "--target", "arm-a53")
    assert code == 0 and "estimated (arm-a53 cost model" in out
    code, out, _ = cli("latency", "--model", "demo-resnet", "--target", "arm-a53", "--json")
    import json

    figures = json.loads(out)
    assert figures["latency"]["kind"] == "estimated" and figures["input_shape"] == [1, 1, 28, 28]

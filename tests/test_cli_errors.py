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


def test_inspect_knows_the_demo_models_shape(cli) -> None:
    code, out, err = cli("inspect", "--model", "demo-resnet")
    assert code == 0, err
    assert "1x1x28x28" in out and "stem.0" in out
    code, _, err = cli("inspect", "--model", "torchvision:resnet18")
    assert code == 2 and "give --input-shape (e.g. 1,3,224,224) for this model" in err


def test_a_runs_dir_under_a_file_is_one_line(cli, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    code, out, err = cli("search", "--runs-dir", "notes.txt/runs")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err + out
    assert "notes.txt is a file, not a folder" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_targets_lists_how_latency_is_obtained(cli) -> None:
    code, out, _ = cli("targets")
    assert code == 0 and "host" in out and "measured" in out
    code, out, _ = cli("targets", "--json")
    import json

    host = next(t for t in json.loads(out) if t["name"] == "host")
    assert host["latency"] == "measured" and "metaschedule" in host["how"]
    m7 = next(t for t in json.loads(out) if t["name"] == "cortex-m7")
    assert m7["latency"] == "estimated" and m7["memory"]["sram"] == 320 * 1024
    gpu = next(t for t in json.loads(out) if t["name"] == "gpu")
    from autocomp.hardware.measure.cuda import gpu_count

    if gpu_count():
        assert gpu["latency"] == "measured" and "this machine's GPU" in gpu["how"]
    else:  # what a search here would do: estimate, and say why
        assert gpu["latency"] == "estimated" and not gpu["how"].startswith("measured")
        assert gpu["how"].startswith("estimated by the gpu cost model")
        assert gpu["how"].endswith("standing in because no CUDA GPU 0 on this machine")


def test_latency_on_a_target_without_a_device_says_it_is_estimated(cli) -> None:
    code, out, _ = cli("latency", "--model", "demo-resnet", "--target", "arm-a53")
    assert code == 0 and "estimated (arm-a53 cost model" in out
    code, out, _ = cli("latency", "--model", "demo-resnet", "--target", "arm-a53", "--json")
    import json

    figures = json.loads(out)
    assert figures["latency"]["kind"] == "estimated" and figures["input_shape"] == [1, 1, 28, 28]


def test_output_piped_into_head_ends_quietly() -> None:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "autocomp", "targets"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline()  # like `| head -1`: one line read, then the pipe closed
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0 and "Traceback" not in err, err

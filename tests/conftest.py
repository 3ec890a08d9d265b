"""Shared fixtures: real Fashion-MNIST and a briefly trained demo network."""

import os
from pathlib import Path

# As the CLI does before torch loads its OpenMP runtime: spinning OpenMP threads slow the
# tests' TVM timing workers and each other on a small machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from autocomp.intake.data import DataSplits, load_data, take

torch.set_num_threads(os.cpu_count() or 1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Baselines trained by tests are cached in a temporary folder, not the user's cache."""
    os.environ["AUTOCOMP_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def fmnist() -> DataSplits:
    """Debian's Fashion-MNIST (CI installs dataset-fashion-mnist)."""
    return load_data("fashion-mnist")


@pytest.fixture(scope="session")
def trained_resnet(fmnist: DataSplits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo-resnet trained for one epoch on 8,000 images (about 89% of what 4 epochs reach)."""
    from autocomp.intake.models import build_model
    from autocomp.training.train import train

    torch.manual_seed(0)  # the same weights whichever tests run first
    model = build_model("demo-resnet", num_classes=10, in_channels=1)
    train(model, take(fmnist.train, 8000), epochs=1, progress=False)
    path = tmp_path_factory.mktemp("weights") / "demo-resnet.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run ``autocomp ARGS`` in-process from an empty folder; returns (code, stdout, stderr)."""
    from autocomp.cli.main import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def resnet():
    """Seeded, untrained demo-resnet and its inventory (without channel coupling)."""
    from helpers import seeded_model

    return seeded_model("demo-resnet", (1, 1, 28, 28), in_channels=1)


@pytest.fixture(scope="session")
def mobilenet():
    """Seeded, untrained demo-mobilenetv2 and its inventory (without channel coupling)."""
    from helpers import seeded_model

    return seeded_model("demo-mobilenetv2", (1, 1, 28, 28), in_channels=1)


@pytest.fixture(scope="session")
def small_run(trained_resnet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real three-trial search (host, untuned, sensitivity pre-pass and warm start on) named
    ``r``, made once and shared by the report, pareto and codesign tests, which only read it
    or add their own files. Returns the runs folder."""
    from autocomp.cli.main import main

    runs = tmp_path_factory.mktemp("runs")
    code = main(["search", "--model", "demo-resnet", "--weights", str(trained_resnet), "--data",
                 "fashion-mnist", "--untuned", "--trials", "3", "--finetune-steps", "10", "--budget", "70%",
                 "--val-subset", "300", "--train-subset", "1000", "--name", "r", "--runs-dir", str(runs)])
    assert code == 0
    return runs


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The random test order's seed, also under -q (pytest-randomly prints it only in the header)."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None:
        terminalreporter.write_line(f"tests ran in random order, pytest-randomly seed {seed} "
                                    f"(rerun that order with --randomly-seed={seed})")

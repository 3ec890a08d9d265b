import logging
from pathlib import Path

import pytest
import torch

from autocomp.intake.data import DataSplits, take
from autocomp.intake.source import ModelSource
from autocomp.training.baseline import cached_baseline


def test_baseline_is_trained_once_then_cached(fmnist: DataSplits, caplog: pytest.LogCaptureFixture) -> None:
    small = DataSplits("fashion-mnist", take(fmnist.train, 2000), take(fmnist.val, 500),
                       take(fmnist.test, 500), fmnist.classes, fmnist.sample_shape)
    source = ModelSource("demo-resnet", 10, 1, 28)
    caplog.set_level(logging.INFO, logger="autocomp")
    trained, info = cached_baseline(source, small, epochs=1)
    assert trained.weights and Path(trained.weights).is_file()
    assert 0.2 < info["val_acc"] <= 1.0  # 16 steps already learn twice the 10% of chance
    again, info_again = cached_baseline(source, small, epochs=1)
    assert again.weights == trained.weights and info_again == info
    assert "using the cached" in caplog.messages[-1]
    model = again.build()
    assert torch.equal(model.fc.weight, trained.build().fc.weight)
    other, _ = cached_baseline(source, small, epochs=2)
    assert other.weights != trained.weights


def test_a_damaged_cached_baseline_is_trained_again(fmnist: DataSplits, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    small = DataSplits("fashion-mnist", take(fmnist.train, 500), take(fmnist.val, 200),
                       take(fmnist.test, 200), fmnist.classes, fmnist.sample_shape)
    source = ModelSource("demo-resnet", 10, 1, 28)
    trained, _ = cached_baseline(source, small, epochs=1)
    weights = Path(trained.weights)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    caplog.set_level(logging.INFO, logger="autocomp")
    again, _ = cached_baseline(source, small, epochs=1)
    assert again.weights == trained.weights
    assert any("is damaged" in message and "training it again" in message for message in caplog.messages)
    assert torch.isfinite(again.build().fc.weight).all()  # the weights read again

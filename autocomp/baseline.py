"""The uncompressed model a search starts from: built from its spec, with weights loaded
from a file or, when none are given, trained once and cached."""

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from autocomp.data import DataSplits
from autocomp.models import build_model, load_weights
from autocomp.paths import cache_dir
from autocomp.train import evaluate, train


@dataclass(frozen=True)
class ModelSource:
    """Everything needed to rebuild the same uncompressed model later (e.g. for export)."""

    spec: str
    num_classes: int
    in_channels: int
    input_size: int
    adapt_stem: bool = False
    weights: str | None = None

    def build(self) -> nn.Module:
        """The model in eval mode, with its weights when it has any."""
        model = build_model(self.spec, num_classes=self.num_classes, in_channels=self.in_channels,
                            input_size=self.input_size, adapt_stem=self.adapt_stem)
        if self.weights:
            load_weights(model, self.weights)
        return model.eval()


def cached_baseline(source: ModelSource, data: DataSplits, epochs: int, seed: int = 0,
                    log=print) -> tuple[ModelSource, dict]:
    """Train the model on ``data`` unless a cached copy exists; returns the source with its
    weights path set, and the baseline's val/test accuracy."""
    key = json.dumps({**asdict(source), "data": data.spec, "epochs": epochs, "seed": seed,
                      "format": 1}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = f"{source.spec.replace(':', '-').replace('/', '_')}-{data.spec.split(':')[0]}-{digest}"
    folder = cache_dir() / "baselines"
    folder.mkdir(parents=True, exist_ok=True)
    weights, info_path = folder / f"{stem}.pt", folder / f"{stem}.json"
    if weights.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        log(f"baseline: using the cached {weights}")
        return ModelSource(**{**asdict(source), "weights": str(weights)}), info
    log(f"baseline: no --weights given, training {source.spec} on {data.spec} for {epochs} "
        f"epochs (cached at {weights})")
    torch.manual_seed(seed)  # the initial weights too, so a baseline is reproducible
    model = source.build()
    train(model, data.train, epochs=epochs, seed=seed)
    info = {"val_acc": evaluate(model, data.val), "test_acc": evaluate(model, data.test),
            "epochs": epochs}
    temporary = weights.with_suffix(".tmp")
    torch.save(model.state_dict(), temporary)
    temporary.replace(weights)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    log(f"baseline: trained and saved to {weights}")
    return ModelSource(**{**asdict(source), "weights": str(weights)}), info

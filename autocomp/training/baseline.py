"""The uncompressed model a search starts from: built from its spec, with weights loaded
from a file or, when none are given, trained once and cached."""

import hashlib
import json
import logging
from dataclasses import asdict

import torch

from autocomp.core.paths import cache_dir
from autocomp.core.staging import replacing, write_json
from autocomp.intake.data import DataSplits
from autocomp.intake.source import ModelSource
from autocomp.training.train import evaluate, train

logger = logging.getLogger(__name__)


def cached_baseline(source: ModelSource, data: DataSplits, epochs: int,
                    seed: int = 0) -> tuple[ModelSource, dict]:
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
        try:
            info = json.loads(info_path.read_text())
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # a cache: a damaged copy is trained again
            first = (str(err).strip().splitlines() or [""])[0][:160]
            logger.warning("baseline: the cached %s is damaged (%s: %s); training it again", weights,
                           type(err).__name__, first)
        else:
            logger.info("baseline: using the cached %s", weights)
            return ModelSource(**{**asdict(source), "weights": str(weights)}), info
    logger.info("baseline: no --weights given, training %s on %s for %d epochs (cached at %s)",
                source.spec, data.spec, epochs, weights)
    torch.manual_seed(seed)  # the initial weights too, so a baseline is reproducible
    model = source.build()
    train(model, data.train, epochs=epochs, seed=seed)
    info = {"val_acc": evaluate(model, data.val), "test_acc": evaluate(model, data.test),
            "epochs": epochs}
    with replacing(weights) as temporary:
        torch.save(model.state_dict(), temporary)
    write_json(info_path, info)
    logger.info("baseline: trained and saved to %s", weights)
    return ModelSource(**{**asdict(source), "weights": str(weights)}), info

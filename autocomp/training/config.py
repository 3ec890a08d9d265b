"""``FinetuneConfig``: how long and how hard a compressed model is fine-tuned, and with which
losses (a search space's ``finetune`` section holds one)."""

from dataclasses import dataclass

from autocomp.training.features import FeatureLossWeights


@dataclass(frozen=True)
class FinetuneConfig:
    """How long and how hard a compressed model is fine-tuned, and with which losses."""

    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.9
    hint_weight: float = 0.0
    attention_weight: float = 0.0
    fsp_weight: float = 0.0
    feature_points: int = 3
    regularizer: str | None = None
    regularizer_weight: float = 1e-4
    meprop_keep: float = 1.0

    @property
    def feature_weights(self) -> FeatureLossWeights:
        return FeatureLossWeights(self.hint_weight, self.attention_weight, self.fsp_weight)

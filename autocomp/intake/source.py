"""``ModelSource``: everything needed to rebuild the same uncompressed model later (its spec,
shape and weights), as a search run stores it."""

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from autocomp.intake.models import build_model, load_weights


@dataclass(frozen=True)
class ModelSource:
    """Everything needed to rebuild the same uncompressed model later (e.g. for export)."""

    spec: str
    num_classes: int
    in_channels: int
    input_size: int
    adapt_stem: bool = False
    weights: str | None = None

    @classmethod
    def named(cls, spec: str, input_shape: tuple[int, ...], num_classes: int, *, adapt_stem: bool = False,
              weights: str | Path | None = None) -> "ModelSource":
        """The model ``spec`` for inputs of ``input_shape`` (N, C, H, W), with ``weights`` made
        absolute so that a run resumed or exported from another folder still finds them."""
        return cls(spec, num_classes, input_shape[1], input_shape[-1], adapt_stem,
                   str(Path(weights).resolve()) if weights else None)

    def build(self) -> nn.Module:
        """The model in eval mode, with its weights when it has any."""
        model = build_model(self.spec, num_classes=self.num_classes, in_channels=self.in_channels,
                            input_size=self.input_size, adapt_stem=self.adapt_stem)
        if self.weights:
            load_weights(model, self.weights)
        return model.eval()

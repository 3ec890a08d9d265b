"""What a compressed module may do beyond its forward pass, as ``typing.Protocol`` s: take part
in fine-tuning (a loss term of its own, invariants restored after each optimizer step,
settling when training ends) and say how many bytes its weights take as deployed.
Fine-tuning (``autocomp.training.distill``) and ``size_bytes`` find them with ``isinstance``."""

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class FinetuneHooks(Protocol):
    """A module that fine-tuning must call: quantized layers (ADMM), sparse layers (the mask)."""

    def penalty(self) -> Tensor:
        """A scalar loss term added to the fine-tuning loss (zero when the module has none)."""
        ...

    def after_step(self) -> None:
        """Restore the module's invariants after an optimizer step (a mask, ADMM's dual)."""
        ...

    def finish_training(self) -> None:
        """Settle when fine-tuning ends (e.g. project the weights onto the quantization grid)."""
        ...


@runtime_checkable
class StoredSize(Protocol):
    """A module that stores its weights in another form than its parameters' dtype (integers
    of a few bits, a sparse encoding): its size accounts for it and everything beneath it."""

    def storage_bytes(self) -> int:
        """Bytes the module's weights take as deployed."""
        ...

"""Feature-level distillation losses between the original (teacher) and compressed (student)
networks: FitNets hints, attention transfer and FSP matrices.

All three compare intermediate feature maps at a few *points*: modules that
exist under the same name in both networks (compression replaces layers but
keeps the blocks around them) and that end a stage of the teacher, i.e. the
last module at each spatial resolution. Where pruning changed a width, a
learned 1x1 adapter maps the student's channels to the teacher's.

- FitNets (Romero et al., ICLR 2015): L2 between adapted student features and
  teacher features.
- Attention transfer (Zagoruyko & Komodakis, ICLR 2017): L2 between the
  normalised spatial attention maps sum_c |F_c|^2 of both networks.
- FSP (Yim et al., CVPR 2017): L2 between the "flow" Gram matrices of each
  point's input and output features, G = F_in^T F_out / (h w).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class FeatureTap:
    """Records the input and output of named modules on every forward pass."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [model.get_submodule(name).register_forward_hook(self._hook(name))
                         for name in names]

    def _hook(self, name: str):
        def record(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            # Re-inserted so the dicts stay in order of each module's last call.
            self.inputs.pop(name, None)
            self.outputs.pop(name, None)
            self.inputs[name] = args[0] if args else None
            self.outputs[name] = output

        return record

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def distill_points(teacher: nn.Module, student: nn.Module, example: torch.Tensor,
                   count: int = 3) -> list[str]:
    """Up to ``count`` module names, present in both networks, that end a teacher stage:
    the last module to produce a 4-D feature map (larger than 1x1) at each spatial size,
    deepest stages kept."""
    student_names = {name for name, _ in student.named_modules()}
    candidates = [name for name, _ in teacher.named_modules() if name and name in student_names]
    tap = FeatureTap(teacher, candidates)
    try:
        with torch.no_grad():
            teacher.eval()(example)
    finally:
        tap.close()
    stage_ends: dict[tuple[int, ...], str] = {}
    producers: dict[int, str] = {}
    for name, output in tap.outputs.items():  # in the order the modules finished
        if not (isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2:].numel() > 1
                and isinstance(tap.inputs.get(name), torch.Tensor) and tap.inputs[name].dim() == 4):
            continue
        # A container that only passes on its last child's tensor adds nothing: keep the child.
        if producers.setdefault(id(output), name) != name:
            continue
        stage_ends.pop(tuple(output.shape[2:]), None)
        stage_ends[tuple(output.shape[2:])] = name
    points = list(stage_ends.values())
    return points[-count:] if count else []


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Normalised spatial attention: sum over channels of squared activations, flattened."""
    return F.normalize(features.pow(2).mean(1).flatten(1), dim=1)


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """FSP Gram matrix between two feature maps (the larger is pooled to the smaller's size)."""
    size = min(first.shape[-2:], second.shape[-2:])
    first = F.adaptive_avg_pool2d(first, size)
    second = F.adaptive_avg_pool2d(second, size)
    return torch.einsum("nchw,ndhw->ncd", first, second) / (size[0] * size[1])


def _adapter(student_channels: int, teacher_channels: int) -> nn.Conv2d:
    adapter = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
    if student_channels == teacher_channels:
        with torch.no_grad():
            adapter.weight.copy_(torch.eye(teacher_channels).view(teacher_channels, teacher_channels, 1, 1))
    return adapter


@dataclass(frozen=True)
class FeatureLossWeights:
    """How much each feature loss counts (0 turns it off)."""

    hint: float = 0.0
    attention: float = 0.0
    fsp: float = 0.0

    @property
    def active(self) -> bool:
        return self.hint > 0 or self.attention > 0 or self.fsp > 0


class FeatureDistiller(nn.Module):
    """Taps both networks at the same points and computes the weighted feature losses.

    Its parameters are the learned adapters; they train with the student and are
    thrown away afterwards.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, example: torch.Tensor,
                 weights: FeatureLossWeights, points: int = 3) -> None:
        super().__init__()
        self.weights = weights
        self.points = distill_points(teacher, student, example, points)
        if not self.points:
            raise ValueError("no module is shared by teacher and student to distil features at")
        self.teacher_tap = FeatureTap(teacher, self.points)
        self.student_tap = FeatureTap(student, self.points)
        with torch.no_grad():
            teacher.eval()(example)
            was_training = student.training
            student.eval()(example)
            student.train(was_training)
        self.out_adapters = nn.ModuleDict()
        self.in_adapters = nn.ModuleDict()
        for index, name in enumerate(self.points):
            key = str(index)
            self.out_adapters[key] = _adapter(self.student_tap.outputs[name].shape[1],
                                              self.teacher_tap.outputs[name].shape[1])
            self.in_adapters[key] = _adapter(self.student_tap.inputs[name].shape[1],
                                             self.teacher_tap.inputs[name].shape[1])

    def loss(self) -> torch.Tensor:
        """The weighted feature losses of the last forward passes of both networks."""
        total = torch.zeros(())
        for index, name in enumerate(self.points):
            key = str(index)
            teacher_out = self.teacher_tap.outputs[name].detach()
            student_out = self.student_tap.outputs[name]
            if self.weights.hint > 0:
                adapted = self.out_adapters[key](student_out)
                total = total + self.weights.hint * F.mse_loss(adapted, teacher_out)
            if self.weights.attention > 0:
                gap = attention_map(student_out) - attention_map(teacher_out)
                total = total + self.weights.attention * gap.pow(2).sum(1).mean()
            if self.weights.fsp > 0:
                teacher_fsp = fsp_matrix(self.teacher_tap.inputs[name].detach(), teacher_out)
                student_fsp = fsp_matrix(self.in_adapters[key](self.student_tap.inputs[name]),
                                         self.out_adapters[key](student_out))
                total = total + self.weights.fsp * F.mse_loss(student_fsp, teacher_fsp)
        return total

    def close(self) -> None:
        self.teacher_tap.close()
        self.student_tap.close()

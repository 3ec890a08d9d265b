"""Peak SRAM and flash of a model deployed bare-metal on a microcontroller.

SRAM is the activation arena planned over the kernel schedule (``program.plan_arena``)
plus the artefact's other static data (measured from its compiled objects when the cross
compiler is installed); the call stack is not included (TVM kernels keep small
temporaries, under 1 KB each, on it). Flash is the weight arrays the artefact holds plus
code: the kernels, tensor descriptors and call sequence compiled with the profile's cross
compiler, or excluded (and said so) when it is not installed. The weights at their stored
bit-widths (``deployed_weight_bytes``) are reported beside it: they are smaller when the
lowering holds weights wider than stored (sub-8-bit weights as int8, weight-only
quantized layers as fp32) or adds per-channel constants (the int8 zero-point
correction), and ``packed_flash_bytes`` is what flash would be if they were not.
"""

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from autocomp.hardware.mcu.program import McuProgram, lower_program, plan_arena
from autocomp.hardware.mcu.toolchain import measure_code, toolchain
from autocomp.hardware.profiles import HardwareProfile, MemoryLimits


@dataclass(frozen=True)
class McuMemory:
    """SRAM and flash a model needs as the bare-metal artefact, with their parts.

    ``sram_bytes`` = ``arena_bytes`` (activations and kernel workspace, as planned) +
    ``static_bytes`` (the runtime's other static data, measured; None when not compiled).
    ``peak_live_bytes`` is the most that is live at once (``peak_at``), a lower bound
    for the arena. ``flash_bytes`` = ``artefact_weight_bytes`` (the C weight arrays) +
    ``code_bytes`` (kernels, call sequence and tensor descriptors, measured; None and
    excluded when not compiled); ``packed_flash_bytes`` counts ``weight_bytes`` (at their
    stored bit-widths) instead of the arrays.
    """

    sram_bytes: int
    flash_bytes: int
    packed_flash_bytes: int
    arena_bytes: int
    peak_live_bytes: int
    peak_at: str
    workspace_bytes: int
    static_bytes: int | None
    weight_bytes: int
    artefact_weight_bytes: int
    code_bytes: int | None
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def exceeds(self, limits: MemoryLimits) -> str | None:
        """Why the model does not fit a profile's SRAM and flash limits, or None when it does."""
        over = []
        if limits.sram_bytes is not None and self.sram_bytes > limits.sram_bytes:
            over.append(f"SRAM {self.sram_bytes} B > {limits.sram_bytes} B")
        if limits.flash_bytes is not None and self.flash_bytes > limits.flash_bytes:
            over.append(f"flash {self.flash_bytes} B > {limits.flash_bytes} B")
        return "; ".join(over) or None


def _describe_time(program: McuProgram, time: int) -> str:
    if time == 0:
        return "input copy-in"
    if time > len(program.steps):
        return "output copy-out"
    return f"step {time - 1} ({program.steps[time - 1].kernel})"


def deployed_weight_bytes(model: nn.Module) -> int:
    """Weights at their stored bit-widths (``autocomp.methods.apply.size_bytes``), with each batch
    norm counted as the one per-channel vector it becomes when the lowering folds it into
    the conv before it (its scale goes into the conv's weights or output scales, its shift
    into the bias), not as its two."""
    from autocomp.methods.apply import size_bytes

    batchnorm = sum(p.numel() * p.element_size() for module in model.modules()
                    if isinstance(module, nn.modules.batchnorm._BatchNorm)
                    for p in module.parameters(recurse=False))
    return size_bytes(model) - batchnorm // 2


def mcu_memory(model: nn.Module, input_shape: tuple[int, ...], profile: HardwareProfile | None = None,
               *, code: bool = True) -> McuMemory:
    """SRAM and flash of ``model`` as the bare-metal artefact for ``profile`` (default:
    Cortex-M7). With ``code`` (and the profile's cross compiler installed) the kernels and
    call sequence are compiled to measure their size and static data."""
    target = profile.tvm_target if profile is not None else None
    program = lower_program(model, input_shape, target)
    return program_memory(program, model, profile, code=code)


def device_memory(model: nn.Module, input_shape: tuple[int, ...],
                  profile: HardwareProfile) -> McuMemory | None:
    """``mcu_memory`` for profiles with SRAM or flash limits (the search's memory constraints),
    None for targets without them."""
    if profile.export.format != "c-sources" or not (profile.memory.sram_bytes or profile.memory.flash_bytes):
        return None
    return mcu_memory(model, input_shape, profile)


def program_memory(program: McuProgram, model: nn.Module, profile: HardwareProfile | None = None, *,
                   code: bool = True) -> McuMemory:
    """``mcu_memory`` for a program already lowered from ``model``."""
    plan = plan_arena(program)
    notes = ["SRAM excludes the call stack"]
    measured = measure_code(program, plan, profile) if code else None
    if measured is None:
        notes.append("flash excludes code: " + ("not asked for" if not code else
                                                 f"{toolchain(profile)[0]} is not installed"))
        code_bytes, static = None, None
    else:
        code_bytes, static = measured
    weight_bytes = deployed_weight_bytes(model)
    held = program.constant_bytes()
    if weight_bytes < held:
        notes.append(f"the artefact's weight arrays take {held} B, the weights at their stored bit-widths "
                     f"{weight_bytes} B (wider dtypes in the lowering, per-channel int8 corrections)")
    workspace = max((program.slots[s.workspace].nbytes for s in program.steps if s.workspace is not None),
                    default=0)
    return McuMemory(
        sram_bytes=plan.size + (static or 0), flash_bytes=held + (code_bytes or 0),
        packed_flash_bytes=weight_bytes + (code_bytes or 0),
        arena_bytes=plan.size, peak_live_bytes=plan.peak_live,
        peak_at=_describe_time(program, plan.peak_time), workspace_bytes=workspace,
        static_bytes=static, weight_bytes=weight_bytes, artefact_weight_bytes=held,
        code_bytes=code_bytes, notes=tuple(notes))

"""The latency oracle: a profile's device when it can be reached, else its cost-model estimate,
labelled with the reason in every figure's provenance."""

import logging

import torch
from torch import nn

from autocomp.hardware.costmodel.estimate import EstimateMeasurer
from autocomp.hardware.measure.base import DeviceUnreachable, Latency, Measurer
from autocomp.hardware.measure.device import device_measurer
from autocomp.hardware.profiles import HardwareProfile, load_target

logger = logging.getLogger(__name__)


def make_measurer(profile: HardwareProfile) -> Measurer:
    """The measurer a profile asks for: this machine's CPU or GPU, a device through a TVM
    RPC tracker, or the profile's cost-model estimate.

    Where the profile's device cannot be reached (no GPU here, no device registered with
    the tracker) the estimate stands in, says why in every figure's provenance, and a
    log line tells the user once.
    """
    if profile.latency.method == "estimate":
        return EstimateMeasurer(profile)
    try:
        return device_measurer(profile)
    except DeviceUnreachable as err:
        reason = str(err)
    logger.info("note: target %s: %s; latency is estimated by its cost model instead", profile.name, reason)
    return EstimateMeasurer(profile, fallback_reason=reason)


def latency_here(profile: HardwareProfile) -> tuple[bool, str]:
    """Whether a search on this machine would measure ``profile``'s latency (True) or estimate
    it, and how, in words: the profile's device when it can be reached from here, else its
    cost model with the reason."""
    if profile.latency.method == "estimate":
        return False, profile.how()
    try:
        device_measurer(profile).close()
    except DeviceUnreachable as err:
        return False, estimated_instead(profile, str(err))
    return True, profile.how()


def estimated_instead(profile: HardwareProfile, reason: str) -> str:
    """How latency is obtained when the profile's cost model stands in for its device."""
    return f"{profile.how_estimated()}, standing in because {reason}"


def measure_latency(model: nn.Module, example_inputs: torch.Tensor, target: str | HardwareProfile = "host", *,
                    untuned: bool = False) -> Latency:
    """``model``'s latency on ``target`` (a profile name, path or profile) for inputs shaped like
    ``example_inputs``: measured on the device when it can be reached, else estimated by the
    profile's cost model; the result's ``provenance`` says which. ``untuned`` compiles with
    TVM's default schedules instead of tuning (fast to build, far slower kernels)."""
    profile = target if isinstance(target, HardwareProfile) else load_target(target, untuned=untuned)
    measurer = make_measurer(profile)
    try:
        return measurer.measure(model.eval(), tuple(example_inputs.shape))
    finally:
        measurer.close()

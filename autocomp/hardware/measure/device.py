"""The measurer of a profile's device: this machine's CPU or GPU, or a board through a TVM RPC
tracker; ``DeviceUnreachable`` says why when the device cannot be reached from here."""

from autocomp.hardware.measure.base import DeviceUnreachable, Measurer
from autocomp.hardware.profiles import HardwareProfile


def device_measurer(profile: HardwareProfile) -> Measurer:
    """A measurer timing on ``profile``'s device; raises ``DeviceUnreachable`` (no GPU here, no
    device registered with the tracker, the tracker down) and ``AutocompError`` for a profile
    whose latency is estimated by definition."""
    lat = profile.latency
    if lat.method == "estimate":
        raise DeviceUnreachable(f"target {profile.name} has no device to measure: its latency is estimated")
    if lat.method == "rpc":
        from autocomp.hardware.measure.rpc import RPCMeasurer, registered_servers

        assert lat.rpc is not None
        try:
            servers = registered_servers(lat.rpc.tracker_host, lat.rpc.tracker_port, lat.rpc.key)
        except (OSError, ConnectionError) as err:
            raise DeviceUnreachable(f"RPC tracker {lat.rpc.tracker_host}:{lat.rpc.tracker_port} "
                                    f"unreachable ({err})") from None
        if not servers:
            raise DeviceUnreachable(f"no device with key {lat.rpc.key!r} is registered with the tracker")
        return RPCMeasurer(profile)
    if lat.device == "cuda":
        from autocomp.hardware.measure.cuda import CudaMeasurer, GpuUnavailableError

        try:
            return CudaMeasurer(profile)
        except GpuUnavailableError as err:
            raise DeviceUnreachable(str(err).split(": ", 1)[-1]) from None
    from autocomp.hardware.measure.local import LocalMeasurer

    return LocalMeasurer(profile)

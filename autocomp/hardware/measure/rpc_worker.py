"""A TVM RPC tracker or server as a child process that cleans up after itself.

``autocomp.hardware.measure.rpc`` starts this module in a new process group. It starts
TVM's tracker or server (which run in worker processes of their own), prints
``{"port": N}`` on stdout once listening, and then waits on stdin. When stdin
closes, because the parent closed it or died, it ends its whole process
group, so no orphaned TVM worker outlives the parent.
"""

import argparse
import json
import os
import signal
import sys


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m autocomp.hardware.measure.rpc_worker")
    parser.add_argument("role", choices=["tracker", "server"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--port-end", type=int, required=True)
    parser.add_argument("--tracker", help="HOST:PORT of the tracker a server registers with")
    parser.add_argument("--key", help="device key a server registers under")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    if args.role == "tracker":
        service = Tracker(args.host, port=args.port, port_end=args.port_end, silent=True)
    else:
        tracker_host, tracker_port = args.tracker.rsplit(":", 1)
        service = rpc.Server(args.host, port=args.port, port_end=args.port_end, key=args.key,
                             tracker_addr=(tracker_host, int(tracker_port)), silent=True)
    sys.stdout.write(json.dumps({"port": service.port}) + "\n")
    sys.stdout.flush()
    sys.stdin.read()  # returns at EOF: the parent closed the pipe or died
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.killpg(os.getpgid(0), signal.SIGTERM)


if __name__ == "__main__":
    main()

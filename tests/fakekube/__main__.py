"""Run the fake Kubernetes API server until killed.

    python -m tests.fakekube --port 0 --kubeconfig PATH [--nodes node-a=zone-a,node-b=zone-b]

Prints its URL on the first line of stdout (then flushes), writes a kubeconfig
pointing at it, and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from tests.fakekube.server import FakeKube


async def _main(args: argparse.Namespace) -> None:
    fake = FakeKube(
        token=args.token,
        boot_step=args.boot_step,
        delete_delay=args.delete_delay,
        bookmark_interval=args.bookmark_interval,
    )
    for spec in filter(None, args.nodes.split(",")):
        name, _, zone = spec.partition("=")
        fake.add_node(name.strip(), zone.strip())
    url = await fake.start(args.host, args.port)
    if args.kubeconfig:
        fake.write_kubeconfig(Path(args.kubeconfig), namespace=args.namespace)
    print(url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakekube", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--kubeconfig", default="", help="write a kubeconfig here")
    parser.add_argument("--namespace", default="vmpool", help="the kubeconfig's namespace")
    parser.add_argument("--token", default="fake-token")
    parser.add_argument(
        "--nodes",
        default="node-a=zone-a,node-b=zone-b,node-c=zone-c",
        help="NAME=ZONE,... (an empty ZONE: a node without a zone label)",
    )
    parser.add_argument("--boot-step", type=float, default=0.5, help="seconds per boot phase")
    parser.add_argument("--delete-delay", type=float, default=1.0)
    parser.add_argument("--bookmark-interval", type=float, default=5.0)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()

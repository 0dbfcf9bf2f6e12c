"""Log every node that joins a network, as it happens.

    python -m meshgate.sdk.examples.watch_joins [networks/demo] [--start-revision N]

An automation service's skeleton: an asyncio loop over `watch_events()`, which
survives control-plane restarts and resumes exactly after the last event
seen (print `revision` somewhere durable to resume across restarts of this
script too).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable

from meshgate.api.v1 import events_pb2, node_pb2
from meshgate.sdk import AsyncClient

log = logging.getLogger("meshgate.examples.watch_joins")


async def watch_joins(
    client: AsyncClient,
    parent: str = "",
    *,
    start_revision: int = 0,
    limit: int | None = None,
    on_start: Callable[[int], object] | None = None,
) -> list[node_pb2.Node]:
    """Log each node created under `parent` (all networks if empty); stop after `limit`."""
    joined: list[node_pb2.Node] = []
    async for ev in client.watch_events(parent, start_revision=start_revision,
                                        resource_types=["meshgate.io/Node"], on_start=on_start):
        if ev.type != events_pb2.WatchEvent.CREATED:
            continue
        node = ev.node
        log.info("node %s joined with %s (endpoint %s) at revision %d",
                 node.name, node.ipv4_address, node.endpoint or "none", ev.revision)
        joined.append(node)
        if limit is not None and len(joined) >= limit:
            break
    return joined


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parent", nargs="?", default="", help="networks/{network}; all networks if omitted")
    p.add_argument("--start-revision", type=int, default=0, help="resume after this revision")
    p.add_argument("--target", help="control plane address (default: context / MESHGATE_TARGET)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    async def run() -> None:
        async with AsyncClient(args.target) as client:
            await watch_joins(client, args.parent, start_revision=args.start_revision)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""meshgate SDK: typed sync and asyncio clients for the meshgate API.

    from meshgate.sdk import Client
    with Client("127.0.0.1:7400") as c:
        net = c.get_network(name="networks/demo")

Every RPC is a method named after it (`CreateNode` -> `create_node`), taking a
request message or keyword arguments per field; `iter_*` follow page tokens;
`modify()` does read-modify-write with etags; `AsyncClient.watch_events()`
streams resource changes. Failures raise `meshgate.sdk.errors.MeshgateError`;
a Duration argument that is no duration raises `DurationError` (a ValueError)
before any call.
"""

from meshgate.sdk._build import DurationError
from meshgate.sdk.client import AsyncClient, Client
from meshgate.sdk.config import ClientConfig, ConfigError
from meshgate.sdk.errors import MeshgateError

__all__ = ["AsyncClient", "Client", "ClientConfig", "ConfigError", "DurationError", "MeshgateError"]

"""iris_raft: the replicated core of Iris.

A Raft-replicated (PySyncObj) store of inboxes, sessions, token revocations and
small registers, with two consistency modes (``cp`` and ``hardened_ap``), a
partition guard, durable acknowledgements, a core server and a trio client.

Embedding::

    import trio, iris_raft

    async def main():
        config = iris_raft.IrisConfig.for_dev("./data", port=7001)
        async with iris_raft.open_node(config) as node:
            await node.wait_ready()
            sent = await node.send("alice", "msg-1", "bob", b"hello")
            print(await node.fetch_inbox("bob"))

    trio.run(main)
"""

from ._client import Client as Client
from ._client import RemoteSubscription as RemoteSubscription
from ._client import open_client as open_client
from ._config import ConsistencyMode as ConsistencyMode
from ._config import IrisConfig as IrisConfig
from ._config import load_config as load_config
from ._exceptions import AuthFailed as AuthFailed
from ._exceptions import BadRequest as BadRequest
from ._exceptions import ConfigError as ConfigError
from ._exceptions import CorruptFile as CorruptFile
from ._exceptions import InboxFull as InboxFull
from ._exceptions import InternalError as InternalError
from ._exceptions import IrisError as IrisError
from ._exceptions import NotLeader as NotLeader
from ._exceptions import Overloaded as Overloaded
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import StateFull as StateFull
from ._exceptions import TokenRevoked as TokenRevoked
from ._exceptions import Unavailable as Unavailable
from ._exceptions import UnknownOutcome as UnknownOutcome
from ._exceptions import WriteBlocked as WriteBlocked
from ._node import Node as Node
from ._node import SendResult as SendResult
from ._node import Subscription as Subscription
from ._node import SubscriptionLost as SubscriptionLost
from ._node import open_node as open_node
from ._server import serve_core as serve_core
from ._state import AckEvent as AckEvent
from ._state import KickEvent as KickEvent
from ._state import MessageEvent as MessageEvent
from ._state import RevokeEvent as RevokeEvent
from ._state import StoredMessage as StoredMessage
from ._wire import Resync as Resync

__all__ = [
    "AckEvent",
    "AuthFailed",
    "BadRequest",
    "Client",
    "ConfigError",
    "ConsistencyMode",
    "CorruptFile",
    "InboxFull",
    "InternalError",
    "IrisConfig",
    "IrisError",
    "KickEvent",
    "MessageEvent",
    "Node",
    "NotLeader",
    "Overloaded",
    "ProtocolError",
    "RemoteSubscription",
    "Resync",
    "RevokeEvent",
    "SendResult",
    "StateFull",
    "StoredMessage",
    "Subscription",
    "SubscriptionLost",
    "TokenRevoked",
    "Unavailable",
    "UnknownOutcome",
    "WriteBlocked",
    "load_config",
    "open_client",
    "open_node",
    "serve_core",
]

"""iris_edge: the WebSocket edge of Iris (protocol v1), its client and the ``iris`` command.

An edge is stateless: it authenticates clients (HS256 JWT), forwards their
sends to the core cluster (``iris_raft``) and answers ``sent`` once the message
is durable, and delivers stored and live messages from the core's event stream.
"""

from ._app import run_dev as run_dev
from ._app import run_edge as run_edge
from ._app import serve_edge as serve_edge
from ._auth import issue_token as issue_token
from ._client import AuthError as AuthError
from ._client import ClientClosed as ClientClosed
from ._client import ConnectFailed as ConnectFailed
from ._client import IrisClient as IrisClient
from ._client import IrisClientError as IrisClientError
from ._client import Message as Message
from ._client import SendTimeout as SendTimeout
from ._client import Sent as Sent
from ._client import open_iris as open_iris
from ._core import CoreAccess as CoreAccess
from ._core import LocalCore as LocalCore
from ._core import RemoteCore as RemoteCore
from ._server import EdgeServer as EdgeServer
from ._server import EdgeSettings as EdgeSettings

__all__ = [
    "AuthError",
    "ClientClosed",
    "ConnectFailed",
    "CoreAccess",
    "EdgeServer",
    "EdgeSettings",
    "IrisClient",
    "IrisClientError",
    "LocalCore",
    "Message",
    "RemoteCore",
    "SendTimeout",
    "Sent",
    "issue_token",
    "open_iris",
    "run_dev",
    "run_edge",
    "serve_edge",
]

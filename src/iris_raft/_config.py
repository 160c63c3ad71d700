"""Configuration of cores and edges: one TOML file, environment variables, overrides.

Theory of operation
-------------------
Every node of a cluster can share one TOML file with the tables ``[cluster]``,
``[core]`` and ``[edge]``. What differs per node comes from environment
variables named ``IRIS_<SECTION>_<KEY>`` (``IRIS_CORE_NODE``,
``IRIS_EDGE_PORT``), and a program (the CLI) can pass ``overrides`` with dotted
keys (``"edge.port"``). Precedence, lowest first::

    defaults  <  TOML file  <  IRIS_<SECTION>_<KEY>  <  overrides

Values are checked in one place: the ``__post_init__`` of the frozen value
types, driven by a *kind* stored in each field's metadata. So a configuration
built in code (``CoreConfig(data_dir=...)``, ``IrisConfig.for_dev(...)``,
``dataclasses.replace(...)``) is checked exactly like one read from a file.
Text from the environment (and text overrides) is first converted to the
key's type (``"8085"`` -> 8085, ``"yes"`` -> True, ``"a:1,b:2"`` -> a tuple);
values read from TOML must already have the right TOML type.

Rules every error follows: a :class:`ConfigError` whose ``key`` is the dotted
key at fault and whose message names the key, the value (secrets are never
echoed, only their length) and why, plus where the value came from (file,
environment variable, override). Unknown keys are errors too, with a
"did you mean" from :mod:`difflib`, because a misspelt key silently ignored
is a setting the operator believes is in force.

What this module does not do: start anything, open sockets, or decide what
a *production* start needs; that is :func:`check_production`, which the
servers call with their role. It reads files only to load the TOML, to check
that TLS files exist (:func:`check_production`) and to check a secret-holding
file's permissions (:func:`secret_file_warnings`).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import math
import os
import re
import shlex
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Final, Literal

from ._exceptions import ConfigError

__all__ = [
    "EXIT_CONFIG",
    "MIN_SECRET_BYTES",
    "ClusterConfig",
    "ConsistencyMode",
    "CoreConfig",
    "EdgeConfig",
    "IrisConfig",
    "check_production",
    "format_address",
    "load_config",
    "parse_address",
    "parse_size",
    "secret_file_warnings",
]

#: Process exit code for a configuration that cannot be used (the CLI's job).
EXIT_CONFIG: Final = 2
#: Minimum length, in UTF-8 bytes, of ``cluster.secret`` and ``edge.jwt_secret``.
MIN_SECRET_BYTES: Final = 32

_ENV_PREFIX: Final = "IRIS_"
_MIB: Final = 1024 * 1024
_FALLBACK_STATE_BYTES: Final = 1024 * _MIB


class ConsistencyMode(enum.Enum):
    """When a write is acknowledged, and what the minority side of a partition does."""

    #: Acknowledged once committed by a Raft majority; linearizable reads; the
    #: minority side fails reads and writes fast with ``unavailable``.
    CP = "cp"
    #: Acknowledged once fsynced to the accepting core's WAL while the partition
    #: guard sees a quorum; reads are local and may be stale.
    HARDENED_AP = "hardened_ap"


# --------------------------------------------------------------------------
# Field kinds: how a value is converted from text and how it is checked.


class _Kind(enum.Enum):
    TEXT = "text"  # non-empty string
    PATH = "path"  # non-empty string or os.PathLike, stored as str
    OPT_PATH = "optional path"  # PATH, or None ("" means None)
    FILE_OR_EMPTY = "file path or empty"  # PATH, or "" for unset (None means "")
    SECRET = "secret"  # None ("" means None) or >= MIN_SECRET_BYTES bytes; never echoed
    BOOL = "boolean"
    INT = "integer"
    OPT_INT = "optional integer"
    FLOAT = "number"
    SIZE = "size"  # bytes: int or text such as "64MiB"
    PORT = "port"  # 0..65535, 0 = any free port
    OPT_PORT = "optional port"
    HOST = "host"  # host name or IP address, no port
    ADDRESS = "address"  # "host:port"
    OPT_ADDRESS = "optional address"
    ADDRESS_LIST = "address list"
    NAME_LIST = "name list"
    MODE = "consistency mode"
    ADDRESS_MAP = "address map"  # {"host:port" = "host:port"}, stored as sorted pairs


_TEXT_KINDS: Final = frozenset(
    {
        _Kind.TEXT,
        _Kind.PATH,
        _Kind.OPT_PATH,
        _Kind.FILE_OR_EMPTY,
        _Kind.SECRET,
        _Kind.HOST,
        _Kind.ADDRESS,
        _Kind.OPT_ADDRESS,
        _Kind.MODE,
        _Kind.SIZE,
    }
)


@dataclass(frozen=True, slots=True)
class _Spec:
    kind: _Kind
    #: Inclusive lower bound (exclusive when ``lo_open``) for numbers and sizes.
    lo: float | None = None
    lo_open: bool = False


def _spec(kind: _Kind, lo: float | None = None, *, lo_open: bool = False) -> dict[str, _Spec]:
    return {"iris": _Spec(kind, lo, lo_open)}


def _default_max_state_bytes() -> int:
    """Half of the physical RAM (``os.sysconf``), or 1 GiB where that is unknown."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return _FALLBACK_STATE_BYTES
    if pages <= 0 or page_size <= 0:
        return _FALLBACK_STATE_BYTES
    return pages * page_size // 2


# --------------------------------------------------------------------------
# Messages.


def _type_name(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _show(value: object, *, secret: bool = False) -> str:
    if secret:
        if isinstance(value, str):
            return f"<redacted, {len(value.encode())} bytes>"
        return "<redacted>"
    if value is None:
        return "(unset)"
    if isinstance(value, ConsistencyMode):
        return repr(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        value = list(value)
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _bad(key: str | None, value: object, why: str, *, secret: bool = False) -> ConfigError:
    if key is None:
        return ConfigError(f"{_show(value, secret=secret)}: {why}")
    return ConfigError(f"{key} = {_show(value, secret=secret)}: {why}", key=key)


# --------------------------------------------------------------------------
# Addresses and sizes.

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_PORT_TEXT = re.compile(r"[0-9]{1,5}\Z")


def _host_problem(host: str) -> str | None:
    """Why ``host`` (no brackets, no port) is not a host name or IP address, or None."""
    if not host:
        return "the host is empty"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} is not a valid IPv6 address"
        return None
    if len(host) > 253:
        return "the host name is longer than 253 characters"
    labels = host.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return f"{host!r} is not a valid host name or IP address"
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host!r} is not a valid IPv4 address"
    return None


def parse_address(text: str, *, key: str | None = None) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6addr]:port"``) into ``(host, port)``.

    The host is a host name, an IPv4 address, or an IPv6 address in brackets
    (returned without the brackets); the port is 1..65535. Nothing is
    resolved. Raises :class:`ConfigError` (with ``key`` when given) for
    anything else; the caller fixes the configuration.
    """
    if not isinstance(text, str):
        raise _bad(key, text, f"must be text 'host:port', got {_type_name(text)}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise _bad(key, text, "must be '[IPv6 address]:port', e.g. '[::1]:7001'")
        host, port_text = text[1:end], text[end + 2 :]
        if ":" not in host:
            raise _bad(key, text, "brackets are only for IPv6 addresses")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise _bad(key, text, "must be 'host:port', e.g. '127.0.0.1:7001'")
        if ":" in host:
            raise _bad(key, text, "an IPv6 address must be in brackets, e.g. '[::1]:7001'")
    problem = _host_problem(host)
    if problem is not None:
        raise _bad(key, text, problem)
    if not _PORT_TEXT.match(port_text) or not 1 <= int(port_text) <= 65535:
        raise _bad(key, text, f"the port {port_text!r} must be a number from 1 to 65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address`: ``"host:port"``, IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address_identity(text: str) -> tuple[str, int]:
    host, port = parse_address(text)
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        host = host.lower()
    return host, port


_SIZE_TEXT = re.compile(r"\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*([A-Za-z]{0,3})\s*\Z")
_SIZE_UNITS: Final[dict[str, int]] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_size(value: str | int, *, key: str | None = None) -> int:
    """A size in bytes from an integer or a text such as ``"512MiB"``, ``"2GiB"``, ``"1GB"``.

    Units (case-insensitive): B, kB, KiB, MB, MiB, GB, GiB, TB, TiB; KB/MB/GB/TB
    are powers of 1000, KiB/MiB/GiB/TiB powers of 1024; no unit means bytes.
    A decimal number is accepted when it makes whole bytes (``"1.5GiB"``).
    Raises :class:`ConfigError` (with ``key`` when given) for negative numbers,
    fractions of a byte, unknown units and any other type.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _bad(key, value, f"must be a size such as 65536 or '64MiB', got {_type_name(value)}")
    if isinstance(value, int):
        if value < 0:
            raise _bad(key, value, "a size cannot be negative")
        return value
    match = _SIZE_TEXT.match(value)
    if match is None:
        raise _bad(key, value, "must be a size such as 65536, '512MiB', '2GiB' or '1GB'")
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        units = ", ".join(u for u in ("B", "kB", "KiB", "MB", "MiB", "GB", "GiB", "TB", "TiB"))
        raise _bad(key, value, f"unknown unit {unit!r}; use one of {units}")
    try:
        size = Decimal(number) * multiplier
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise _bad(key, value, "is not a number") from None
    if size != size.to_integral_value():
        raise _bad(key, value, "is not a whole number of bytes")
    return int(size)


# --------------------------------------------------------------------------
# Checking one value against its kind.


def _check_range(key: str, value: float, spec: _Spec, shown: object) -> None:
    if spec.lo is not None:
        if spec.lo_open and value <= spec.lo:
            raise _bad(key, shown, f"must be greater than {_num(spec.lo)}")
        if not spec.lo_open and value < spec.lo:
            raise _bad(key, shown, f"must be at least {_num(spec.lo)}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_int(key: str, value: object, spec: _Spec) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, value, f"must be an integer, got {_type_name(value)}")
    _check_range(key, value, spec, value)
    return value


def _check_port(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, value, f"must be a port number (integer), got {_type_name(value)}")
    if not 0 <= value <= 65535:
        raise _bad(key, value, "must be a port number from 0 to 65535 (0 = any free port)")
    return value


def _check_path(key: str, value: object) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise _bad(key, value, f"must be a path (text), got {_type_name(value)}")
    if not value.strip():
        raise _bad(key, value, "must not be empty")
    return value


def _check_list(key: str, value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise _bad(key, value, f"must be a list of {what}, got {_type_name(value)}")
    for item in value:
        if not isinstance(item, str):
            raise _bad(key, value, f"must be a list of {what}; {item!r} is {_type_name(item)}")
    return tuple(value)


def _normalize(key: str, spec: _Spec, value: object) -> Any:
    """Check ``value`` for ``key`` and return it in its canonical type."""
    kind = spec.kind
    if kind is _Kind.TEXT:
        if not isinstance(value, str):
            raise _bad(key, value, f"must be text, got {_type_name(value)}")
        if not value.strip():
            raise _bad(key, value, "must not be empty")
        return value
    if kind is _Kind.PATH:
        return _check_path(key, value)
    if kind is _Kind.OPT_PATH:
        return None if value is None or value == "" else _check_path(key, value)
    if kind is _Kind.FILE_OR_EMPTY:
        return "" if value is None or value == "" else _check_path(key, value)
    if kind is _Kind.SECRET:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise _bad(key, value, f"must be text, got {_type_name(value)}", secret=True)
        if len(value.encode()) < MIN_SECRET_BYTES:
            raise _bad(
                key,
                value,
                f"must be at least {MIN_SECRET_BYTES} bytes (generate one with: "
                "python -c 'import secrets; print(secrets.token_urlsafe(48))')",
                secret=True,
            )
        return value
    if kind is _Kind.BOOL:
        if not isinstance(value, bool):
            raise _bad(key, value, f"must be true or false, got {_type_name(value)}")
        return value
    if kind is _Kind.INT:
        return _check_int(key, value, spec)
    if kind is _Kind.OPT_INT:
        return None if value is None else _check_int(key, value, spec)
    if kind is _Kind.FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(key, value, f"must be a number, got {_type_name(value)}")
        number = float(value)
        if not math.isfinite(number):
            raise _bad(key, value, "must be a finite number")
        _check_range(key, number, spec, value)
        return number
    if kind is _Kind.SIZE:
        size = parse_size(value, key=key)  # type: ignore[arg-type]
        _check_range(key, size, spec, value)
        return size
    if kind is _Kind.PORT:
        return _check_port(key, value)
    if kind is _Kind.OPT_PORT:
        return None if value is None else _check_port(key, value)
    if kind is _Kind.HOST:
        if not isinstance(value, str):
            raise _bad(key, value, f"must be a host name or IP address, got {_type_name(value)}")
        problem = _host_problem(value)
        if problem is not None:
            raise _bad(key, value, problem)
        return value
    if kind is _Kind.ADDRESS:
        parse_address(value, key=key)  # type: ignore[arg-type]
        return value
    if kind is _Kind.OPT_ADDRESS:
        if value is None or value == "":
            return None
        parse_address(value, key=key)  # type: ignore[arg-type]
        return value
    if kind is _Kind.ADDRESS_LIST:
        items = _check_list(key, value, "'host:port' addresses")
        seen: dict[tuple[str, int], str] = {}
        for item in items:
            parse_address(item, key=key)
            identity = _address_identity(item)
            if identity in seen:
                raise _bad(key, items, f"lists {item!r} twice")
            seen[identity] = item
        return items
    if kind is _Kind.NAME_LIST:
        items = _check_list(key, value, "names")
        for item in items:
            if not item.strip():
                raise _bad(key, items, "holds an empty name")
        duplicates = sorted({item for item in items if items.count(item) > 1})
        if duplicates:
            raise _bad(key, items, f"lists {duplicates[0]!r} twice")
        return items
    if kind is _Kind.MODE:
        if isinstance(value, ConsistencyMode):
            return value
        choices = " or ".join(repr(m.value) for m in ConsistencyMode)
        if not isinstance(value, str):
            raise _bad(key, value, f"must be {choices}, got {_type_name(value)}")
        try:
            return ConsistencyMode(value.strip().lower())
        except ValueError:
            pass
        if value.strip().lower() == "ap":
            raise _bad(key, value, f"plain 'ap' (no partition guard) is not offered; use {choices}")
        raise _bad(key, value, f"must be {choices}") from None
    if kind is _Kind.ADDRESS_MAP:
        if isinstance(value, tuple | list):
            try:
                value = dict(value)
            except (TypeError, ValueError):
                raise _bad(key, value, "must be a table of 'host:port' = 'host:port'") from None
        if not isinstance(value, dict):
            raise _bad(
                key, value, f"must be a table of 'host:port' = 'host:port', got {_type_name(value)}"
            )
        pairs = []
        for peer, target in value.items():
            if not isinstance(peer, str) or not isinstance(target, str):
                raise _bad(key, value, "keys and values must be 'host:port' text")
            parse_address(peer, key=key)
            parse_address(target, key=key)
            pairs.append((peer, target))
        return tuple(sorted(pairs))
    raise AssertionError(f"unhandled kind {kind}")  # pragma: no cover


def _validate_fields(obj: object, section: str) -> None:
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        spec = f.metadata.get("iris")
        if spec is None:
            continue
        value = getattr(obj, f.name)
        normal = _normalize(f"{section}.{f.name}", spec, value)
        if normal is not value:
            object.__setattr__(obj, f.name, normal)


def _tls_pair(section: str, cert: str, key: str) -> None:
    if bool(cert) != bool(key):
        missing, given = ("tls_key", "tls_cert") if not key else ("tls_cert", "tls_key")
        raise _bad(
            f"{section}.{missing}",
            "",
            f"must be set when {section}.{given} is set: TLS needs both files "
            "(or neither, for no TLS)",
        )


# --------------------------------------------------------------------------
# The value types.


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Settings every core (and edge) of one cluster must agree on: the ``[cluster]`` table."""

    _SECTION: ClassVar[str] = "cluster"

    #: Shared secret (>= 32 bytes): authenticates and encrypts core<->core and
    #: edge<->core traffic. None = unset (refused by :func:`check_production`).
    secret: str | None = field(default=None, repr=False, metadata=_spec(_Kind.SECRET))
    #: Raft addresses ``"host:port"`` of every core; the partition guard's quorum.
    expected_cluster_nodes: tuple[str, ...] = field(default=(), metadata=_spec(_Kind.ADDRESS_LIST))
    consistency_mode: ConsistencyMode = field(
        default=ConsistencyMode.HARDENED_AP, metadata=_spec(_Kind.MODE)
    )
    #: 1..len(expected_cluster_nodes) when those are given.
    replication_factor: int = field(default=3, metadata=_spec(_Kind.INT, 1))
    region_id: str = field(default="local", metadata=_spec(_Kind.TEXT))
    #: Every region of the deployment; must contain ``region_id`` when non-empty.
    regions: tuple[str, ...] = field(default=(), metadata=_spec(_Kind.NAME_LIST))
    #: Seconds an operation id is remembered, so a retry is applied once.
    dedup_window: float = field(default=86400.0, metadata=_spec(_Kind.FLOAT, 0, lo_open=True))
    #: Seconds a stored message lives before it expires.
    message_ttl: float = field(default=7 * 86400.0, metadata=_spec(_Kind.FLOAT, 0, lo_open=True))
    max_inbox_messages: int = field(default=10_000, metadata=_spec(_Kind.INT, 1))
    max_inbox_bytes: int = field(default=64 * _MIB, metadata=_spec(_Kind.SIZE, 1))
    #: Memory budget of the replicated state; writes are refused above it.
    max_state_bytes: int = field(
        default_factory=_default_max_state_bytes, metadata=_spec(_Kind.SIZE, 1)
    )
    #: Seconds: our own timeout on every replicated call.
    request_timeout: float = field(default=5.0, metadata=_spec(_Kind.FLOAT, 0, lo_open=True))

    def __post_init__(self) -> None:
        _validate_fields(self, self._SECTION)
        nodes = len(self.expected_cluster_nodes)
        if nodes and self.replication_factor > nodes:
            raise _bad(
                "cluster.replication_factor",
                self.replication_factor,
                f"must be between 1 and {nodes}, the number of cluster.expected_cluster_nodes",
            )
        if self.regions and self.region_id not in self.regions:
            raise _bad(
                "cluster.region_id",
                self.region_id,
                f"is not one of cluster.regions {list(self.regions)!r}",
            )


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """Settings of one core node: the ``[core]`` table."""

    _SECTION: ClassVar[str] = "core"

    #: This node's Raft address; one of ``cluster.expected_cluster_nodes``.
    node: str | None = field(default=None, metadata=_spec(_Kind.OPT_ADDRESS))
    #: Where edges and tools reach this core.
    rpc: str = field(default="127.0.0.1:7101", metadata=_spec(_Kind.ADDRESS))
    data_dir: str = field(default="./iris-data", metadata=_spec(_Kind.PATH))
    #: None = ``<data_dir>/wal``; see :attr:`wal_path`.
    wal_directory: str | None = field(default=None, metadata=_spec(_Kind.OPT_PATH))
    #: Delete a corrupt journal/WAL/snapshot instead of stopping (data loss).
    allow_table_nuke: bool = field(default=False, metadata=_spec(_Kind.BOOL))
    #: Prometheus metrics and health over HTTP; None = off, 0 = any free port.
    metrics_port: int | None = field(default=None, metadata=_spec(_Kind.OPT_PORT))
    #: TLS certificate file; "" = no TLS. Both ``tls_cert`` and ``tls_key``, or neither.
    tls_cert: str = field(default="", metadata=_spec(_Kind.FILE_OR_EMPTY))
    tls_key: str = field(default="", metadata=_spec(_Kind.FILE_OR_EMPTY))
    election_timeout_min: float = field(default=0.15, metadata=_spec(_Kind.FLOAT, 0, lo_open=True))
    election_timeout_max: float = field(default=0.3, metadata=_spec(_Kind.FLOAT, 0, lo_open=True))
    heartbeat_interval: float = field(default=0.03, metadata=_spec(_Kind.FLOAT, 0, lo_open=True))
    #: Operations per replicated call (group commit).
    max_batch_ops: int = field(default=2000, metadata=_spec(_Kind.INT, 1))
    #: Operations accepted but not yet committed; beyond it ``overloaded``.
    max_inflight_ops: int = field(default=50_000, metadata=_spec(_Kind.INT, 1))
    #: Peer Raft address -> address to dial instead (NAT mapping, fault-injection proxy).
    raft_dial: tuple[tuple[str, str], ...] = field(default=(), metadata=_spec(_Kind.ADDRESS_MAP))

    def __post_init__(self) -> None:
        _validate_fields(self, self._SECTION)
        if self.election_timeout_max <= self.election_timeout_min:
            raise _bad(
                "core.election_timeout_max",
                self.election_timeout_max,
                f"must be greater than core.election_timeout_min ({self.election_timeout_min})",
            )
        if self.heartbeat_interval * 3 >= self.election_timeout_min:
            raise _bad(
                "core.heartbeat_interval",
                self.heartbeat_interval,
                "must be less than a third of core.election_timeout_min "
                f"({self.election_timeout_min}): followers need several heartbeats per timeout",
            )
        if self.max_inflight_ops < self.max_batch_ops:
            raise _bad(
                "core.max_inflight_ops",
                self.max_inflight_ops,
                f"must be at least core.max_batch_ops ({self.max_batch_ops})",
            )
        if self.node is not None and _address_identity(self.node) == _address_identity(self.rpc):
            raise _bad("core.rpc", self.rpc, "must differ from core.node (the Raft address)")
        _tls_pair(self._SECTION, self.tls_cert, self.tls_key)

    @property
    def wal_path(self) -> str:
        """The WAL directory in force: ``wal_directory``, or ``<data_dir>/wal``."""
        if self.wal_directory is not None:
            return self.wal_directory
        return os.path.join(self.data_dir, "wal")


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    """Settings of one edge server: the ``[edge]`` table."""

    _SECTION: ClassVar[str] = "edge"

    host: str = field(default="0.0.0.0", metadata=_spec(_Kind.HOST))
    #: WebSocket port; 0 = any free port.
    port: int = field(default=8085, metadata=_spec(_Kind.PORT))
    #: Core rpc addresses: a seed, the current membership is learnt from the cores.
    cores: tuple[str, ...] = field(default=(), metadata=_spec(_Kind.ADDRESS_LIST))
    #: HS256 secret (>= 32 bytes), identical on every edge.
    jwt_secret: str | None = field(default=None, repr=False, metadata=_spec(_Kind.SECRET))
    auth_enabled: bool = field(default=True, metadata=_spec(_Kind.BOOL))
    #: Dev only: make up a random JWT secret when none is configured.
    allow_random_secret: bool = field(default=False, metadata=_spec(_Kind.BOOL))
    #: Seconds of clock skew allowed on ``exp``/``nbf``.
    jwt_leeway: float = field(default=30.0, metadata=_spec(_Kind.FLOAT, 0))
    #: None = auto-tuned.
    router_pool_size: int | None = field(default=None, metadata=_spec(_Kind.OPT_INT, 1))
    #: Prometheus metrics and health over HTTP; None = off, 0 = any free port.
    metrics_port: int | None = field(default=None, metadata=_spec(_Kind.OPT_PORT))
    #: TLS certificate file (clients use wss://); "" = no TLS. Both or neither.
    tls_cert: str = field(default="", metadata=_spec(_Kind.FILE_OR_EMPTY))
    tls_key: str = field(default="", metadata=_spec(_Kind.FILE_OR_EMPTY))
    max_frame_bytes: int = field(default=65536, metadata=_spec(_Kind.SIZE, 256))
    max_queue_per_connection: int = field(default=1000, metadata=_spec(_Kind.INT, 1))
    rate_limit_per_second: float = field(
        default=100.0, metadata=_spec(_Kind.FLOAT, 0, lo_open=True)
    )
    rate_limit_burst: int = field(default=200, metadata=_spec(_Kind.INT, 1))
    #: None = auto-tuned from the open-files limit.
    max_connections: int | None = field(default=None, metadata=_spec(_Kind.OPT_INT, 1))

    def __post_init__(self) -> None:
        _validate_fields(self, self._SECTION)
        if self.metrics_port and self.metrics_port == self.port:
            raise _bad("edge.metrics_port", self.metrics_port, "must differ from edge.port")
        _tls_pair(self._SECTION, self.tls_cert, self.tls_key)


@dataclass(frozen=True, slots=True)
class IrisConfig:
    """A whole configuration: the three tables and the file it came from (``source``)."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    core: CoreConfig = field(default_factory=CoreConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    #: Path of the TOML file read by :func:`load_config`, None when built in code.
    source: str | None = None

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be a {cls.__name__}", key=name)
        if isinstance(self.source, os.PathLike):
            object.__setattr__(self, "source", os.fspath(self.source))
        expected = {_address_identity(n) for n in self.cluster.expected_cluster_nodes}
        if expected:
            node = self.core.node
            if node is not None and _address_identity(node) not in expected:
                raise _bad(
                    "core.node",
                    node,
                    "is not one of cluster.expected_cluster_nodes "
                    f"{list(self.cluster.expected_cluster_nodes)!r}",
                )
            if _address_identity(self.core.rpc) in expected:
                raise _bad(
                    "core.rpc",
                    self.core.rpc,
                    "is a Raft address (listed in cluster.expected_cluster_nodes); "
                    "core.rpc must be a different port",
                )
            for core in self.edge.cores:
                if _address_identity(core) in expected:
                    raise _bad(
                        "edge.cores",
                        self.edge.cores,
                        f"{core!r} is a Raft address (listed in cluster.expected_cluster_nodes); "
                        "edges connect to the cores' rpc addresses (core.rpc)",
                    )

    @classmethod
    def for_dev(
        cls,
        data_dir: str | os.PathLike[str],
        *,
        raft_port: int = 7001,
        rpc_port: int = 7101,
        edge_port: int = 8085,
        jwt_secret: str | None = None,
    ) -> IrisConfig:
        """A single-node development configuration, everything on 127.0.0.1.

        ``expected_cluster_nodes = (node,)`` with ``node = "127.0.0.1:<raft_port>"``,
        ``replication_factor = 1``, no cluster secret, the edge on
        ``127.0.0.1:<edge_port>`` talking to the core at ``127.0.0.1:<rpc_port>``.
        Pass it to :func:`check_production` with ``dev=True``. Raises
        :class:`ConfigError` for bad ports or a short ``jwt_secret``.
        """
        node = format_address("127.0.0.1", raft_port)
        rpc = format_address("127.0.0.1", rpc_port)
        return cls(
            cluster=ClusterConfig(expected_cluster_nodes=(node,), replication_factor=1),
            core=CoreConfig(node=node, rpc=rpc, data_dir=os.fspath(data_dir)),
            edge=EdgeConfig(host="127.0.0.1", port=edge_port, cores=(rpc,), jwt_secret=jwt_secret),
        )


_SECTIONS: Final[dict[str, type[ClusterConfig] | type[CoreConfig] | type[EdgeConfig]]] = {
    "cluster": ClusterConfig,
    "core": CoreConfig,
    "edge": EdgeConfig,
}

_SPECS: Final[dict[str, dict[str, _Spec]]] = {
    section: {f.name: f.metadata["iris"] for f in dataclasses.fields(cls)}
    for section, cls in _SECTIONS.items()
}


# --------------------------------------------------------------------------
# Loading.


def _suggestion(section: str | None, name: str) -> str | None:
    """The dotted key ``section.name`` was probably meant as, or None."""
    if section in _SPECS:
        close = difflib.get_close_matches(name, list(_SPECS[section]), n=1, cutoff=0.6)
        if close:
            return f"{section}.{close[0]}"
    for other, keys in _SPECS.items():
        if other != section and name in keys:
            return f"{other}.{name}"
    every = [f"{s}.{k}" for s, keys in _SPECS.items() for k in keys]
    close = difflib.get_close_matches(name, [k.split(".", 1)[1] for k in every], n=1, cutoff=0.8)
    if close:
        return next(k for k in every if k.endswith("." + close[0]))
    return None


def _unknown_key(dotted: str, where: str, *, env_name: str | None = None) -> ConfigError:
    section, _, name = dotted.partition(".")
    if not name:
        section, name = "", dotted
    guess = _suggestion(section or None, name)
    if env_name is not None:
        hint = f"; did you mean {_env_name(guess)}?" if guess else ""
        return ConfigError(
            f"unknown environment variable {env_name} (key {dotted}){hint}", key=dotted
        )
    hint = f"; did you mean {guess}?" if guess else ""
    return ConfigError(f"unknown key {dotted} {where}{hint}", key=dotted)


def _env_name(dotted: str) -> str:
    return _ENV_PREFIX + dotted.replace(".", "_").upper()


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fp:
            raw = fp.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", path=path) from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory", path=path) from None
    except PermissionError:
        raise ConfigError(f"cannot read config file {path}: permission denied", path=path) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror or exc}", path=path
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}, line {line}: the file is not UTF-8 text", path=path, line=line
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        reason, line, column = _toml_error_position(exc, text)
        where = f"line {line}" if column is None else f"line {line}, column {column}"
        raise ConfigError(
            f"{path}, {where}: invalid TOML: {reason}", path=path, line=line, column=column
        ) from None


def _toml_error_position(exc: tomllib.TOMLDecodeError, text: str) -> tuple[str, int, int | None]:
    message = str(exc)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", message)
    if match:
        return message[: match.start()], int(match.group(1)), int(match.group(2))
    match = re.search(r"\s*\(at end of document\)\s*$", message)
    if match:
        return message[: match.start()], text.rstrip("\n").count("\n") + 1, None
    lineno = getattr(exc, "lineno", None)
    return message, lineno if isinstance(lineno, int) else 1, None


def _from_text(key: str, spec: _Spec, text: str) -> Any:
    """Convert an environment variable's (or a text override's) value to the key's type."""
    kind = spec.kind
    if kind in _TEXT_KINDS:
        return text
    stripped = text.strip()
    if kind is _Kind.BOOL:
        truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if stripped.lower() not in truth:
            raise _bad(key, text, "must be true or false (or 1/0, yes/no)")
        return truth[stripped.lower()]
    if kind in (_Kind.OPT_INT, _Kind.OPT_PORT) and stripped.lower() in ("", "none", "off"):
        return None
    if kind in (_Kind.INT, _Kind.OPT_INT, _Kind.PORT, _Kind.OPT_PORT):
        if not re.fullmatch(r"[+-]?[0-9]{1,30}", stripped):
            raise _bad(key, text, "must be an integer")
        return int(stripped)
    if kind is _Kind.FLOAT:
        try:
            return float(stripped)
        except ValueError:
            raise _bad(key, text, "must be a number") from None
    if kind is _Kind.ADDRESS_MAP:
        if stripped.startswith("{"):
            try:
                return tomllib.loads(f"v = {stripped}")["v"]
            except tomllib.TOMLDecodeError:
                raise _bad(key, text, "must be a TOML inline table or peer=target,...") from None
        out: dict[str, str] = {}
        for item in filter(None, (x.strip() for x in stripped.split(","))):
            peer, sep, target = item.partition("=")
            if not sep:
                raise _bad(key, text, "must be peer=target pairs separated by commas")
            out[peer.strip()] = target.strip()
        return out
    if kind in (_Kind.ADDRESS_LIST, _Kind.NAME_LIST):
        if stripped.startswith("[") and stripped.endswith("]"):
            try:
                return tomllib.loads(f"v = {stripped}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise _bad(key, text, f"is not a valid TOML array: {exc}") from None
        return [part.strip() for part in stripped.split(",") if part.strip()]
    raise AssertionError(f"unhandled kind {kind}")  # pragma: no cover


def load_config(
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> IrisConfig:
    """Read, merge and check a configuration.

    Precedence, lowest first: defaults, the TOML file at ``path`` (None = no
    file), environment variables ``IRIS_<SECTION>_<KEY>`` from ``env``
    (None = ``os.environ``), then ``overrides`` (dotted keys such as
    ``"edge.port"``; a None value means "not given" and is skipped; a text
    value is converted like an environment variable).

    Environment variables whose names start with ``IRIS_CLUSTER_``,
    ``IRIS_CORE_`` or ``IRIS_EDGE_`` must name a known key; other ``IRIS_*``
    variables are ignored.

    Raises :class:`ConfigError` (``key`` = the dotted key at fault, or None for
    a file that cannot be read or parsed) for a missing/unreadable file, a
    TOML syntax error (the message names the file and line), an unknown
    section or key, and any value of the wrong type or out of range. The
    caller reports the message and exits with :data:`EXIT_CONFIG`.
    """
    source = None if path is None else os.fspath(path)
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}

    if source is not None:
        for section, table in _read_toml(source).items():
            if section not in _SPECS:
                if isinstance(table, dict):
                    close = difflib.get_close_matches(section, list(_SPECS), n=1, cutoff=0.6)
                    hint = f"; did you mean [{close[0]}]?" if close else ""
                    raise ConfigError(
                        f"unknown section [{section}] in {source}{hint} "
                        "(the sections are [cluster], [core] and [edge])",
                        key=section,
                    )
                raise _unknown_key(section, f"at the top of {source} (outside any [section])")
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{section} in {source} must be a table [{section}], got {_type_name(table)}",
                    key=section,
                )
            for name, value in table.items():
                dotted = f"{section}.{name}"
                if name not in _SPECS[section]:
                    raise _unknown_key(dotted, f"in {source}")
                merged[dotted] = value
                origins[dotted] = f"set in {source}"

    environ = os.environ if env is None else env
    for var, text in environ.items():
        for section in _SPECS:
            prefix = f"{_ENV_PREFIX}{section.upper()}_"
            if not var.startswith(prefix):
                continue
            name = var[len(prefix) :].lower()
            dotted = f"{section}.{name}"
            if name not in _SPECS[section]:
                raise _unknown_key(dotted, "", env_name=var)
            origin = f"set by environment variable {var}"
            try:
                merged[dotted] = _from_text(dotted, _SPECS[section][name], text)
            except ConfigError as exc:
                raise _with_origin(exc, origin) from None
            origins[dotted] = origin

    for dotted, value in (overrides or {}).items():
        section, _, name = dotted.partition(".")
        if section not in _SPECS or name not in _SPECS[section]:
            raise _unknown_key(dotted, "in overrides")
        if value is None:
            continue
        origin = f"set by override {dotted}"
        try:
            spec = _SPECS[section][name]
            merged[dotted] = _from_text(dotted, spec, value) if isinstance(value, str) else value
        except ConfigError as exc:
            raise _with_origin(exc, origin) from None
        origins[dotted] = origin

    tables: dict[str, dict[str, Any]] = {section: {} for section in _SPECS}
    for dotted, value in merged.items():
        section, _, name = dotted.partition(".")
        tables[section][name] = value
    try:
        return IrisConfig(
            cluster=ClusterConfig(**tables["cluster"]),
            core=CoreConfig(**tables["core"]),
            edge=EdgeConfig(**tables["edge"]),
            source=source,
        )
    except ConfigError as exc:
        set_by = origins.get(exc.key or "")
        if set_by is None:
            raise
        raise _with_origin(exc, set_by) from None


def _with_origin(exc: ConfigError, origin: str) -> ConfigError:
    data = {k: v for k, v in exc.data.items() if k != "key"}
    return ConfigError(f"{exc.message} ({origin})", key=exc.key, **data)


# --------------------------------------------------------------------------
# Production checks.

_DEV_ONLY_BANNER: Final = "!!! DEV ONLY !!!"


def check_production(
    config: IrisConfig, role: Literal["core", "edge"], *, dev: bool = False
) -> list[str]:
    """Check ``config`` before starting a ``role`` server; return warnings to print.

    Raises :class:`ConfigError` for what must stop the start (the caller
    prints it and exits with :data:`EXIT_CONFIG`):

    * core: no ``cluster.secret`` (unless ``dev``); no
      ``cluster.expected_cluster_nodes`` (unless ``dev``); ``core.node`` unset
      while ``expected_cluster_nodes`` is set (always).
    * edge: no ``edge.jwt_secret`` unless ``allow_random_secret`` or ``dev``;
      no ``cluster.secret`` or no ``edge.cores`` (unless ``dev``).
    * either: the role's ``tls_cert``/``tls_key`` name files that do not exist
      or cannot be read (always).

    Warnings (never fatal): ``allow_table_nuke = true``, an even or single
    node count, a WAL under ``/tmp``, ``/dev/shm`` or ``/run`` (core);
    ``allow_random_secret`` (loud, dev only), ``auth_enabled = false``, no TLS
    (edge); no secret on a non-loopback Raft address in dev mode (core).
    Does not include :func:`secret_file_warnings`; call that too.
    """
    if role == "core":
        return _check_core(config, dev)
    if role == "edge":
        return _check_edge(config, dev)
    raise ValueError(f"role must be 'core' or 'edge', not {role!r}")


def _check_core(config: IrisConfig, dev: bool) -> list[str]:
    cluster, core = config.cluster, config.core
    warnings: list[str] = []
    if cluster.secret is None and not dev:
        raise ConfigError(
            "cluster.secret is not set: a core refuses to start without it. It authenticates "
            "and encrypts core<->core and edge<->core traffic; without it anyone who reaches "
            "the Raft port can inject commands (PySyncObj runs what it receives). Set "
            f">= {MIN_SECRET_BYTES} bytes, the same on every node, e.g. from "
            "python -c 'import secrets; print(secrets.token_urlsafe(48))'",
            key="cluster.secret",
        )
    if not cluster.expected_cluster_nodes and not dev:
        raise ConfigError(
            "cluster.expected_cluster_nodes is not set: a core refuses to start without it. "
            "The partition guard needs the Raft address of every core to know when this "
            "side of a network partition has lost its quorum and must block writes",
            key="cluster.expected_cluster_nodes",
        )
    if cluster.expected_cluster_nodes and core.node is None:
        raise ConfigError(
            "core.node is not set: this core must know which of "
            f"cluster.expected_cluster_nodes {list(cluster.expected_cluster_nodes)!r} it is; "
            "set it per node, e.g. with the environment variable IRIS_CORE_NODE",
            key="core.node",
        )
    _check_tls_files("core", core.tls_cert, core.tls_key)

    if core.allow_table_nuke:
        warnings.append(
            "core.allow_table_nuke = true: a corrupt journal, WAL or snapshot will be DELETED "
            "(data loss) instead of stopping the node. NEVER enable in production without an "
            "operator; set it back to false once the recovery is done"
        )
    count = len(cluster.expected_cluster_nodes)
    if not dev and count == 1:
        warnings.append(
            "cluster.expected_cluster_nodes lists a single core: no fault tolerance, losing "
            "it stops the cluster; production clusters have 3 or 5 cores"
        )
    elif not dev and count and count % 2 == 0:
        warnings.append(
            f"cluster.expected_cluster_nodes lists {count} cores: an even count survives no "
            f"more failures than {count - 1} would; use an odd count (3 or 5)"
        )
    wal = os.path.abspath(core.wal_path)
    volatile = next(
        (p for p in ("/tmp", "/dev/shm", "/run") if wal == p or wal.startswith(p + "/")), None
    )
    if volatile is not None and not dev:
        warnings.append(
            f"core.wal_directory {wal!r} is under {volatile}, which is often tmpfs (RAM): "
            "acknowledged writes would not survive a reboot; put the WAL on persistent disk"
        )
    if dev and cluster.secret is None and core.node is not None:
        host, _ = parse_address(core.node)
        if not _is_loopback(host):
            warnings.append(
                f"core.node {core.node!r} is not a loopback address and cluster.secret is not "
                "set: anyone who reaches that port can inject commands; set cluster.secret"
            )
    return warnings


def _check_edge(config: IrisConfig, dev: bool) -> list[str]:
    cluster, edge = config.cluster, config.edge
    warnings: list[str] = []
    if edge.jwt_secret is None and not edge.allow_random_secret and not dev:
        raise ConfigError(
            "edge.jwt_secret is not set: an edge refuses to start without it. Tokens are "
            f"signed with it; set >= {MIN_SECRET_BYTES} bytes, identical on every edge "
            "(a secret that differs between edges makes users fail to authenticate when they "
            "reconnect to another edge)",
            key="edge.jwt_secret",
        )
    if cluster.secret is None and not dev:
        raise ConfigError(
            "cluster.secret is not set: an edge authenticates to the cores with it; set the "
            "same value as on the cores",
            key="cluster.secret",
        )
    if not edge.cores and not dev:
        raise ConfigError(
            "edge.cores is empty: an edge needs the rpc address (core.rpc) of at least one "
            "core to reach the cluster",
            key="edge.cores",
        )
    _check_tls_files("edge", edge.tls_cert, edge.tls_key)

    if edge.allow_random_secret and not dev:
        if edge.jwt_secret is None:
            warnings.append(
                f"{_DEV_ONLY_BANNER} edge.allow_random_secret = true and no edge.jwt_secret: "
                "this edge makes up a random JWT secret. Its tokens are refused by every other "
                "edge and by itself after a restart, so users fail to authenticate when they "
                "reconnect. NEVER use this in production; set edge.jwt_secret"
            )
        else:
            warnings.append(
                f"{_DEV_ONLY_BANNER} edge.allow_random_secret = true is a dev-only setting "
                "(ignored while edge.jwt_secret is set); remove it from production configs"
            )
    if not edge.auth_enabled:
        warnings.append(
            "edge.auth_enabled = false: clients connect as any user they name, without a "
            "token (testing only)"
        )
    if not edge.tls_cert and not dev:
        warnings.append(
            "edge.tls_cert and edge.tls_key are not set: clients connect over plain ws://; "
            "set both for wss://, or terminate TLS in front of the edge"
        )
    return warnings


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_tls_files(section: str, cert: str, key: str) -> None:
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        if not path:
            continue
        if not os.path.isfile(path):
            raise _bad(f"{section}.{name}", path, "no such file")
        if not os.access(path, os.R_OK):
            raise _bad(f"{section}.{name}", path, "the file is not readable by this user")


def secret_file_warnings(path: str | os.PathLike[str] | None) -> list[str]:
    """A warning when the TOML file at ``path`` holds a secret and other users can access it.

    A secret is a non-empty ``cluster.secret`` or ``edge.jwt_secret``; "other
    users" means any group or other permission bit (``mode & 0o077``). The fix
    offered is ``chmod 600`` (or ``chmod 400``, as for the Erlang cookie).
    Returns ``[]`` for None, for a file without secrets and on Windows.
    Raises :class:`ConfigError` like :func:`load_config` when the file cannot be
    read or parsed.
    """
    if path is None or os.name == "nt":
        return []
    name = os.fspath(path)
    document = _read_toml(name)
    held = [
        f"{section}.{key}"
        for section, key in (("cluster", "secret"), ("edge", "jwt_secret"))
        if isinstance(document.get(section), dict) and document[section].get(key)
    ]
    if not held:
        return []
    try:
        mode = stat.S_IMODE(os.stat(name).st_mode)
    except OSError as exc:  # pragma: no cover - the file was just read
        raise ConfigError(f"cannot stat config file {name}: {exc.strerror or exc}") from None
    if not mode & 0o077:
        return []
    quoted = shlex.quote(name)
    return [
        f"{name} holds {' and '.join(held)} and other users can access it "
        f"(mode {mode:04o}); run: chmod 600 {quoted}  (or chmod 400 {quoted} to make it "
        "read-only as well)"
    ]

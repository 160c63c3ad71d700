"""Unit tests for iris_raft._config: pure, no sockets."""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iris_raft._config import (
    EXIT_CONFIG,
    MIN_SECRET_BYTES,
    ClusterConfig,
    ConsistencyMode,
    CoreConfig,
    EdgeConfig,
    IrisConfig,
    check_production,
    format_address,
    load_config,
    parse_address,
    parse_size,
    secret_file_warnings,
)
from iris_raft._exceptions import ConfigError

SECRET = "s" * MIN_SECRET_BYTES
JWT = "j" * 40
NODES = ["10.0.0.1:7001", "10.0.0.2:7001", "10.0.0.3:7001"]
CORES = ["10.0.0.1:7101", "10.0.0.2:7101", "10.0.0.3:7101"]
MIB = 1024 * 1024


def write(tmp_path: Path, text: str, mode: int = 0o600, name: str = "iris.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    path.chmod(mode)
    return path


def load_text(tmp_path: Path, text: str, **kwargs: Any) -> IrisConfig:
    kwargs.setdefault("env", {})
    return load_config(write(tmp_path, text), **kwargs)


def production(**changes: Any) -> IrisConfig:
    """A complete production configuration for core 1; ``changes`` use dotted keys."""
    tables: dict[str, dict[str, Any]] = {
        "cluster": {"secret": SECRET, "expected_cluster_nodes": tuple(NODES)},
        "core": {
            "node": NODES[0],
            "rpc": CORES[0],
            "data_dir": "/var/lib/iris",
        },
        "edge": {"cores": tuple(CORES), "jwt_secret": JWT},
    }
    for dotted, value in changes.items():
        section, _, name = dotted.partition(".")
        tables[section][name] = value
    return IrisConfig(
        cluster=ClusterConfig(**tables["cluster"]),
        core=CoreConfig(**tables["core"]),
        edge=EdgeConfig(**tables["edge"]),
    )


# --------------------------------------------------------------------------
# Defaults


def test_exit_code_for_bad_config_is_2() -> None:
    assert EXIT_CONFIG == 2


def test_consistency_mode_values() -> None:
    assert ConsistencyMode("cp") is ConsistencyMode.CP
    assert ConsistencyMode("hardened_ap") is ConsistencyMode.HARDENED_AP


def test_cluster_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = {"SC_PHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: sizes[name])
    cluster = ClusterConfig()
    assert cluster.secret is None
    assert cluster.expected_cluster_nodes == ()
    assert cluster.consistency_mode is ConsistencyMode.HARDENED_AP
    assert cluster.replication_factor == 3
    assert cluster.region_id == "local"
    assert cluster.regions == ()
    assert cluster.dedup_window == 86400.0
    assert cluster.message_ttl == 7 * 86400.0
    assert cluster.max_inbox_messages == 10_000
    assert cluster.max_inbox_bytes == 64 * MIB
    assert cluster.max_state_bytes == 1000 * 4096 // 2
    assert cluster.request_timeout == 5.0


def test_max_state_bytes_falls_back_to_1gib_without_sysconf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_sysconf(name: str) -> int:
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", no_sysconf)
    assert ClusterConfig().max_state_bytes == 1024 * MIB


def test_core_defaults() -> None:
    core = CoreConfig()
    assert core.node is None
    assert core.rpc == "127.0.0.1:7101"
    assert core.data_dir == "./iris-data"
    assert core.wal_directory is None
    assert core.wal_path == os.path.join("./iris-data", "wal")
    assert core.allow_table_nuke is False
    assert core.metrics_port is None
    assert core.tls_cert == ""
    assert core.tls_key == ""
    assert core.election_timeout_min == 0.15
    assert core.election_timeout_max == 0.3
    assert core.heartbeat_interval == 0.03
    assert core.max_batch_ops == 2000
    assert core.max_inflight_ops == 50_000


def test_edge_defaults() -> None:
    edge = EdgeConfig()
    assert edge.host == "0.0.0.0"
    assert edge.port == 8085
    assert edge.cores == ()
    assert edge.jwt_secret is None
    assert edge.auth_enabled is True
    assert edge.allow_random_secret is False
    assert edge.jwt_leeway == 30.0
    assert edge.router_pool_size is None
    assert edge.metrics_port is None
    assert edge.tls_cert == ""
    assert edge.tls_key == ""
    assert edge.max_frame_bytes == 65536
    assert edge.max_queue_per_connection == 1000
    assert edge.rate_limit_per_second == 100.0
    assert edge.rate_limit_burst == 200
    assert edge.max_connections is None


def test_no_file_no_env_gives_defaults() -> None:
    config = load_config(None, env={})
    assert config.source is None
    assert config.core == CoreConfig()
    assert config.edge == EdgeConfig()
    assert config.cluster.replication_factor == 3


def test_wal_path_follows_wal_directory_and_data_dir(tmp_path: Path) -> None:
    core = CoreConfig(data_dir=tmp_path)  # type: ignore[arg-type]  # os.PathLike accepted
    assert core.data_dir == str(tmp_path)
    assert core.wal_path == str(tmp_path / "wal")
    moved = dataclasses.replace(core, data_dir="/srv/iris")
    assert moved.wal_path == "/srv/iris/wal"
    assert CoreConfig(wal_directory="/disk/wal").wal_path == "/disk/wal"


def test_secrets_never_appear_in_repr() -> None:
    config = production()
    assert SECRET not in repr(config)
    assert JWT not in repr(config)


def test_file_values_are_read_and_source_kept(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        [cluster]
        secret = "{SECRET}"
        expected_cluster_nodes = {NODES!r}
        consistency_mode = "cp"
        replication_factor = 3
        region_id = "us-east-1"
        regions = ["us-east-1", "eu-west-1"]
        dedup_window = 3600
        max_state_bytes = "2GiB"
        max_inbox_bytes = 1024

        [core]
        node = "{NODES[1]}"
        rpc = "{CORES[1]}"
        wal_directory = "/var/lib/iris/wal"
        metrics_port = 9100

        [edge]
        cores = {CORES!r}
        port = 9000
        jwt_leeway = 5
        tls_cert = ""
        tls_key = ""
        """,
    )
    config = load_config(path, env={})
    assert config.source == str(path)
    assert config.cluster.secret == SECRET
    assert config.cluster.expected_cluster_nodes == tuple(NODES)
    assert config.cluster.consistency_mode is ConsistencyMode.CP
    assert config.cluster.regions == ("us-east-1", "eu-west-1")
    assert config.cluster.dedup_window == 3600.0
    assert isinstance(config.cluster.dedup_window, float)
    assert config.cluster.max_state_bytes == 2 * 1024 * MIB
    assert config.cluster.max_inbox_bytes == 1024
    assert config.core.node == NODES[1]
    assert config.core.wal_path == "/var/lib/iris/wal"
    assert config.core.metrics_port == 9100
    assert config.edge.cores == tuple(CORES)
    assert config.edge.port == 9000
    assert config.edge.jwt_leeway == 5.0
    assert config.edge.tls_cert == ""  # "" means no TLS


# --------------------------------------------------------------------------
# Bad values: each names the key, the value and why


BAD_VALUES = [
    # cluster
    ("[cluster]\nsecret = 5", "cluster.secret", "must be text"),
    ('[cluster]\nexpected_cluster_nodes = "a:1"', "cluster.expected_cluster_nodes", "list of"),
    ("[cluster]\nexpected_cluster_nodes = [1]", "cluster.expected_cluster_nodes", "list of"),
    ('[cluster]\nexpected_cluster_nodes = ["a"]', "cluster.expected_cluster_nodes", "host:port"),
    ('[cluster]\nexpected_cluster_nodes = ["a:0"]', "cluster.expected_cluster_nodes", "1 to 65535"),
    (
        '[cluster]\nexpected_cluster_nodes = ["a:70000"]',
        "cluster.expected_cluster_nodes",
        "1 to 65535",
    ),
    (
        '[cluster]\nexpected_cluster_nodes = ["::1:7001"]',
        "cluster.expected_cluster_nodes",
        "in brackets",
    ),
    (
        '[cluster]\nexpected_cluster_nodes = ["a:1", "A:1"]',
        "cluster.expected_cluster_nodes",
        "twice",
    ),
    (
        '[cluster]\nexpected_cluster_nodes = ["[::1]:1", "[0::1]:1"]',
        "cluster.expected_cluster_nodes",
        "twice",
    ),
    ('[cluster]\nconsistency_mode = "ap"', "cluster.consistency_mode", "not offered"),
    ('[cluster]\nconsistency_mode = "strong"', "cluster.consistency_mode", "'cp' or"),
    ("[cluster]\nconsistency_mode = 1", "cluster.consistency_mode", "'cp' or"),
    ("[cluster]\nreplication_factor = 0", "cluster.replication_factor", "at least 1"),
    ("[cluster]\nreplication_factor = true", "cluster.replication_factor", "integer"),
    ("[cluster]\nreplication_factor = 2.0", "cluster.replication_factor", "integer"),
    (
        f"[cluster]\nexpected_cluster_nodes = {NODES!r}\nreplication_factor = 5",
        "cluster.replication_factor",
        "between 1 and 3",
    ),
    ('[cluster]\nregion_id = ""', "cluster.region_id", "empty"),
    ('[cluster]\nregions = ["a"]\nregion_id = "b"', "cluster.region_id", "not one of"),
    ('[cluster]\nregions = ["a", "a"]\nregion_id = "a"', "cluster.regions", "twice"),
    ('[cluster]\nregions = [""]', "cluster.regions", "empty name"),
    ("[cluster]\ndedup_window = 0", "cluster.dedup_window", "greater than 0"),
    ("[cluster]\ndedup_window = nan", "cluster.dedup_window", "finite"),
    ("[cluster]\nmessage_ttl = -1", "cluster.message_ttl", "greater than 0"),
    ("[cluster]\nmax_inbox_messages = 0", "cluster.max_inbox_messages", "at least 1"),
    ('[cluster]\nmax_inbox_bytes = "12XB"', "cluster.max_inbox_bytes", "unknown unit"),
    ('[cluster]\nmax_inbox_bytes = "-1"', "cluster.max_inbox_bytes", "size such as"),
    ("[cluster]\nmax_inbox_bytes = 1.5", "cluster.max_inbox_bytes", "size such as"),
    ('[cluster]\nmax_state_bytes = "0.5B"', "cluster.max_state_bytes", "whole number"),
    ("[cluster]\nmax_state_bytes = 0", "cluster.max_state_bytes", "at least 1"),
    ('[cluster]\nrequest_timeout = "5"', "cluster.request_timeout", "must be a number"),
    ("[cluster]\nrequest_timeout = 0", "cluster.request_timeout", "greater than 0"),
    # core
    ('[core]\nnode = "nope"', "core.node", "host:port"),
    ('[core]\nnode = "bad host!:7001"', "core.node", "not a valid host"),
    ('[core]\nnode = "300.1.1.1:7001"', "core.node", "IPv4"),
    ('[core]\nrpc = "127.0.0.1:7001"\nnode = "127.0.0.1:7001"', "core.rpc", "differ"),
    ('[core]\ndata_dir = ""', "core.data_dir", "empty"),
    ("[core]\nwal_directory = 3", "core.wal_directory", "path"),
    ('[core]\nallow_table_nuke = "yes"', "core.allow_table_nuke", "true or false"),
    ("[core]\nmetrics_port = 70000", "core.metrics_port", "0 to 65535"),
    ('[core]\ntls_cert = "/c.pem"', "core.tls_key", "must be set when core.tls_cert is set"),
    ("[core]\nelection_timeout_max = 0.15", "core.election_timeout_max", "greater than"),
    ("[core]\nelection_timeout_min = -1", "core.election_timeout_min", "greater than 0"),
    ("[core]\nheartbeat_interval = 0.2", "core.heartbeat_interval", "less than"),
    ("[core]\nmax_batch_ops = 0", "core.max_batch_ops", "at least 1"),
    ("[core]\nmax_inflight_ops = 10", "core.max_inflight_ops", "at least core.max_batch_ops"),
    # edge
    ('[edge]\nhost = "bad host"', "edge.host", "not a valid host"),
    ("[edge]\nhost = 1", "edge.host", "host name"),
    ("[edge]\nport = -1", "edge.port", "0 to 65535"),
    ('[edge]\nport = "8085"', "edge.port", "port number"),
    ('[edge]\ncores = ["x:1", "x:1"]', "edge.cores", "twice"),
    ('[edge]\njwt_secret = "short"', "edge.jwt_secret", "at least 32 bytes"),
    ("[edge]\nauth_enabled = 1", "edge.auth_enabled", "true or false"),
    ("[edge]\nallow_random_secret = 0", "edge.allow_random_secret", "true or false"),
    ("[edge]\njwt_leeway = -1", "edge.jwt_leeway", "at least 0"),
    ("[edge]\nrouter_pool_size = 0", "edge.router_pool_size", "at least 1"),
    ("[edge]\nmetrics_port = 8085", "edge.metrics_port", "differ from edge.port"),
    ("[edge]\nmetrics_port = true", "edge.metrics_port", "port number"),
    ('[edge]\ntls_key = "/k.pem"', "edge.tls_cert", "must be set when edge.tls_key is set"),
    ("[edge]\nmax_frame_bytes = 100", "edge.max_frame_bytes", "at least 256"),
    ("[edge]\nmax_queue_per_connection = 0", "edge.max_queue_per_connection", "at least 1"),
    ("[edge]\nrate_limit_per_second = 0", "edge.rate_limit_per_second", "greater than 0"),
    ("[edge]\nrate_limit_burst = 0", "edge.rate_limit_burst", "at least 1"),
    ("[edge]\nmax_connections = 0", "edge.max_connections", "at least 1"),
    # across tables
    (
        f'[cluster]\nexpected_cluster_nodes = {NODES!r}\n[core]\nnode = "10.0.0.9:7001"',
        "core.node",
        "not one of cluster.expected_cluster_nodes",
    ),
    (
        f'[cluster]\nexpected_cluster_nodes = {NODES!r}\n[core]\nrpc = "{NODES[0]}"',
        "core.rpc",
        "is a Raft address",
    ),
    (
        f'[cluster]\nexpected_cluster_nodes = {NODES!r}\n[edge]\ncores = ["{NODES[0]}"]',
        "edge.cores",
        "is a Raft address",
    ),
]


@pytest.mark.parametrize(("toml", "key", "why"), BAD_VALUES)
def test_bad_value_names_key_and_why_and_file(
    tmp_path: Path, toml: str, key: str, why: str
) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError, match=re.escape(why)) as info:
        load_config(path, env={})
    assert info.value.key == key
    assert info.value.message.startswith(f"{key} = ")
    if key.partition(".")[2] + " =" in toml:  # the blamed key was set in the file
        assert info.value.message.endswith(f"(set in {path})")


def test_bad_value_message_shows_the_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"edge\.port = 70000: must be a port") as info:
        load_text(tmp_path, "[edge]\nport = 70000")
    assert info.value.key == "edge.port"


@pytest.mark.parametrize(("section", "name"), [("cluster", "secret"), ("edge", "jwt_secret")])
def test_secret_length_in_bytes_and_never_echoed(section: str, name: str) -> None:
    cls: Any = ClusterConfig if section == "cluster" else EdgeConfig
    short = "x" * (MIN_SECRET_BYTES - 1)
    with pytest.raises(ConfigError, match="at least 32 bytes") as info:
        cls(**{name: short})
    assert info.value.key == f"{section}.{name}"
    assert short not in str(info.value)
    assert "<redacted, 31 bytes>" in str(info.value)
    assert getattr(cls(**{name: "x" * MIN_SECRET_BYTES}), name) == "x" * 32
    # bytes, not characters: 16 two-byte characters are 32 bytes
    assert getattr(cls(**{name: "é" * 16}), name) == "é" * 16
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        cls(**{name: "é" * 15})
    assert getattr(cls(**{name: ""}), name) is None


def test_tls_pair_both_or_neither() -> None:
    assert CoreConfig(tls_cert="/c.pem", tls_key="/k.pem").tls_cert == "/c.pem"
    assert EdgeConfig(tls_cert="", tls_key="").tls_cert == ""
    assert EdgeConfig(tls_cert=None, tls_key=None).tls_cert == ""  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="both files") as info:
        EdgeConfig(tls_cert="/c.pem")
    assert info.value.key == "edge.tls_key"
    with pytest.raises(ConfigError, match="both files") as info:
        CoreConfig(tls_key="/k.pem")
    assert info.value.key == "core.tls_cert"


def test_node_must_be_an_expected_node_in_code() -> None:
    with pytest.raises(ConfigError, match="not one of") as info:
        production(**{"core.node": "10.0.0.9:7001"})
    assert info.value.key == "core.node"
    # the same address spelt differently is the same node
    config = IrisConfig(
        cluster=ClusterConfig(expected_cluster_nodes=("[::1]:7001",), replication_factor=1),
        core=CoreConfig(node="[0:0::1]:7001"),
    )
    assert config.core.node == "[0:0::1]:7001"


def test_replace_revalidates() -> None:
    core = CoreConfig(node="127.0.0.1:7001")
    with pytest.raises(ConfigError, match="differ"):
        dataclasses.replace(core, rpc="127.0.0.1:7001")


def test_lists_become_tuples_in_code() -> None:
    cluster = ClusterConfig(expected_cluster_nodes=NODES)  # type: ignore[arg-type]
    assert cluster.expected_cluster_nodes == tuple(NODES)
    assert hash(cluster)  # frozen and hashable


def test_mode_accepts_text_in_code() -> None:
    cluster = ClusterConfig(consistency_mode="CP")  # type: ignore[arg-type]
    assert cluster.consistency_mode is ConsistencyMode.CP


def test_iris_config_rejects_wrong_section_types() -> None:
    with pytest.raises(ConfigError) as info:
        IrisConfig(core=EdgeConfig())  # type: ignore[arg-type]
    assert info.value.key == "core"


# --------------------------------------------------------------------------
# Environment variables and overrides


def test_env_overrides_file_and_overrides_override_env(tmp_path: Path) -> None:
    path = write(tmp_path, "[edge]\nport = 9000\n")
    assert load_config(path, env={}).edge.port == 9000
    assert load_config(path, env={"IRIS_EDGE_PORT": "9100"}).edge.port == 9100
    both = load_config(path, env={"IRIS_EDGE_PORT": "9100"}, overrides={"edge.port": 9200})
    assert both.edge.port == 9200
    text = load_config(path, env={"IRIS_EDGE_PORT": "9100"}, overrides={"edge.port": "9300"})
    assert text.edge.port == 9300
    skipped = load_config(path, env={"IRIS_EDGE_PORT": "9100"}, overrides={"edge.port": None})
    assert skipped.edge.port == 9100


def test_env_none_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRIS_EDGE_PORT", "9555")
    assert load_config(None).edge.port == 9555
    assert load_config(None, env={}).edge.port == 8085


def test_env_key_with_underscores() -> None:
    env = {
        "IRIS_CLUSTER_EXPECTED_CLUSTER_NODES": ",".join(NODES),
        "IRIS_CORE_NODE": NODES[2],
        "IRIS_CORE_RPC": CORES[2],
    }
    config = load_config(None, env=env)
    assert config.cluster.expected_cluster_nodes == tuple(NODES)
    assert config.core.node == NODES[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        (" Yes ", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("NO", False),
    ],
)
def test_env_bool_coercion(text: str, expected: bool) -> None:
    config = load_config(None, env={"IRIS_EDGE_AUTH_ENABLED": text})
    assert config.edge.auth_enabled is expected


@pytest.mark.parametrize(
    ("var", "text", "why"),
    [
        ("IRIS_EDGE_AUTH_ENABLED", "maybe", "true or false"),
        ("IRIS_EDGE_PORT", "80a", "must be an integer"),
        ("IRIS_EDGE_PORT", "4.2", "must be an integer"),
        ("IRIS_EDGE_PORT", "70000", "0 to 65535"),
        ("IRIS_EDGE_JWT_LEEWAY", "soon", "must be a number"),
        ("IRIS_EDGE_JWT_LEEWAY", "inf", "finite"),
        ("IRIS_CLUSTER_MAX_STATE_BYTES", "lots", "size such as"),
        ("IRIS_CLUSTER_CONSISTENCY_MODE", "eventual", "'cp' or"),
        ("IRIS_CLUSTER_EXPECTED_CLUSTER_NODES", '["a:1" "b:2"]', "TOML array"),
        ("IRIS_CLUSTER_EXPECTED_CLUSTER_NODES", "[1, 2]", "list of"),
        ("IRIS_CORE_NODE", "no-port", "host:port"),
    ],
)
def test_env_bad_text_names_variable_and_key(var: str, text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(why)) as info:
        load_config(None, env={var: text})
    key = info.value.key
    assert key is not None
    assert var == "IRIS_" + key.replace(".", "_").upper()
    assert f"environment variable {var}" in str(info.value)


def test_env_lists_toml_array_or_comma_separated() -> None:
    def nodes(text: str) -> tuple[str, ...]:
        env = {"IRIS_CLUSTER_EXPECTED_CLUSTER_NODES": text, "IRIS_CLUSTER_REPLICATION_FACTOR": "1"}
        return load_config(None, env=env).cluster.expected_cluster_nodes

    assert nodes("a:1, b:2 ,c:3,") == ("a:1", "b:2", "c:3")
    assert nodes('["a:1", "b:2"]') == ("a:1", "b:2")
    assert nodes("") == ()
    assert nodes("[::1]:7001,[::1]:7002") == ("[::1]:7001", "[::1]:7002")
    assert nodes("[::1]:7001") == ("[::1]:7001",)
    regions = load_config(
        None, env={"IRIS_CLUSTER_REGIONS": "us, eu", "IRIS_CLUSTER_REGION_ID": "eu"}
    )
    assert regions.cluster.regions == ("us", "eu")


def test_env_numbers_sizes_modes_and_unset(tmp_path: Path) -> None:
    path = write(tmp_path, "[core]\nmetrics_port = 9100\n[edge]\ntls_cert = 'c'\ntls_key = 'k'\n")
    env = {
        "IRIS_CORE_MAX_BATCH_OPS": " 42 ",
        "IRIS_EDGE_RATE_LIMIT_PER_SECOND": "2.5",
        "IRIS_CLUSTER_MAX_STATE_BYTES": "512MiB",
        "IRIS_CLUSTER_CONSISTENCY_MODE": "CP",
        "IRIS_CORE_METRICS_PORT": "off",
        "IRIS_EDGE_TLS_CERT": "",
        "IRIS_EDGE_TLS_KEY": "",
        "IRIS_CLUSTER_SECRET": "",
    }
    config = load_config(path, env=env)
    assert config.core.max_batch_ops == 42
    assert config.edge.rate_limit_per_second == 2.5
    assert config.cluster.max_state_bytes == 512 * MIB
    assert config.cluster.consistency_mode is ConsistencyMode.CP
    assert config.core.metrics_port is None
    assert config.edge.tls_cert == ""
    assert config.cluster.secret is None
    for off in ("", "none", "OFF"):
        unset = load_config(path, env={"IRIS_CORE_METRICS_PORT": off})
        assert unset.core.metrics_port is None
    assert load_config(path, env={"IRIS_CORE_METRICS_PORT": "0"}).core.metrics_port == 0


def test_value_from_env_rejected_later_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, f"[cluster]\nexpected_cluster_nodes = {NODES!r}\n")
    with pytest.raises(ConfigError, match="not one of") as info:
        load_config(path, env={"IRIS_CORE_NODE": "10.0.0.7:7001"})
    assert info.value.key == "core.node"
    assert "set by environment variable IRIS_CORE_NODE" in str(info.value)


def test_unknown_env_variable_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r"IRIS_CORE_NOD .*did you mean IRIS_CORE_NODE\?") as info:
        load_config(None, env={"IRIS_CORE_NOD": "127.0.0.1:7001"})
    assert info.value.key == "core.nod"


def test_unrelated_env_variables_are_ignored() -> None:
    env = {"IRIS_COOKIE": "x", "IRIS_CONFIG": "/etc/iris.toml", "iris_core_nod": "x", "PATH": "/"}
    assert load_config(None, env=env).core == CoreConfig()


def test_overrides_coercion_and_errors() -> None:
    config = load_config(
        None,
        env={},
        overrides={
            "edge.auth_enabled": "no",
            "edge.cores": "a:1,b:2",
            "core.data_dir": Path("/srv/iris"),
            "cluster.consistency_mode": ConsistencyMode.CP,
        },
    )
    assert config.edge.auth_enabled is False
    assert config.edge.cores == ("a:1", "b:2")
    assert config.core.data_dir == "/srv/iris"
    assert config.cluster.consistency_mode is ConsistencyMode.CP
    with pytest.raises(ConfigError, match=r"set by override edge\.port") as info:
        load_config(None, env={}, overrides={"edge.port": 99999})
    assert info.value.key == "edge.port"


@pytest.mark.parametrize(
    ("dotted", "guess"),
    [("edge.prot", "edge.port"), ("port", None), ("core.jwt_secret", "edge.jwt_secret")],
)
def test_unknown_override_key(dotted: str, guess: str | None) -> None:
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_config(None, env={}, overrides={dotted: 1})
    assert info.value.key == dotted
    if guess is not None:
        assert f"did you mean {guess}?" in str(info.value)


# --------------------------------------------------------------------------
# Unknown keys and sections in the file


@pytest.mark.parametrize(
    ("toml", "key", "hint"),
    [
        ('[core]\nnod = "a:1"', "core.nod", "did you mean core.node?"),
        ("[edge]\nprot = 1", "edge.prot", "did you mean edge.port?"),
        ('[core]\njwt_secret = "x"', "core.jwt_secret", "did you mean edge.jwt_secret?"),
        ("[cluster]\nexpected_nodes = []", "cluster.expected_nodes", "expected_cluster_nodes"),
        ('node = "a:1"', "node", "did you mean core.node?"),
        ("[cor]\nnode = 1", "cor", "did you mean [core]?"),
    ],
)
def test_unknown_key_suggests(tmp_path: Path, toml: str, key: str, hint: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError, match="unknown") as info:
        load_config(path, env={})
    assert info.value.key == key
    assert hint in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_key_without_a_close_match_has_no_guess(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key core\.zzzzzz") as info:
        load_text(tmp_path, "[core]\nzzzzzz = 1")
    assert "did you mean" not in str(info.value)


def test_section_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a table") as info:
        load_text(tmp_path, "core = 5")
    assert info.value.key == "core"


# --------------------------------------------------------------------------
# Reading the file


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[core]\nnode = "127.0.0.1:7001"\nrpc = \n')
    with pytest.raises(ConfigError, match=r"line 3\b") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "invalid TOML" in str(info.value)
    assert info.value.key is None
    assert info.value.data["line"] == 3


@pytest.mark.parametrize(
    "toml", ["[edge]\nport = 1\nport = 2\n", "[edge]\nport = 1\nport = 2", '[edge]\n\nhost = "abc']
)
def test_toml_error_at_end_of_document_names_last_line(tmp_path: Path, toml: str) -> None:
    with pytest.raises(ConfigError, match=r"line 3\b.*invalid TOML") as info:
        load_text(tmp_path, toml)
    assert info.value.data["line"] == 3


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(missing, env={})
    assert str(missing) in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, env={})


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[edge]\nport = 1\n", mode=0o000)
    with pytest.raises(ConfigError, match="permission denied"):
        load_config(path, env={})


def test_unreadable_file_without_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import iris_raft._config as config_module

    def denied(path: str, mode: str = "r") -> Any:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(config_module, "open", denied, raising=False)
    with pytest.raises(ConfigError, match=r"cannot read config file .*permission denied"):
        load_config(tmp_path / "iris.toml", env={})


def test_file_not_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "iris.toml"
    path.write_bytes(b"[edge]\nhost = '\xff'\n")
    with pytest.raises(ConfigError, match="line 2: the file is not UTF-8"):
        load_config(path, env={})


# --------------------------------------------------------------------------
# check_production


def test_production_config_has_no_warnings_or_errors(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("cert")
    key.write_text("key")
    config = production(**{"edge.tls_cert": str(cert), "edge.tls_key": str(key)})
    assert check_production(config, "core") == []
    assert check_production(config, "edge") == []


def test_core_without_secret_refuses_unless_dev() -> None:
    config = production(**{"cluster.secret": None})
    with pytest.raises(ConfigError, match=r"cluster\.secret is not set") as info:
        check_production(config, "core")
    assert info.value.key == "cluster.secret"
    local = dataclasses.replace(
        config,
        cluster=ClusterConfig(expected_cluster_nodes=("127.0.0.1:7001",), replication_factor=1),
        core=CoreConfig(node="127.0.0.1:7001"),
        edge=EdgeConfig(),
    )
    assert check_production(local, "core", dev=True) == []


def test_core_without_expected_nodes_refuses_unless_dev() -> None:
    config = production(**{"cluster.expected_cluster_nodes": (), "core.node": None})
    with pytest.raises(ConfigError, match="partition guard") as info:
        check_production(config, "core")
    assert info.value.key == "cluster.expected_cluster_nodes"
    assert check_production(config, "core", dev=True) == []


def test_core_without_node_refuses_even_in_dev() -> None:
    config = production(**{"core.node": None})
    for dev in (False, True):
        with pytest.raises(ConfigError, match="IRIS_CORE_NODE") as info:
            check_production(config, "core", dev=dev)
        assert info.value.key == "core.node"


def test_table_nuke_warns() -> None:
    warnings = check_production(production(**{"core.allow_table_nuke": True}), "core")
    assert len(warnings) == 1
    assert "NEVER enable in production without an operator" in warnings[0]


def test_node_count_warnings() -> None:
    one = production(
        **{
            "cluster.expected_cluster_nodes": (NODES[0],),
            "cluster.replication_factor": 1,
            "edge.cores": (CORES[0],),
        }
    )
    assert any("single core" in w for w in check_production(one, "core"))
    assert check_production(one, "core", dev=True) == []
    four = production(**{"cluster.expected_cluster_nodes": (*NODES, "10.0.0.4:7001")})
    assert any("even count" in w for w in check_production(four, "core"))


def test_wal_under_tmp_warns_in_production_only() -> None:
    config = production(**{"core.wal_directory": "/tmp/iris/wal"})
    assert any("tmpfs" in w for w in check_production(config, "core"))
    assert check_production(config, "core", dev=True) == []
    shm = production(**{"core.data_dir": "/dev/shm/iris"})
    assert any("/dev/shm" in w for w in check_production(shm, "core"))
    assert check_production(production(**{"core.data_dir": "/tmpfoo"}), "core") == []


def test_dev_without_secret_on_public_address_warns() -> None:
    public = production(**{"cluster.secret": None})
    assert any("loopback" in w for w in check_production(public, "core", dev=True))
    local = IrisConfig.for_dev("/srv/iris")
    assert check_production(local, "core", dev=True) == []


def test_tls_files_must_exist_for_the_role(tmp_path: Path) -> None:
    config = production(**{"edge.tls_cert": "/no/cert.pem", "edge.tls_key": "/no/key.pem"})
    assert check_production(config, "core") == []  # the core does not use edge files
    for dev in (False, True):
        with pytest.raises(ConfigError, match="no such file") as info:
            check_production(config, "edge", dev=dev)
        assert info.value.key == "edge.tls_cert"
    cert = tmp_path / "c.pem"
    cert.write_text("cert")
    core = production(**{"core.tls_cert": str(cert), "core.tls_key": str(tmp_path / "k.pem")})
    with pytest.raises(ConfigError, match="no such file") as info:
        check_production(core, "core")
    assert info.value.key == "core.tls_key"


def test_edge_without_jwt_secret_refuses() -> None:
    config = production(**{"edge.jwt_secret": None})
    with pytest.raises(ConfigError, match=r"edge\.jwt_secret is not set") as info:
        check_production(config, "edge")
    assert info.value.key == "edge.jwt_secret"
    dev_warnings = check_production(config, "edge", dev=True)
    assert not any("jwt_secret" in w for w in dev_warnings)


def test_edge_random_secret_is_loudly_dev_only() -> None:
    config = production(**{"edge.jwt_secret": None, "edge.allow_random_secret": True})
    warnings = check_production(config, "edge")
    loud = [w for w in warnings if "allow_random_secret" in w]
    assert len(loud) == 1
    assert "DEV ONLY" in loud[0]
    assert "NEVER" in loud[0]
    with_secret = production(**{"edge.allow_random_secret": True})
    assert any("DEV ONLY" in w for w in check_production(with_secret, "edge"))


def test_edge_auth_disabled_warns_also_in_dev() -> None:
    config = production(**{"edge.auth_enabled": False})
    for dev in (False, True):
        assert any("auth_enabled = false" in w for w in check_production(config, "edge", dev=dev))


def test_edge_needs_cluster_secret_and_cores_unless_dev() -> None:
    no_secret = production(**{"cluster.secret": None})
    with pytest.raises(ConfigError) as info:
        check_production(no_secret, "edge")
    assert info.value.key == "cluster.secret"
    no_cores = production(**{"edge.cores": ()})
    with pytest.raises(ConfigError, match=r"edge\.cores is empty") as info:
        check_production(no_cores, "edge")
    assert info.value.key == "edge.cores"
    assert not any("cores" in w for w in check_production(no_cores, "edge", dev=True))


def test_edge_without_tls_warns_in_production() -> None:
    assert any("ws://" in w for w in check_production(production(), "edge"))
    assert not any("ws://" in w for w in check_production(production(), "edge", dev=True))


def test_check_production_rejects_unknown_role() -> None:
    with pytest.raises(ValueError, match="role"):
        check_production(production(), "router")  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# secret_file_warnings


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_secret_file_readable_by_others_warns(tmp_path: Path) -> None:
    path = write(tmp_path, f'[cluster]\nsecret = "{SECRET}"\n', mode=0o644)
    warnings = secret_file_warnings(path)
    assert len(warnings) == 1
    assert "chmod 600" in warnings[0]
    assert "chmod 400" in warnings[0]
    assert "cluster.secret" in warnings[0]
    assert "0644" in warnings[0]
    assert SECRET not in warnings[0]


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_secret_file_private_is_quiet(tmp_path: Path) -> None:
    path = write(tmp_path, f'[cluster]\nsecret = "{SECRET}"\n', mode=0o600)
    assert secret_file_warnings(path) == []
    path.chmod(0o400)
    assert secret_file_warnings(path) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_secret_file_group_bits_and_jwt_secret(tmp_path: Path) -> None:
    path = write(tmp_path, f'[edge]\njwt_secret = "{JWT}"\n', mode=0o640)
    warnings = secret_file_warnings(str(path))
    assert len(warnings) == 1
    assert "edge.jwt_secret" in warnings[0]


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_file_without_secret_is_quiet(tmp_path: Path) -> None:
    path = write(tmp_path, '[cluster]\nsecret = ""\n[edge]\nport = 1\n', mode=0o644)
    assert secret_file_warnings(path) == []
    assert secret_file_warnings(None) == []


def test_secret_file_warnings_on_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        secret_file_warnings(tmp_path / "nope.toml")


# --------------------------------------------------------------------------
# for_dev


def test_for_dev_single_node(tmp_path: Path) -> None:
    config = IrisConfig.for_dev(tmp_path, raft_port=7201, rpc_port=7301, edge_port=8185)
    assert config.cluster.expected_cluster_nodes == ("127.0.0.1:7201",)
    assert config.cluster.replication_factor == 1
    assert config.cluster.secret is None
    assert config.core.node == "127.0.0.1:7201"
    assert config.core.rpc == "127.0.0.1:7301"
    assert config.core.data_dir == str(tmp_path)
    assert config.edge.cores == ("127.0.0.1:7301",)
    assert (config.edge.host, config.edge.port) == ("127.0.0.1", 8185)
    assert check_production(config, "core", dev=True) == []
    assert check_production(config, "edge", dev=True) == []
    with pytest.raises(ConfigError, match=r"cluster\.secret"):
        check_production(config, "core")


def test_for_dev_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        IrisConfig.for_dev(tmp_path, raft_port=0)
    assert info.value.key == "cluster.expected_cluster_nodes"
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        IrisConfig.for_dev(tmp_path, jwt_secret="short")
    assert IrisConfig.for_dev(tmp_path, jwt_secret=JWT).edge.jwt_secret == JWT


# --------------------------------------------------------------------------
# parse_address / parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7001", ("127.0.0.1", 7001)),
        ("core-1.example.com:1", ("core-1.example.com", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:7001", ("::1", 7001)),
        ("[fe80::1%eth0]:7001", ("fe80::1%eth0", 7001)),
    ],
)
def test_parse_address_examples(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host",
        ":7001",
        "host:",
        "host:0",
        "host:65536",
        "host:+80",
        "host: 80",
        "::1:7001",
        "[::1]7001",
        "[::1:7001",
        "[host]:7001",
        "[zz::1]:7001",
        "a b:1",
        "-bad:1",
        "1.2.3.256:1",
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(text)


def test_parse_address_names_key() -> None:
    with pytest.raises(ConfigError, match=r"^core\.node = 'x': ") as info:
        parse_address("x", key="core.node")
    assert info.value.key == "core.node"


_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,20}[a-z0-9_])?"
hostnames = st.from_regex(rf"{_LABEL}(\.{_LABEL}){{0,3}}", fullmatch=True).filter(
    lambda h: not all(label.isdigit() for label in h.split("."))
)
hosts = hostnames | st.ip_addresses(v=4).map(str) | st.ip_addresses(v=6).map(str)
ports = st.integers(min_value=1, max_value=65535)


@given(hosts, ports)
def test_parse_address_round_trip(host: str, port: int) -> None:
    assert parse_address(format_address(host, port)) == (host, port)


@given(hosts, st.integers(min_value=65536, max_value=10**6) | st.just(0))
def test_parse_address_rejects_bad_ports(host: str, port: int) -> None:
    with pytest.raises(ConfigError, match="port"):
        parse_address(format_address(host, port))


@given(st.text(max_size=40))
def test_parse_address_only_raises_config_error(text: str) -> None:
    try:
        host, port = parse_address(text)
    except ConfigError:
        return
    assert 1 <= port <= 65535
    assert parse_address(format_address(host, port)) == (host, port)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * MIB),
        ("2GiB", 2 * 1024 * MIB),
        ("1GB", 10**9),
        ("1.5GiB", 1536 * MIB),
        (" 64 MiB ", 64 * MIB),
        ("64mib", 64 * MIB),
        ("1024", 1024),
        ("10B", 10),
        ("3kB", 3000),
        ("1TiB", 1024**4),
        (0, 0),
        (4096, 4096),
    ],
)
def test_parse_size_examples(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "value", ["", "MiB", "-1", "1.5", "0.1KiB", "12XB", "1 2", "1e3", -1, True, 1.5, None]
)
def test_parse_size_rejects(value: Any) -> None:
    with pytest.raises(ConfigError):
        parse_size(value)


UNITS = {
    "": 1,
    "B": 1,
    "kB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
    "TB": 1000**4,
    "TiB": 1024**4,
}


@given(st.integers(min_value=0, max_value=10**12), st.sampled_from(sorted(UNITS)), st.booleans())
def test_parse_size_round_trip(number: int, unit: str, upper: bool) -> None:
    text = f"{number}{unit.upper() if upper else unit}"
    assert parse_size(text) == number * UNITS[unit]
    assert parse_size(number) == number


@given(st.text(max_size=20))
def test_parse_size_only_raises_config_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ConfigError:
        return
    assert size >= 0


# --------------------------------------------------------------------------
# The documentation stays in step with the code


DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_docs_name_every_key() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for cls, section in ((ClusterConfig, "cluster"), (CoreConfig, "core"), (EdgeConfig, "edge")):
        for f in dataclasses.fields(cls):
            assert f"`{section}.{f.name}`" in text, f"{section}.{f.name} is not documented"


def test_docs_cluster_example_loads_on_every_node(tmp_path: Path) -> None:
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "# /etc/iris/iris.toml" in b)
    path = write(tmp_path, example)
    for i in (1, 2, 3):
        env = {"IRIS_CORE_NODE": f"10.0.0.{i}:7001", "IRIS_CORE_RPC": f"10.0.0.{i}:7101"}
        config = load_config(path, env=env)
        assert check_production(config, "core") == []
        assert config.core.node == f"10.0.0.{i}:7001"
    edge = load_config(path, env={})
    assert "ws://" in " ".join(check_production(edge, "edge"))

"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s bench``."""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (unit tests and real-process cluster tests)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting check."""
    session.install("ruff>=0.5")
    paths = ["src", "tests", "examples", "benchmarks", "jepsen_like"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the packages."""
    session.install("-e", ".[test]", "mypy>=1.10")
    session.run("mypy")


@nox.session
def harness(session: nox.Session) -> None:
    """Every fault-injection scenario, 3 and 5 nodes, both modes (long; not in CI)."""
    session.install("-e", ".[test,plots]")
    args = session.posargs or ["--scenario", "all", "--time", "30"]
    session.run("python", "-m", "jepsen_like", "run", *args)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks, into bench-results/ (long). ``nox -s bench -- --smoke``: a quick check."""
    session.install("-e", ".[test,plots,bench]")
    # etcd is a baseline, not a requirement: without it the benchmarks skip it and say so.
    if os.geteuid() == 0 and shutil.which("apt-get") and not shutil.which("etcd"):
        session.run_always(
            "sh",
            "-c",
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive"
            " apt-get install -y -qq etcd-server etcd-client >/dev/null",
            external=True,
            success_codes=list(range(256)),
        )
    if not shutil.which("etcd"):
        session.warn("etcd is not installed: the etcd baselines will be skipped")
    session.run("python", "-m", "benchmarks", *session.posargs)

"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``."""

from __future__ import annotations

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
    session.run("ruff", "check", "src", "tests", "examples")
    session.run("ruff", "format", "--check", "src", "tests", "examples")


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

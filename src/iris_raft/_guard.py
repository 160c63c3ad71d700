"""The partition guard: block writes on the minority side of a network partition.

Theory of operation
-------------------
The guard knows the cluster's members (``expected_cluster_nodes``, then the
live Raft membership) and, for each peer, when it was last heard from (the
Raft transport heartbeats every peer; see ``_raft.GuardTransport``). A peer
is *reachable* if it was heard within ``detect_after`` seconds. Writes are
safe while the reachable members, this node included, are more than half of
all members.

* Losing quorum blocks writes at the first evaluation that sees it: with
  ``detect_after = 1.0`` and evaluations every 0.1 s, writes are blocked
  within about 1.1 s of the cut (the promise is 2 s).
* Regaining quorum re-enables writes only after quorum has held for
  ``hysteresis`` seconds, so a flapping link does not flap writes.
* A node starts blocked (it cannot know yet) unless it is alone in its
  cluster; the first transition to safe is logged as "quorum reached", not as
  a heal.

The guard is pure: callers pass ``now`` (a monotonic clock) and the
last-heard map; the node's shell logs the transitions it returns.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class GuardState(enum.Enum):
    """Whether this node may accept writes."""

    #: A majority of the members is reachable: writes allowed.
    SAFE = "safe"
    #: No majority reachable (or not yet known): writes blocked.
    BLOCKED = "blocked"


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of the guard's state, for the shell to log and count."""

    state: GuardState
    reachable: tuple[str, ...]
    members: tuple[str, ...]
    first: bool


class PartitionGuard:
    """Decides ``is_safe_for_writes`` from heartbeat times. Pure: no clock, no I/O."""

    def __init__(
        self,
        self_node: str,
        members: Iterable[str],
        *,
        detect_after: float = 1.0,
        hysteresis: float = 1.0,
    ) -> None:
        self.self_node = self_node
        self.members: frozenset[str] = frozenset(members) | {self_node}
        self.detect_after = detect_after
        self.hysteresis = hysteresis
        alone = self.members == {self_node}
        self.state = GuardState.SAFE if alone else GuardState.BLOCKED
        self.reachable: frozenset[str] = frozenset({self_node})
        self._quorum_since: float | None = None
        self._ever_safe = alone
        self.transitions = 0

    def set_members(self, members: Iterable[str]) -> None:
        """Follow a membership change (the next :meth:`evaluate` uses it)."""
        self.members = frozenset(members) | {self.self_node}

    def has_quorum(self, reachable: Iterable[str]) -> bool:
        count = len(self.members & (frozenset(reachable) | {self.self_node}))
        return count * 2 > len(self.members)

    def evaluate(self, last_heard: Mapping[str, float], now: float) -> Transition | None:
        """Update the state from the last-heard times; return a transition if any."""
        reachable = {self.self_node} | {
            node
            for node, heard in last_heard.items()
            if node in self.members and now - heard <= self.detect_after
        }
        self.reachable = frozenset(reachable)
        quorum = self.has_quorum(reachable)
        if not quorum:
            self._quorum_since = None
            if self.state is GuardState.SAFE:
                self.state = GuardState.BLOCKED
                self.transitions += 1
                return Transition(GuardState.BLOCKED, self._sorted(), self._all(), first=False)
            return None
        if self.state is GuardState.SAFE:
            return None
        if self._quorum_since is None:
            self._quorum_since = now
        alone = len(self.members) == 1
        if alone or now - self._quorum_since >= self.hysteresis or not self._ever_safe:
            first = not self._ever_safe
            self._ever_safe = True
            self.state = GuardState.SAFE
            self.transitions += 1
            return Transition(GuardState.SAFE, self._sorted(), self._all(), first=first)
        return None

    @property
    def safe(self) -> bool:
        return self.state is GuardState.SAFE

    def _sorted(self) -> tuple[str, ...]:
        return tuple(sorted(self.reachable))

    def _all(self) -> tuple[str, ...]:
        return tuple(sorted(self.members))

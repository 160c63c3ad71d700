"""Unit tests for iris_raft._guard: the partition guard, driven by hand-moved time.

Pure: ``evaluate(last_heard, now)`` is called with explicit times; no clock.
The Hypothesis test checks the guard against its specification on random
heartbeat histories: safe only with a strict majority reachable, blocked at
the first evaluation without one, and re-enabled only after ``hysteresis``
seconds of continuous quorum.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iris_raft._guard import GuardState, PartitionGuard, Transition

THREE = ("a", "b", "c")
FIVE = ("a", "b", "c", "d", "e")


def heard(now: float, *nodes: str) -> dict[str, float]:
    return dict.fromkeys(nodes, now)


# ------------------------------------------------------------- starting state


@pytest.mark.parametrize("members", [THREE, FIVE])
def test_starts_blocked_and_stays_blocked_without_a_majority(members: tuple[str, ...]) -> None:
    guard = PartitionGuard("a", members)
    assert not guard.safe
    assert guard.state is GuardState.BLOCKED
    minority = members[1 : len(members) // 2]  # with "a": exactly half or fewer
    for t in range(5):
        assert guard.evaluate(heard(t, *minority), t) is None
        assert not guard.safe
    assert guard.transitions == 0
    assert guard.reachable == frozenset({"a", *minority})


@pytest.mark.parametrize("members", [THREE, FIVE])
def test_first_majority_makes_it_safe_at_once(members: tuple[str, ...]) -> None:
    guard = PartitionGuard("a", members, hysteresis=5.0)
    majority = members[1 : len(members) // 2 + 1]
    assert guard.evaluate(heard(0.0, *majority[:-1]), 0.0) is None
    transition = guard.evaluate(heard(0.1, *majority), 0.1)
    assert transition == Transition(
        GuardState.SAFE, tuple(sorted({"a", *majority})), tuple(sorted(members)), first=True
    )
    assert guard.safe
    assert guard.transitions == 1
    # Staying safe reports nothing.
    assert guard.evaluate(heard(0.2, *majority), 0.2) is None


def test_five_members_need_three() -> None:
    guard = PartitionGuard("a", FIVE)
    assert guard.evaluate(heard(0, "b"), 0) is None
    assert not guard.safe
    assert guard.evaluate(heard(0, "b", "e"), 0) is not None
    assert guard.safe


def test_self_is_counted_even_if_absent_from_members_and_last_heard() -> None:
    guard = PartitionGuard("a", ["b", "c"])
    assert guard.members == frozenset(THREE)
    transition = guard.evaluate({"b": 0.0}, 0.0)
    assert transition is not None
    assert transition.reachable == ("a", "b")


@pytest.mark.parametrize("members", [[], ["a"]])
def test_single_member_cluster_is_safe_at_once(members: list[str]) -> None:
    # Regression: a lone node used to start blocked until its first evaluation.
    guard = PartitionGuard("a", members, hysteresis=100.0)
    assert guard.safe
    assert guard.evaluate({}, 0.0) is None
    assert guard.evaluate({"x": -1e9}, 1e9) is None
    assert guard.safe
    assert guard.transitions == 0


def test_growing_from_a_single_member_blocks_then_heals_after_hysteresis() -> None:
    guard = PartitionGuard("a", [], hysteresis=2.0)
    guard.set_members(THREE)
    transition = guard.evaluate({}, 0.0)
    assert transition == Transition(GuardState.BLOCKED, ("a",), THREE, first=False)
    assert guard.evaluate(heard(1.0, "b"), 1.0) is None
    transition = guard.evaluate(heard(3.0, "b"), 3.0)
    assert transition is not None and transition.first is False


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("detect_after", [1.0, 2.5])
def test_blocks_at_the_first_evaluation_after_heartbeats_are_too_old(detect_after: float) -> None:
    guard = PartitionGuard("a", THREE, detect_after=detect_after)
    assert guard.evaluate({"b": 10.0}, 10.0) is not None
    # Heard exactly detect_after ago still counts.
    assert guard.evaluate({"b": 10.0}, 10.0 + detect_after) is None
    assert guard.safe
    transition = guard.evaluate({"b": 10.0}, 10.0 + detect_after + 0.01)
    assert transition == Transition(GuardState.BLOCKED, ("a",), THREE, first=False)
    assert not guard.safe
    assert guard.transitions == 2
    assert guard.evaluate({"b": 10.0}, 20.0) is None


def test_losing_one_of_two_peers_keeps_quorum_of_three() -> None:
    guard = PartitionGuard("a", THREE)
    guard.evaluate(heard(0, "b", "c"), 0)
    assert guard.evaluate({"b": 0.0, "c": 5.0}, 5.0) is None
    assert guard.safe
    assert guard.reachable == frozenset({"a", "c"})


def test_five_members_block_when_down_to_two() -> None:
    guard = PartitionGuard("a", FIVE)
    guard.evaluate(heard(0, "b", "c", "d", "e"), 0)
    assert guard.evaluate({"b": 0, "c": 0, "d": 3, "e": 3}, 3) is None
    transition = guard.evaluate({"b": 0, "c": 0, "d": 3, "e": 0}, 3)
    assert transition is not None
    assert transition.state is GuardState.BLOCKED
    assert transition.reachable == ("a", "d")
    assert transition.members == FIVE


# --------------------------------------------------------------- hysteresis


def blocked_after_being_safe(hysteresis: float = 1.0) -> PartitionGuard:
    guard = PartitionGuard("a", THREE, hysteresis=hysteresis)
    assert guard.evaluate(heard(0, "b"), 0) is not None
    assert guard.evaluate({}, 10) is not None
    assert not guard.safe
    return guard


@pytest.mark.parametrize("hysteresis", [1.0, 3.0])
def test_reenables_only_after_hysteresis_of_continuous_quorum(hysteresis: float) -> None:
    guard = blocked_after_being_safe(hysteresis)
    t0 = 20.0
    assert guard.evaluate(heard(t0, "b"), t0) is None
    assert guard.evaluate(heard(t0 + hysteresis / 2, "b"), t0 + hysteresis / 2) is None
    assert guard.evaluate(heard(t0 + hysteresis * 0.99, "c"), t0 + hysteresis * 0.99) is None
    assert not guard.safe
    transition = guard.evaluate(heard(t0 + hysteresis, "c"), t0 + hysteresis)
    assert transition == Transition(GuardState.SAFE, ("a", "c"), THREE, first=False)
    assert guard.safe


def test_flapping_within_hysteresis_stays_blocked() -> None:
    guard = blocked_after_being_safe(hysteresis=1.0)
    assert guard.evaluate(heard(20.0, "b"), 20.0) is None
    assert guard.evaluate({"b": 20.0}, 21.5) is None  # lost again
    assert guard.evaluate(heard(21.6, "b"), 21.6) is None  # regained: the clock restarts
    assert guard.evaluate(heard(22.1, "b"), 22.1) is None  # 2.1 s after the first regain
    assert not guard.safe
    transition = guard.evaluate(heard(22.7, "b"), 22.7)
    assert transition is not None
    assert transition.state is GuardState.SAFE
    assert transition.first is False


# ------------------------------------------------------ membership and noise


def test_unknown_nodes_in_last_heard_are_ignored() -> None:
    guard = PartitionGuard("a", THREE)
    assert guard.evaluate(heard(0, "x", "y", "z"), 0) is None
    assert not guard.safe
    assert guard.reachable == frozenset({"a"})
    transition = guard.evaluate(heard(1, "x", "y", "c"), 1)
    assert transition is not None
    assert transition.reachable == ("a", "c")


def test_growing_membership_can_block() -> None:
    guard = PartitionGuard("a", THREE)
    guard.evaluate(heard(0, "b"), 0)
    assert guard.safe
    guard.set_members(FIVE)
    assert guard.members == frozenset(FIVE)
    transition = guard.evaluate(heard(1, "b"), 1)
    assert transition == Transition(GuardState.BLOCKED, ("a", "b"), FIVE, first=False)


def test_shrinking_membership_can_unblock_after_hysteresis() -> None:
    guard = PartitionGuard("a", FIVE)
    guard.evaluate(heard(0, "b", "c"), 0)
    assert guard.evaluate(heard(5, "b"), 5) is not None
    assert not guard.safe
    guard.set_members(["b", "c"])  # self stays a member
    assert guard.members == frozenset(THREE)
    assert guard.evaluate(heard(6, "b"), 6) is None
    transition = guard.evaluate(heard(7, "b"), 7)
    assert transition == Transition(GuardState.SAFE, ("a", "b"), THREE, first=False)


def test_shrinking_to_a_single_member_is_safe_at_once() -> None:
    guard = blocked_after_being_safe(hysteresis=60.0)
    guard.set_members([])
    transition = guard.evaluate({}, 11)
    assert transition is not None
    assert transition.state is GuardState.SAFE
    assert transition.members == ("a",)


def test_first_quorum_after_membership_change_is_still_first() -> None:
    guard = PartitionGuard("a", FIVE, hysteresis=60.0)
    assert guard.evaluate(heard(0, "b"), 0) is None
    guard.set_members(THREE)
    transition = guard.evaluate(heard(1, "b"), 1)
    assert transition is not None
    assert transition.first is True


# ---------------------------------------------------------------- property

NODES = ("a", "b", "c", "d", "e", "f", "g")


Step = tuple[int, dict[str, int], int | None]  # now, last heard, new cluster size


@st.composite
def histories(draw: st.DrawFn) -> tuple[int, int, int, list[Step]]:
    size = draw(st.sampled_from([1, 2, 3, 4, 5, 7]))
    detect_after = draw(st.integers(1, 5))
    hysteresis = draw(st.integers(0, 6))
    raw = draw(
        st.lists(
            st.tuples(
                st.integers(0, 3),
                st.dictionaries(
                    st.sampled_from((*NODES[1:], "x", "y")), st.integers(0, 2 * detect_after)
                ),
                st.one_of(st.none(), st.none(), st.none(), st.sampled_from([1, 3, 5, 7])),
            ),
            min_size=1,
            max_size=30,
        )
    )
    steps = []
    now = 0
    for advance, ages, resize in raw:
        now += advance
        steps.append((now, {node: now - age for node, age in ages.items()}, resize))
    return size, detect_after, hysteresis, steps


@settings(max_examples=200, deadline=None)
@given(histories())
def test_guard_follows_its_specification(history: tuple[int, int, int, list[Step]]) -> None:
    size, detect_after, hysteresis, steps = history
    members = NODES[:size]
    guard = PartitionGuard("a", members, detect_after=detect_after, hysteresis=hysteresis)
    run_start: int | None = None  # first evaluation of the current run of quorum
    assert guard.safe == (size == 1)
    ever_safe = guard.safe
    for now, last_heard, resize in steps:
        if resize is not None:  # a membership change, used from the next evaluation
            size = resize
            members = NODES[:size]
            guard.set_members(members)
        was_safe = guard.safe
        transition = guard.evaluate(last_heard, now)
        reachable = {"a"} | {
            n for n, t in last_heard.items() if n in members and now - t <= detect_after
        }
        quorum = 2 * len(reachable) > size
        run_start = (now if run_start is None else run_start) if quorum else None
        assert guard.reachable == frozenset(reachable)
        if guard.safe:
            assert quorum, "safe without a strict majority reachable"
        if not quorum:
            assert not guard.safe, "still safe at an evaluation without quorum"
        if quorum and (size == 1 or not ever_safe):
            assert guard.safe, "first quorum (or a lone member) must be safe at once"
        if quorum and run_start is not None and now - run_start >= hysteresis:
            assert guard.safe, "quorum held for the hysteresis but still blocked"
        if transition is None:
            assert guard.safe == was_safe
        else:
            assert guard.safe != was_safe
            assert transition.state is guard.state
            assert transition.reachable == tuple(sorted(reachable))
            assert transition.members == tuple(sorted(members))
            assert transition.first == (guard.safe and not ever_safe)
            if guard.safe and ever_safe and size > 1:
                assert run_start is not None and now - run_start >= hysteresis, (
                    "re-enabled before the hysteresis elapsed"
                )
        ever_safe = ever_safe or guard.safe

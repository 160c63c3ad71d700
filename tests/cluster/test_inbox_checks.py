"""The cluster tests' own checker (``check_inboxes``) on known-bad histories.

No processes: if the checker accepted a lost, duplicated, unexpected or
re-numbered message, every cluster test built on it would pass vacuously.
"""

from __future__ import annotations

import pytest
from cluster_helpers import Ack, Workload, check_inboxes

from iris_raft import StoredMessage

pytestmark = pytest.mark.cluster


def _history() -> tuple[Workload, dict[str, list[StoredMessage]]]:
    wl = Workload(tag="t", writers=2, recipients=2)
    inboxes: dict[str, list[StoredMessage]] = {u: [] for u in wl.inboxes}
    for w in range(2):
        for seq in range(3):
            cid = f"t-w{w}-{seq}"
            wl.attempted.add(cid)
            mid = f"mid-{w}-{seq}"
            wl.acks[cid] = Ack(
                f"t-w{w}", cid, wl.recipient_of(w), mid, at=float(seq), duplicate=False
            )
            inboxes[wl.recipient_of(w)].append(StoredMessage(mid, f"t-w{w}", cid.encode(), 0, 0))
    return wl, inboxes


def test_a_good_history_passes() -> None:
    wl, inboxes = _history()
    assert check_inboxes(wl, inboxes, where="good") == []


def test_a_lost_acknowledged_send_fails() -> None:
    wl, inboxes = _history()
    inboxes["t-inbox-0"].pop(1)
    with pytest.raises(AssertionError, match="1 acknowledged sends lost"):
        check_inboxes(wl, inboxes, where="lost")


def test_a_duplicate_fails() -> None:
    wl, inboxes = _history()
    first = inboxes["t-inbox-1"][0]
    inboxes["t-inbox-1"].append(first._replace(mid="another"))
    with pytest.raises(AssertionError, match="stored more than once"):
        check_inboxes(wl, inboxes, where="dup")


def test_an_unexpected_message_fails() -> None:
    wl, inboxes = _history()
    inboxes["t-inbox-0"].append(StoredMessage("m", "t-w0", b"t-w0-99", 0, 0))
    with pytest.raises(AssertionError, match="unexpected message"):
        check_inboxes(wl, inboxes, where="unexpected")


def test_a_message_in_the_wrong_inbox_fails() -> None:
    wl, inboxes = _history()
    inboxes["t-inbox-1"].append(inboxes["t-inbox-0"].pop(0))
    with pytest.raises(AssertionError, match="wrong inbox"):
        check_inboxes(wl, inboxes, where="misrouted")


def test_another_mid_fails_unless_tolerated_after_the_fault() -> None:
    wl, inboxes = _history()
    inboxes["t-inbox-0"][2] = inboxes["t-inbox-0"][2]._replace(mid="replayed")
    with pytest.raises(AssertionError, match="stored under another mid"):
        check_inboxes(wl, inboxes, where="renumbered")
    # Acknowledged at t=2.0: tolerated only when the fault came before that.
    assert check_inboxes(wl, inboxes, where="t", mid_may_differ_after=1.5) == [
        ("t-w0-2", "mid-0-2", "replayed")
    ]
    with pytest.raises(AssertionError, match="stored under another mid"):
        check_inboxes(wl, inboxes, where="t", mid_may_differ_after=2.5)

"""Histories of a fault run: what each client asked, what it was told, when.

Theory of operation
-------------------
A :class:`History` is an append-only list of :class:`Op` entries in the order
they happened. The harness records an ``invoke`` when a client starts an
operation and a completion when it learns the outcome, following Jepsen:

* ``ok``: it happened (a read's value is the value observed);
* ``fail``: it certainly did not happen (a read that errors is a ``fail``);
* ``info``: unknown outcome (a timed-out write): it may or may not have
  happened, at any time after its invocation. A process that got ``info``
  never invokes again; the harness gives its worker a fresh process number.

A process has at most one operation open at a time, so an invocation is
paired with the next completion of the same process (:meth:`History.pairs`).
Entry positions (``Op.index``) give the real-time order: an operation whose
completion has a lower index than another's invocation happened before it.
``Op.time`` is for people and for fault windows.

Fault injection is recorded by :meth:`History.nemesis` with process
:data:`NEMESIS` (-1): ``f`` is ``"start"`` or ``"stop"`` (``"heal"`` is an
alias; Jepsen's ``"start-partition"`` / ``"stop-partition"`` work too) and the
value names the fault; :meth:`History.fault_windows` turns them into intervals.

Values are stored as JSON lines (:meth:`History.dump`, :meth:`History.load`).
Bytes become ``{"$b": base64}``, tuples become lists, and a dict whose only key
starts with ``$`` is wrapped as ``{"$map": {...}}`` so it cannot be mistaken
for an encoded value. Dict keys must be strings.

Recording does no I/O and reads the clock only through the injected
``clock``; nothing here is thread-safe (the harness records from trio tasks of
one thread).
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast, overload

__all__ = [
    "NEMESIS",
    "History",
    "HistoryError",
    "Op",
    "OpType",
]

#: What an entry is: the start of an operation or one of its three outcomes.
OpType = Literal["invoke", "ok", "fail", "info"]

_OP_TYPES: Final = frozenset({"invoke", "ok", "fail", "info"})
_COMPLETIONS: Final = frozenset({"ok", "fail", "info"})

#: Process number of fault-injection entries.
NEMESIS: Final = -1

_START_WORDS: Final = ("start",)
_STOP_WORDS: Final = ("stop", "heal", "end")


class HistoryError(ValueError):
    """A history was recorded or stored in a way that cannot be paired or read.

    Raised for harness bugs (an invocation on a process that already has one
    open, completing an operation twice), for values JSON cannot hold, and for
    malformed history files (the message names the file and line). Fix the
    harness or the file; a checker never raises it for a merely odd history.
    """


@dataclass(frozen=True, slots=True)
class Op:
    """One history entry.

    ``index`` is the entry's position in the history; ``process`` the client
    (or :data:`NEMESIS`); ``time`` monotonic seconds since the run started;
    ``extra`` anything else worth keeping (error code, ``mid``, node).
    """

    index: int
    process: int
    type: OpType
    f: str
    key: str | None
    value: Any
    time: float
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in _OP_TYPES:
            raise HistoryError(f"op type must be one of {sorted(_OP_TYPES)}, not {self.type!r}")

    def __hash__(self) -> int:
        return hash((self.index, self.process, self.type, self.f))

    def to_json(self) -> dict[str, Any]:
        """The entry as a JSON-ready dict (see the module docstring for values).

        Raises :class:`HistoryError` if a value cannot be stored.
        """
        return {
            "index": self.index,
            "process": self.process,
            "type": self.type,
            "f": self.f,
            "key": self.key,
            "value": _encode(self.value),
            "time": self.time,
            "extra": _encode(self.extra),
        }

    @classmethod
    def from_json(cls, raw: Any) -> Op:
        """The entry stored by :meth:`to_json`; raises :class:`HistoryError` if malformed."""
        if not isinstance(raw, dict):
            raise HistoryError("an entry must be a JSON object")
        try:
            index, process, op_type = raw["index"], raw["process"], raw["type"]
            f, key, value, at = raw["f"], raw["key"], raw["value"], raw["time"]
        except KeyError as e:
            raise HistoryError(f"entry has no {e.args[0]!r} field") from None
        extra = _decode(raw.get("extra", {}))
        if not (isinstance(index, int) and isinstance(process, int)):
            raise HistoryError("index and process must be integers")
        if not isinstance(f, str) or not (key is None or isinstance(key, str)):
            raise HistoryError("f must be a string and key a string or null")
        if not isinstance(at, int | float) or not isinstance(extra, dict):
            raise HistoryError("time must be a number and extra an object")
        if op_type not in _OP_TYPES:
            raise HistoryError(f"unknown op type {op_type!r}")
        return cls(index, process, op_type, f, key, _decode(value), float(at), extra)


class _Same:
    """Marker: the completion keeps the invocation's value."""

    def __repr__(self) -> str:
        return "SAME"


_SAME: Final = _Same()


class History:
    """An append-only list of :class:`Op`, recorded by the harness.

    ``clock`` returns seconds; by default, monotonic seconds since the
    history was created. Tests pass their own (a counter works).
    """

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        if clock is None:
            origin = time.monotonic()

            def clock() -> float:
                return time.monotonic() - origin

        self._clock: Callable[[], float] = clock
        self._ops: list[Op] = []
        self._open: dict[int, int] = {}  # process -> index of its open invocation

    # ------------------------------------------------------------ sequence
    def __len__(self) -> int:
        return len(self._ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self._ops)

    @overload
    def __getitem__(self, i: int) -> Op: ...
    @overload
    def __getitem__(self, i: slice) -> list[Op]: ...
    def __getitem__(self, i: int | slice) -> Op | list[Op]:
        return self._ops[i]

    @property
    def ops(self) -> tuple[Op, ...]:
        """A copy of the entries, in order."""
        return tuple(self._ops)

    # ------------------------------------------------------------ recording
    def _append(
        self, process: int, op_type: OpType, f: str, key: str | None, value: Any, extra: Any
    ) -> Op:
        op = Op(len(self._ops), process, op_type, f, key, value, float(self._clock()), extra)
        self._ops.append(op)
        return op

    def invoke(
        self, process: int, f: str, key: str | None = None, value: Any = None, **extra: Any
    ) -> Op:
        """Record that ``process`` starts operation ``f`` on ``key``; returns the entry.

        Raises :class:`HistoryError` if ``process`` is negative or already has
        an operation open (complete it first, or use a new process number).
        """
        if process < 0:
            raise HistoryError(f"client processes are >= 0, not {process} (use nemesis())")
        if process in self._open:
            raise HistoryError(
                f"process {process} still has op #{self._open[process]} open; "
                "complete it (info if the outcome is unknown) before invoking again"
            )
        op = self._append(process, "invoke", f, key, value, extra)
        self._open[process] = op.index
        return op

    def complete(self, invoke_op: Op, type: OpType, value: Any = _SAME, **extra: Any) -> Op:
        """Record the outcome of ``invoke_op``: ``"ok"``, ``"fail"`` or ``"info"``.

        ``value`` defaults to the invocation's value (pass the observed value
        for a read). Raises :class:`HistoryError` if ``type`` is not a
        completion or ``invoke_op`` is not the open invocation of its process.
        """
        if type not in _COMPLETIONS:
            raise HistoryError(f"a completion is ok, fail or info, not {type!r}")
        if invoke_op.type != "invoke" or self._open.get(invoke_op.process) != invoke_op.index:
            raise HistoryError(f"op #{invoke_op.index} is not an open invocation")
        del self._open[invoke_op.process]
        if value is _SAME:
            value = invoke_op.value
        return self._append(invoke_op.process, type, invoke_op.f, invoke_op.key, value, extra)

    def observe(
        self, process: int, f: str, key: str | None = None, value: Any = None, **extra: Any
    ) -> Op:
        """Record something ``process`` saw happen (e.g. ``"deliver"``) as an
        invocation immediately followed by its ``ok`` (both carry ``value`` and
        ``extra``); returns the ``ok`` entry.

        Raises :class:`HistoryError` like :meth:`invoke`.
        """
        return self.complete(self.invoke(process, f, key, value, **extra), "ok", **extra)

    def nemesis(self, f: str, value: Any = None, **extra: Any) -> Op:
        """Record a fault event: ``f`` = ``"start"`` or ``"stop"`` (``"heal"``),
        ``value`` = the fault's name (or a dict with a ``"name"``).

        A ``stop`` without a name ends every open fault.
        """
        return self._append(NEMESIS, "info", f, None, value, extra)

    def pending(self) -> list[Op]:
        """Invocations still open (at the end of a run, complete them as ``info``)."""
        return [self._ops[i] for i in sorted(self._open.values())]

    # ------------------------------------------------------------ reading
    def pairs(self) -> list[tuple[Op, Op | None]]:
        """Client operations as ``(invocation, completion)`` in invocation order.

        The completion is None when none was recorded (treat it as ``info``).
        Fault entries are left out. See :meth:`validate` for what was odd.
        """
        return _pair(self._ops)[0]

    def validate(self) -> list[str]:
        """Convention violations, one sentence each; empty if none.

        Reported: an invocation by a process that got ``info`` (Jepsen
        processes never come back), an invocation while the same process had
        one open, a completion with no open invocation or of another ``f``,
        entries whose index is not their position, and time going backwards.
        """
        problems = _pair(self._ops)[1]
        last = -math.inf
        for pos, op in enumerate(self._ops):
            if op.index != pos:
                problems.append(f"entry at position {pos} has index {op.index}")
            if op.time < last:
                problems.append(f"op #{op.index} is earlier ({op.time}) than the entry before it")
            last = max(last, op.time)
        return problems

    def fault_windows(self) -> list[tuple[float, float | None, str]]:
        """``(start, end, name)`` of every fault, by start time.

        ``end`` is None for a fault never healed before the history ended.
        """
        open_faults: list[tuple[float, str]] = []
        windows: list[tuple[float, float | None, str]] = []
        for op in self._ops:
            if op.process != NEMESIS:
                continue
            action, name = _fault_event(op)
            if action == "start":
                open_faults.append((op.time, name or "fault"))
            elif action == "stop":
                if name is None:
                    windows.extend((start, op.time, fault) for start, fault in open_faults)
                    open_faults = []
                    continue
                for pos, (start, fault) in enumerate(open_faults):
                    if fault == name:
                        windows.append((start, op.time, fault))
                        del open_faults[pos]
                        break
        windows.extend((start, None, fault) for start, fault in open_faults)
        windows.sort(key=lambda w: (w[0], math.inf if w[1] is None else w[1]))
        return windows

    # ------------------------------------------------------------ storage
    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write the history as JSON lines (one entry per line) to ``path``.

        Raises :class:`HistoryError` if a value cannot be stored (nothing is
        written then) and ``OSError`` if the file cannot be written.
        """
        lines = [json.dumps(op.to_json(), separators=(",", ":")) for op in self._ops]
        with open(path, "w", encoding="utf-8") as out:
            for line in lines:
                out.write(line)
                out.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> History:
        """Read a history written by :meth:`dump`.

        Raises :class:`HistoryError` naming the file and line of a malformed
        entry, ``OSError`` if the file cannot be read.
        """
        ops: list[Op] = []
        with open(path, encoding="utf-8") as src:
            for lineno, line in enumerate(src, 1):
                if not line.strip():
                    continue
                try:
                    ops.append(Op.from_json(json.loads(line)))
                except (HistoryError, ValueError) as e:
                    raise HistoryError(f"{os.fspath(path)}:{lineno}: {e}") from None
        return cls.from_ops(ops)

    @classmethod
    def from_ops(cls, ops: Iterable[Op], clock: Callable[[], float] | None = None) -> History:
        """A history holding ``ops`` as they are (check them with :meth:`validate`);
        further entries are recorded after them. Without a ``clock``, time goes
        on from the last entry's time."""
        history = cls(clock)
        history._ops = list(ops)
        if clock is None and history._ops:
            resume_at = max(op.time for op in history._ops)
            origin = time.monotonic()
            history._clock = lambda: resume_at + (time.monotonic() - origin)
        for inv, done in _pair(history._ops)[0]:
            if done is None:
                history._open[inv.process] = inv.index
        return history


def _pair(ops: list[Op]) -> tuple[list[tuple[Op, Op | None]], list[str]]:
    problems: list[str] = []
    found: list[list[Any]] = []  # [invocation, completion | None]
    open_by_process: dict[int, int] = {}  # process -> position in `found`
    gave_info: dict[int, int] = {}  # process -> index of its info completion
    for op in ops:
        if op.process < 0:
            continue
        p = op.process
        if op.type == "invoke":
            if p in open_by_process:
                earlier = found[open_by_process[p]][0].index
                problems.append(f"process {p} invoked op #{op.index} while op #{earlier} was open")
            if p in gave_info:
                problems.append(
                    f"process {p} invoked op #{op.index} after its op #{gave_info[p]} "
                    "ended with info (a process never invokes again after info)"
                )
            open_by_process[p] = len(found)
            found.append([op, None])
            continue
        slot = open_by_process.pop(p, None)
        if slot is None:
            problems.append(f"completion #{op.index} of process {p} has no open invocation")
            continue
        if found[slot][0].f != op.f:
            problems.append(
                f"completion #{op.index} ({op.f}) does not match op #{found[slot][0].index} "
                f"({found[slot][0].f})"
            )
        found[slot][1] = op
        if op.type == "info":
            gave_info[p] = op.index
    return [(inv, done) for inv, done in found], problems


def _fault_event(op: Op) -> tuple[str | None, str | None]:
    """(``"start"`` | ``"stop"`` | None, fault name or None) of a nemesis entry."""
    f = op.f.lower()
    action: str | None = None
    suffix = ""
    for word, kind in [(w, "start") for w in _START_WORDS] + [(w, "stop") for w in _STOP_WORDS]:
        if f == word or f.startswith((word + "-", word + ":", word + "_")):
            action, suffix = kind, op.f[len(word) + 1 :]
            break
    name: str | None = None
    if isinstance(op.value, str):
        name = op.value
    elif isinstance(op.value, dict) and "name" in op.value:
        name = str(op.value["name"])
    elif suffix:
        name = suffix
    return action, name


# ---------------------------------------------------------------- JSON values
def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$b": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise HistoryError(f"dict keys must be strings to be stored, not {k!r}")
            out[k] = _encode(v)
        if len(out) == 1 and next(iter(out)).startswith("$"):
            return {"$map": out}
        return out
    raise HistoryError(f"cannot store a value of type {type(value).__name__} in a history")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((k, v),) = value.items()
            if k == "$b":
                if not isinstance(v, str):
                    raise HistoryError("$b must hold a base64 string")
                try:
                    return base64.b64decode(v, validate=True)
                except ValueError:
                    raise HistoryError("$b holds invalid base64") from None
            if k == "$map":
                if not isinstance(v, dict):
                    raise HistoryError("$map must hold an object")
                return {kk: _decode(vv) for kk, vv in v.items()}
        return {k: _decode(v) for k, v in cast(dict[str, Any], value).items()}
    return value

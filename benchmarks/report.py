"""``report.md``: the machine, one table of every figure, then each benchmark's notes.

``markdown(results)`` takes the dict ``python -m benchmarks`` writes to
``results.json`` and never raises on partial results: missing machine facts,
``None`` medians, benchmarks that errored and figures without baselines all
render as readable text.
"""

from __future__ import annotations

import math
from typing import Any

DASH = "—"
TIMES = "\u00d7"  # multiplication sign
EN_DASH = "\u2013"


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = ["# Iris benchmarks", ""]
    if results.get("smoke"):
        lines += [
            "> **Smoke run — figures are not meaningful.** Each measurement ran for a second "
            "or two, once, only to prove the benchmark scripts work; do not quote these numbers.",
            "",
        ]
    lines += _machine(results.get("machine") or {})
    benchmarks = results.get("benchmarks") or {}
    if not benchmarks:
        lines += ["No benchmark ran.", ""]
        return "\n".join(lines)
    errored = [name for name, r in benchmarks.items() if _error(r)]
    if errored:
        lines += [f"**Failed:** {', '.join(f'`{n}`' for n in errored)} (tracebacks below).", ""]
    lines += _table(benchmarks)
    descriptions = _descriptions()
    for name, result in benchmarks.items():
        lines += _section(name, result, descriptions.get(name, ""))
    return "\n".join(lines).rstrip() + "\n"


def fmt(x: Any) -> str:
    """A number with 3 significant digits and thousands separators: 12,300; 1.5; 0.00123."""
    if x is None or isinstance(x, bool):
        return DASH
    if not isinstance(x, int | float):
        return str(x)
    x = float(x)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        return f"{x:.3g}"
    mag = math.floor(math.log10(abs(x)))
    decimals = 2 - mag
    rounded = round(x, decimals)
    if decimals <= 0:
        return f"{rounded:,.0f}"
    text = f"{rounded:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``"0.617x"`` (with a multiplication sign); a dash when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return DASH
    return f"{fmt(a / b)}{TIMES}"


# ---------------------------------------------------------------------------


def _machine(m: dict[str, Any]) -> list[str]:
    mem = m.get("memory_gib")
    facts = [
        ("date", m.get("date")),
        ("host", m.get("host")),
        ("cpu", m.get("cpu")),
        ("cores", m.get("cores")),
        ("memory", f"{fmt(mem)} GiB" if mem else None),
        ("kernel", m.get("kernel")),
        ("python", m.get("python")),
        ("commit", f"`{m['commit']}`" if m.get("commit") else None),
        ("command", f"`{m['command']}`" if m.get("command") else None),
    ]
    out = ["## Machine", "", "| | |", "|---|---|"]
    out += [f"| {key} | {_cell(DASH if v in (None, '') else v)} |" for key, v in facts]
    return [*out, ""]


def _table(benchmarks: dict[str, Any]) -> list[str]:
    out = [
        "## Results",
        "",
        "Medians of repeated runs; baselines were measured in the same run on the same machine.",
        "",
        f"| benchmark | figure | median | spread (min{EN_DASH}max, n) "
        "| baselines (median, figure/baseline) | target | met? |",
        "|---|---|--:|---|---|---|---|",
    ]
    for name, result in benchmarks.items():
        result = result if isinstance(result, dict) else {}
        figures = [f for f in result.get("figures") or [] if isinstance(f, dict)]
        shown = f"`{name}`"
        if _error(result):
            last = _error(result).strip().splitlines()[-1] if _error(result).strip() else "error"
            out.append(f"| {shown} | **ERROR**: {_cell(last)} | | | | | |")
            shown = ""
        elif not figures:
            out.append(f"| {shown} | no figures | | | | | |")
        for fig in figures:
            out.append("| " + " | ".join([shown, *_row(fig)]) + " |")
            shown = ""
    return [*out, ""]


def _row(fig: dict[str, Any]) -> list[str]:
    unit = str(fig.get("unit") or "")
    value = _summary(fig.get("value"))
    med = value.get("median")
    median = f"{fmt(med)} {unit}".strip() if med is not None else "n/a"
    n = value.get("n") or 0
    if n > 1 and value.get("min") is not None:
        spread = f"{fmt(value['min'])}{EN_DASH}{fmt(value['max'])}, n={n}"
    else:
        spread = f"n={n}"
    bases = []
    for base, summary in (fig.get("baseline") or {}).items():
        bmed = _summary(summary).get("median")
        if bmed is None:
            bases.append(f"{base}: n/a")
        else:
            bases.append(f"{base}: {fmt(bmed)} ({ratio(med, bmed)})")
    met = {True: "yes", False: "**no**"}.get(fig.get("met"), DASH)
    return [
        _cell(fig.get("name", "?")),
        _cell(median),
        spread,
        "<br>".join(_cell(b) for b in bases) if bases else DASH,
        _cell(fig.get("target") or DASH),
        met,
    ]


def _section(name: str, result: Any, description: str) -> list[str]:
    result = result if isinstance(result, dict) else {"error": f"malformed result: {result!r}"}
    out = [f"## {name}", ""]
    if description:
        out += [description[0].upper() + description[1:] + ".", ""]
    if result.get("seconds") is not None:
        out += [f"Took {fmt(result['seconds'])} s.", ""]
    notes = [str(n) for n in result.get("notes") or []]
    notes += [
        f"*{f.get('name', '?')}*: {f['note']}"
        for f in result.get("figures") or []
        if isinstance(f, dict) and f.get("note")
    ]
    out += [f"- {n}" for n in notes]
    if notes:
        out.append("")
    error = _error(result)
    if error:
        out += ["**This benchmark failed:**", "", "```", error.rstrip(), "```", ""]
    return out


def _summary(value: Any) -> dict[str, Any]:
    """A figure's value or baseline as a summary dict (bare numbers allowed)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"median": value, "min": value, "max": value, "n": 1}
    return {"median": None, "n": 0}


def _error(result: Any) -> str:
    if not isinstance(result, dict) or not result.get("error"):
        return ""
    return str(result["error"])


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell: no pipes, newlines or HTML tags."""
    return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def _descriptions() -> dict[str, str]:
    try:
        from benchmarks.__main__ import BENCHMARKS
    except ImportError:
        return {}
    return dict(BENCHMARKS)

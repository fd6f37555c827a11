"""The replay's report as a table, as JSON (schema in docs/tuning.md), and as an HTML page."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence
from typing import Final

from spamguardd.core.notice import printable, undecodable_escaped
from spamguardd.core.rate import Rate, format_duration
from spamguardd.tools.replay.engine import BlockRecord, Candidate, Report

#: Users in the table of peaks: the highest peaks in any window.
TABLE_PEAKS: Final = 20
#: Users drawn in each chart of peaks: the highest peaks in that window.
CHART_PEAKS: Final = 200


def _iso(at: float, *, zoned: bool) -> str:
    moment = dt.datetime.fromtimestamp(at, dt.UTC)
    text = moment.replace(tzinfo=None).isoformat(timespec="seconds")
    return text + "Z" if zoned else text


def _expiry(block: BlockRecord, *, zoned: bool) -> dict[str, object]:
    """``blocks`` and ``until`` of a user whose blocks expire (``block.expire``); else nothing."""
    if block.until is None and block.blocks == 1:
        return {}
    extra: dict[str, object] = {"blocks": block.blocks}
    if block.until is not None:
        extra["until"] = _iso(block.until, zoned=zoned)
    return extra


def to_json(report: Report) -> dict[str, object]:
    """The ``--json`` document (schema in docs/tuning.md)."""
    limits = []
    for result in report.results:
        blocked = sorted(result.blocked.values(), key=lambda b: (b.at, b.user))
        entry: dict[str, object] = {
            "limit": result.candidate.label,
            "blocked": [
                {
                    "user": undecodable_escaped(b.user),
                    "at": _iso(b.at, zoned=report.zoned),
                    "failures": b.failures,
                    "frozen_after": b.frozen_after,
                    "reason": b.reason,
                    **_expiry(b, zoned=report.zoned),
                }
                for b in blocked
            ],
        }
        if report.warn:  # only with limits.warn_at: today's documents stay as they were
            entry["warned"] = [
                {
                    "user": undecodable_escaped(w.user),
                    "at": _iso(w.at, zoned=report.zoned),
                    "limit": w.limit,
                    "counted": w.counted,
                    "warnings": w.warnings,
                }
                for w in sorted(result.warned.values(), key=lambda w: (w.at, w.user))
            ]
        limits.append(entry)
    extra: dict[str, object] = {}
    if report.volume:
        extra["accepted"] = report.accepted
    return {
        "limits": limits,
        "peaks": {
            undecodable_escaped(user): {
                format_duration(period): n for period, n in sorted(per.items())
            }
            for user, per in sorted(report.peaks.items())
        },
        "lines": {
            "read": report.lines_read,
            "unparsed": report.unparsed,
            "unparsed_examples": [undecodable_escaped(line) for line in report.unparsed_examples],
            **(
                {
                    "relays": {
                        undecodable_escaped(relay.name): {
                            "read": relay.lines,
                            "unparsed": relay.unparsed,
                        }
                        for relay in report.relays
                    }
                }
                if report.relays
                else {}
            ),
        },
        "failures": report.failures,
        **extra,
    }


def to_table(report: Report) -> str:
    """A readable summary: blocks per candidate, then the users who came closest."""
    out = [
        (
            f"lines read: {report.lines_read:,}, unparsed: {report.unparsed:,}, "
            f"failed recipients counted: {report.failures:,}"
        )
    ]
    if report.volume:
        out[0] += f", accepted recipients counted: {report.accepted:,}"
    out.extend(
        f"  relay {relay.name}: {relay.lines:,} lines read, {relay.unparsed:,} unparsed"
        for relay in report.relays
    )
    out.extend(f"  unparsed: {example}" for example in report.unparsed_examples)
    for result in report.results:
        out.append("")
        out.append(f"limit {result.candidate.label}: {len(result.blocked)} user(s) blocked")
        if result.blocked:
            out.append(f"  {'user':<40} {'blocked at':<20} {'failures':>8} {'frozen after':>12}")
            for b in sorted(result.blocked.values(), key=lambda b: (b.at, b.user)):
                at = _iso(b.at, zoned=report.zoned)
                row = f"  {printable(b.user):<40} {at:<20} {b.failures:>8} {b.frozen_after:>12}"
                extra = _expiry(b, zoned=report.zoned)
                if extra:
                    last = extra.get("until", "never")
                    row += f"  ({b.blocks} block(s), the last until {last})"
                out.append(row)
        if report.warn:
            out.append(f"  {len(result.warned)} user(s) warned (limits.warn_at)")
            out.extend(
                f"    {printable(w.user):<38} {_iso(w.at, zoned=report.zoned):<20} "
                f"{w.limit} {w.counted}"
                for w in sorted(result.warned.values(), key=lambda w: (w.at, w.user))
            )
    if report.peaks:
        out.append("")
        heads = " ".join(f"{format_duration(p):>8}" for p in report.windows)
        out.append(f"peak failures per window (top {TABLE_PEAKS})\n  {'user':<40} {heads}")
        top = sorted(report.peaks.items(), key=lambda item: (-max(item[1].values()), item[0]))
        for user, per in top[:TABLE_PEAKS]:
            cells = " ".join(f"{per.get(p, 0):>8}" for p in report.windows)
            out.append(f"  {printable(user):<40} {cells}")
    return "\n".join(out) + "\n"


def to_html(report: Report) -> str:
    """One self-contained page: a timeline per blocked user, and peaks against each limit."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>spamguardd replay</title>",
        (
            "<style>body{font-family:sans-serif;margin:2em}"
            "svg{background:#fafafa;border:1px solid #ddd}</style></head><body>"
        ),
        "<h1>spamguardd replay</h1>",
        (
            f"<p>{report.lines_read:,} lines read, {report.unparsed:,} unparsed, "
            f"{report.failures:,} failed recipients"
            + (f", {report.accepted:,} accepted recipients" if report.volume else "")
            + ".</p>"
        ),
    ]
    if report.relays:
        relays = ", ".join(f"{esc(r.name)} ({r.lines:,} lines)" for r in report.relays)
        parts.append(f"<p>Relays: {relays}.</p>")
    for result in report.results:
        label = esc(result.candidate.label)
        parts.append(f"<h2>limit {label}: {len(result.blocked)} blocked</h2>")
        for b in sorted(result.blocked.values(), key=lambda b: (b.at, b.user)):
            times = list(report.timelines.get(b.user, ()))
            parts.append(
                f"<h3>{esc(printable(b.user))}</h3>"
                f"<p>blocked {esc(_iso(b.at, zoned=report.zoned))} "
                f"after {b.failures} failures; {b.frozen_after} later recipients frozen</p>"
            )
            parts.append(_timeline_svg(times, b.at, zoned=report.zoned))
        if report.warn:  # only with limits.warn_at: today's pages stay as they were
            warned = sorted(result.warned.values(), key=lambda w: (w.at, w.user))
            parts.append(f"<h3>{len(warned)} warned (limits.warn_at)</h3><ul>")
            parts.extend(
                f"<li>{esc(printable(w.user))}: {esc(_iso(w.at, zoned=report.zoned))}, "
                f"{esc(w.limit)} {esc(w.counted)}</li>"
                for w in warned
            )
            parts.append("</ul>")
        parts.append(_peaks_svg(report, result.candidate))
    parts.append("</body></html>\n")
    return "".join(parts)


def _timeline_svg(times: Sequence[float], block_at: float, *, zoned: bool) -> str:
    width, height, pad = 600, 75, 10
    if not times:
        return ""
    start, end = min(times[0], block_at), max(times[-1], block_at)
    span = max(end - start, 1.0)

    def x(t: float) -> float:
        return pad + (t - start) / span * (width - 2 * pad)

    marks = "".join(
        f"<line x1='{x(t):.1f}' y1='15' x2='{x(t):.1f}' y2='45' stroke='#36c'/>" for t in times
    )
    block = (
        f"<line x1='{x(block_at):.1f}' y1='5' x2='{x(block_at):.1f}' y2='55' "
        "stroke='#d00' stroke-width='3'><title>block</title></line>"
    )
    labels = (
        f"<text x='{pad}' y='70' font-size='10'>{_iso(start, zoned=zoned)}</text>"
        f"<text x='{width - pad}' y='70' font-size='10' text-anchor='end'>"
        f"{_iso(end, zoned=zoned)}</text>"
    )
    return f"<svg width='{width}' height='{height}' role='img'>{marks}{block}{labels}</svg>"


def _own_limit(report: Report, user: str, rate: Rate) -> Rate | None:
    """The limit *user* is held to in *rate*'s window: its override's (None when the override
    has no such window), else the candidate's *rate*."""
    override = report.overrides.get(user)
    if override is None:
        return rate
    return next((own for own in override if own.period == rate.period), None)


def _peaks_svg(report: Report, candidate: Candidate) -> str:
    """Per window of *candidate*: the highest peaks as bars, sorted, with the limit as a line.

    A bar is red where the user reached the limit it is held to: a user with an override is
    compared with its own (drawn in purple, its limit as a black tick on the bar when within
    the chart). Each bar's tooltip names the user, its peak and its limit.
    """
    out = []
    for rate in candidate.rates:
        window = format_duration(rate.period)
        ranked = sorted(
            ((per.get(rate.period, 0), user) for user, per in report.peaks.items()),
            key=lambda item: (-item[0], item[1]),
        )[:CHART_PEAKS]
        if not ranked:
            continue
        width, height, pad = 600, 160, 20
        top = max(ranked[0][0], rate.count) * 1.1
        bar = (width - 2 * pad) / len(ranked)

        def y(n: float, top: float = top, height: int = height, pad: int = pad) -> float:
            return height - pad - n / top * (height - 2 * pad)

        bars = []
        for i, (n, user) in enumerate(ranked):
            own = _own_limit(report, user, rate)
            overridden = user in report.overrides
            if own is not None and n >= own.count:
                fill = "#d00"
            else:
                fill = "#93c" if overridden else "#36c"
            if own is None:
                held = f"no limit on {window} (override)"
            else:
                held = f"limit {own}" + (" (override)" if overridden else "")
            left, wide = pad + i * bar, max(bar - 1, 1)
            bars.append(
                f"<rect x='{left:.1f}' y='{y(n):.1f}' width='{wide:.1f}' "
                f"height='{height - pad - y(n):.1f}' fill='{fill}'>"
                f"<title>{html.escape(printable(user))}: peak {n} within {window}, {held}"
                "</title></rect>"
            )
            if overridden and own is not None and own != rate and own.count <= top:
                bars.append(
                    f"<line x1='{left:.1f}' x2='{left + wide:.1f}' y1='{y(own.count):.1f}' "
                    f"y2='{y(own.count):.1f}' stroke='#000' stroke-width='2'/>"
                )
        limit = (
            f"<line x1='{pad}' x2='{width - pad}' y1='{y(rate.count):.1f}' "
            f"y2='{y(rate.count):.1f}' stroke='#000' stroke-dasharray='4'/>"
            f"<text x='{width - pad}' y='{y(rate.count) - 3:.1f}' text-anchor='end' "
            f"font-size='11'>limit {rate}</text>"
        )
        shown = (
            f" (the {len(ranked)} highest of {len(report.peaks):,} users)"
            if len(ranked) < len(report.peaks)
            else ""
        )
        out.append(
            f"<h4>peak failures within {window}, per user{shown}</h4>"
            f"<svg width='{width}' height='{height}' role='img'>{''.join(bars)}{limit}</svg>"
        )
    return "".join(out)

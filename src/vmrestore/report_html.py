"""The restore report as one self-contained HTML page: a timeline per disk.

Why: performance engineers want to see where the time went, not read a final
percentage. For every disk the page draws (1) throughput over time, data
written and zeros (zeroed or skipped) stacked, and (2) the busy share of
source / proxy / network / target over time, and names the bottleneck
(vmrestore.timeline.bottleneck). Charts are inline SVG written here: no
script, no fonts, no network fetch, so the file opens anywhere, offline.
"""

from __future__ import annotations

import html
import math
from typing import Any

from vmrestore.timeline import PLACES, ROLES, bottleneck, intervals

W, H = 760, 230                  # chart size (SVG user units)
ML, MR, MT, MB = 58, 150, 14, 34  # margins: room for axes and the legend
COLORS = {"data": "#2f6fb0", "zeros": "#b9c4cf", "source": "#8e5ea2", "proxy": "#e08a1e",
          "network": "#2f9e5b", "target": "#c9393b", "throttle": "#7a7a7a"}
ROLE_TEXT = {"source": "source (reading the backup)",
             "proxy": "proxy (decompress + verify)",
             "network": "network (NBD write lane)",
             "target": "target (local device / LUN writes)",
             "throttle": "the rate limit (--max-rate / max_rate: readers held back)"}

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:980px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 4px}
table{border-collapse:collapse;margin:8px 0} td,th{padding:2px 10px;border-bottom:1px solid #ddd;
text-align:left} td.n{text-align:right}
.bottleneck{margin:4px 0 8px;padding:6px 10px;background:#fff4df;border-left:4px solid #e08a1e}
svg.chart{display:block;margin:6px 0 14px;background:#fff;border:1px solid #ddd}
svg text{font:11px system-ui,sans-serif;fill:#333} .axis{stroke:#888} .grid{stroke:#eee}
.muted{color:#666}
"""


def nice_ticks(top: float, n: int = 5) -> list[float]:
    """Round tick values from 0 up to at least `top` (1, 2, 5 x 10^k steps)."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


class _Frame:
    """x (seconds) and y (value) to SVG coordinates for one chart."""

    def __init__(self, t_end: float, y_top: float) -> None:
        self.t_end = t_end or 1.0
        self.y_top = y_top or 1.0

    def x(self, t: float) -> float:
        return round(ML + (W - ML - MR) * t / self.t_end, 1)

    def y(self, v: float) -> float:
        return round(MT + (H - MT - MB) * (1 - v / self.y_top), 1)


def _axes(f: _Frame, yticks: list[float], ylabel: str, yfmt: str) -> list[str]:
    out = []
    for v in yticks:
        y = f.y(v)
        out.append(f'<line class="grid" x1="{ML}" y1="{y}" x2="{W - MR}" y2="{y}"/>')
        out.append(f'<text x="{ML - 6}" y="{y + 4}" text-anchor="end">{yfmt.format(v)}</text>')
    for t in nice_ticks(f.t_end, 8):
        if t > f.t_end * 1.001:
            break
        x = f.x(t)
        out.append(f'<line class="axis" x1="{x}" y1="{H - MB}" x2="{x}" y2="{H - MB + 4}"/>')
        out.append(f'<text x="{x}" y="{H - MB + 16}" text-anchor="middle">{t:g}</text>')
    out.append(f'<line class="axis" x1="{ML}" y1="{H - MB}" x2="{W - MR}" y2="{H - MB}"/>')
    out.append(f'<line class="axis" x1="{ML}" y1="{MT}" x2="{ML}" y2="{H - MB}"/>')
    out.append(f'<text x="{(ML + W - MR) / 2}" y="{H - 4}" text-anchor="middle">'
               'seconds since the disk started</text>')
    out.append(f'<text transform="translate(14,{(MT + H - MB) / 2}) rotate(-90)" '
               f'text-anchor="middle">{ylabel}</text>')
    return out


def _legend(items: list[tuple[str, str]]) -> list[str]:
    out = []
    for i, (key, label) in enumerate(items):
        y = MT + 10 + 18 * i
        out.append(f'<rect x="{W - MR + 12}" y="{y - 9}" width="12" height="10" '
                   f'fill="{COLORS[key]}"/>')
        out.append(f'<text x="{W - MR + 30}" y="{y}">{html.escape(label)}</text>')
    return out


def _step(rows: list[dict[str, float]], f: _Frame, value: Any, base: Any) -> str:
    """Polygon points of a step area between base(row) and value(row)."""
    top, bottom = [], []
    for r in rows:
        top += [(f.x(r["t0"]), f.y(value(r))), (f.x(r["t1"]), f.y(value(r)))]
        bottom += [(f.x(r["t0"]), f.y(base(r))), (f.x(r["t1"]), f.y(base(r)))]
    return " ".join(f"{x},{y}" for x, y in top + bottom[::-1])


def _axis_top(values: list[float]) -> float:
    """The y range: the peak, unless a few intervals dwarf the rest (zero runs answered
    at once run at GB/s); then 1.5x the 90th percentile, and those bars are clipped."""
    if not values:
        return 0.0
    peak = max(values)
    p90 = sorted(values)[int(0.9 * (len(values) - 1))]
    return 1.5 * p90 if p90 > 0 and peak > 3 * p90 else peak * 1.05


def throughput_svg(disk: int, rows: list[dict[str, float]]) -> str:
    """Stacked step areas: data MB/s, then zeros MB/s on top (clipped bars say their value)."""
    t_end = rows[-1]["t1"] if rows else 1.0
    totals = [r["data_mbps"] + r["zero_mbps"] for r in rows]
    ticks = nice_ticks(_axis_top(totals))
    f = _Frame(t_end, ticks[-1])
    top = ticks[-1]
    clipped = [r for r, v in zip(rows, totals, strict=True) if v > top]
    rows = [dict(r, data_mbps=min(r["data_mbps"], top),
                 zero_mbps=min(r["zero_mbps"], top - min(r["data_mbps"], top))) for r in rows]
    parts = [f'<svg class="chart" data-chart="throughput" data-disk="{disk}" '
             f'data-points="{len(rows)}" xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">',
             f"<title>disk {disk}: throughput over time (MB/s)</title>"]
    parts += _axes(f, ticks, "MB/s (10^6 bytes)", "{:g}")
    if rows:
        parts.append(f'<polygon fill="{COLORS["data"]}" points="'
                     f'{_step(rows, f, lambda r: r["data_mbps"], lambda r: 0.0)}"/>')
        parts.append(f'<polygon fill="{COLORS["zeros"]}" points="'
                     + _step(rows, f, lambda r: r["data_mbps"] + r["zero_mbps"],
                             lambda r: r["data_mbps"]) + '"/>')
    for r in clipped:
        parts.append(f'<text x="{f.x(r["t1"]) + 3}" y="{MT + 10}">'
                     f'↑ {r["data_mbps"] + r["zero_mbps"]:.0f} MB/s</text>')
    parts += _legend([("data", "data written"), ("zeros", "zeroed / skipped")])
    parts.append("</svg>")
    return "\n".join(parts)


def busy_svg(disk: int, rows: list[dict[str, float]], roles: list[str]) -> str:
    """One line per role: the share of each interval that stage was busy (0..100 %)."""
    t_end = rows[-1]["t1"] if rows else 1.0
    f = _Frame(t_end, 100.0)
    parts = [f'<svg class="chart" data-chart="busy" data-disk="{disk}" '
             f'data-points="{len(rows)}" xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">',
             f"<title>disk {disk}: busy share per stage over time</title>"]
    parts += _axes(f, [0, 25, 50, 75, 100], "busy share (%)", "{:g}%")
    for role in roles:
        # thin: each interval; thick: a moving average over about half a second
        pts = []
        for r in rows:
            y = f.y(100 * r[role])
            pts += [f"{f.x(r['t0'])},{y}", f"{f.x(r['t1'])},{y}"]
        parts.append(f'<polyline data-role="{role}" fill="none" stroke="{COLORS[role]}" '
                     f'stroke-width="1" stroke-opacity="0.35" points="{" ".join(pts)}"/>')
        smooth = []
        for i, r in enumerate(rows):
            win = rows[max(0, i - 2):i + 3]
            span = sum(x["t1"] - x["t0"] for x in win)
            v = sum(x[role] * (x["t1"] - x["t0"]) for x in win) / span if span > 0 else 0.0
            smooth.append(f"{f.x((r['t0'] + r['t1']) / 2)},{f.y(100 * v)}")
        parts.append(f'<polyline data-role="{role}-avg" fill="none" stroke="{COLORS[role]}" '
                     f'stroke-width="2.5" points="{" ".join(smooth)}"/>')
    parts += _legend([(r, r) for r in roles])
    parts.append("</svg>")
    return "\n".join(parts)


def bottleneck_text(tl: dict[str, Any]) -> str:
    role, share, led = bottleneck(tl)
    if not role:
        return "no samples: the disk finished before the first counter reading"
    what = ROLE_TEXT[role]
    if share < 0.5:
        return (f"no stage saturated: the busiest, {what}, was busy {100 * share:.0f}% of the "
                "time (start-up, latency or a slow source dominate)")
    return (f"bottleneck: {what}, busy {100 * share:.0f}% of the time and the busiest stage "
            f"in {100 * led:.0f}% of the samples")


def _disk_section(d: dict[str, Any]) -> str:
    tl = d.get("timeline") or {}
    logical = d.get("logical_bytes") or (d.get("bytes_written", 0) + d.get("bytes_zeroed", 0)
                                         + d.get("bytes_skipped", 0))
    head = (f'<section class="disk" id="disk-{d["disk"]}"><h2>disk {d["disk"]}'
            f'{" (" + html.escape(d["label"]) + ")" if d.get("label") else ""} — '
            f'{html.escape(d.get("transport") or "-")}, {logical / (1 << 20):.0f} MiB in '
            f'{d.get("seconds", 0):.2f} s ({d.get("mb_per_s", 0):.0f} MB/s), '
            f'{html.escape(d.get("status", ""))}</h2>')
    busy = d.get("busy") or {}
    avg = ", ".join(f"{k} {100 * float(busy.get(k, 0)):.0f}%" for k in ROLES
                    if k in PLACES or busy.get(k))
    if not tl.get("t"):
        return (head + f'<p class="muted">no timeline recorded for this disk '
                f'(average busy: {avg})</p></section>')
    rows = intervals(tl)
    roles = [r for r in ROLES if any(x[r] > 0 for x in rows)] or list(PLACES)
    return "\n".join([
        head,
        f'<p class="bottleneck">{html.escape(bottleneck_text(tl))}</p>',
        f'<p class="muted">written {d.get("bytes_written", 0) / (1 << 20):.1f} MiB, zeroed '
        f'{d.get("bytes_zeroed", 0) / (1 << 20):.1f} MiB, skipped '
        f'{d.get("bytes_skipped", 0) / (1 << 20):.1f} MiB; average busy {avg}; '
        f'{len(tl["t"])} samples</p>',
        throughput_svg(d["disk"], rows),
        busy_svg(d["disk"], rows, roles),
        "</section>"])


def render(doc: dict[str, Any]) -> str:
    """The whole page for a restore report document (vmrestore.report.Report.as_dict)."""
    vm = doc.get("vm") or {}
    title = f"vmrestore restore report: {vm.get('name') or doc.get('backup') or ''}"
    phases = "".join(
        f"<tr><td>{html.escape(p['name'])}</td><td>{html.escape(p['status'])}</td>"
        f"<td class=n>{p['seconds']:.2f}</td><td>{html.escape(p.get('detail') or '')}</td></tr>"
        for p in doc.get("phases") or [])
    status = doc.get("status", "")
    err = f" — {html.escape(str(doc['error']))}" if doc.get("error") else ""
    backup = f"backup {html.escape(str(doc['backup']))}; " if doc.get("backup") else ""
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="muted">{backup}'
        f'proxy {html.escape(str(doc.get("proxy") or "-"))}; status {html.escape(status)}{err}; '
        f'{doc.get("seconds", 0):.2f} s in all</p>',
    ]
    if phases:
        body.append("<table><tr><th>phase</th><th>status</th><th>seconds</th><th>detail</th>"
                    f"</tr>{phases}</table>")
    body += [_disk_section(d) for d in doc.get("disks") or []]
    body.append('<p class="muted">Throughput: bytes finished per sampling interval (data '
                "written, and zero ranges zeroed or skipped). Busy share: the part of each "
                "interval a stage was working (per thread, averaged over its threads; thin lines "
                "per interval, thick ones averaged over five); the "
                "stage busiest over the whole disk is the one the others wait for.</p>")
    return ("<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def from_restore_disk(d: dict[str, Any]) -> dict[str, Any]:
    """A `restore-disk --json` document seen as a one-disk restore report."""
    from vmrestore.timeline import role_busy

    disk = dict(d, status="ok", transport=d.get("transport", ""),
                busy=role_busy(d.get("transport", ""), d.get("busy") or {}))
    return {"status": "ok", "backup": "", "seconds": d.get("seconds", 0),
            "vm": {"name": f"restore-disk -> {d.get('target', '')}"}, "phases": [],
            "disks": [disk]}

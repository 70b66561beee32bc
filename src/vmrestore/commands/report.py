"""`vmrestore report REPORT.json`: show a saved restore report, or draw its timeline.

Takes the document `vmrestore restore --json` wrote (or `restore-disk --json`:
one disk). Without options it prints the summary table; `--html OUT.html`
writes one self-contained page with per-disk throughput and busy-share
charts and the bottleneck named (vmrestore.report_html).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vmrestore.errors import FormatError, SourceError, TargetError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "report", help="print a saved restore report, or draw its timeline as HTML",
        description="Read a restore report (the JSON of 'vmrestore restore --json', or of "
                    "'restore-disk --json') and print its table, or with --html write a "
                    "self-contained page: per disk throughput over time, the busy share of "
                    "source / proxy / network / target, and the bottleneck named.")
    p.add_argument("report", metavar="REPORT.json", help="the saved JSON document")
    p.add_argument("--html", metavar="OUT.html", help="write the timeline page here")
    p.set_defaults(func=run)


def load(path: str) -> dict[str, Any]:
    """The report document, as a restore report (restore-disk output converted)."""
    from vmrestore.report_html import from_restore_disk

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read the report: {e}") from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise FormatError(f"{path}: not a JSON report: {e}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: not a restore report (expected a JSON object)")
    if "report_version" in doc and isinstance(doc.get("disks"), list):
        return doc
    if "writer" in doc and "disk" in doc:
        return from_restore_disk(doc)
    raise FormatError(f"{path}: not a restore report (no report_version / disks, and not "
                      "restore-disk --json output)")


def run(args: argparse.Namespace) -> int:
    from vmrestore import report as rep
    from vmrestore.report_html import render

    doc = load(args.report)
    if args.html:
        try:
            Path(args.html).write_text(render(doc))
        except OSError as e:
            raise TargetError(f"{args.html}: cannot write: {e}") from None
        print(f"wrote {args.html} ({len(doc.get('disks') or [])} disk timeline(s))",
              file=sys.stderr)
        return 0
    if "report_version" in doc:
        try:
            print(rep.format_table(rep.from_dict(doc, str(args.report))))
        except (KeyError, TypeError) as e:
            raise FormatError(f"{args.report}: incomplete restore report ({e})") from None
    else:
        d = doc["disks"][0]
        print(f"disk {d['disk']} -> {d.get('target', '')}: {d.get('seconds', 0):.2f} s, "
              f"{d.get('mb_per_s', 0):.1f} MiB/s")
    return 0

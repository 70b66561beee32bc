"""`vmrestore proxy-mover`: run one data-phase job, report JSON lines (docs/proxy-mover.md)."""

from __future__ import annotations

import argparse
import signal
import sys

from vmrestore.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "proxy-mover",
        help="run a data-phase job (JSON) and report progress as JSON lines",
        description="The proxy-side data mover the orchestrator starts: reads a job (JSON on "
        "stdin or --job FILE), restores its disks, writes one JSON event per line on stdout "
        "and a final 'result' line; the exit code says what happened (docs/proxy-mover.md).",
    )
    p.add_argument("--job", metavar="FILE", default="-", help="job file (default: stdin)")
    p.add_argument("--parent-pid", type=int, metavar="PID",
                   help="stop (as on SIGTERM) when process PID, our parent, dies: a killed "
                   "orchestrator leaves no mover writing behind it (Linux)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vmrestore.mover import proxy_mover

    if args.job == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(args.job) as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"--job {args.job}: {e.strerror}") from None

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    if args.parent_pid:
        _exit_with_parent(args.parent_pid)
    return proxy_mover.main(text)


def _exit_with_parent(pid: int) -> None:
    """SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG); already gone -> SIGTERM now."""
    import ctypes
    import os

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the mover stops at its next event instead
        return
    if os.getppid() != pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

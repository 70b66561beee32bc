"""`vmrestore restore --plan PLAN.yaml`: many VMs, their disks over the proxies (docs/fleet.md)."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from vmrestore.errors import PlanFailed, UsageError

# Options of `restore` that may stand next to --plan; the rest belong in the plan file.
PLAN_FLAGS = ("plan", "scheduler", "resume", "json", "quiet")


def run_plan(args: argparse.Namespace) -> int:
    from vmrestore.fleet.plan import load_plan
    from vmrestore.fleet.progress import PlanProgress
    from vmrestore.fleet.report import format_table
    from vmrestore.fleet.runner import PlanRunner

    if not args.plan:
        raise UsageError("restore: --scheduler only with --plan PLAN.yaml")
    extra = sorted("--" + k.replace("_", "-") if k != "job_file" else "JOB.yaml"
                   for k, v in vars(args).items()
                   if k not in (*PLAN_FLAGS, "func", "command", "verbose", "log_file")
                   and v not in (None, [], {}, False))
    if extra:
        raise UsageError(f"restore --plan: {', '.join(extra)} cannot be combined with a plan "
                         f"({args.plan}): put them in the plan (per VM or in 'defaults')")
    plan = load_plan(args.plan)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    with PlanProgress("none" if args.quiet else "auto") as progress:
        report = PlanRunner(plan, scheduler=args.scheduler, resume=bool(args.resume),
                            progress=progress).run()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_table(report))
    sys.stdout.flush()
    if report.status != "ok":
        failed = [v for v in report.vms if v.status != "ok"]
        raise PlanFailed(f"plan {plan.path.name}: {len(failed)} of {report.vms_total} VMs "
                         f"failed (first: {failed[0].name} in {failed[0].failed_phase}: "
                         f"{failed[0].error}); the others are restored")
    return 0


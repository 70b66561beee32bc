"""`vmrestore restore`: full VM restore into vSphere, in the five phases of docs/restore.md."""

from __future__ import annotations

import argparse
import os
from typing import Any

from vmrestore.commands import point_id

HELP = "restore a whole VM from a backup into vCenter/ESXi (or the lab)"

DESCRIPTION = """\
Restore a whole VM from a backup into vCenter/ESXi (or the embedded lab), in five
phases: 1 initialize (proxy slot, movers, vCenter), 2 restore the configuration and
register the VM, 3 snapshot (skipped on VVOL), 4 write the disks through the core,
5 commit the snapshot (and power on). A failed phase rolls back what this restore
created. Give either options, or a job file (YAML/JSON, same field names) as the only
argument; next to a job file only --resume, --keep-on-failure, --json, --power-on, -q."""

EPILOG = """\
examples:
  vmrestore restore --backup inc1.vmrb --name web02 --datastore ds-local \\
      --network-map "VM Network=Restore Network" --power-on
  vmrestore restore --backup inc1.vmrb --vcenter https://vc.example/sdk \\
      --user restore@vsphere.local --password-file /etc/vmrestore/vc.pw --transport nbd
  vmrestore restore job.yaml --resume       continue a killed run from its checkpoint
  vmrestore restore --backup inc1.vmrb --original --quick-rollback
                                            roll web01 back, writing only changed blocks
  vmrestore restore --plan dr.yaml --json   many VMs at once over the proxies (docs/fleet.md)

The report (a table, or --json) names each phase's outcome and, per disk, the transport
used and why. Exit codes: 0 restored; 2 bad arguments or job file; 3 broken backup;
6/7 target or transport failed; 8 vCenter refused; 130 interrupted (see 'vmrestore -h').
Details: docs/restore.md.
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "restore", help=HELP, description=DESCRIPTION, epilog=EPILOG,
        # Defaults are spelled out in each help text: the options default to None so that
        # a job file's fields are not overridden by them.
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job_file", nargs="?", metavar="JOB.yaml",
                   help="job file (YAML/JSON) with the same fields as the options, e.g. "
                   "'backup: x.vmrb', 'network_map: {A: B}' (docs/restore.md)")
    pl = p.add_argument_group("many VMs (docs/fleet.md)")
    pl.add_argument("--plan", metavar="PLAN.yaml",
                    help="restore every VM of a plan (a list of job entries with an RTO tier), "
                    "their disks scheduled over the proxies; only --resume, --json, -q, "
                    "--scheduler may be added")
    pl.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                    help="with --plan: the Dask scheduler whose workers are the proxies "
                    "('vmrestore proxy-worker'); default: an embedded LocalCluster running "
                    "the infra's proxies on this machine")
    src = p.add_argument_group("backup")
    src.add_argument("--backup", metavar="BACKUP",
                     help="restore point file (*.vmrb); its parents are found next to it")
    src.add_argument("--repository", metavar="URL",
                     help="restore point on a repository agent: repo://HOST:PORT/PATH "
                     "(instead of --backup; blocks cross the network compressed)")
    src.add_argument("--token-file", metavar="F",
                     help="with --repository: the agent's token (default $VMRESTORE_REPO_TOKEN)")
    src.add_argument("--point", type=point_id, metavar="ID",
                     help="an earlier point of the chain: id prefix or file name (default: BACKUP "
                     "itself)")
    vc = p.add_argument_group("target vCenter/ESXi (default: the lab's, when it is up)")
    vc.add_argument("--vcenter", metavar="URL",
                    help="https://HOST[:PORT][/sdk] (default: the lab's, when it is up)")
    vc.add_argument("--user", metavar="U", help="user name (needed with --vcenter)")
    vc.add_argument("--password-file", metavar="F",
                    help="file holding the password (needed with --vcenter; the password is "
                    "never an argument)")
    vc.add_argument("--thumbprint", metavar="HEX", help="pin the server certificate (SHA-1/256)")
    vc.add_argument("--ca-file", metavar="PEM", help="CA bundle to verify the server certificate")
    vc.add_argument("--insecure", action="store_true", default=None,
                    help="https without certificate checks (default: verify)")
    vc.add_argument("--datacenter", metavar="DC", help="datacenter (default: the only one)")
    am = p.add_argument_group("placement and amendments")
    am.add_argument("--name", metavar="N",
                    help="name of the restored VM (default: the backed-up VM's name)")
    am.add_argument("--folder", metavar="F",
                    help="VM folder path under the datacenter (default: the root VM folder)")
    am.add_argument("--host", metavar="H",
                    help="ESXi host (default: first that sees the datastore)")
    am.add_argument("--resource-pool", metavar="RP",
                    help="resource pool (default: the host's cluster root pool)")
    am.add_argument("--datastore", metavar="DS",
                    help="datastore for the VM and its disks (default: the backed-up one)")
    am.add_argument("--disk-datastore", metavar="N=DS", action="append",
                    help="datastore of disk N, counted from 0 (repeatable; default: --datastore)")
    am.add_argument("--disk-format", choices=("same", "thin", "thick-lazy", "thick-eager"),
                    default=None,
                    help="provisioning of the restored disks (default: as backed up)")
    am.add_argument("--network-map", metavar="SRC=DST", action="append",
                    help="connect NICs on network SRC to DST (repeatable; default: same network)")
    am.add_argument("--power-on", action="store_true", default=None,
                    help="power the VM on at the end")
    og = p.add_argument_group("restore to the original VM (roll it back in place)")
    og.add_argument("--original", action="store_true", default=None,
                    help="roll back the VM the backup was taken of instead of creating one: "
                    "found by the backup's instance UUID, then by name (--name overrides); "
                    "it must have the backup's disks (count, capacities; or --full) and be powered "
                    "off; "
                    "a safety snapshot is taken first and reverted to if the rollback fails")
    og.add_argument("--original-vm", metavar="MOREF",
                    help="with --original: the VM by managed object id (e.g. vm-42), when "
                    "several match")
    og.add_argument("--quick-rollback", action="store_true", default=None,
                    help="with --original: read each block of the VM's disks, compare it with "
                    "the backup's checksum and write only the blocks that differ (default: "
                    "overwrite every block)")
    og.add_argument("--keep-config", action="store_true", default=None,
                    help="with --original: keep the VM's CPU, memory and NICs (default: "
                    "restore the backup's; the report lists what changed)")
    og.add_argument("--full", action="store_true", default=None,
                    help="with --original: when the VM's disks differ from the backup's (count "
                    "or capacity), write every backed-up disk into a new file and swap them "
                    "into the VM at the end (same VM, moref, UUID and name); its old disks are "
                    "deleted only after the swap; a failure leaves the VM as it was. Not with "
                    "--quick-rollback")
    og.add_argument("--force", action="store_true", default=None,
                    help="with --original: power the VM off when it is on (default: refuse)")
    tr = p.add_argument_group("data movement")
    tr.add_argument("--transport", choices=("auto", "san", "hotadd", "nbd", "nbdssl"),
                    default=None,
                    help="how disks are written (default auto: san if every disk is thick-eager "
                    "and the proxy sees the LUN, else hotadd if the proxy is a VM, else nbd; "
                    "a failing disk falls back to nbd)")
    tr.add_argument("--proxy", metavar="NAME",
                    help="proxy to use (default: one with a free slot)")
    tr.add_argument("--infra", metavar="FILE",
                    help="infrastructure file: proxies, their slots and storage (default: "
                    "one local proxy with 4 slots; docs/restore.md)")
    tr.add_argument("--disk-library", choices=("native", "vddk"), default=None,
                    help="who writes the disks: vmrestore's writers, or VMware's VixDiskLib "
                    "(default: native)")
    tr.add_argument("--vddk-libdir", metavar="DIR",
                    help="VDDK install dir (default $VMRESTORE_VDDK_LIBDIR; on the lab: vddk_sim)")
    tr.add_argument("--threads", type=int, metavar="T",
                    help="core worker threads per disk (default: as restore-disk)")
    tr.add_argument("--queue-depth", type=int, metavar="Q",
                    help="requests in flight per disk (default: as restore-disk)")
    tr.add_argument("--max-rate", metavar="RATE",
                    help="write at most RATE data bytes per second per disk (200M, 1G), to "
                         "spare a datastore other VMs use (default: no limit)")
    fl = p.add_argument_group("failure handling")
    fl.add_argument("--resume", action="store_true", default=None,
                    help="continue an interrupted restore from its checkpoint")
    fl.add_argument("--keep-on-failure", action="store_true", default=None,
                    help="leave what was created when a phase fails (default: roll back)")
    fl.add_argument("--state-dir", metavar="DIR",
                    help="where job state and checkpoints live (default: $VMRESTORE_STATE_DIR, "
                    "else BACKUP_DIR/.vmrestore, for --repository ~/.local/state/vmrestore/"
                    "repo-HASH)")
    p.add_argument("--json", action="store_true", default=None,
                   help="print the report as JSON on stdout (also on failure)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from vmrestore import job as jobmod
    from vmrestore import ui
    from vmrestore.errors import VmrError
    from vmrestore.orchestrator import Orchestrator
    from vmrestore.report import Report, format_table

    if args.plan or args.scheduler:
        from vmrestore.commands.restore_plan import run_plan

        return run_plan(args)
    try:
        job = jobmod.from_args(args)
    except VmrError as e:
        if args.json:  # a script asked for JSON: it gets a report also for a refused job
            r = Report(backup=args.backup or args.repository or args.job_file or "",
                       status="failed", failed_phase="initialize", error=e)
            r.phases["initialize"].status = "failed"
            r.phases["initialize"].detail = "job refused before it started"
            print(json.dumps(r.as_dict(), indent=2))
            sys.stdout.flush()
        raise

    if job.disk_library == "vddk" and (job.vddk_libdir or os.environ.get("VMRESTORE_VDDK_LIBDIR")):
        from vmrestore import vddk  # VMware's search path rule, before anything starts

        vddk.ensure_search_path(job.vddk_libdir)
    # SIGTERM and SIGHUP stop like Ctrl-C (clean rollback): cli.install_signal_handlers
    with ui.Display(quiet=args.quiet or False) as display:
        orch = Orchestrator(job, display=display, site=default_site)
        report = orch.run()
    if job.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_table(report))
    if report.error is not None:
        # The report is printed; the CLI edge prints the one-line error and maps the exit code.
        sys.stdout.flush()
        raise report.error
    return 0


def default_site(job: Any, lab_dir: Any = None) -> Any:
    """Where a restore goes: the job's vCenter, else the embedded lab when it is up.

    The lab is this command's default, not the orchestrator's: with the lab as the
    target its host data services, proxy VM, datacenter and (for --disk-library
    vddk) vddk_sim over its datastores come with it. Any other vCenter takes its
    host data services from $VMRESTORE_HOSTD_URL + $VMRESTORE_HOSTD_TOKEN_FILE.
    """
    import logging
    from pathlib import Path

    from vmrestore.errors import LabError, UsageError
    from vmrestore.lab.client import lab_is_up, load_lab
    from vmrestore.orchestrator import Site
    from vmrestore.transport.host import HostServices
    from vmrestore.vsphere.connect import Target  # for --vcenter; the lab makes its own

    lab = None
    if lab_is_up(lab_dir):
        try:
            lab = load_lab(lab_dir)
        except LabError as e:
            logging.getLogger("vmrestore.restore").info("lab not usable: %s", e)
    if job.vcenter:
        try:
            password = Path(job.password_file or "").read_text().strip()
        except OSError as e:
            raise UsageError(f"--password-file {job.password_file}: {e.strerror}") from None
        target = Target(job.vcenter, job.user or "", password, job.thumbprint, job.ca_file,
                        job.insecure)
    elif lab is not None:
        target = lab.target()
    else:
        raise UsageError("restore: no --vcenter given and no lab is up (run 'vmrestore lab "
                         "up', or give --vcenter URL --user U --password-file F)")
    # the lab's vCenter or its ESXi host: its host data services and vddk_sim serve both
    on_lab = lab is not None and target.url.rstrip("/") in (
        u.rstrip("/") for u in lab.endpoints())
    url = os.environ.get("VMRESTORE_HOSTD_URL")
    if url:
        tok = Path(os.environ.get("VMRESTORE_HOSTD_TOKEN_FILE", "")).read_text().strip()
        hostd = HostServices(url, tok)
    elif on_lab:
        hostd = HostServices.from_lab(lab)
    else:
        hostd = None  # refused by phase 1 once vCenter answered (docs/restore.md)
    if not on_lab:
        return Site(target, hostd)
    lab_vc = target.url.rstrip("/") == lab.vcenter_url.rstrip("/")
    site = Site(target, hostd, datacenter=None if job.vcenter else lab.datacenter,
                proxy_vm=lab.proxy_vm if lab_vc else None,
                vddk_password_file=str(lab.password_file))
    if job.disk_library == "vddk":
        from vmrestore import vddk

        site.vddk_libdir = str(vddk.sim_libdir())
        site.vddk_env = vddk.sim_env_for_lab(lab)
        site.vddk_note = f"disk library: vddk_sim ({site.vddk_libdir}) over the lab's datastores"
    return site

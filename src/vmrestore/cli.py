"""The `vmrestore` command: parses arguments, runs one command, maps errors to exit codes.

Each sub-command lives in ``vmrestore.commands.<name>`` and exposes
``register(subparsers)``; this module only wires them and owns the edge where
typed errors become a one-line message and an exit code. Command modules
import heavy dependencies (pyvmomi, numpy, the core) inside their run
functions so that ``vmrestore --help`` stays instant.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from vmrestore import __version__
from vmrestore.errors import Interrupted, VmrError

# Order shown in --help. A module that does not exist yet is skipped.
COMMANDS = (
    "restore",
    "report",
    "backup",
    "verify",
    "inspect",
    "restore_disk",
    "lab",
    "proxy_mover",
    "proxy_worker",
    "repo_agent",
    "vddk",
    "bench",
)

log = logging.getLogger("vmrestore")


def exit_codes_text() -> str:
    """The exit codes, from errors.py itself so the help can never drift from the code."""
    from vmrestore import errors

    seen: dict[int, str] = {0: "success", 1: "any other failure (the message says what)"}
    for obj in vars(errors).values():
        if isinstance(obj, type) and issubclass(obj, errors.VmrError):
            doc = (obj.__doc__ or obj.__name__).strip().splitlines()[0].rstrip(".")
            seen.setdefault(obj.exit_code, f"{obj.__name__}: {doc}")
    rows = (f"  {code:<4} {text}" for code, text in sorted(seen.items()))
    return "exit codes:\n" + "\n".join(rows)


EPILOG = """\
main forms (details: 'vmrestore COMMAND --help', README.md, docs/):
  vmrestore backup create --disk disk0.img [--disk ...] [--parent PREV] -o OUT.vmrb
  vmrestore verify OUT.vmrb            vmrestore inspect OUT.vmrb [--json]
  vmrestore restore-disk OUT.vmrb --disk 0 --to PATH|nbd://...|san:...|vddk://...
  vmrestore restore --backup OUT.vmrb --name NEW [--vcenter URL ...]   (or JOB.yaml)
  vmrestore lab up | status | down     the embedded vSphere lab (root)

"""


def command_named(argv: Sequence[str]) -> str | None:
    """The command module an argument list runs ('restore-disk' -> restore_disk), if any.

    Why: registering every command imports every command module (~0.1 CPU-s,
    more when the page cache is cold); a run needs only its own. The first
    argument that is not an option (nor --log-file's value) names it.
    """
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--log-file":
            skip = True
        elif not a.startswith("-"):
            name = a.replace("-", "_")
            return name if name in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (``only``) the global options plus that one command."""
    parser = argparse.ArgumentParser(
        prog="vmrestore",
        description=(
            "Full VM restore into VMware vSphere from block-level backups. "
            "Run 'vmrestore COMMAND --help' for each command."
        ),
        epilog=EPILOG + exit_codes_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vmrestore {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    parser.add_argument(
        "--log-file", metavar="PATH", help="also write a debug log to PATH (timestamps, threads)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (only,) if only else COMMANDS:
        try:
            module = importlib.import_module(f"vmrestore.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"vmrestore.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def setup_logging(verbose: int, log_file: str | None) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    root = logging.getLogger("vmrestore")
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("vmrestore: %(levelname)s: %(message)s"))
    root.addHandler(console)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(
            logging.Formatter("%(asctime)s %(process)d %(threadName)s %(name)s %(levelname)s "
                              "%(message)s")
        )
        root.addHandler(fh)


REAL_COMMAND_LINE = False  # main() runs on this process's own argv (not called in-process)


# The signal that ended the run (SIGINT unless SIGTERM or SIGHUP came).
_stopped_by = signal.SIGINT


def _stop_like_ctrl_c(signum: int, _frame: object) -> None:
    """SIGTERM (systemd, `timeout`) and SIGHUP (a closed terminal) end a run as Ctrl-C does.

    Raising KeyboardInterrupt takes every path Ctrl-C takes: the pipeline is
    cancelled, a partial target is kept for --resume or removed, a restore rolls
    back, exit code 130 as for Ctrl-C; the message names the signal.
    """
    global _stopped_by
    _stopped_by = signal.Signals(signum)
    raise KeyboardInterrupt(_stopped_by.name)


def install_signal_handlers() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:  # `nohup` (SIG_IGN) stays as it is
            signal.signal(sig, _stop_like_ctrl_c)


def _interrupted_exit(message: str) -> int:
    by = f" ({_stopped_by.name})" if _stopped_by != signal.SIGINT else ""
    print(message + by, file=sys.stderr)
    return Interrupted.exit_code


@contextlib.contextmanager
def heavy_imports() -> Iterator[None]:
    """Import a command's heavy modules (numpy, the core) with the cyclic GC paused.

    Why: restore-disk's imports make some 16 000 tracked objects that live as long
    as the process, and the collector ran 46 passes while they were made; frozen
    afterwards, no later pass walks them again. Only in a process of our
    own (a test calling main() in-process keeps its collector as it is).
    """
    if not REAL_COMMAND_LINE:
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _exit_now(rc: int) -> None:
    """End a finished run without the interpreter's teardown, if nothing else still runs.

    Why: after restore-disk's last byte, freeing every module (numpy's among them)
    took 25-50 ms of a 1 s restore (docs/benchmarks.md, sixth round), spent after
    the work is done. The exit handlers still run (logging's flush, finalizers),
    the output is flushed; a non-daemon thread still alive means work is still
    going on, and then the normal exit waits for it as always.
    """
    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: the output was not wanted
            pass
    os._exit(rc)


def main(argv: Sequence[str] | None = None) -> int:
    # vmrestore never does linear algebra, but numpy's OpenBLAS starts one spinning
    # thread per core at import: ~0.1-0.3 CPU-s stolen from the restore (perf, docs/core.md).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser(command_named(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    setup_logging(args.verbose, args.log_file)
    global REAL_COMMAND_LINE
    REAL_COMMAND_LINE = argv is None  # vddk may then re-execute it (LD_LIBRARY_PATH)
    if REAL_COMMAND_LINE:  # a process of its own: not a test calling main() in-process
        install_signal_handlers()
    try:
        rc = int(args.func(args) or 0)
        if REAL_COMMAND_LINE and getattr(args, "quick_exit", False):
            _exit_now(rc)
        return rc
    except KeyboardInterrupt:
        return _interrupted_exit("vmrestore: interrupted")
    except Interrupted as e:
        return _interrupted_exit(f"vmrestore: error: {e}")
    except VmrError as e:
        log.debug("error", exc_info=True)
        print(f"vmrestore: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # Output closed early (e.g. piped to head): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

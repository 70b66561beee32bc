"""`vmrestore repo-agent`: serve the backups under a directory to proxy movers, read-only."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from vmrestore.commands import number
from vmrestore.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "repo-agent",
        help="serve backups under a directory to proxy movers (docs/protocol.md)",
        description="Serve the backup files under --root, read-only, over the authenticated "
        "mover protocol (docs/protocol.md). Runs until SIGTERM/SIGINT.",
    )
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to listen on (port 0: pick one; the chosen one is printed)")
    p.add_argument("--root", required=True, metavar="DIR", help="directory of the backups served")
    p.add_argument("--token-file", required=True, metavar="F",
                   help="per-job token (one line), or lines 'NAME TOKEN' naming each client")
    p.add_argument("--tls-cert", metavar="C", help="PEM certificate: requires TLS of every client")
    p.add_argument("--tls-key", metavar="K", help="PEM private key of --tls-cert")
    p.add_argument("--bwlimit", type=number(0, 1e9, float), default=0.0, metavar="MB/S",
                   help="limit the bytes sent, all clients together (MB/s, 0 = none)")
    p.add_argument("--max-clients", type=number(1, 100000), default=64, metavar="N",
                   help="authenticated connections served at once (default 64); "
                        "connections still in the handshake have their own budget")
    p.add_argument("--handshake-timeout", type=number(0.1, 3600, float), default=10.0,
                   metavar="S", help="a peer must finish the whole handshake in S seconds "
                                     "(default 10)")
    p.add_argument("--idle-timeout", type=number(1, 86400, float), default=600.0, metavar="S",
                   help="close a connection that sends no complete request in S seconds "
                        "(default 600)")
    p.set_defaults(func=run)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT")
    if int(port) > 65535:
        raise UsageError(f"--listen {text!r}: port {port} is out of range (0..65535)")
    return host.strip("[]"), int(port)


def run(args: argparse.Namespace) -> int:
    from vmrestore.mover import agent as A
    from vmrestore.mover.protocol import load_tokens

    root = Path(args.root)
    if not root.is_dir():
        raise UsageError(f"--root {root}: not a directory")
    try:
        tokens = load_tokens(Path(args.token_file).read_text())
    except OSError as e:
        raise UsageError(f"--token-file {args.token_file}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(f"--token-file {args.token_file}: {e}") from None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert:
        try:
            tls = A.server_tls_context(args.tls_cert, args.tls_key)
        except (OSError, ValueError) as e:
            raise UsageError(f"TLS certificate/key: {e}") from None
    host, port = parse_listen(args.listen)
    try:
        listener = A.listen(host, port)
    except OSError as e:
        raise UsageError(f"cannot listen on {args.listen}: {e.strerror}") from None
    cfg = A.AgentConfig(root=root, tokens=tokens, tls=tls, bwlimit=args.bwlimit * 1e6,
                        max_clients=args.max_clients, handshake_timeout=args.handshake_timeout,
                        idle_timeout=args.idle_timeout)
    agent = A.Agent(cfg, listener)
    # Log refusals and connections to stderr even without -v: an agent's log is its record.
    logging.getLogger("vmrestore.mover").setLevel(logging.INFO)
    for h in logging.getLogger("vmrestore").handlers:
        h.setLevel(min(h.level, logging.INFO))

    def stop(signum: int, _frame: object) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    h, p = agent.address
    # One machine-readable line: tests and launchers read the port from it.
    print(f"listening {h}:{p} root={agent.root} tls={'on' if tls else 'off'}", flush=True)
    agent.serve_forever()
    print("stopped", file=sys.stderr, flush=True)
    return 0

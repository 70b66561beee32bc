"""Repository URLs (repo://, repos://): parsed without the client's sockets, TLS and protocol.

Kept apart from client.py so that a local restore, which only asks "is this a
repository URL?", does not import the network client at start-up (about 25 ms
of a restore-disk run's fixed cost, docs/benchmarks.md "Start-up").
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from vmrestore.errors import UsageError


@dataclass(frozen=True)
class RepoURL:
    """repo://HOST:PORT/PATH (plain) or repos://HOST:PORT/PATH?ca=FILE (TLS required)."""

    host: str
    port: int
    path: str  # relative to the agent's root
    tls: bool = False
    ca: str | None = None

    @classmethod
    def parse(cls, url: str) -> RepoURL:
        try:  # a broken IPv6 literal or a port out of range raise ValueError here
            u = urlsplit(url)
            port = u.port
        except ValueError as e:
            raise UsageError(f"{url}: not a valid repository URL: {e}") from None
        if u.scheme not in ("repo", "repos"):
            raise UsageError(f"{url}: not a repository URL (repo://HOST:PORT/PATH)")
        if not u.hostname or not port:
            raise UsageError(f"{url}: needs a host and a port (repo://HOST:PORT/PATH)")
        path = u.path.lstrip("/")
        if not path:
            raise UsageError(f"{url}: names no backup file")
        q = parse_qs(u.query)
        ca = q.get("ca", [None])[0]
        return cls(u.hostname, port, path, u.scheme == "repos", ca)

    def __str__(self) -> str:
        return f"{'repos' if self.tls else 'repo'}://{self.host}:{self.port}/{self.path}"


def is_repo_url(text: str) -> bool:
    return text.startswith(("repo://", "repos://"))

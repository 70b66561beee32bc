"""Hostile peers and changing files against a real `vmrestore repo-agent` process.

Families (counted in the closing note by the CASES lists below): slow and silent
peers that try to hold every slot, handshake replay and reflection, oversized and
overflowing lengths, path tricks, and files truncated or replaced while served.
Each case asserts the agent's answer and that the agent still serves afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmrestore.errors import AuthenticationError, RemoteError
from vmrestore.mover import protocol as P
from vmrestore.mover.client import Connection, RepoURL
from vmrestore.mover.protocol import E, T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mover"))
from mover_helpers import TOKEN, AgentProc, make_backup


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_backup(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    return p


@pytest.fixture
def agent(sample: tuple[Path, Path], token_file: Path, tmp_path: Path
          ) -> Iterator[Callable[..., AgentProc]]:
    """Start an agent over a private copy of the sample repository (files may be changed)."""
    started: list[AgentProc] = []
    root = tmp_path / "root"
    shutil.copytree(sample[0].parent, root)

    def make(*extra: str) -> AgentProc:
        a = AgentProc(root, token_file, list(extra)).start()
        started.append(a)
        return a

    yield make
    for a in started:
        a.stop()


def _connect(a: AgentProc) -> Connection:
    return Connection(RepoURL("127.0.0.1", a.port, "vm1/inc1.vmrb"), TOKEN.encode(), "test")


def _still_serves(a: AgentProc) -> None:
    assert a.proc is not None and a.proc.poll() is None, "the agent died"
    with _connect(a) as c:
        assert "full.vmrb" in c.list("vm1")


def _error_code(fn: Callable[[], object]) -> int:
    with pytest.raises(RemoteError) as ei:
        fn()
    return ei.value.code


# ------------------------------------------------------------------ slow and silent peers


class Hostiles:
    """N open connections that never finish a handshake: silent, trickling, or stalled."""

    def __init__(self, port: int, n: int) -> None:
        self.socks: list[socket.socket] = []
        self.trickle: list[socket.socket] = []
        hello = P.frame(T.HELLO, 0, P.Hello(P.MIN_VERSION, P.VERSION, 0).encode())
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            kind = i % 3
            if kind == 1:
                self.trickle.append(s)
            elif kind == 2:  # a valid HELLO, then nothing: it has the agent's HELLO_OK
                s.sendall(hello)
            self.socks.append(s)
        self._hello = hello
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._drip, daemon=True)
        self._t.start()

    def _drip(self) -> None:
        """A valid HELLO, one byte per peer per second: a per-recv timeout never fires."""
        pos = 0
        while not self._stop.wait(1.0) and pos < len(self._hello):
            for s in self.trickle:
                try:
                    s.send(self._hello[pos:pos + 1])
                except OSError:
                    pass
            pos += 1

    def open_count(self) -> int:
        """Connections the agent has not closed (what it sent is read and dropped)."""
        n = 0
        for s in self.socks:
            s.setblocking(False)
            try:
                while s.recv(1 << 16):
                    pass
            except BlockingIOError:
                n += 1
            except OSError:
                pass
        return n

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        for s in self.socks:
            s.close()


def test_legitimate_proxy_served_while_200_hostile_connections_are_open(
        agent, sample, token_file: Path, tmp_path: Path) -> None:
    a = agent("--max-clients", "2", "--handshake-timeout", "60")
    hostile = Hostiles(a.port, 200)
    try:
        time.sleep(0.5)
        out = tmp_path / "out.img"
        r = subprocess.run([sys.executable, "-m", "vmrestore", "restore-disk", a.url(),
                            "--disk", "0", "--to", str(out), "--token-file", str(token_file),
                            "-q"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == sample[1].read_bytes()
        assert hostile.open_count() == 200  # they were all still there meanwhile
    finally:
        hostile.close()
    _still_serves(a)


def test_handshake_deadline_closes_trickling_and_silent_peers(agent) -> None:
    a = agent("--handshake-timeout", "1")
    hostile = Hostiles(a.port, 30)
    try:
        deadline = time.monotonic() + 8
        while hostile.open_count() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hostile.open_count() == 0  # trickling peers included
    finally:
        hostile.close()
    assert a.wait_log("handshake not finished in 1 s")
    _still_serves(a)


def test_idle_authenticated_connection_is_closed(agent) -> None:
    a = agent("--idle-timeout", "1")
    c = _connect(a)
    try:
        time.sleep(2.5)
        with pytest.raises((ConnectionError, OSError, RemoteError)):
            c.list("vm1")
    finally:
        c.close()
    assert a.wait_log("no complete request in 1 s")
    _still_serves(a)


# ------------------------------------------------------------------ handshake replay


def _handshake(port: int, hello: bytes, auth: bytes,
               proof_for: Callable[[bytes, bytes], bytes]) -> tuple[bytes, P.Frame]:
    """HELLO, AUTH, then the PROOF proof_for(transcript, agent proof) says; the agent's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        P.send_frame(s, T.HELLO, 0, hello)
        ok = P.read_frame(s)
        P.send_frame(s, T.AUTH, 0, auth)
        ch = P.Challenge.decode(P.read_frame(s).payload)
        tr = P.transcript(hello, ok.payload, auth, ch.nonce, b"")
        sent = proof_for(tr, ch.proof)
        P.send_frame(s, T.PROOF, 0, sent)
        return sent, P.read_frame(s)


def test_handshake_replay_and_reflection_are_refused(agent) -> None:
    a = agent()
    hello = P.Hello(P.MIN_VERSION, P.VERSION, 0).encode()
    auth = P.Auth(os.urandom(P.NONCE_SIZE), "replayer").encode()
    key = TOKEN.encode()
    good, ans = _handshake(a.port, hello, auth, lambda tr, _ag: P.proof(key, b"proxy", tr))
    assert ans.type == T.READY
    cases = {
        # the same bytes again: the agent's fresh nonce makes the old proof worthless
        "replay": lambda tr, _ag: good,
        # the agent's own proof sent back (role confusion)
        "reflect": lambda tr, ag: ag,
        "zero proof": lambda tr, _ag: bytes(P.MAC_SIZE),
    }
    for name, how in cases.items():
        _sent, ans = _handshake(a.port, hello, auth, how)
        assert ans.type == T.ERROR, name
        assert P.Error.decode(ans.payload).code == E.AUTH_FAILED, name
    with pytest.raises(AuthenticationError):
        Connection(RepoURL("127.0.0.1", a.port, "x.vmrb"), b"wrong-token-0123456789", "t")
    _still_serves(a)


# ------------------------------------------------------------------ lengths


def _raw(c: Connection, data: bytes) -> P.Frame:
    c.io.sendall(data)
    return P.read_frame(c.io)


def _crc_frame(mtype: int, rid: int, payload: bytes, length: int | None = None) -> bytes:
    head = struct.pack("<2sBBII", P.MAGIC, mtype, 0, rid,
                       len(payload) if length is None else length)
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


LENGTH_CASES = [
    # name, request bytes (handle 1 = vm1/full.vmrb), expected error code, connection survives
    ("READ offset near 2**64", lambda: _crc_frame(T.READ, 9, P.Read(1, 2**64 - 8, 4096).encode()),
     E.BAD_RANGE, True),
    ("READ length 2**32-1", lambda: _crc_frame(T.READ, 9, P.Read(1, 0, 2**32 - 1).encode()),
     E.TOO_LARGE, True),
    ("READ of a handle never opened",
     lambda: _crc_frame(T.READ, 9, P.Read(77, 0, 16).encode()), E.BAD_HANDLE, True),
    ("EXTENTS count 2**32-1 with one range",
     lambda: _crc_frame(T.EXTENTS, 9, struct.pack("<IIQII", 1, 2**32 - 1, 4096, 512, 0)),
     E.BAD_MESSAGE, False),
    ("EXTENTS range past 2**64",
     lambda: _crc_frame(T.EXTENTS, 9, P.Extents(1, ((2**64 - 16, 4096),)).encode()),
     E.BAD_RANGE, True),
    ("EXTENTS zero-length range",
     lambda: _crc_frame(T.EXTENTS, 9, P.Extents(1, ((4096, 0),)).encode()), E.BAD_RANGE, True),
    ("frame length 2**32-1", lambda: _crc_frame(T.READ, 9, b"", length=2**32 - 1),
     E.BAD_MESSAGE, False),
    ("bad CRC", lambda: _flip(_crc_frame(T.READ, 9, P.Read(1, 0, 16).encode()), 12),
     E.BAD_MESSAGE, False),
    ("a reply type sent as a request", lambda: _crc_frame(T.OPENED, 9, b""),
     E.BAD_MESSAGE, False),
    ("HELLO again after READY",
     lambda: _crc_frame(T.HELLO, 9, P.Hello(1, 1, 0).encode()), E.BAD_MESSAGE, False),
]


@pytest.mark.parametrize("case", LENGTH_CASES, ids=[c[0] for c in LENGTH_CASES])
def test_oversized_and_overflowing_lengths(agent, case) -> None:
    name, make, code, survives = case
    a = agent()
    with _connect(a) as c:
        f = c.open("vm1/full.vmrb")
        assert f.handle == 1
        ans = _raw(c, make())
        assert ans.type == T.ERROR, name
        assert P.Error.decode(ans.payload).code == code, (name, P.Error.decode(ans.payload))
        if survives:
            assert c.read(f, 0, 8) == b"VMRBAK\r\n"
    _still_serves(a)


def test_more_handles_than_allowed(agent) -> None:
    a = agent()
    with _connect(a) as c:
        for _ in range(P.MAX_HANDLES):
            c.open("vm1/full.vmrb")
        assert _error_code(lambda: c.open("vm1/full.vmrb")) == E.TOO_LARGE
    _still_serves(a)


# ------------------------------------------------------------------ path tricks


def _path_cases(root: Path, outside: Path) -> list[tuple[str, bytes, int]]:
    os.mkfifo(root / "vm1" / "fifo.vmrb")
    (root / "vm1" / "dir.vmrb").mkdir()
    (root / "vm1" / "link-out.vmrb").symlink_to(outside / "full.vmrb")
    (root / "vm1" / "link-fifo.vmrb").symlink_to(root / "vm1" / "fifo.vmrb")
    (root / "vm1" / "short.vmrb").write_bytes(b"VMRBAK\r\n")
    return [
        ("parent escape", b"../x.vmrb", E.REFUSED_PATH),
        ("deep escape", b"vm1/../../" + str(outside).encode() + b"/full.vmrb", E.REFUSED_PATH),
        ("absolute", b"/etc/passwd", E.REFUSED_PATH),
        ("backslash", b"vm1\\full.vmrb", E.REFUSED_PATH),
        ("symlink leading outside", b"vm1/link-out.vmrb", E.REFUSED_PATH),
        ("FIFO named like a backup", b"vm1/fifo.vmrb", E.NOT_A_BACKUP),
        ("symlink to a FIFO", b"vm1/link-fifo.vmrb", E.NOT_A_BACKUP),
        ("directory named like a backup", b"vm1/dir.vmrb", E.NOT_A_BACKUP),
        ("too short", b"vm1/short.vmrb", E.NOT_A_BACKUP),
        ("not a .vmrb", b"vm1/../../token", E.REFUSED_PATH),
        ("missing", b"vm1/none.vmrb", E.NOT_FOUND),
        ("NUL inside", b"vm1/full.vmrb\x00.vmrb", E.BAD_MESSAGE),
        ("not UTF-8", b"vm1/\xff\xfe.vmrb", E.BAD_MESSAGE),
        ("empty", b"", E.BAD_MESSAGE),
        ("longer than allowed", b"a/" * 3000 + b"x.vmrb", E.BAD_MESSAGE),
    ]


def test_path_tricks(agent, tmp_path: Path, sample) -> None:
    a = agent()
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(sample[0] / "full.vmrb", outside / "full.vmrb")
    for name, raw, code in _path_cases(a.root, outside):
        with _connect(a) as c:
            t0 = time.monotonic()
            ans = _raw(c, _crc_frame(T.OPEN, 5, raw))
            assert time.monotonic() - t0 < 5, name  # a FIFO never blocks the agent
            assert ans.type == T.ERROR, name
            got = P.Error.decode(ans.payload).code
            assert got == code, (name, E(got), P.Error.decode(ans.payload).message)
    assert not any("Traceback" in line for line in a.log), "".join(a.log)
    _still_serves(a)


# ------------------------------------------------------------------ files changing under the agent


def test_file_truncated_while_served_errors_that_client_only(agent, sample) -> None:
    from vmrestore.repository.plan import build_plan
    from vmrestore.repository.reader import open_chain

    a = agent()
    victim = a.root / "vm1" / "full.vmrb"
    plan = build_plan(open_chain(sample[0] / "full.vmrb"), 0).plan
    data = plan[plan["kind"] == 1][:4]
    ranges = [(int(e["src_off"]), int(e["stored_len"])) for e in data]
    with _connect(a) as c:
        f = c.open("vm1/full.vmrb")
        with open(victim, "r+b") as fh:  # in place, as a careless cleanup would
            fh.truncate(8192)
        assert _error_code(lambda: c.read(f, 4096, 4096)) == E.IO_ERROR
        rid = c.request_extents(f, ranges)
        buf = memoryview(bytearray(sum(n for _, n in ranges)))
        assert _error_code(lambda: c.receive_extents(rid, ranges, buf)) == E.IO_ERROR
    assert a.proc is not None and a.proc.poll() is None  # no SIGBUS
    assert a.wait_log("changed while served")
    _still_serves(a)


def test_file_replaced_by_rename_while_served_keeps_the_opened_one(agent, sample) -> None:
    from vmrestore.repository.plan import build_plan
    from vmrestore.repository.reader import open_chain

    a = agent()
    plan = build_plan(open_chain(sample[0] / "full.vmrb"), 0).plan
    e = plan[plan["kind"] == 1][0]
    rng = [(int(e["src_off"]), int(e["stored_len"]))]
    with _connect(a) as c:
        f = c.open("vm1/full.vmrb")
        other = a.root / "vm1" / "other.tmp"
        other.write_bytes(b"\0" * 100)
        os.replace(other, a.root / "vm1" / "full.vmrb")
        rid = c.request_extents(f, rng)
        buf = memoryview(bytearray(rng[0][1]))
        rec = c.receive_extents(rid, rng, buf)[0]
        assert rec.flags & P.REC_EXACT and (rec.xxh_lo, rec.xxh_hi) == (int(e["xxh_lo"]),
                                                               int(e["xxh_hi"]))
        assert bytes(buf) == (sample[0] / "full.vmrb").read_bytes()[rng[0][0]:sum(rng[0])]
    assert not any("Traceback" in line for line in a.log), "".join(a.log)
    _still_serves(a)

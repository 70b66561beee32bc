"""Every error vmrestore raises on purpose, in one place.

Each class carries the exit code the CLI turns it into, so a script calling
vmrestore can tell a bad argument from a corrupt backup from a dead target
without parsing text. Messages are one line and say what and where
(file, disk, block, offset): they are shown to the user as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any


class VmrError(Exception):
    """Base of all expected errors; never shown with a traceback."""

    exit_code = 1


class UsageError(VmrError):
    """Wrong or contradictory arguments, or an invalid job file."""

    exit_code = 2


class FormatError(VmrError):
    """A backup file that is not one, is truncated, or has a broken section."""

    exit_code = 3


class IncompleteBackupError(FormatError):
    """A backup file without a valid footer (the writer never finished)."""


class UnsupportedVersionError(FormatError):
    """A backup file of a format version this build cannot read."""


class ChainError(FormatError):
    """A missing parent, or a parent whose id or checksum does not match."""


class ChecksumError(VmrError):
    """Stored data whose checksum does not match: names file, disk, block, offset."""

    exit_code = 4


class SourceError(VmrError):
    """A source disk or image that cannot be read."""

    exit_code = 5


class TargetError(VmrError):
    """A target that cannot be written: too small, exists, full, refused."""

    exit_code = 6


class TransportError(VmrError):
    """A transport that failed mid-transfer (dead connection, I/O error)."""

    exit_code = 7


class VSphereError(VmrError):
    """vCenter/ESXi refused, is unreachable, or lacks a named object."""

    exit_code = 8

    def __init__(self, message: str, fault: str = "") -> None:
        super().__init__(message)
        self.fault = fault  # the vim fault's type name when a task failed ("FileNotFound")


class LabError(VmrError):
    """The embedded lab cannot be started, reached, or torn down."""

    exit_code = 9


class VddkError(VmrError):
    """A VixDiskLib call failed; code and text come from the library."""

    exit_code = 10

    def __init__(self, message: str, code: int = 0, text: str = "", kind: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.text = text  # the library's own text for code (GetErrorText)
        self.kind = kind  # which side failed, when the core knows: "target", "transport"


class MoverError(VmrError):
    """The data movers could not connect, authenticate, or talk."""

    exit_code = 11


class Interrupted(VmrError):
    """The user stopped the run (Ctrl-C / SIGTERM)."""

    exit_code = 130


class StaleAttemptError(MoverError):
    """A disk task attempt older than the one that holds its checkpoint: it must not write.

    The fencing rule of docs/disktask.md: the checkpoint file records the
    attempt that owns the disk; a lower attempt stops before writing and at
    its next checkpoint.
    """

    def __init__(self, message: str, attempt: int = 0, holder: int = 0) -> None:
        super().__init__(message)
        self.attempt = attempt
        self.holder = holder


class ProtocolError(MoverError):
    """A mover message that is malformed, oversized, or not allowed at this point."""


class AuthenticationError(MoverError):
    """A mover peer that failed the token challenge (wrong token, unknown client)."""


class RemoteError(MoverError):
    """An error the repository agent answered with; ``code`` is the protocol's error code."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class HostServiceError(TransportError):
    """A host data services call that was refused or failed; ``kind`` says which.

    Kinds (docs/lab.md): bad-request, not-found, refused (e.g. an extent map of
    a thin disk: the transport must fall back), failed, unauthorized, unreachable.
    """

    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.kind = kind


# --- the one translation of core errors ---------------------------------------------------
# The core's error classes (enum vmr_errcode, ext/core/writer.h); vmrestore.pipeline checks
# at import that the compiled module agrees.
CORE_CLASSES: dict[int, tuple[str, type[VmrError]]] = {
    1: ("checksum", ChecksumError),
    2: ("source", SourceError),
    3: ("target", TargetError),
    4: ("transport", TransportError),
    5: ("interrupted", Interrupted),
    6: ("internal", VmrError),
}


def from_core(e: Any, *, disk: int | None = None, sources: Sequence[str] = (),
              where: str = "") -> VmrError:
    """The typed error for a core error (vmrestore._pipeline.CoreError), by its class code.

    A non-zero ``vendor_code`` (a VixDiskLib failure) is a VddkError whatever the
    class, so the same library failure exits 10 from every command; otherwise the
    class decides. ``sources`` turns "chain file N" into the file's path; ``disk``
    and ``where`` prefix the message (once) so it names what failed.
    """
    msg = str(getattr(e, "message", "") or e)
    if sources:
        msg = re.sub(r"chain file (\d+)",
                     lambda m: sources[int(m.group(1))] if int(m.group(1)) < len(sources)
                     else m.group(0), msg)
    offset = getattr(e, "offset", None)
    if disk is not None and not msg.startswith("disk "):
        at = f" (disk offset {offset})" if offset is not None and str(offset) not in msg else ""
        msg = f"disk {disk}: {msg}{at}"
    if where and not msg.startswith(where):
        msg = f"{where}: {msg}"
    kind, cls = CORE_CLASSES.get(int(getattr(e, "code", 6) or 6), CORE_CLASSES[6])
    vendor = int(getattr(e, "vendor_code", 0) or 0)
    err: VmrError = (VddkError(msg, code=vendor, kind=kind) if vendor and kind != "interrupted"
                     else cls(msg))
    err.plan_index = getattr(e, "plan_index", None)  # type: ignore[attr-defined]
    err.offset = offset  # type: ignore[attr-defined]
    return err


def from_exit(exit_code: int, message: str, kind: str = "", vendor_code: int = 0) -> VmrError:
    """The typed error another vmrestore process reported (exit code, class name).

    Used where a child's error crosses a process boundary (the proxy-side mover's
    JSON events): the class named by ``kind`` when it is one of ours, else the
    most general class with that exit code.
    """
    cls = globals().get(kind)
    if isinstance(cls, type) and issubclass(cls, VmrError) and cls.exit_code == exit_code:
        if cls is VddkError:
            return VddkError(message, code=vendor_code)
        try:
            return cls(message)
        except TypeError:  # pragma: no cover - a class with required extra arguments
            pass
    for c in _BY_EXIT:
        if c.exit_code == exit_code:
            return c(message)
    return MoverError(message)


# The class used for each exit code when only the code is known (the first listed wins).
_BY_EXIT: tuple[type[VmrError], ...] = (
    UsageError, FormatError, ChecksumError, SourceError, TargetError, TransportError,
    VSphereError, LabError, VddkError, MoverError, Interrupted,
)


class PlanFailed(VmrError):
    """Some VMs of a restore plan failed (each rolled back alone; the others are restored)."""

    exit_code = 12

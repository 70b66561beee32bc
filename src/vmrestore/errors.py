"""Every error vmrestore raises on purpose, in one place.

Each class carries the exit code the CLI turns it into, so a script calling
vmrestore can tell a bad argument from a corrupt backup from a dead target
without parsing text. Messages are one line and say what and where
(file, disk, block, offset): they are shown to the user as they are.
"""

from __future__ import annotations


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


class LabError(VmrError):
    """The embedded lab cannot be started, reached, or torn down."""

    exit_code = 9


class VddkError(VmrError):
    """A VixDiskLib call failed; code and text come from the library."""

    exit_code = 10

    def __init__(self, message: str, code: int = 0, text: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.text = text  # the library's own text for code (GetErrorText)


class MoverError(VmrError):
    """The data movers could not connect, authenticate, or talk."""

    exit_code = 11


class Interrupted(VmrError):
    """The user stopped the run (Ctrl-C / SIGTERM)."""

    exit_code = 130


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

"""The face of the compiled core (ext/core): one typed API over `vmrestore._core`.

Importing this module fails with a clear message when the extension was not
built, instead of a bare ImportError deep in a command.
"""

from __future__ import annotations

from vmrestore.errors import VmrError

try:
    from vmrestore import _core
except ImportError as e:  # pragma: no cover - only on a broken install
    raise VmrError(
        f"vmrestore's compiled core is missing ({e}); run scripts/bootstrap.sh "
        "or 'pip install -e .' to build it"
    ) from e

CODEC_NONE: int = _core.CODEC_NONE
CODEC_LZ4: int = _core.CODEC_LZ4
CODEC_ZSTD: int = _core.CODEC_ZSTD
CODECS: dict[str, int] = {"none": CODEC_NONE, "lz4": CODEC_LZ4, "zstd": CODEC_ZSTD}
CODEC_NAMES: dict[int, str] = {v: k for k, v in CODECS.items()}

CodecError = _core.CodecError
compress = _core.compress
decompress = _core.decompress
decompress_into = _core.decompress_into
xxh3_128 = _core.xxh3_128
is_zero = _core.is_zero

__all__ = [
    "CODECS",
    "CODEC_LZ4",
    "CODEC_NAMES",
    "CODEC_NONE",
    "CODEC_ZSTD",
    "CodecError",
    "compress",
    "decompress",
    "decompress_into",
    "is_zero",
    "xxh3_128",
]

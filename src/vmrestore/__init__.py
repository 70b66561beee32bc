"""vmrestore: full VM restore into VMware vSphere from block-level backups."""

__version__ = "0.1.0"

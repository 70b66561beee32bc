"""The lab's certificates: a CA of its own and the vCenter/ESXi server certificate it signs.

A real vCenter serves https with a certificate from its own CA (VMCA); the lab
does the same so that ``--ca-file``, ``--thumbprint`` (SHA-1 or SHA-256) and
``--insecure`` are exercised against a real TLS endpoint. Made with the
``openssl`` command (EC P-256 keys: quick), once per ``lab up``, in the lab
directory: ``ca.pem`` (give it to ``--ca-file``), ``vcsim.pem`` + ``vcsim.key``.
"""

from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmrestore.errors import LabError

DAYS = "30"


@dataclass(frozen=True)
class LabCerts:
    ca: Path     # the lab CA's certificate (PEM)
    cert: Path   # the server certificate, signed by the CA
    key: Path    # its private key

    def thumbprints(self) -> dict[str, str]:
        """SHA-1 and SHA-256 of the server certificate, as vSphere prints them (AA:BB:...)."""
        return thumbprints(self.cert)


def thumbprints(cert_pem: Path) -> dict[str, str]:
    der = ssl.PEM_cert_to_DER_cert(cert_pem.read_text())

    def colon(h: str) -> str:
        return ":".join(h[i:i + 2] for i in range(0, len(h), 2)).upper()

    return {"sha1": colon(hashlib.sha1(der).hexdigest()),
            "sha256": colon(hashlib.sha256(der).hexdigest())}


def _openssl(*args: str) -> None:
    try:
        proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise LabError(f"cannot run openssl: {e}") from e
    if proc.returncode != 0:
        raise LabError(f"openssl {args[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")


def make_certs(directory: Path, host: str = "127.0.0.1") -> LabCerts:
    """A CA and a server certificate for host (IP and localhost in subjectAltName)."""
    if shutil.which("openssl") is None:
        raise LabError("'openssl' not found: run scripts/bootstrap.sh")
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (d / "ca.key", d / "ca.pem", d / "vcsim.key",
                                  d / "vcsim.csr", d / "vcsim.pem")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", DAYS,
             "-subj", "/CN=vmrestore lab CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", "-new", *ec, "-keyout", str(key), "-out", str(csr),
             "-subj", f"/CN={host}")
    ext = d / "vcsim.ext"
    ext.write_text(f"subjectAltName=IP:{host},DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", DAYS, "-extfile", str(ext), "-out", str(cert))
    for p in (ca_key, key):
        p.chmod(0o600)
    return LabCerts(ca, cert, key)

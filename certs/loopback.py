"""A throw-away certificate for a TLS hop that never leaves one host.

Flower's SuperNode insists on TLS whenever it authenticates with a node key, but it cannot present a
client certificate; the site's uplink therefore terminates the SuperNode's TLS on 127.0.0.1 with this
certificate (made fresh for each `visionfm-client join`) and opens the mutual-TLS connection to the
coordinator itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from certs.authority import Validity, cert_pem, create_ca, issue_server_cert
from certs.keys import make_private_dir, new_ec_key, private_pem, write_private, write_public

LOOPBACK_VALIDITY_DAYS = 30


@dataclass(frozen=True)
class LoopbackTLS:
    """Files of a one-host TLS hop: the CA the SuperNode trusts, and the uplink's cert and key."""

    ca_cert: Path
    cert: Path
    key: Path


def make_loopback_tls(folder: Path) -> LoopbackTLS:
    """Create a fresh local CA and a 127.0.0.1/localhost server certificate in `folder` (0700)."""
    make_private_dir(folder)
    ca_key = new_ec_key()
    validity = Validity.days_from_now(LOOPBACK_VALIDITY_DAYS)
    ca = create_ca(ca_key, "visionfm site loopback", validity)
    key = new_ec_key()
    cert = issue_server_cert(ca, ca_key, key.public_key(), "127.0.0.1", validity)
    files = LoopbackTLS(folder / "loopback-ca.crt", folder / "loopback.crt", folder / "loopback.key")
    write_public(files.ca_cert, cert_pem(ca))
    write_public(files.cert, cert_pem(cert))
    write_private(files.key, private_pem(key))
    return files

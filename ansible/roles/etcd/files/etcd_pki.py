#!/usr/bin/env python3
"""The etcd cluster's certificates, made on the Ansible control host.

Theory of operation
-------------------
``etcd_pki.py DIR --member NAME=ADDR[,ADDR...] ...`` keeps in DIR:

* ``ca.crt`` / ``ca.key``: an ECDSA P-256 CA (10 years);
* ``member-NAME.crt`` / ``.key`` per member: serverAuth + clientAuth (the
  same certificate serves clients and peers), CN ``etcd member NAME`` (never
  an etcd user name: the HTTP gateway reaches etcd with this certificate),
  SAN = the member's addresses plus ``localhost`` and 127.0.0.1;
* ``client.crt`` / ``client.key``: the certificate postroom nodes present,
  with an empty subject and a SAN only (etcd 3.4's gateway refuses a client
  certificate that has a CommonName when ``--client-cert-auth`` is on).

Files are created only when missing (idempotent; delete one to re-issue it).
A member certificate whose SAN lacks one of the given addresses is re-issued.
Private keys are mode 0600.  Prints one JSON line ``{"changed": bool,
"created": [...]}`` for Ansible's ``changed_when``.  Needs ``cryptography``,
which ansible-core itself depends on, so the control host's Python has it.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 1825


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _general_names(addresses: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for address in addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            names.append(x509.DNSName(address))
    return names


def _builder(subject: x509.Name, issuer: x509.Name, key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 (control hosts may run Python < 3.11)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def ensure_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        return cert, key, False  # type: ignore[return-value]
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "postroom etcd CA")])
    usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    cert = (_builder(name, name, key, CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .sign(key, hashes.SHA256()))
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, True


def _san(path: Path) -> set[str] | None:
    """The SAN entries (as strings) of an existing certificate, None if absent."""
    if not path.exists():
        return None
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in ext.get_values_for_type(x509.IPAddress)} | set(
        ext.get_values_for_type(x509.DNSName))


def issue(directory: Path, stem: str, cn: str, addresses: list[str], ca, ca_key) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    cert = (_builder(subject, ca.subject, key, LEAF_DAYS)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(eku, critical=False)
            .add_extension(x509.SubjectAlternativeName(_general_names(addresses)),
                           critical=not cn)
            .sign(ca_key, hashes.SHA256()))
    _write(directory / f"{stem}.key", _key_pem(key), private=True)
    _write(directory / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--member", action="append", default=[], metavar="NAME=ADDR[,ADDR]")
    args = parser.parse_args(argv)
    args.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(args.directory, 0o700)
    ca, ca_key, changed = ensure_ca(args.directory)
    created = ["ca"] if changed else []
    for item in args.member:
        name, _, addrs = item.partition("=")
        addresses = [a for a in addrs.split(",") if a]
        wanted = list(dict.fromkeys([*addresses, "localhost", "127.0.0.1"]))
        have = _san(args.directory / f"member-{name}.crt")
        if changed or have is None or not set(wanted) <= have:
            issue(args.directory, f"member-{name}", f"etcd member {name}", wanted, ca, ca_key)
            created.append(f"member-{name}")
    if changed or not (args.directory / "client.crt").exists():
        issue(args.directory, "client", "", ["postroom-etcd-client"], ca, ca_key)
        created.append("client")
    print(json.dumps({"changed": bool(created), "created": created}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Certificates and keys for a consortium deployment (Flower 1.39 SuperLink + SuperNodes).

What each file protects:

- ``ca.crt`` / ``ca.key``: the consortium CA. Sites get ``ca.crt`` only and use it
  to check they talk to the real SuperLink (TLS server authentication). ``ca.key``
  never leaves the coordinator's offline store; whoever holds it can impersonate
  the SuperLink.
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate (SANs: every
  given host, IPs as IP SANs, names as DNS SANs) and its private key.
- ``<site>`` / ``<site>.pub``: a SuperNode authentication key pair, ECDSA on
  NIST P-384, OpenSSH format (what ``flower-supernode --auth-supernode-private-key``
  and ``flwr supernode register`` read). The private key belongs on the site's
  machine only; the coordinator registers the public key. In production each
  site generates its own pair (``ssh-keygen -t ecdsa -b 384``) and sends only
  the ``.pub``; generating them here is for demos and tests.

Every private key is written 0600. Validity: CA ``ca_days`` (default 3 years),
server certificate ``days`` (default 1 year, renew before it expires; clients
refuse an expired certificate). Clock skew allowance: ``not_valid_before`` is 5
minutes in the past.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.atomic import PRIVATE, write_atomic
from shared.errors import ConfigError, Problem

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SKEW = timedelta(minutes=5)


def _validate(sites: Sequence[str], hosts: Sequence[str], days: int, ca_days: int) -> None:
    problems: list[Problem] = []
    for site in sites:
        if not isinstance(site, str) or not SITE_NAME.match(site) or site in {"ca", "server"}:
            problems.append(Problem(f"sites[{site!r:.60}]",
                                    "must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63} and not be 'ca'/'server'"))
    if len(set(sites)) != len(sites):
        problems.append(Problem("sites", "duplicate site names"))
    if not hosts:
        problems.append(Problem("hosts", "at least one host name or IP is needed"))
    for host in hosts:
        if not isinstance(host, str) or not host or any(c.isspace() for c in host):
            problems.append(Problem(f"hosts[{host!r:.60}]", "must be a non-empty name or IP"))
    if not isinstance(days, int) or not 1 <= days <= 825:
        problems.append(Problem("days", "server certificate validity must be 1..825 days"))
    if not isinstance(ca_days, int) or not days <= ca_days <= 3650:
        problems.append(Problem("ca_days", "CA validity must be >= days and <= 3650 days"))
    if problems:
        raise ConfigError("invalid PKI request", problems)


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start (a chmod after writing leaves a window), then made exact.
    write_atomic(path, data, mode=PRIVATE)
    os.chmod(path, PRIVATE)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_consortium_pki(
    out_dir: Path | str,
    *,
    sites: Sequence[str],
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 365,
    ca_days: int = 3 * 365,
    consortium: str = "fedsynth consortium",
) -> dict[str, Path]:
    """Write a CA, the SuperLink TLS certificate and one SuperNode key pair per site.

    ``hosts`` always gets ``127.0.0.1`` and ``localhost`` added (local tools and
    tests). Refuses to overwrite an existing ``ca.key`` (a second CA would
    silently invalidate every site's trust anchor). Returns a mapping of
    logical names (``ca_cert``, ``ca_key``, ``server_cert``, ``server_key``,
    ``<site>``, ``<site>.pub``) to the written paths.
    """
    sites = list(sites)
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    _validate(sites, hosts, days, ca_days)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ca.key").exists():
        raise ConfigError("refusing to overwrite an existing CA",
                          [Problem(str(out / "ca.key"), "already exists; use a new directory")])
    now = datetime.now(UTC)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{consortium} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    paths = {
        "ca_cert": out / "ca.crt",
        "ca_key": out / "ca.key",
        "server_cert": out / "server.pem",
        "server_key": out / "server.key",
    }
    _write_private(paths["ca_key"], _pem_key(ca_key))
    paths["ca_cert"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["server_key"], _pem_key(server_key))
    paths["server_cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    for site in sites:
        paths[site], paths[f"{site}.pub"] = make_site_key(out, site)
    return paths


def make_site_key(out_dir: Path | str, site: str) -> tuple[Path, Path]:
    """Write one SuperNode authentication key pair (ECDSA P-384, OpenSSH): ``<site>``, ``<site>.pub``."""
    _validate([site], ["x"], 1, 1)
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    private = out / site
    public = out / f"{site}.pub"
    _write_private(private, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH)
                       + f" {site}\n".encode())
    return private, public


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.pki OUT_DIR site1 site2 ... [--host NAME]...``."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a consortium CA, SuperLink cert and site keys")
    parser.add_argument("out_dir")
    parser.add_argument("sites", nargs="+")
    parser.add_argument("--host", action="append", default=[],
                        help="extra SuperLink host name or IP for the certificate (repeatable)")
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args(argv)
    paths = make_consortium_pki(args.out_dir, sites=args.sites, hosts=args.host or ["127.0.0.1"],
                                days=args.days)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

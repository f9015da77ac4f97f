"""``fedsynth-site doctor`` checks of the site's place in the federation: keys, CA, SecAgg, coordinator.

Each function returns one :class:`client.doctor.checks.Check`; :func:`client.doctor.run.run_doctor`
calls them in order. The coordinator check is a TCP connect and TLS handshake
only: no Flower message and no site data is sent.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

from client.doctor.checks import Check, fail_check, warn_check
from shared.errors import FedsynthError
from shared.settings import SiteSettings

_NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_CERT_WARN_DAYS = 30


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- certificates, keys


def check_root_cert(root_cert: Path | None, *, now: datetime | None = None) -> Check:
    """The consortium CA: readable PEM, a CA certificate, valid now (warns 30 days before expiry)."""
    from cryptography import x509

    name = "root CA"
    ask = "get the consortium's current ca.crt from the coordinator (made by `fedsynth-coordinator pki`)"
    if root_cert is None:
        return warn_check(name, "not given (needed to reach the coordinator)",
                          "pass --root-cert or set FEDSYNTH_CA_CERT")
    try:
        certs = x509.load_pem_x509_certificates(Path(root_cert).read_bytes())
    except OSError as exc:
        return fail_check(name, f"{root_cert}: {exc.strerror or exc}", ask)
    except ValueError:
        return fail_check(name, f"{root_cert}: not a PEM certificate", ask)
    now = now or datetime.now(UTC)
    cert = certs[0]
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    subject = cert.subject.rfc4514_string()
    if not is_ca:
        return fail_check(name, f"{root_cert}: {subject} is not a CA certificate (server.pem given?)", ask)
    if now < cert.not_valid_before_utc:
        return fail_check(name, f"{root_cert}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                          "check this host's clock (timedatectl; NTP)")
    if now > cert.not_valid_after_utc:
        return fail_check(name, f"{root_cert}: expired {cert.not_valid_after_utc:%Y-%m-%d}", ask)
    detail = f"{subject}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_after_utc - now < timedelta(days=_CERT_WARN_DAYS):
        return warn_check(name, detail + " (expires soon)", "ask the coordinator for the renewed CA in time")
    return Check(name, True, detail)


def _owned_by_another_account(path: Path) -> str | None:
    """The owner's name when ``path`` is another account's owner-only file, else None."""
    try:
        st = path.stat()
    except OSError:
        return None
    if os.name != "posix" or st.st_uid == os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        return None
    try:
        import pwd

        return pwd.getpwuid(st.st_uid).pw_name
    except (KeyError, ImportError):
        return f"uid {st.st_uid}"


def check_auth_key(auth_key: Path | None) -> Check:
    """SuperNode authentication key: OpenSSH ECDSA on a NIST curve, unencrypted, mode 0600."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    name = "SuperNode key"
    make = ("make a new pair with `ssh-keygen -t ecdsa -b 384 -N '' -f KEY` and send only KEY.pub "
            "to the coordinator to register")
    if auth_key is None:
        return warn_check(name, "not given (needed to join the federation)",
                          "pass --auth-key or set FEDSYNTH_DEPLOY_KEY")
    path = Path(auth_key)
    try:
        data = path.read_bytes()
        mode = _mode(path)
    except PermissionError as exc:
        other = _owned_by_another_account(path)
        if other is None:
            return fail_check(name, f"{path}: {exc.strerror or exc}", make)
        # hospital-it.md: the SuperNode runs as its own user (fedsynth-net), so the
        # launcher's account, which runs doctor, cannot and should not read its key
        return warn_check(name, f"{path}: owned by {other}, mode 0600: not readable by this account "
                          "(as intended when the SuperNode runs as its own user); format not checked",
                          f"check it as that user: sudo -u {other} fedsynth-site doctor --auth-key {path}")
    except OSError as exc:
        return fail_check(name, f"{path}: {exc.strerror or exc}", make)
    if os.name == "posix" and mode & 0o077:
        return fail_check(name, f"{path}: mode {mode:04o} lets other accounts read the site's identity",
                          f"chmod 600 {path} (owned by the site's service account)")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        return fail_check(name, f"{path}: encrypted with a passphrase (the SuperNode cannot prompt)",
                          f"remove the passphrase: ssh-keygen -p -N '' -f {path}")
    except Exception as exc:  # any parse failure is the same finding
        return fail_check(name, f"{path}: not an OpenSSH private key ({type(exc).__name__})", make)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in _NIST_CURVES:
        kind = getattr(getattr(key, "curve", None), "name", type(key).__name__)
        return fail_check(name, f"{path}: {kind} key; Flower needs ECDSA on a NIST curve", make)
    detail = f"{path}: ECDSA {key.curve.name}, mode {mode:04o}"
    pub = path.with_name(path.name + ".pub")
    if pub.is_file():
        derived = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH)
        if pub.read_bytes().split()[:2] != derived.split()[:2]:
            return fail_check(name, f"{pub} does not match {path}",
                              f"regenerate {pub} with `ssh-keygen -y -f {path}` and re-register it")
    return Check(name, True, detail)


def check_signing_key(settings: SiteSettings) -> Check:
    """The Ed25519 key that signs this site's privacy reports (shared.signing.load_private_key)."""
    from shared.signing import load_private_key

    name = "signing key"
    if settings.signing_key is None:
        return warn_check(name, "FEDSYNTH_SITE_SIGNING_KEY unset: privacy reports are not signed",
                          "fedsynth-site keygen /srv/site/keys/<site-id>.key; "
                          "set FEDSYNTH_SITE_SIGNING_KEY to it; give auditors the .pub")
    try:
        load_private_key(Path(settings.signing_key))
    except FedsynthError as exc:
        reason = "; ".join(p.reason for p in exc.problems) or exc.message
        fix = (f"chmod 600 {settings.signing_key}" if "permissions" in exc.message
               else "point FEDSYNTH_SITE_SIGNING_KEY at an unencrypted Ed25519 key "
                    "(ssh-keygen -t ed25519 -N '' -f KEY)")
        return fail_check(name, f"{settings.signing_key}: {exc.message}: {reason}", fix)
    return Check(name, True, f"{settings.signing_key}: Ed25519")


def check_secagg(settings: SiteSettings) -> Check:
    """The site's ``require_secagg`` policy: whether it ever sends an unmasked adapter update.

    Privacy meaning: with False, a coordinator whose run config says ``secagg = false``
    receives this site's adapter in the clear (DP-protected, but not hidden in a sum).
    False is meant for the CPU demo only, hence a warning, not a failure.
    """
    name = "secure aggregation"
    if settings.require_secagg:
        return Check(name, True, "FEDSYNTH_SITE_REQUIRE_SECAGG=true: only SecAgg+ (masked) updates "
                                 "leave; plain train rounds are declined (secagg_required)")
    return warn_check(name, "FEDSYNTH_SITE_REQUIRE_SECAGG=false: a run with secagg = false gets this "
                            "site's adapter update in the clear",
                      "set FEDSYNTH_SITE_REQUIRE_SECAGG=true (false is for the CPU demo only)")


# --------------------------------------------------------------------------- coordinator


def _split_address(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def check_coordinator(coordinator: str | None, root_cert: Path | None, *, timeout: float = 5.0) -> Check:
    """TCP connect + TLS handshake to the coordinator's Fleet API, verifying against the CA.

    The handshake checks what the SuperNode will check: the chain to ``root_cert``
    and the dialled host name in the certificate's SANs. No Flower message is sent.
    """
    name = "coordinator"
    if coordinator is None:
        return warn_check(name, "not given", "pass --coordinator HOST:PORT or set FEDSYNTH_SUPERLINK")
    parsed = _split_address(coordinator)
    if parsed is None:
        return fail_check(name, f"{coordinator!r} is not HOST:PORT", "e.g. coordinator.example.org:9092")
    if root_cert is None:
        return fail_check(name, "no root CA to verify the coordinator with",
                          "pass --root-cert or set FEDSYNTH_CA_CERT")
    host, port = parsed
    try:
        context = ssl.create_default_context(cafile=str(root_cert))
    except (OSError, ssl.SSLError) as exc:
        return fail_check(name, f"cannot use {root_cert} as CA: {exc}", "fix the root CA (see its check)")
    context.set_alpn_protocols(["h2"])  # what gRPC offers
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                version = tls.version()
    except socket.gaierror as exc:
        return fail_check(name, f"cannot resolve {host}: {exc.strerror}",
                          "check DNS / /etc/hosts for the coordinator's name")
    except ssl.SSLCertVerificationError as exc:
        return fail_check(name, f"{coordinator}: certificate not trusted: {exc.verify_message}",
                          "use the consortium's current ca.crt and dial a host name listed in the "
                          "SuperLink certificate (fedsynth-coordinator pki ... --host NAME)")
    except ssl.SSLError as exc:
        return fail_check(name, f"{coordinator}: TLS handshake failed: {exc.reason or exc}",
                          "check that HOST:PORT is the Fleet API (not the Control API) and no proxy "
                          "intercepts TLS")
    except ConnectionRefusedError:
        return fail_check(name, f"{coordinator}: connection refused",
                          "ask the coordinator whether the SuperLink is up; check the Fleet API port")
    except TimeoutError:
        return fail_check(name, f"{coordinator}: no answer within {timeout:g} s",
                          "open outbound TCP to the coordinator's Fleet API port in the hospital firewall")
    except OSError as exc:
        return fail_check(name, f"{coordinator}: {exc.strerror or exc}",
                          "check routing and firewall to the coordinator")
    return Check(name, True, f"{coordinator}: TLS ({version}) verified against {root_cert}")

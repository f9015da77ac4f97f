import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.pki import make_consortium_pki, make_site_key
from shared.errors import ConfigError


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    return out, make_consortium_pki(out, sites=["site1", "site2"], hosts=["coord.example", "10.0.0.5"])


def test_server_cert_chains_to_ca_and_carries_sans(pki):
    _, paths = pki
    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)  # raises on a bad signature or issuer
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "coord.example"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.5")}
    assert server.not_valid_before_utc < server.not_valid_after_utc <= ca.not_valid_after_utc


def test_server_key_matches_cert(pki):
    _, paths = pki
    key = serialization.load_pem_private_key(paths["server_key"].read_bytes(), None)
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_other_ca_does_not_verify(pki, tmp_path):
    _, paths = pki
    other = make_consortium_pki(tmp_path, sites=[])
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    wrong_ca = x509.load_pem_x509_certificate(other["ca_cert"].read_bytes())
    with pytest.raises(Exception):  # noqa: B017 - signature or issuer mismatch, either is a refusal
        server.verify_directly_issued_by(wrong_ca)


def test_site_keys_are_openssh_p384_pairs(pki):
    _, paths = pki
    for site in ("site1", "site2"):
        private = serialization.load_ssh_private_key(paths[site].read_bytes(), None)
        public = serialization.load_ssh_public_key(paths[f"{site}.pub"].read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
    a = serialization.load_ssh_public_key(paths["site1.pub"].read_bytes())
    b = serialization.load_ssh_public_key(paths["site2.pub"].read_bytes())
    assert a.public_numbers() != b.public_numbers()


def test_private_keys_are_0600(pki):
    _, paths = pki
    for name in ("ca_key", "server_key", "site1", "site2"):
        assert stat.S_IMODE(paths[name].stat().st_mode) == 0o600, name
    assert stat.S_IMODE(paths["site1.pub"].stat().st_mode) & 0o077 != 0o077  # public is readable


def test_refuses_overwrite_and_bad_input_listing_every_problem(pki, tmp_path):
    out, _ = pki
    with pytest.raises(ConfigError, match="overwrite"):
        make_consortium_pki(out, sites=["site3"])
    with pytest.raises(ConfigError) as err:
        make_consortium_pki(tmp_path / "x", sites=["../evil", "ok", "ok"], days=0)
    where = {p.where for p in err.value.problems}
    assert {"sites['../evil']", "sites", "days"} <= where
    assert not (tmp_path / "x" / "ca.key").exists()


def test_make_site_key_standalone(tmp_path):
    private, public = make_site_key(tmp_path, "site9")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert serialization.load_ssh_private_key(private.read_bytes(), None)

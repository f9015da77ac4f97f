import base64
import json
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization

from shared.errors import ConfigError, InputError, VerificationError
from shared.signing import (
    canonical_json,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    sign_file,
    signature_path,
    verify_file,
)


@pytest.fixture
def keys(tmp_path):
    out = {}
    for name in ("site-a", "site-b"):
        pub = generate_key(tmp_path / "keys" / f"{name}.key")
        out[name] = (load_private_key(tmp_path / "keys" / f"{name}.key"), load_public_key(pub))
    return out


@pytest.fixture
def signed(tmp_path, keys):
    f = tmp_path / "report.json"
    f.write_bytes(b'{"report": "content", "epsilon": 1.25}\n')
    sign_file(f, keys["site-a"][0])
    return f


def test_generate_key_mode_pub_and_refuses_overwrite(tmp_path):
    path = tmp_path / "k" / "site.key"
    pub = generate_key(path)
    assert pub == tmp_path / "k" / "site.key.pub"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in path.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    first = key_id(load_public_key(pub))
    with pytest.raises(ConfigError, match="overwrite"):
        generate_key(path)
    generate_key(path, overwrite=True)
    assert key_id(load_public_key(pub)) != first
    assert key_id(load_private_key(path)) == key_id(load_public_key(pub))


def test_loose_permissions_refused_with_fix(tmp_path):
    path = tmp_path / "site.key"
    generate_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as exc:
        load_private_key(path)
    assert f"chmod 600 {path}" in str(exc.value)
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError):
        load_private_key(path)
    os.chmod(path, 0o600)
    load_private_key(path)


def test_missing_or_bad_keys_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_private_key(tmp_path / "nope.key")
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    os.chmod(bad, 0o600)
    with pytest.raises(InputError, match="Ed25519"):
        load_private_key(bad)
    with pytest.raises(InputError, match="Ed25519"):
        load_public_key(bad)


def test_public_key_formats_agree(tmp_path, keys):
    pub = keys["site-a"][1]
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ssh = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp_path / "a.ssh.pub").write_bytes(ssh + b"\n")
    (tmp_path / "a.raw.pub").write_bytes(base64.b64encode(raw) + b"\n")
    ids = {key_id(load_public_key(tmp_path / n)) for n in ("a.ssh.pub", "a.raw.pub")}
    assert ids == {key_id(pub)}
    assert len(key_id(pub)) == 16 and key_id(pub) != key_id(keys["site-b"][1])
    assert key_id(keys["site-a"][0]) == key_id(pub)


def test_canonical_json_known_answer():
    assert canonical_json({"b": 1, "a": [1.5, "é", None, True]}) == '{"a":[1.5,"é",null,true],"b":1}'.encode()
    for bad in (float("nan"), float("inf"), {"x": [float("-inf")]}):
        with pytest.raises(InputError, match="non-finite"):
            canonical_json(bad)


def test_sign_and_verify(signed, keys):
    sig = json.loads(signature_path(signed).read_text())
    assert sig["algorithm"] == "ed25519" and sig["key_id"] == key_id(keys["site-a"][1])
    assert verify_file(signed, {"site-a": keys["site-a"][1]}) == key_id(keys["site-a"][1])


@pytest.mark.parametrize("pos", [0, 1, 5, 17, 30, -2, -1])
def test_flipping_a_byte_of_the_file_fails(signed, keys, pos):
    data = bytearray(signed.read_bytes())
    data[pos] ^= 0x01
    signed.write_bytes(bytes(data))
    with pytest.raises(VerificationError) as exc:
        verify_file(signed, {"site-a": keys["site-a"][1]})
    assert str(signed) in str(exc.value) and "hash mismatch" in str(exc.value)


def test_flipping_any_byte_of_the_signature_fails(signed, keys):
    sig_path = signature_path(signed)
    original = sig_path.read_bytes()
    for pos in range(len(original)):
        for bit in (0x01, 0x20):
            data = bytearray(original)
            data[pos] ^= bit
            sig_path.write_bytes(bytes(data))
            with pytest.raises(VerificationError) as exc:
                verify_file(signed, {"site-a": keys["site-a"][1]})
            assert str(sig_path) in str(exc.value), (pos, str(exc.value))
    sig_path.write_bytes(original)
    verify_file(signed, {"site-a": keys["site-a"][1]})


@pytest.mark.parametrize("field,reason", [("sha256", "bad signature"), ("signature", "bad signature")])
def test_edited_sig_field_names_the_problem(signed, keys, field, reason):
    sig_path = signature_path(signed)
    sig = json.loads(sig_path.read_text())
    value = sig[field]
    sig[field] = ("f" if value[0] != "f" else "e") + value[1:] if field == "sha256" else base64.b64encode(b"\0" * 64).decode()
    sig_path.write_bytes(canonical_json(sig) + b"\n")
    with pytest.raises(VerificationError, match=reason):
        verify_file(signed, {"site-a": keys["site-a"][1]})


def test_missing_signature_and_wrong_key(signed, keys):
    with pytest.raises(VerificationError, match="unknown key"):
        verify_file(signed, {"site-b": keys["site-b"][1]})
    sign_file(signed, keys["site-b"][0])  # re-signed by someone else's key
    with pytest.raises(VerificationError, match="unknown key"):
        verify_file(signed, {"site-a": keys["site-a"][1]})
    # claiming site-a's key id with site-b's signature
    sig_path = signature_path(signed)
    sig = json.loads(sig_path.read_text())
    sig["key_id"] = key_id(keys["site-a"][1])
    sig_path.write_bytes(canonical_json(sig) + b"\n")
    with pytest.raises(VerificationError, match="bad signature"):
        verify_file(signed, {"site-a": keys["site-a"][1]})
    sig_path.unlink()
    with pytest.raises(VerificationError, match="missing signature file report.json.sig"):
        verify_file(signed, {"site-a": keys["site-a"][1]})

"""The GIL-free ChaCha20 binding is RFC 8439 ChaCha20, the same keystream as ``cryptography``."""

from __future__ import annotations

import pytest
import torch

import client.dp.noise as dp_noise
from client.dp.chacha20 import CHUNK, OpenSSLChaCha20, libcrypto
from client.dp.noise import deterministic_for_tests


def test_both_keystream_backends_are_rfc8439_chacha20_and_agree():
    """The ctypes/OpenSSL backend (GIL released) and ``cryptography`` give the same
    keystream, and it is RFC 8439's (section 2.3.2 test vector)."""
    key, iv = bytes(range(32)), (1).to_bytes(4, "little") + bytes.fromhex("000000090000004a00000000")
    lib = libcrypto()
    if lib is None:
        pytest.skip("no system OpenSSL: the cryptography backend is used")
    block = torch.empty(64, dtype=torch.uint8)
    OpenSSLChaCha20(lib, key, iv).fill(block.data_ptr(), 64)
    assert bytes(block.numpy())[:16].hex() == "10f1e7e4d13b5915500fdd1fa32071c4"
    streams = []
    for backend in ("openssl", "cryptography"):
        with deterministic_for_tests(1):
            stream = dp_noise._KeyStream(backend=backend)
        assert stream.backend == backend
        streams.append(torch.cat([stream.words(3 * 2**17 + 5), stream.words(1000)]))
    assert torch.equal(*streams)


def test_refuses_wrong_key_iv_and_fill_sizes():
    lib = libcrypto()
    if lib is None:
        pytest.skip("no system OpenSSL")
    with pytest.raises(ValueError, match="32-byte key"):
        OpenSSLChaCha20(lib, bytes(16), bytes(16))
    cipher = OpenSSLChaCha20(lib, bytes(32), bytes(16))
    buf = torch.empty(CHUNK + 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bytes at a time"):
        cipher.fill(buf.data_ptr(), CHUNK + 1)

"""ChaCha20 (RFC 8439) keystream from the system OpenSSL, called with the GIL released.

``cryptography`` (the project's dependency) computes the same cipher but holds
the GIL while it encrypts; :mod:`client.dp.noise` generates the DP noise
keystream in a background thread while training runs Python in the main one,
so it prefers this thin ``ctypes`` binding (``ctypes.CDLL`` releases the GIL
for every foreign call) and falls back to ``cryptography`` without it. Keys
and nonces are the caller's (fresh from ``os.urandom``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

CHUNK = 1 << 20  # bytes per call: bounds the zero input buffer (and a GIL-held cryptography call)


@functools.cache
def libcrypto() -> ctypes.CDLL | None:
    """The system OpenSSL (>= 1.1, which has ChaCha20), or None.

    Called through ``ctypes.CDLL``, which releases the GIL for the duration of
    each call: the prefetch thread then generates keystream while the training
    thread runs Python. (``cryptography`` holds the GIL while it encrypts.)
    """
    name = ctypes.util.find_library("crypto")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.EVP_chacha20.restype = ctypes.c_void_p
        lib.EVP_chacha20.argtypes = []
        lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
        lib.EVP_CIPHER_CTX_new.argtypes = []
        lib.EVP_CIPHER_CTX_free.restype = None
        lib.EVP_CIPHER_CTX_free.argtypes = [ctypes.c_void_p]
        lib.EVP_EncryptInit_ex.restype = ctypes.c_int
        lib.EVP_EncryptInit_ex.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
        ]
        lib.EVP_EncryptUpdate.restype = ctypes.c_int
        lib.EVP_EncryptUpdate.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.c_void_p,
            ctypes.c_int,
        ]
    except (OSError, AttributeError):
        return None
    return lib if lib.EVP_chacha20() else None


class OpenSSLChaCha20:
    """ChaCha20 encryption of zeros through the system OpenSSL (GIL released per call)."""

    def __init__(self, lib: ctypes.CDLL, key: bytes, iv: bytes) -> None:
        # OpenSSL reads exactly 32 key and 16 IV bytes (4-byte LE counter + 12-byte nonce).
        if len(key) != 32 or len(iv) != 16:
            raise ValueError(f"ChaCha20 needs a 32-byte key and 16-byte IV, got {len(key)}, {len(iv)}")
        self._lib, self._ctx = lib, lib.EVP_CIPHER_CTX_new()
        if not self._ctx or lib.EVP_EncryptInit_ex(self._ctx, lib.EVP_chacha20(), None, key, iv) != 1:
            raise OSError("OpenSSL could not set up ChaCha20")
        self._zeros = ctypes.create_string_buffer(CHUNK)
        self._written = ctypes.c_int(0)

    def fill(self, address: int, n: int) -> None:
        """Write the next ``n`` (<= CHUNK) keystream bytes to memory at ``address``."""
        if not 0 < n <= CHUNK:  # the zero input buffer is CHUNK bytes
            raise ValueError(f"fill takes 1..{CHUNK} bytes at a time, got {n}")
        if self._lib.EVP_EncryptUpdate(
            self._ctx, address, ctypes.byref(self._written), self._zeros, n
        ) != 1 or self._written.value != n:
            raise OSError("OpenSSL ChaCha20 failed")

    def __del__(self) -> None:
        if getattr(self, "_ctx", None):
            self._lib.EVP_CIPHER_CTX_free(self._ctx)
            self._ctx = None

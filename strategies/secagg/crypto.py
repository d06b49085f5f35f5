"""Key agreement, share encryption and Shamir sharing, from Flower's secure-aggregation primitives.

Flower provides ECDH + HKDF (`generate_shared_key`), Fernet encryption, Shamir sharing and the share
plaintext layout; this module wraps them for raw-bytes keys. Mask seeds are expanded with our own
AES-CTR generator (see `masking`), because Flower's `pseudo_rand_gen` folds a seed into 32 bits.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    generate_key_pairs,
    public_key_to_bytes,
)

CURVE = ec.SECP384R1()
PRIVATE_KEY_BYTES = 48  # a P-384 scalar
SEED_BYTES = 32
MASK_KEY_BYTES = 16  # AES-128: the fastest AES-NI key size, 128-bit security


def new_key_pair() -> tuple[bytes, bytes]:
    """(private scalar, PEM public key) of a fresh P-384 key pair."""
    private_key, public_key = generate_key_pairs()
    scalar = private_key.private_numbers().private_value.to_bytes(PRIVATE_KEY_BYTES, "big")
    return scalar, public_key_to_bytes(public_key)


def _private_key(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(scalar, "big"), CURVE)


def public_key_of(scalar: bytes) -> bytes:
    """The PEM public key that belongs to a private scalar."""
    return public_key_to_bytes(_private_key(scalar).public_key())


def load_public_key(public_pem: bytes) -> ec.EllipticCurvePublicKey:
    """Parse a PEM public key; ValueError unless it is a P-384 key."""
    try:
        public_key = bytes_to_public_key(public_pem)
    except Exception as error:  # cryptography raises ValueError or UnsupportedAlgorithm
        raise ValueError("not a PEM public key") from error
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != CURVE.name:
        raise ValueError("public key is not on curve P-384")
    return public_key


def shared_key(private_scalar: bytes, public_pem: bytes) -> bytes:
    """The ECDH key two parties agree on (Flower: ECDH + HKDF-SHA256, urlsafe-base64, Fernet-ready)."""
    return generate_shared_key(_private_key(private_scalar), load_public_key(public_pem))


def new_seed() -> bytes:
    """A fresh self-mask seed."""
    return os.urandom(SEED_BYTES)


def mask_key(secret: bytes, nonce: bytes, context: bytes) -> bytes:
    """Derive an AES key for one mask stream, bound to the round's nonce and the stream's context."""
    return HKDF(algorithm=hashes.SHA256(), length=MASK_KEY_BYTES, salt=nonce, info=context).derive(secret)


def encrypt_shares(key: bytes, src: int, dst: int, seed_share: bytes, key_share: bytes) -> bytes:
    """Encrypt the two shares `src` sends to `dst`, with both indices inside the ciphertext."""
    return encrypt(key, share_keys_plaintext_concat(src, dst, seed_share, key_share))


def decrypt_shares(key: bytes, ciphertext: bytes) -> tuple[int, int, bytes, bytes]:
    """(src, dst, seed share, key share) from a ciphertext made by `encrypt_shares`."""
    return share_keys_plaintext_separate(decrypt(key, ciphertext))


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir shares of `secret`; any `threshold` of the `count` rebuild it."""
    return create_shares(secret, threshold, count)


def join_secret(shares: list[bytes]) -> bytes:
    """Rebuild a secret from at least its threshold of Shamir shares."""
    return combine_shares(shares)

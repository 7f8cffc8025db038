"""X25519 against RFC 7748's test vectors (unit tier)."""

import pytest

from dmrepl.link import x25519


def test_rfc7748_scalar_multiplication_vectors():
    k = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert x25519.x25519(k, u).hex() == "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    k = bytes.fromhex("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d")
    u = bytes.fromhex("e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493")
    # u's top bit is set: it must be masked off (RFC 7748, section 5)
    assert x25519.x25519(k, u).hex() == "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"


def test_rfc7748_diffie_hellman_vectors():
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert x25519.public(alice).hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert x25519.public(bob).hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert x25519.x25519(alice, x25519.public(bob)).hex() == shared
    assert x25519.x25519(bob, x25519.public(alice)).hex() == shared


def test_new_keys_agree_and_round_trip_through_base64():
    a, b = x25519.new_private(), x25519.new_private()
    assert a != b and a[0] & 7 == 0 and a[31] & 0xC0 == 0x40
    assert x25519.x25519(a, x25519.public(b)) == x25519.x25519(b, x25519.public(a))
    assert x25519.decode(x25519.encode(a)) == a
    for bad in ("", "not base64!", x25519.encode(b"x" * 31)):
        with pytest.raises(ValueError):
            x25519.decode(bad)

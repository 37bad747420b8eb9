"""Unsubscribe tokens: every malformed input is an InvalidToken, never another error."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random

import pytest

from sequences.unsubscribe import InvalidToken, make_token, verify_token

SECRET = "unsub-secret"
GOOD = make_token(SECRET, 42, "email")
PAYLOAD, SIGNATURE = GOOD.split(".")


def signed(payload_text: str | bytes) -> str:
    """A correctly signed token over an arbitrary payload (to reach the payload parsing)."""
    raw = payload_text.encode() if isinstance(payload_text, str) else payload_text
    payload = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    mac = hmac.new(SECRET.encode(), f"v1.{payload}".encode(), hashlib.sha256).digest()
    return f"{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


HOSTILE = [
    None,
    "",
    " ",
    ".",
    "..",
    "abc",
    GOOD.encode(),
    bytearray(GOOD.encode()),
    42,
    4.2,
    ["a", "b"],
    {"token": GOOD},
    object(),
    f"{PAYLOAD}.{SIGNATURE[:-1]}é",  # a non-ASCII signature
    f"{PAYLOAD}.ü{SIGNATURE[1:]}",
    f"é{PAYLOAD}.{SIGNATURE}",
    f"{PAYLOAD}.{SIGNATURE}=",  # wrong padding
    f"{PAYLOAD}==.{SIGNATURE}",
    f"{PAYLOAD}.{SIGNATURE}.extra",  # extra dots
    f"{PAYLOAD}..{SIGNATURE}",
    f".{PAYLOAD}.{SIGNATURE}",
    f"{PAYLOAD}.",
    f".{SIGNATURE}",
    f"{PAYLOAD}.{SIGNATURE[:-2]}",
    f"{PAYLOAD} .{SIGNATURE}",
    f"{PAYLOAD}.{SIGNATURE}\x00",
    f"{PAYLOAD}\n.{SIGNATURE}",
    "x" * 10_000_000 + "." + SIGNATURE,  # huge
    "." * 100_000,
    "\ud800.\udfff",  # lone surrogates
    f"{PAYLOAD}.{SIGNATURE[:-1]}+",  # standard (not URL-safe) base64
    make_token("another-secret", 42, "email"),
    signed("42"),  # no channel
    signed("42:"),  # empty channel
    signed("abc:email"),
    signed("٤٢:email"),  # non-ASCII digits
    signed("²:email"),
    signed(" 42:email"),
    signed("9" * 5000 + ":email"),
    signed(b"\xff\xfe:email"),  # not UTF-8
    signed(""),
    "A.B",
]


@pytest.mark.parametrize("token", HOSTILE, ids=lambda t: repr(t)[:40])
def test_every_malformed_token_is_invalid(token):
    with pytest.raises(InvalidToken):
        verify_token(SECRET, token)


def test_valid_tokens_still_verify():
    assert verify_token(SECRET, GOOD) == (42, "email")
    assert verify_token(SECRET, f"  {GOOD}\n") == (42, "email")
    assert verify_token(SECRET, make_token(SECRET, 7, "sms:marketing")) == (7, "sms:marketing")


def test_random_garbage_is_invalid():
    rng = random.Random(1234)
    alphabet = "".join(chr(c) for c in range(0, 0x300)) + ".=-_"
    for _ in range(2000):
        token = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
        with pytest.raises(InvalidToken):
            verify_token(SECRET, token)
    for _ in range(500):  # bit flips of a good token
        chars = list(GOOD)
        chars[rng.randrange(len(chars))] = rng.choice(alphabet)
        token = "".join(chars)
        if token != GOOD:
            with pytest.raises(InvalidToken):
                verify_token(SECRET, token)

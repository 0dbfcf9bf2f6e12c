"""Envelopes and keyrings (pure): round trips, binding to the key path, wrong keys, and what errors show."""

from __future__ import annotations

import base64
import os

import pytest

from meshgate.keyservice.sealing import KekError, Keyring, SealError, header, kek_line, parse_keks

K1, K2 = os.urandom(32), os.urandom(32)


def test_round_trip_and_public_header():
    ring = Keyring([("k1", K1)])
    v = ring.seal("k1", "keys/psk/n/a.b", {"gen": 3}, b"s" * 32)
    assert b"s" * 32 not in v
    assert header(v) == {"gen": 3, "kek": "k1"}
    meta, secret = ring.open("keys/psk/n/a.b", v)
    assert secret == b"s" * 32 and meta["gen"] == 3
    # Two seals of the same secret differ (random nonce).
    assert ring.seal("k1", "p", {}, b"x") != ring.seal("k1", "p", {}, b"x")


def test_ciphertext_bound_to_its_path_and_header():
    ring = Keyring([("k1", K1)])
    v = ring.seal("k1", "keys/psk/n/a.b", {"gen": 1}, b"secret-bytes-123")
    with pytest.raises(SealError, match="moved or altered"):
        ring.open("keys/psk/n/a.c", v)
    tampered = v.replace(b'"gen":1', b'"gen":2')
    assert tampered != v
    with pytest.raises(SealError):
        ring.open("keys/psk/n/a.b", tampered)
    flipped = v[:-1] + bytes([v[-1] ^ 1])
    with pytest.raises(SealError):
        ring.open("keys/psk/n/a.b", flipped)


def test_wrong_or_missing_kek():
    v = Keyring([("k1", K1)]).seal("k1", "p", {}, b"x" * 16)
    with pytest.raises(SealError):
        Keyring([("k1", K2)]).open("p", v)
    with pytest.raises(KekError, match="'k1'.*does not hold"):
        Keyring([("k2", K2)]).open("p", v)
    with pytest.raises(SealError):
        Keyring([("k1", K1)]).open("p", b"garbage")


def test_parse_keks_and_errors_never_show_key_material():
    text = f"# comment\n{kek_line('a', K1)}\n\n{kek_line('b.2', K2)}  # trailing\n"
    assert parse_keks(text, "t") == [("a", K1), ("b.2", K2)]
    assert parse_keks(f"{kek_line('a', K1)},{kek_line('b', K2)}", "t") == [("a", K1), ("b", K2)]
    short = base64.b64encode(K1[:16]).decode()
    bad = [f"a:{short}", "a:not*base64", f"-bad:{base64.b64encode(K1).decode()}", "nocolon",
           f"{kek_line('a', K1)}\n{kek_line('a', K2)}"]
    for text in bad:
        with pytest.raises(KekError) as ei:
            parse_keks(text, "KEK file x")
        msg = str(ei.value)
        assert "KEK file x" in msg
        for secret in (K1, K2, K1[:16]):
            for form in (base64.b64encode(secret).decode(), secret.hex()):
                assert form not in msg


def test_keyring_repr_and_no_kek(tmp_path):
    ring = Keyring([("k1", K1)])
    assert "k1" in repr(ring) and base64.b64encode(K1).decode() not in repr(ring)
    with pytest.raises(KekError, match="no key-encryption key configured"):
        Keyring.from_config("", "")
    with pytest.raises(KekError, match="cannot read the KEK file"):
        Keyring.from_config(str(tmp_path / "missing"), "")


def test_reload_picks_up_a_kek_added_to_the_file(tmp_path):
    f = tmp_path / "kek"
    f.write_text(kek_line("k1", K1) + "\n")
    ring = Keyring.from_config(str(f), "")
    v = Keyring([("k2", K2)]).seal("k2", "p", {}, b"y" * 8)
    f.write_text(kek_line("k1", K1) + "\n" + kek_line("k2", K2) + "\n")
    assert ring.open("p", v)[1] == b"y" * 8  # unknown id -> file re-read
    assert ring.ids == ["k1", "k2"]


def test_generate_command(capsys):
    from meshgate.keyservice.sealing import main

    main(["new", "dev"])
    out = capsys.readouterr().out.strip()
    ((kid, key),) = parse_keks(out, "stdout")
    assert kid == "dev" and len(key) == 32
    with pytest.raises(SystemExit):
        main(["new", "bad id"])

"""API keys: stored as HMAC-SHA-256 with the server's secret (keys of before, under
scrypt, upgraded at their next check), and the failed-check limiter per key id."""

import hashlib

import pytest

import service.auth as auth
from service.auth import FailureLimiter, KeyVerifier, create_key
from service.db import Database
from service.errors import AuthError, RateLimitError


@pytest.fixture()
def db(tmp_path, backend):
    """A key database on each engine (SQLite; Postgres)."""
    return Database(backend or tmp_path / "service.db")


@pytest.fixture()
def no_scrypt(monkeypatch):
    """Fail the test if scrypt runs (16 MiB and about 50 ms a check)."""
    def scrypt(*args, **kwargs):
        raise AssertionError("scrypt ran")

    monkeypatch.setattr(auth.hashlib, "scrypt", scrypt)


def test_keys_are_checked_by_a_keyed_hash_and_unknown_ids_cost_no_scrypt(db, no_scrypt):
    key = create_key(db, "ann", ["a"])
    verify = KeyVerifier(db)
    assert verify(f"Bearer {key}").user == "ann"
    row = db.get_key(key.split("_")[1])
    assert row["scheme"] == "hmac" and row["salt"] == b""
    assert key.split("_", 2)[2].encode() not in row["key_hash"]  # not the secret itself
    for bad in ("cdm_0123456789ab_" + "x" * 32, "cdm_" + key.split("_")[1] + "_wrong", "junk"):
        with pytest.raises(AuthError, match="invalid API key"):
            verify(f"Bearer {bad}")


def test_a_key_stored_under_scrypt_still_works_and_is_upgraded(db, monkeypatch):
    secret, salt = "s" * 32, b"0123456789abcdef"
    db.insert_key("00ff00ff00ff", "old", "user", ["a"], salt,
                  hashlib.scrypt(secret.encode(), salt=salt, **auth.SCRYPT), scheme=None)
    assert KeyVerifier(db)(f"Bearer cdm_00ff00ff00ff_{secret}").user == "old"
    row = db.get_key("00ff00ff00ff")
    assert row["scheme"] == "hmac" and row["salt"] == b""
    monkeypatch.setattr(auth.hashlib, "scrypt", lambda *a, **k: pytest.fail("scrypt ran"))
    assert KeyVerifier(db)(f"Bearer cdm_00ff00ff00ff_{secret}").user == "old"  # a new process
    with pytest.raises(AuthError, match="invalid API key"):
        KeyVerifier(db)("Bearer cdm_00ff00ff00ff_" + "t" * 32)


def test_failed_checks_are_limited_per_key_id_not_per_address(db):
    """A client whose old key failed many times can still use its new valid key; the
    failing key id stays limited, and headers without a key id count per address."""
    good = create_key(db, "ann", ["a"])
    verify = KeyVerifier(db, FailureLimiter(limit=3))
    wrong = "cdm_0123456789ab_" + "x" * 32
    for _ in range(3):
        with pytest.raises(AuthError):
            verify(f"Bearer {wrong}", "10.0.0.1")
    with pytest.raises(RateLimitError, match="too many failed checks of this API key"):
        verify(f"Bearer {wrong}", "10.0.0.1")
    assert verify(f"Bearer {good}", "10.0.0.1").user == "ann"
    for _ in range(3):
        with pytest.raises(AuthError):
            verify("Bearer junk", "10.0.0.2")
    with pytest.raises(RateLimitError):
        verify("Bearer other-junk", "10.0.0.2")
    assert verify(f"Bearer {good}", "10.0.0.2").user == "ann"


def test_the_ledger_commits_many_requests_together_and_each_is_durable_on_return(db):
    """Sixteen requests finishing at once: fewer commits than rows (group commit), and
    each row readable from another connection as soon as its `record` returns."""
    import threading

    from service.ledger import Ledger

    ledger = Ledger(db, window_s=0.05)
    checked, errors = [], []

    def finish(i):
        try:
            ledger.release_later("w", i)
            request_id = ledger.record(f"u{i}", {"n": 1}, ["a"], {"a": [1.0]})
            other = Database(db.url)  # another handle: sees only what is committed
            checked.append(other.get_request(request_id) is not None)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger.close()
    assert not errors and checked == [True] * 16
    assert ledger.rows == 32 and ledger.commits < 16, (ledger.commits, ledger.rows)

"""Which keys a gateway accepts (gateway/tenancy/book.py, keys.py): --api-key keys by exact match, issued keys
`gsk_<id>.<secret>` by the digest of the whole key, revocations taken from the store's rows once; and `Tenancy`
over a real Store on a temporary SQLite file: model and tier restrictions (403), and the admin side (create,
revoke, list) never showing a key or its digest after creation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gridserve.gateway.api.errors import APIError
from gridserve.gateway.tenancy import KeyPolicy, Tenancy, UnknownKey
from gridserve.gateway.tenancy.book import KeyBook
from gridserve.gateway.tenancy.keys import MAX_KEY_CHARS, PREFIX, digest, key_id_of, new_key
from gridserve.gateway.tenancy.limits import OverLimit
from gridserve.store import Store

T0 = 1_700_000_040.0


def row(key_id: str, key: str, *, at: float = T0, revoked_at: float | None = None, **policy: Any) -> dict[str, Any]:
    """A key's row as the store gives it (policy as JSON: lists, not tuples)."""
    return {
        "key_id": key_id,
        "name": f"name-{key_id}",
        "digest": digest(key),
        "created_at": at,
        "updated_at": at if revoked_at is None else revoked_at,
        "revoked_at": revoked_at,
        "policy": policy,
    }


# -- static keys -------------------------------------------------------------------------------------------------


def test_static_keys_authenticate_by_exact_match_only() -> None:
    book = KeyBook(["alpha-secret", "", "beta-secret"])
    a, b = book.authenticate("alpha-secret"), book.authenticate("beta-secret")
    assert a is not None and b is not None
    # the id stays the same whatever order the keys are given in (what a key stored, it reads after a restart)
    assert (a.key_id, a.name, a.static) == ("static-" + digest("alpha-secret")[:12], "--api-key 1", True)
    assert (b.key_id, b.name) == ("static-" + digest("beta-secret")[:12], "--api-key 2"), "empty keys are skipped"
    assert getattr(KeyBook(["beta-secret"]).authenticate("beta-secret"), "key_id", None) == b.key_id
    assert a.policy == KeyPolicy()
    for wrong in ["alpha-secre", "alpha-secret ", "ALPHA-SECRET", "alpha-secretx", "", "beta"]:
        assert book.authenticate(wrong) is None, wrong
    assert book.get(b.key_id) is b
    assert book.get("static-3") is None
    assert book.issued() == []


# -- issued keys -------------------------------------------------------------------------------------------------


def test_issued_keys_authenticate_with_their_own_secret_only() -> None:
    (id1, key1), (id2, key2) = new_key(), new_key()
    assert key_id_of(key1) == id1 and key1.startswith(f"{PREFIX}{id1}.")
    book = KeyBook(["static"])
    assert book.apply([row(id1, key1, rpm=5, models=["m"]), row(id2, key2, at=T0 + 1)]) == []
    found = book.authenticate(key1)
    assert found is not None and found.key_id == id1 and not found.static
    assert found.policy.rpm == 5 and found.policy.models == ("m",)
    assert book.authenticate(key2) is book.get(id2)
    secret1, secret2 = key1.partition(".")[2], key2.partition(".")[2]
    assert book.authenticate(f"{PREFIX}{id1}.{secret2}") is None, "another key's secret under this id"
    assert book.authenticate(f"{PREFIX}{id2}.{secret1}") is None
    assert book.authenticate(key1[:-1]) is None
    assert book.authenticate(key1 + "x") is None
    assert book.authenticate(f"{PREFIX}ffffffffffff.{secret1}") is None, "unknown id"
    assert [k.key_id for k in book.issued()] == [id1, id2]


@pytest.mark.parametrize(
    "token",
    ["", "gsk_", "gsk_.", "gsk_abc", "gsk_abc.", "gsk_.secret", "abc.secret", "GSK_abc.secret", " gsk_abc.secret"],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    book = KeyBook()
    book.apply([row("abc", "gsk_abc.secret")])
    assert book.authenticate(token) is None
    assert book.authenticate("gsk_abc.secret") is not None


def test_key_id_of_reads_the_id_part() -> None:
    assert key_id_of("gsk_abc.def") == "abc"
    assert key_id_of("gsk_abc.d.e") == "abc", "the secret may hold dots"
    assert key_id_of("gsk_abc") is None
    assert key_id_of("sk_abc.def") is None


def test_oversized_tokens_are_refused_even_when_their_digest_matches() -> None:
    head = f"{PREFIX}abc."
    at_limit = head + "s" * (MAX_KEY_CHARS - len(head))
    over = head + "s" * (MAX_KEY_CHARS - len(head) + 1)
    assert (len(at_limit), len(over)) == (MAX_KEY_CHARS, MAX_KEY_CHARS + 1)
    book = KeyBook()
    book.apply([row("abc", at_limit)])
    assert book.authenticate(at_limit) is not None
    book.apply([row("abc", over)])
    assert book.authenticate(over) is None
    assert book.authenticate("x" * 100_000) is None


def test_a_revoked_row_stops_authentication_and_is_reported_once() -> None:
    key_id, key = new_key()
    book = KeyBook()
    book.apply([row(key_id, key)])
    assert book.authenticate(key) is not None
    revoked = book.apply([row(key_id, key, revoked_at=T0 + 5)])
    assert [k.key_id for k in revoked] == [key_id]
    assert revoked[0].revoked_at == T0 + 5
    assert book.authenticate(key) is None
    assert book.apply([row(key_id, key, revoked_at=T0 + 5)]) == [], "the same row read again (the sync's slack)"
    assert book.authenticate(key) is None
    assert book.get(key_id) is not None and book.get(key_id).revoked_at == T0 + 5  # type: ignore[union-attr]


def test_a_row_read_before_a_change_the_book_holds_does_not_undo_it() -> None:
    """A key sync reads the store in a thread; a rotation or revocation applied here meanwhile must not be undone by
    the older row it then applies (seen in a fresh clone's dashboard test: the rotated-out key answered 200)."""
    key_id, old = new_key()
    _, rotated = new_key(key_id)
    book = KeyBook()
    book.apply([row(key_id, old, at=T0)])
    book.apply([row(key_id, rotated, at=T0 + 5)])  # the rotation, applied here at once
    assert book.apply([row(key_id, old, at=T0)]) == []  # the sync's read from before it
    assert book.authenticate(old) is None and book.authenticate(rotated) is not None
    book.apply([row(key_id, rotated, revoked_at=T0 + 9)])
    book.apply([row(key_id, rotated, at=T0 + 5)])  # an older read again: the key stays revoked
    assert book.authenticate(rotated) is None
    book.apply([row(key_id, rotated, revoked_at=T0 + 9)])  # the same row again is fine
    assert book.authenticate(rotated) is None and book.cursor == T0 + 9


def test_a_row_first_seen_revoked_is_reported_and_refused() -> None:
    key_id, key = new_key()
    book = KeyBook()
    assert [k.key_id for k in book.apply([row(key_id, key, revoked_at=T0)])] == [key_id]
    assert book.authenticate(key) is None


def test_cursor_tracks_the_newest_updated_at() -> None:
    book = KeyBook()
    assert book.cursor == 0.0
    book.apply([row("a", "gsk_a.x", at=T0 + 3), row("b", "gsk_b.x", at=T0 + 1)])
    assert book.cursor == T0 + 3
    book.apply([row("c", "gsk_c.x", at=T0 + 2)])
    assert book.cursor == T0 + 3, "an older row does not move it back"
    book.apply([row("b", "gsk_b.x", at=T0 + 1, revoked_at=T0 + 9)])
    assert book.cursor == T0 + 9
    book.apply([])
    assert book.cursor == T0 + 9


# -- Tenancy over a real store -------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = T0 + 10.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def tenancy(tmp_path: Path) -> Iterator[Tenancy]:
    store = Store(f"sqlite:///{tmp_path}/db.sqlite")
    store.migrate()
    try:
        yield Tenancy(store, ["static-key"], gateway_id="gw-a", sync_interval_s=1.0, clock=Clock())
    finally:
        store.engine.dispose()


def issue(t: Tenancy, name: str = "ci", **policy: Any) -> dict[str, Any]:
    return asyncio.run(t.create(name, KeyPolicy(**policy)))


def test_create_returns_the_key_once_and_it_is_in_force_at_once(tenancy: Tenancy) -> None:
    made = issue(tenancy, "ci", rpm=10, models=("m1", "m2"), tiers=("batch",), priority="batch")
    key = made["key"]
    assert key.startswith(f"{PREFIX}{made['id']}.")
    assert "digest" not in made
    assert made["name"] == "ci" and made["status"] == "active" and made["revoked_at"] is None
    assert made["created_at"] == T0 + 10.0
    assert (made["rpm"], made["models"], made["tiers"], made["priority"]) == (10, ["m1", "m2"], ["batch"], "batch")
    found = tenancy.authenticate(key)
    assert found is not None and found.key_id == made["id"] and found.policy.rpm == 10
    assert tenancy.authenticate("static-key") is not None
    assert tenancy.authenticate("") is None
    stored = tenancy.keystore.keys_changed_since(0.0)
    assert [r["digest"] for r in stored] == [digest(key)], "the store keeps the digest"
    assert key not in str(stored), "and never the key"


def test_list_keys_never_shows_a_key_or_its_digest_and_is_oldest_first(tenancy: Tenancy) -> None:
    first = issue(tenancy, "first", rpm=1)
    tenancy.clock.t += 5  # type: ignore[attr-defined]
    second = issue(tenancy, "second")
    listed = tenancy.list_keys()
    assert [k["id"] for k in listed] == [first["id"], second["id"]]
    assert [k["name"] for k in listed] == ["first", "second"]
    for k in listed:
        assert "key" not in k and "digest" not in k
        text = str(k)
        assert first["key"] not in text and second["key"] not in text
        assert digest(first["key"]) not in text and digest(second["key"]) not in text
    assert listed[0]["rpm"] == 1 and listed[1]["rpm"] is None


def test_revoke_takes_effect_at_once_keeps_the_first_time_and_unknown_raises(tenancy: Tenancy) -> None:
    made = issue(tenancy)
    tenancy.clock.t += 7  # type: ignore[attr-defined]
    gone = asyncio.run(tenancy.revoke(made["id"]))
    assert gone["status"] == "revoked" and gone["revoked_at"] == T0 + 17.0
    assert "digest" not in gone and "key" not in gone
    assert tenancy.authenticate(made["key"]) is None
    tenancy.clock.t += 7  # type: ignore[attr-defined]
    again = asyncio.run(tenancy.revoke(made["id"]))
    assert again["revoked_at"] == T0 + 17.0
    assert [k["status"] for k in tenancy.list_keys()] == ["revoked"]
    with pytest.raises(UnknownKey):
        asyncio.run(tenancy.revoke("nosuchkey"))


@pytest.mark.parametrize("name", ["", "   ", "x" * 201])
def test_create_refuses_a_bad_name_and_stores_nothing(tenancy: Tenancy, name: str) -> None:
    with pytest.raises(ValueError, match="name must be"):
        issue(tenancy, name)
    assert tenancy.list_keys() == []


def test_admit_refuses_a_model_the_key_may_not_call(tenancy: Tenancy) -> None:
    key = tenancy.authenticate(issue(tenancy, "ci", models=("m1", "m2"))["key"])
    assert key is not None
    tenancy.admit(key, model="m2", tier=None, tokens=1).close()
    with pytest.raises(APIError) as refused:
        tenancy.admit(key, model="m3", tier=None, tokens=1)
    exc = refused.value
    assert not isinstance(exc, OverLimit)
    assert (exc.status, exc.code, exc.param, exc.type) == (403, "model_not_allowed", "model", "permission_error")
    assert "'m3'" in exc.message and "allowed: m1, m2" in exc.message
    assert tenancy.usage.keys[key.key_id].refused == {"model_not_allowed": 1}
    assert tenancy.limiter.counts(key.key_id).own.requests == 1, "a 403 counts no request"


def test_admit_with_no_models_allowed_says_none(tenancy: Tenancy) -> None:
    key = tenancy.authenticate(issue(tenancy, "ci", models=())["key"])
    assert key is not None
    with pytest.raises(APIError) as refused:
        tenancy.admit(key, model="m1", tier=None, tokens=1)
    assert "allowed: none" in refused.value.message


def test_admit_refuses_a_tier_the_key_may_not_ask_for_and_defaults_to_standard(tenancy: Tenancy) -> None:
    key = tenancy.authenticate(issue(tenancy, "ci", tiers=("batch", "economy"))["key"])
    assert key is not None
    tenancy.admit(key, model="any", tier="batch", tokens=1).close()
    for asked, shown in [(None, "'standard'"), ("premium", "'premium'")]:
        with pytest.raises(APIError) as refused:
            tenancy.admit(key, model="any", tier=asked, tokens=1)
        exc = refused.value
        assert (exc.status, exc.code, exc.param) == (403, "tier_not_allowed", "gridserve.tier")
        assert shown in exc.message and "allowed: batch, economy" in exc.message
    assert tenancy.usage.keys[key.key_id].refused == {"tier_not_allowed": 2}
    standard = tenancy.authenticate(issue(tenancy, "std", tiers=("standard",))["key"])
    assert standard is not None
    tenancy.admit(standard, model="any", tier=None, tokens=1).close()


def test_admit_over_a_limit_raises_the_429_and_counts_the_refusal(tenancy: Tenancy) -> None:
    key = tenancy.authenticate(issue(tenancy, "ci", rpm=1)["key"])
    assert key is not None
    tenancy.admit(key, model="m", tier=None, tokens=0).close()
    with pytest.raises(OverLimit) as refused:
        tenancy.admit(key, model="m", tier=None, tokens=0)
    assert refused.value.status == 429
    assert tenancy.usage.keys[key.key_id].refused == {"rate_limit_exceeded": 1}


def test_static_keys_pass_every_restriction(tenancy: Tenancy) -> None:
    key = tenancy.authenticate("static-key")
    assert key is not None and key.static
    for _ in range(3):
        tenancy.admit(key, model="whatever", tier="premium", tokens=10**9).close()
    assert tenancy.limiter.keys == {}
    assert tenancy.usage.keys == {}


def test_a_key_is_rotated_in_the_store_but_a_revoked_one_is_not(tenancy: Tenancy) -> None:
    made = asyncio.run(tenancy.create("rotating", KeyPolicy(rpm=9)))
    rotated = asyncio.run(tenancy.rotate(made["id"]))
    assert (rotated["id"], rotated["rpm"]) == (made["id"], 9) and rotated["key"] != made["key"]
    assert tenancy.authenticate(made["key"]) is None
    assert getattr(tenancy.authenticate(rotated["key"]), "key_id", None) == made["id"]
    asyncio.run(tenancy.revoke(made["id"]))
    with pytest.raises(UnknownKey):
        asyncio.run(tenancy.rotate(made["id"]))
    with pytest.raises(UnknownKey):
        asyncio.run(tenancy.rotate("no-such-key"))

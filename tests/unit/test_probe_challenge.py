"""Health probes bound to keys (trust/challenge.py): only the registered key's signature of this probe's challenge,
under this node's id, passes."""

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gridserve.trust import Identity
from gridserve.trust.challenge import MAX_CHALLENGE, answer, check, fresh_challenge

NODE = Identity.generate()
OTHER = Identity.generate()


def reply(identity: Identity, challenge: str, node_id: str | None = None) -> bytes:
    return orjson.dumps({"node_id": node_id or identity.node_id, "challenge_signature": answer(identity, challenge)})


@given(challenge=st.text(st.characters(codec="utf-8"), min_size=1, max_size=MAX_CHALLENGE))
def test_the_nodes_own_answer_passes(challenge: str) -> None:
    assert check(NODE.public_key, NODE.node_id, challenge, reply(NODE, challenge)) == ""


def test_another_identitys_answer_fails_however_it_is_dressed() -> None:
    challenge = fresh_challenge()
    as_itself = reply(OTHER, challenge)
    assert "answers as" in check(NODE.public_key, NODE.node_id, challenge, as_itself)
    claiming = reply(OTHER, challenge, node_id=NODE.node_id)  # says it is the node, signs with its own key
    assert "not signed by this node's key" in check(NODE.public_key, NODE.node_id, challenge, claiming)


def test_an_old_answer_does_not_pass_a_new_challenge() -> None:
    old = reply(NODE, fresh_challenge())
    assert "not signed" in check(NODE.public_key, NODE.node_id, fresh_challenge(), old)


def test_answers_without_a_signature_or_not_json_fail() -> None:
    challenge = fresh_challenge()
    unsigned = orjson.dumps({"status": "ok", "node_id": NODE.node_id})
    assert "does not sign" in check(NODE.public_key, NODE.node_id, challenge, unsigned)
    assert check(NODE.public_key, NODE.node_id, challenge, b'{"status":"ok"') == "the answer is not JSON"
    assert check(NODE.public_key, NODE.node_id, challenge, b"[1]") == "the answer is not a JSON object"


def test_a_challenge_too_long_is_not_signed() -> None:
    assert answer(NODE, "x" * (MAX_CHALLENGE + 1)) == ""

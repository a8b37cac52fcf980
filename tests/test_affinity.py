"""The conversation key: every turn of a chat has the same one, other chats another."""

from __future__ import annotations

from ghubai.affinity import key_of

SYSTEM = {"role": "system", "content": "You are terse."}


def chat(*messages: dict[str, object], model: str = "m", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": list(messages), **extra}


def test_every_turn_of_a_chat_has_its_key() -> None:
    first = chat(SYSTEM, {"role": "user", "content": "hello"})
    later = chat(SYSTEM, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                 {"role": "user", "content": "and then?"})
    assert key_of(first, []) == key_of(later, []) is not None


def test_another_opening_model_or_session_is_another_conversation() -> None:
    base = key_of(chat(SYSTEM, {"role": "user", "content": "hello"}), [])
    assert key_of(chat(SYSTEM, {"role": "user", "content": "bonjour"}), []) != base
    assert key_of(chat({"role": "system", "content": "You are verbose."}, {"role": "user", "content": "hello"}),
                  []) != base
    assert key_of(chat(SYSTEM, {"role": "user", "content": "hello"}, model="other"), []) != base
    assert key_of(chat(SYSTEM, {"role": "user", "content": "hello"}), [(b"x-session-id", b"s1")]) != base


def test_an_explicit_session_or_user_wins_over_the_opening() -> None:
    one = key_of(chat({"role": "user", "content": "a"}), [(b"x-session-id", b"s1")])
    assert one == key_of(chat({"role": "user", "content": "b"}), [(b"x-session-id", b"s1")])
    assert key_of(chat({"role": "user", "content": "a"}, user="u1"), []) == \
        key_of(chat({"role": "user", "content": "b"}, user="u1"), [])


def test_completions_by_their_prompts_opening_and_nothing_without_one() -> None:
    preamble = "x " * 2000
    assert key_of({"model": "m", "prompt": preamble + "one"}, []) == key_of({"model": "m", "prompt": preamble + "two"}, [])
    assert key_of({"model": "m", "prompt": "one"}, []) != key_of({"model": "m", "prompt": "two"}, [])
    assert key_of({"model": "m", "input": "embed me"}, []) is None
    assert key_of({"model": "m", "messages": [{"role": "assistant", "content": "no user yet"}]}, []) is None
    assert key_of({"model": "m", "messages": "not a list", "prompt": 3}, []) is None

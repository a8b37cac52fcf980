"""The conversation key: every turn of a chat has the same one, other chats another."""

from __future__ import annotations

from ghubai.affinity import as_conversation, key_of, keys_of

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
    assert key_of({"model": "m", "messages": [{"role": ["user"]}, {"role": {}}, {"role": "user"}]}, []) is not None
    big = "s" * (1 << 16)  # a system told by its start, as a message is; a context by its tokens
    assert key_of({"model": "m", "system": big + "a", "prompt": "p"}, []) == \
        key_of({"model": "m", "system": big + "b", "prompt": "p"}, [])
    assert key_of({"model": "m", "context": [1, "x" * 100, {"a": 1}, 2]}, []) == \
        key_of({"model": "m", "context": [1, 2]}, [])


def test_once_a_chat_has_the_model_s_answer_it_is_told_from_others_that_opened_alike() -> None:
    """Regression (hunt): every conversation that opened with "hi" under one system prompt had one key, so
    each turn went wherever the last of them went (47–52 of 80 follow-ups moved, as with no affinity). The
    hub's key now holds the model's first answer once a turn carries it, falling back on the opening's
    for that turn; the proxy's stays the opening's, the same for every turn."""
    hello = {"role": "user", "content": "hi"}
    first = chat(SYSTEM, hello)
    one = chat(SYSTEM, hello, {"role": "assistant", "content": "Hello! How can I help?"},
               {"role": "user", "content": "x"})
    other = chat(SYSTEM, hello, {"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "y"})
    opening, none = keys_of(first, [], "openai.chat") or (0, 0)
    assert none is None and opening == key_of(first, []) == key_of(one, []) == key_of(other, [])
    later = chat(*one["messages"], {"role": "assistant", "content": "z"}, {"role": "user", "content": "w"})
    assert keys_of(one, [], "openai.chat") == keys_of(later, [], "ollama.chat")
    (one_key, fallback), (other_key, _) = keys_of(one, [], "openai.chat"), keys_of(other, [], "openai.chat")
    assert fallback == opening and len({one_key, other_key, opening}) == 3
    calls = chat(SYSTEM, hello, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]})
    assert keys_of(calls, [], "openai.chat")[0] != opening  # a tool call is an answer too


def test_the_hub_keys_only_what_an_engine_keeps_and_honours_openai_s_cache_key() -> None:
    """Regression (hunt): 100,000 legacy /api/embeddings calls (a RAG ingestion) each got a key and pushed
    the chats out of the hub's memory. OpenAI's ``prompt_cache_key``, which replaces ``user`` for its
    caches, names a session as ``user`` does."""
    assert keys_of({"model": "m", "prompt": "embed me"}, [], "ollama.embeddings") is None
    assert keys_of({"model": "m", "input": "x", "user": "u"}, [], "openai.embeddings") is None
    assert keys_of({"model": "m", "prompt": "write"}, [], "ollama.generate") is not None
    cached = [chat({"role": "user", "content": text}, prompt_cache_key="thread-1") for text in "ab"]
    assert keys_of(cached[0], [], "openai.chat") == keys_of(cached[1], [], "openai.chat") == \
        (key_of(cached[0], []), None)


def test_a_generation_with_context_is_keyed_by_it_and_a_huge_message_by_its_start() -> None:
    """Regression (hunt): /api/generate's follow-ups carry the conversation's ``context`` and a new prompt,
    so each had a new key (15 of 18 moved); and hashing a 4 MB message whole was half the hub's time for
    its request. The start of each text (64 Ki characters) names the conversation. (A context is told by its
    first 1,024 tokens: a short one changes with each turn, but its prompt is cheap to compute again.)"""
    turns = [{"model": "m", "prompt": prompt, "context": list(range(size))}
             for prompt, size in (("a", 1100), ("b", 1500))]
    assert keys_of(turns[0], [], "ollama.generate") == keys_of(turns[1], [], "ollama.generate") is not None
    big = "x" * (1 << 16)
    assert key_of(chat({"role": "user", "content": big + "a"}), []) == \
        key_of(chat({"role": "user", "content": big + "b"}), [])
    deep: object = "end"
    for _ in range(5000):  # nesting: no recursion past a few levels
        deep = [deep]
    assert key_of(chat({"role": "user", "content": deep}), []) is not None


def test_a_responses_conversation_is_keyed_like_the_chat_it_is() -> None:
    """``/v1/responses``: ``instructions`` is the system message, ``input`` the messages (a tool call's
    item has no role and is passed over) or, as text, the prompt."""
    first = {"model": "m", "instructions": "You are terse.", "input": [{"role": "user", "content": "hello"}]}
    later = {**first, "input": [{"role": "user", "content": "hello"}, {"type": "function_call", "name": "f"},
                                {"role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
                                {"role": "user", "content": "and then?"}]}
    opening = keys_of(as_conversation(first), [], "openai.chat")
    assert keys_of(first, [], "openai.responses") == opening and opening is not None
    assert keys_of(later, [], "openai.responses")[1] == opening[0]  # (its opening's key, once answered)
    assert key_of(as_conversation(first), []) == key_of(as_conversation(later), [])
    assert key_of(as_conversation({"model": "m", "input": "hello"}), []) == \
        key_of({"model": "m", "prompt": "hello"}, [])
    assert key_of({"model": "m", "input": "an embedding's text"}, []) is None  # (not read as a conversation)

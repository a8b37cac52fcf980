"""What the simulated engine generates and when: deterministic tokens on a timetable, embeddings,
the parallel-slot limit, and the counters that let tests see generation really stop."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import zlib
from collections import Counter, OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import trio

SLOT_SIMILARITY = 0.1  # llama.cpp's --slot-prompt-similarity: the share of a prompt a slot's cache must hold
WORDS = (
    "the grid hums along as tokens flow from many quiet machines into one steady stream of "
    "words that keep arriving in order while the hub counts them and the worker listens"
).split()


@dataclass(frozen=True)
class SimOptions:
    """How the simulator behaves (``ghubai sim`` flags)."""
    models: tuple[str, ...] = ("sim",)
    ttft_ms: float = 20.0
    itl_ms: float = 10.0
    tokens: int = 32
    max_parallel: int = 64
    fail_rate: float = 0.0
    fail_after_tokens: int | None = None
    embed_dim: int = 16
    # Engines unlike Ollama, for the worker's tests: a key the engine demands (``Bearer``), paths it
    # does not serve (404, as from a partial shim), llama.cpp's slot count on ``/props``, and usage
    # sent on a chunk whose ``choices`` is not empty (as LiteLLM does).
    api_key: str = ""
    disabled: frozenset[str] = frozenset()
    slots: int | None = None
    usage_with_choices: bool = False
    # An engine with memory, as the scheduler meets one: loading a model that is not resident takes
    # ``load_ms`` (one load at a time), at most ``max_loaded`` models stay resident (the least
    # recently used is evicted; 0: no bound), and a prompt costs ``prefill_us_per_token`` per word
    # not already in the cache of the slot that runs it (a slot keeps its last prompt).
    load_ms: float = 0.0
    max_loaded: int = 0
    prefill_us_per_token: float = 0.0

    @property
    def has_memory(self) -> bool:
        return self.load_ms > 0 or self.max_loaded > 0


@dataclass
class Stats:
    """What the simulator did, for ``/sim/stats`` and the tests. Invariant: ``active`` counts the
    generations producing tokens now; each started one ends as completed, cancelled or failed."""
    active: int = 0
    waiting: int = 0
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens: int = 0  # generated so far, over all requests
    refused: int = 0  # answered 401 (no key) or 404 (a path hidden with --disable)
    loads: int = 0  # models loaded into memory
    prefill_tokens_computed: int = 0  # prompt words not found in the running slot's cache

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class EngineFailure(Exception):
    """Raised inside a generation to end it the way a real engine fails mid-stream."""


def count_words(text: str) -> int:
    return max(1, len(text.split()))


def embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    seed = hashlib.blake2b(text.encode(), digest_size=8).digest()
    rng = random.Random(struct.unpack("<Q", seed)[0])
    vector = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
    norm = sum(x * x for x in vector) ** 0.5 or 1.0
    return [x / norm for x in vector]


@dataclass
class Generation:
    """One reply: its tokens, why it stopped, and its counts. Invariant: at most ``limit`` tokens."""
    prompt_tokens: int
    limit: int
    finish_reason: str
    tokens: list[str] = field(default_factory=list)
    script: list[str] | None = None  # fixed pieces to send instead of words (a JSON answer)
    tool_call: tuple[str, dict[str, Any]] | None = None  # the answer is this call instead of text
    stop: tuple[str, ...] = ()  # the request's stop sequences: the answer ends before one, finish "stop"
    started: float = 0.0  # trio time its generation began, once it has (for Ollama's durations)
    first_token_at: float = 0.0  # and its first token came

    def answer_with_json(self, document: Any) -> None:
        """The answer is ``document``, cut (finish ``length``) where the request's own limit is shorter."""
        text = json.dumps(document)
        self.script = [text[i:i + 8] for i in range(0, len(text), 8)]
        if self.finish_reason != "length" or self.limit >= len(self.script):
            self.limit, self.finish_reason = len(self.script), "stop"

    def answer_with_call(self, name: str, arguments: dict[str, Any]) -> None:
        self.script, self.limit, self.tool_call, self.finish_reason = [], 0, (name, arguments), "stop"

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass(eq=False)
class Slot:
    """One parallel slot of the engine and its prompt cache: the words of the last prompt it ran."""
    model: str = ""
    words: list[str] = field(default_factory=list)

    def shared(self, model: str, words: list[str]) -> int:
        """How many leading words of this prompt the slot's cache holds."""
        if model != self.model:
            return 0
        count = 0
        for mine, theirs in zip(self.words, words):
            if mine != theirs:
                break
            count += 1
        return count


class Simulator:
    """A deterministic engine: at most ``max_parallel`` generations at once (the others wait),
    each on the ``ttft_ms`` / ``itl_ms`` timetable, after its model's load and its prompt's prefill
    when the options ask for memory. Invariant: ``stats`` is updated as generations move, and
    ``resident`` holds at most ``max_loaded`` models, least recently used first."""
    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.stats = Stats()
        self.slots = trio.Semaphore(options.max_parallel)
        self.free: list[Slot] = [Slot() for _ in range(options.max_parallel)]
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.running: Counter[str] = Counter()  # generations running, by model: such a model is not evicted
        self.expiring: set[str] = set()  # models told to unload while they generated: evicted as the last ends
        self._loading = trio.Lock()
        self._ended = trio.Event()  # set (and replaced) whenever a generation ends
        self._random = random.Random(0)

    def loaded(self) -> list[str]:
        """The models in memory (``/api/ps``): all of them for an engine without memory."""
        return list(self.resident) if self.options.has_memory else list(self.options.models)

    async def _load(self, model: str) -> None:
        """Make ``model`` resident, as Ollama does: a load (one at a time) unless it is already;
        beyond ``max_loaded``, first evict the least recently used model that runs no generation
        (waiting for one to end when all do), and the slot caches of the evicted model with it."""
        self.expiring.discard(model)  # (asked for again: it stays, as Ollama's does)
        if not self.options.has_memory:
            return
        async with self._loading:
            while model not in self.resident:
                if not self.options.max_loaded or len(self.resident) < self.options.max_loaded:
                    await trio.sleep(self.options.load_ms / 1000)
                    self.stats.loads += 1
                    self.resident[model] = None
                elif (idle := next((held for held in self.resident if not self.running[held]), None)) is None:
                    await self._ended.wait()
                else:
                    del self.resident[idle]
                    for slot in self.free:
                        if slot.model == idle:
                            slot.model, slot.words = "", []
        self.resident.move_to_end(model)

    async def preload(self, model: str, reason: str) -> None:
        """An Ollama request with nothing to generate: "load" makes ``model`` resident; "unload"
        evicts it, and its slots' caches, now, or, while generations run on it, as the last ends,
        answered at once all the same: Ollama lets a running model finish."""
        if reason == "load":
            await self._load(model)
            return
        if self.running[model]:
            self.expiring.add(model)  # (at once: not behind a load that waits for memory)
            return
        async with self._loading:  # (after a load under way, not before it)
            if self.running[model]:
                self.expiring.add(model)
            else:
                self._evict(model)

    def _evict(self, model: str) -> None:
        self.expiring.discard(model)
        self.resident.pop(model, None)
        for slot in self.free:
            if slot.model == model:
                slot.model, slot.words = "", []

    def _take_slot(self, model: str, words: list[str]) -> tuple[Slot, int]:
        """A free slot, as llama.cpp picks one: the one whose cache holds the most of this prompt, if
        that is more than ``SLOT_SIMILARITY`` of it, else the least recently used (``free`` is in the
        order the slots were freed); and how many words of the prompt must be computed. (Taking the
        slot that shares a first word wiped a conversation's cache for a stranger.)"""
        if not self.options.prefill_us_per_token:
            return self.free.pop(), 0
        best = max(range(len(self.free)),  # on a tie, the slot whose cache is the least to lose
                   key=lambda index: (self.free[index].shared(model, words), -len(self.free[index].words)))
        if (shared := self.free[best].shared(model, words)) <= SLOT_SIMILARITY * len(words):
            best, shared = 0, self.free[0].shared(model, words)
        slot = self.free.pop(best)
        compute = len(words) - shared
        slot.model, slot.words = model, words
        self.stats.prefill_tokens_computed += compute
        return slot, compute

    def should_fail(self) -> bool:
        return self._random.random() < self.options.fail_rate

    def plan(self, prompt: str, requested_limit: int | None, stop: tuple[str, ...] = ()) -> Generation:
        """The request's own limit wins over ``--tokens``; running into it is finish ``length``."""
        if requested_limit is not None:
            return Generation(count_words(prompt), requested_limit, "length", stop=stop)
        return Generation(count_words(prompt), self.options.tokens, "stop", stop=stop)

    async def run(self, generation: Generation, prompt: str, model: str = "") -> AsyncGenerator[str, None]:
        """Yield the tokens on the timetable, holding one parallel slot while generating.

        Counts the outcome: completed when the caller consumed every token, cancelled when it was
        cancelled or stopped early (the client left), failed on an injected failure."""
        self.stats.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.stats.waiting -= 1
        try:
            await self._load(model)  # in its slot, as a request waits for its model's load
        except BaseException:
            self.slots.release()
            raise
        self.running[model] += 1  # no checkpoint since the load: it cannot be evicted in between
        slot, compute = self._take_slot(model, prompt.split())
        self.stats.active += 1
        self.stats.started += 1
        outcome = "cancelled"
        try:
            generation.started = trio.current_time()
            start = generation.started + compute * self.options.prefill_us_per_token / 1e6
            ttft, itl = self.options.ttft_ms / 1000, self.options.itl_ms / 1000
            offset = zlib.crc32(prompt.encode())
            fail_after = self.options.fail_after_tokens
            for index in range(generation.limit):
                if fail_after is not None and index >= fail_after:
                    outcome = "failed"
                    raise EngineFailure(f"simulated engine failure after {fail_after} tokens")
                deadline = start + ttft + index * itl
                if deadline > trio.current_time():
                    await trio.sleep_until(deadline)
                if generation.script is not None:
                    token = generation.script[index]
                else:
                    token = WORDS[(offset + index) % len(WORDS)]
                    token = token if index == 0 else " " + token
                if generation.stop and any(stop in generation.text + token for stop in generation.stop):
                    generation.finish_reason = "stop"  # (the stop sequence is not part of the answer)
                    break
                if not generation.tokens:
                    generation.first_token_at = trio.current_time()
                generation.tokens.append(token)
                self.stats.tokens += 1
                yield token
            if generation.limit == 0:
                await trio.sleep(ttft)
            outcome = "completed"
        finally:
            self.stats.active -= 1
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            self.running[model] -= 1
            self.free.append(slot)
            if model in self.expiring and not self.running[model]:
                self._evict(model)  # (its slots' caches too, this one's included)
            self._ended.set()
            self._ended = trio.Event()
            self.slots.release()


_FORMATS = {"date-time": "2026-01-01T00:00:00Z", "date": "2026-01-01", "time": "00:00:00Z",
            "email": "sim@example.com", "uri": "https://example.com/sim", "hostname": "sim.example.com",
            "uuid": "00000000-0000-4000-8000-000000000000", "ipv4": "127.0.0.1", "ipv6": "::1"}
MAX_FIT_DEPTH = 32  # a schema that refers to itself ends in an empty value
DEEP_ARRAYS = 8  # from this depth an array has only the items it must (a tree of nodes ends)
MAX_ITEMS = 1000  # a schema's minItems beyond it gets this many: a simulator's answer stays small


def fit(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A value that fits a JSON schema as Pydantic and OpenAI's SDK write them: types, properties,
    items (``minItems`` of them, at most ``MAX_ITEMS``), enum, const, string formats, ``$ref`` to
    ``$defs`` (or ``definitions``), the first branch of ``anyOf``/``oneOf`` (``Optional[X]`` is X),
    ``allOf`` merged (their properties together).
    Real engines constrain their output to the schema; a client then validates it."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > MAX_FIT_DEPTH:
        return {"answer": "the grid hums"} if depth == 0 else None
    if isinstance(schema.get("$ref"), str):
        return fit(_resolved(schema, root), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for choice in ("anyOf", "oneOf"):
        if isinstance(branches := schema.get(choice), list) and branches:
            return fit(next((b for b in branches if isinstance(b, dict) and b.get("type") != "null"), branches[0]),
                       root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        return fit(_merged([schema], root, depth), root, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema or depth == 0 else "string")
    kind = next((k for k in kind if k != "null"), "null") if isinstance(kind, list) and kind else kind
    if kind == "object":
        properties = schema.get("properties") or {}
        if not properties:
            return {"answer": "the grid hums"} if depth == 0 else {}
        return {name: fit(sub, root, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        least = least if isinstance(least := schema.get("minItems"), int) else 0
        count = min(MAX_ITEMS, max(least, 1 if depth < DEEP_ARRAYS else 0))
        return [fit(schema.get("items") or {"type": "string"}, root, depth + 1) for _ in range(count)]
    if kind == "string" and (fmt := _FORMATS.get(schema.get("format", ""))):
        return fmt
    return {"string": "sim", "integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, "sim")


def _merged(parts: list[Any], root: Any, depth: int, seen: frozenset[str] = frozenset()) -> dict[str, Any]:
    """One schema of ``parts`` and of the ``allOf`` parts within them (through ``$ref`` too): their
    keywords together, their properties together, and no ``allOf`` left. A ``$ref`` already being
    merged on this path is skipped (a schema whose ``allOf`` names itself twice took hours)."""
    merged: dict[str, Any] = {}

    def take(piece: dict[str, Any]) -> None:
        properties = {**merged.get("properties", {}), **(piece.get("properties") or {})}
        merged.update({key: value for key, value in piece.items() if key != "allOf"})
        if properties:
            merged["properties"] = properties

    for part in parts:
        path = seen
        if isinstance(part, dict) and "$ref" in part:
            if (ref := str(part["$ref"])) in seen:
                continue
            part, path = _resolved(part, root), seen | {ref}
        if not isinstance(part, dict):
            continue
        if isinstance(inner := part.get("allOf"), list) and depth < MAX_FIT_DEPTH:
            take(_merged(inner, root, depth + 1, path))
        take(part)
    return merged


def _resolved(schema: dict[str, Any], root: Any) -> dict[str, Any]:
    """What ``schema``'s ``$ref`` (``#/$defs/Name``) points to in ``root``; {} when nothing."""
    target: Any = root
    for name in str(schema["$ref"]).removeprefix("#/").split("/"):
        target = target.get(name) if isinstance(target, dict) else None
    return target if isinstance(target, dict) else {}


def requested_tool(body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The tool a request forces (``tool_choice`` naming a function, or ``"required"``: the first),
    as chat completions and Ollama give tools (``{"type": "function", "function": {...}}``) and
    as the Responses API does (``{"type": "function", "name": ...}``)."""
    tools = [tool.get("function", tool) for tool in body.get("tools") or []
             if isinstance(tool, dict) and tool.get("type", "function") == "function"]
    tools = [tool for tool in tools if isinstance(tool, dict)]
    choice = body.get("tool_choice")  # (a dict of another type, e.g. allowed_tools, forces none)
    named = isinstance(choice, dict) and choice.get("type", "function") == "function"
    if not tools or not (choice == "required" or named):
        return None
    wanted = (choice.get("function") or choice).get("name") if isinstance(choice, dict) else None
    tool = next((t for t in tools if t.get("name") == wanted), tools[0])
    return str(tool.get("name", "")), fit(tool.get("parameters") or {"type": "object"})


def requested_json(body: dict[str, Any], dialect: str) -> tuple[bool, Any]:
    """Whether the answer must be JSON (Ollama's ``format``, OpenAI's ``response_format`` and the
    Responses API's ``text.format``, each on its own API only), and its schema."""
    fmt = body.get("format") if dialect == "ollama" else None
    text = body.get("text") if dialect == "openai" else None
    response_format = body.get("response_format") if dialect == "openai" else None
    if response_format is None and isinstance(text, dict):
        response_format = text.get("format")
    response_format = response_format if isinstance(response_format, dict) else {}
    if fmt == "json" or response_format.get("type") == "json_object":
        return True, None
    if isinstance(fmt, dict):
        return True, fmt
    if response_format.get("type") == "json_schema":  # (the Responses API's schema sits beside its type)
        return True, (response_format.get("json_schema") or response_format).get("schema")
    return False, None

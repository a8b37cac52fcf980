"""Configuration files as operators handle them: ``ghubai init`` writes commented defaults for every
role, ``ghubai check`` validates a file, ``ghubai registry add-hub/remove-hub`` edit a registry file.

Edits are atomic (a temporary file in the same folder, then rename), so the registry watching the
file never reads half of one. tomli-w writes every key back, but not the comments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import tempfile
import tomllib
import typing
from pathlib import Path
from typing import Any

import tomli_w

from ghubai.config import ROLES, ConfigError, HubEntry, load, parse, read_text, unlisted_hubs

_HEADERS = {
    "registry": "ghubai registry --config registry.toml\n# The list of hubs. Save an edit and every proxy follows "
                "within a second;\n# a broken edit keeps the last good list (GET /health says why).",
    "hub": "ghubai hub --config hub.toml\n# The API clients call, and the WebSocket /gridhub that workers dial.",
    "worker": "ghubai worker --config worker.toml\n# Environment variables win over this file: HUB_URL "
              "(comma-separated), PROVIDER_TOKEN,\n# OLLAMA_LOCAL_URL, ALLOW_INVALID_CERTS, GHUBAI_ENGINE_API_KEY.",
    "proxy": "ghubai proxy --config proxy.toml\n# The grid's front door: health-checked, model-aware routing "
             "over the hubs.\n# Environment variable REGISTRY_URL wins over registry_url.",
}
_EXAMPLE_HUB = HubEntry(name="hub1", address="http://10.0.0.5:7197")


def _toml_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _render(cls: type, defaults: Any, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines: list[str] = []
    tables = []
    for spec in dataclasses.fields(cls):
        hint, value, doc = hints[spec.name], getattr(defaults, spec.name), spec.metadata.get("doc")
        if dataclasses.is_dataclass(hint):
            tables.append(spec)
            continue
        if doc:
            lines.append(f"# {doc}")
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else None
        if dataclasses.is_dataclass(item):  # [[hubs]]: an example, commented out (``ghubai check`` says so)
            example = tomli_w.dumps(dataclasses.asdict(_EXAMPLE_HUB)).strip().splitlines()
            lines.extend([f"# [[{spec.name}]]", *(f"# {line}" for line in example)])
            continue
        if isinstance(value, dict) and not value:  # tomli-w would open a table here, ending this section
            lines.append(f"{spec.name} = {{}}")
            continue
        lines.append(tomli_w.dumps({spec.name: _toml_value(value)}).strip())
    for spec in tables:
        lines.append(f"\n[{prefix}{spec.name}]")
        lines.extend(_render(hints[spec.name], getattr(defaults, spec.name), f"{prefix}{spec.name}."))
    return lines


def default_text(role: str) -> str:
    """The commented default file of ``role``: what ``ghubai init`` writes."""
    cls = ROLES[role]
    return f"# {_HEADERS[role]}\n\n" + "\n".join(_render(cls, cls(), "")) + "\n"


def init(directory: str, force: bool = False) -> list[str]:
    """Write ``registry.toml``, ``hub.toml``, ``worker.toml``, ``proxy.toml``; returns the paths written.
    Raises FileExistsError naming the files that exist, unless ``force``."""
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory)
    paths = [folder / f"{role}.toml" for role in ROLES]
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise FileExistsError(", ".join(existing))
    folder.mkdir(parents=True, exist_ok=True)
    for role, path in zip(ROLES, paths):
        write_atomically(path, default_text(role))
    return [str(path) for path in paths]


def role_of(path: str) -> str | None:
    """The role a file name says: ``hub.toml``, ``hub-2.toml``, ``worker_gpu1.toml`` ..."""
    match = re.match(r"(registry|hub|worker|proxy)(?![a-z])", Path(path).name)
    return match.group(1) if match else None


def check(path: str, role: str) -> list[str]:
    """Every problem in the file, key first, as the daemon of ``role`` would see it (its environment's
    overrides too: ``OLLAMA_LOCAL_URL`` without a scheme passed here, and stopped the worker); empty
    when it is valid."""
    try:
        text = read_text(path)
        load(role, path)
    except ConfigError as error:
        return error.errors
    problem = unlisted_hubs(text, path) if role == "registry" else None
    return [problem] if problem else []


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by a complete new file in one rename; keeps the old file's permissions and,
    where it may (as root), its owner and group: a service must still read its config after an edit.
    A new file is 0640, never readable by every user: configs come to hold tokens and keys."""
    old = path.stat() if path.exists() else None
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, old.st_mode & 0o7777 if old else 0o640)
        if old is not None:
            with contextlib.suppress(PermissionError):
                os.chown(temporary, old.st_uid, old.st_gid)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _edit_hubs(path: str, edit: typing.Callable[[list[dict[str, Any]]], None]) -> None:
    """Read, edit and write the file under a lock on its folder (the file itself is replaced by
    each edit): two ``add-hub`` at once each wrote the list with its own hub alone. A hand edit
    made at the same moment can still be lost; none of ours can."""
    file = Path(path).resolve()  # through a symlink, edit the file it points to
    try:
        folder = os.open(file.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise ConfigError([f"{path}: cannot edit: {error.strerror}"]) from None
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        _edit_locked(path, file, edit)
    finally:
        os.close(folder)  # (and the lock with it)


def _edit_locked(path: str, file: Path, edit: typing.Callable[[list[dict[str, Any]]], None]) -> None:
    try:
        document = tomllib.loads(read_text(str(file))) if file.exists() else {}
    except (ValueError, RecursionError) as error:  # (as config.parse reads it)
        raise ConfigError([f"{path}: not valid TOML: {error}"]) from None
    hubs = document.setdefault("hubs", [])
    if not isinstance(hubs, list) or not all(isinstance(hub, dict) for hub in hubs):
        raise ConfigError([f"{path}: hubs: expected an array of tables ([[hubs]])"])
    edit(hubs)
    text = tomli_w.dumps(document)
    parse("registry", text, path)  # never write a file the registry would refuse
    write_atomically(file, text)


def add_hub(path: str, name: str, address: str) -> None:
    def edit(hubs: list[dict[str, Any]]) -> None:
        if any(hub.get("name") == name for hub in hubs):
            raise ConfigError([f"{path}: hubs: a hub named {name!r} is already listed"])
        hubs.append({"name": name, "address": address})

    _edit_hubs(path, edit)


def remove_hub(path: str, name: str) -> None:
    def edit(hubs: list[dict[str, Any]]) -> None:
        kept = [hub for hub in hubs if hub.get("name") != name]
        if len(kept) == len(hubs):
            raise ConfigError([f"{path}: hubs: no hub named {name!r}"])
        hubs[:] = kept

    _edit_hubs(path, edit)

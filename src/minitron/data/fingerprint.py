"""What an output was made from: settings + the identity of every model and corpus it read -> one hash.

A stage folder of `minitron run` holds `stage.json`:
    {"stage": "prune", "settings": {...}, "inputs": {...}, "fingerprint": "<sha256 of settings + inputs>"}
`inputs` names each model and corpus the stage read by its identity (below) and each earlier stage by
its fingerprint, so a change anywhere upstream changes every later fingerprint. A rerun compares the
record it would write with the one on disk (`stale_reason`): equal -> the stage is skipped; different ->
the stage and every later one are redone, and the message names what changed. A setting that a newer
minitron added and that is None (unset: the behaviour before it existed) does not make a record stale, so an
upgrade that adds e.g. `target.experts` does not redo a finished dense run; likewise a setting a newer record
leaves out on purpose (`stale_reason(..., left_out)`: distillation's resumable settings) is ignored in an older
record that still holds it.

Identities are cheap (no weight file is read): a model dir is its config.json and tokenizer files by
content hash and its weight files by size and modification time; a dir written by a minitron stage is
its stage fingerprint; a corpus is its file list with sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from minitron.arch.files import digest, stat_identity  # noqa: F401 (digest: importable from here as before)

RECORD = "stage.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
HASHED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")


def dir_identity(path: Path) -> dict:
    """A model dir: its stage fingerprint when a minitron stage wrote it, else small files by content hash
    and weight files by size + mtime."""
    path = Path(path)
    record = path / RECORD
    if record.is_file():
        return {"stage": json.loads(record.read_text())["fingerprint"]}
    files = {}
    for p in sorted(path.iterdir()):
        if p.name in HASHED_FILES:
            files[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_file() and p.name.endswith(WEIGHT_SUFFIXES):
            files[p.name] = stat_identity(p)
    return {"files": digest(files)}


def model_identity(name: str) -> dict:
    """`default`, a local dir or a hub id -> what identifies its weights and tokenizer."""
    from minitron.arch.models import resolve_model_path

    path = Path(resolve_model_path(name))
    if path.is_dir():
        return {"model": name, **dir_identity(path)}
    return {"model": name, "hub_id": name}


def content_id(identity: dict) -> str:
    """Digest of a model identity without its name: the same weights under another path or name match."""
    return digest({k: v for k, v in identity.items() if k != "model"})


def corpus_identity(source: str, data_root: str | os.PathLike | None = None) -> dict:
    """A corpus (see minitron.data.corpus.resolve_source): every file's relative path, size and mtime; a token store
    (`minitron data --out`) by its fingerprint (its source's identity, tokenizer, dtype and bad-bytes policy)."""
    from minitron.data.sources import resolve_source, store_meta

    path = resolve_source(source, data_root)
    if isinstance(path, str):
        return {"corpus": source, "dataset": path}
    meta = store_meta(path) if path.is_dir() else None
    if meta is not None:
        return {"corpus": source, "store": meta["fingerprint"]}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    listing = [[str(p.relative_to(path)) if p != path else p.name, *stat_identity(p)] for p in files]
    return {"corpus": source, "files": len(listing), "digest": digest(listing)}


def make_record(stage: str, settings: dict, inputs: dict) -> dict:
    return {"stage": stage, "settings": settings, "inputs": inputs, "fingerprint": digest([settings, inputs])}


def _flat(obj, prefix: str = "") -> dict:
    """Nested dicts -> {'a.b.c': leaf}; an empty dict is a leaf of its own (so its key is not lost)."""
    if isinstance(obj, dict) and obj:
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


_ABSENT = object()


def _changed_keys(old: dict, new: dict, part: str) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for each flattened key of `part` that differs (as JSON writes them: a tuple
    is a list; 1 and 1.0 differ, as in the digest); _ABSENT where missing."""
    a, b = (_flat(json.loads(json.dumps(r.get(part, {}), default=str))) for r in (old, new))
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, _ABSENT) != b.get(k, _ABSENT) or type(a.get(k)) is not type(b.get(k))]


def _shown(value) -> str:
    return "(unset)" if value is _ABSENT else repr(value)


def differences(old: dict, new: dict, limit: int = 6) -> list[str]:
    """'key: old -> new' for each setting or input that differs (inputs by name only)."""
    out = [f"{k}: {_shown(a)} -> {_shown(b)}" for k, a, b in _changed_keys(old, new, "settings")]
    out += [f"input {k.split('.')[0]} changed" for k, _, _ in _changed_keys(old, new, "inputs")]
    return list(dict.fromkeys(out))[:limit]


def only_new_unset_settings(old: dict, new: dict) -> bool:
    """True when the records differ only by settings the old one lacks and the new one has as None: settings
    a newer minitron added, at the value that means the behaviour from before they existed."""
    if _changed_keys(old, new, "inputs") or old.get("stage") != new.get("stage"):
        return False
    changed = _changed_keys(old, new, "settings")
    return bool(changed) and all(a is _ABSENT and b is None for _, a, b in changed)


def read_record(folder: Path) -> dict | None:
    path = Path(folder) / RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def without_settings(record: dict, keys: tuple[str, ...] | list[str]) -> dict:
    """`record` less the settings named by dotted `keys` (e.g. 'distill.eval_every'), its fingerprint recomputed."""
    settings = json.loads(json.dumps(record.get("settings", {}), default=str))
    for key in keys:
        *parents, leaf = key.split(".")
        node = settings
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return make_record(record.get("stage"), settings, record.get("inputs", {}))


def stale_reason(folder: Path, record: dict, left_out: tuple[str, ...] = ()) -> str | None:
    """None when `folder` was made from exactly `record`; else why it is stale (a readable sentence).

    left_out: dotted settings that `record` leaves out on purpose (e.g. distillation's resumable settings); a
    record on disk written while they were still recorded matches when it differs only by them."""
    old = read_record(folder)
    if old is None:
        return "it has no record of what it was made from (an older minitron or an interrupted write)"
    if old.get("fingerprint") == record["fingerprint"] or only_new_unset_settings(old, record):
        return None
    if left_out:
        old = without_settings(old, left_out)
        if old["fingerprint"] == record["fingerprint"] or only_new_unset_settings(old, record):
            return None
    return "; ".join(differences(old, record)) or "its record differs in form (no setting or input changed)"


def write_record(folder: Path, record: dict) -> None:
    """stage.json, written atomically (temp file + rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, folder / RECORD)

"""The files beside the weights that a grown (or shrunk) vocabulary changes: ``config.json``'s
``vocab_size``, the tokenizer's added tokens, and the README line that tells a user to prefix
every input with the virtual tokens of a merged prompt-tuning adapter.

The weights say nothing of how the new rows are used: without the README line, the merged model
is the base plus unused tokens. Adding tokens goes through the tokenizer library itself (an
optional extra, imported only here), so that every tokenizer format it saves stays consistent;
taking them back off edits the saved JSON, which has no API for removal.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgeon.errors import SurgeonError, missing_extra

_CONFIG = "config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_SECTION = "<!-- surgeon: merged prompt -->"


def record_tokens(out: Path, tokens: list[str], undo: bool = False) -> list[str]:
    """Grow (or, with ``undo``, shrink) the vocabulary files in ``out`` by ``tokens``, appended as
    the last rows of the embedding; returns notes on what could not be done."""
    size = _vocab_size(out / _CONFIG)
    if size is not None:
        _write_vocab_size(out / _CONFIG, size - len(tokens) if undo else size + len(tokens))
    first = size - len(tokens) if undo and size is not None else size
    notes = []
    if any((out / name).is_file() for name in _TOKENIZER_FILES):
        notes += _drop_tokens(out, tokens) if undo else _add_tokens(out, tokens, size)
    _edit_readme(out / "README.md", None if undo else usage(tokens, first))
    return notes


def check_new_tokens(base_files: list[Path], tokens: list[str], base: object) -> None:
    """Refuse, before anything is written, virtual tokens that two adapters both append or that
    ``base``'s tokenizer (among ``base_files``) already holds: their rows would get other ids."""
    if len(set(tokens)) != len(tokens):
        raise SurgeonError(
            f"two prompt adapters both append the virtual tokens {tokens[0]}…; merge one prompt adapter at a time."
        )
    held = set().union(*(_added_tokens(path) for path in base_files if path.name in _TOKENIZER_FILES))
    if held & set(tokens):
        raise SurgeonError(
            f"{base}: the tokenizer already holds some of the tokens {tokens[0]}…; merge into a base that has no "
            "merged prompt yet."
        )


def _added_tokens(file: Path) -> set[str]:
    """The contents of the tokens added to a saved tokenizer (what :func:`_drop_tokens` edits)."""
    data = json.loads(file.read_text())
    entries = data.get("added_tokens") or list((data.get("added_tokens_decoder") or {}).values())
    return {t.get("content") for t in entries if isinstance(t, dict)}


def usage(tokens: list[str], first_id: int | None) -> str:
    """The README section: what to prefix every input with."""
    ids = f" (ids {first_id}…{first_id + len(tokens) - 1})" if first_id is not None else ""
    return (
        f"{_SECTION}\n## Merged prompt\n\nThis model has a prompt-tuning adapter merged into its vocabulary as "
        f"{len(tokens)} virtual tokens{ids}. Prefix every input with these {len(tokens)} tokens, in order: "
        f"`{''.join(tokens)}`. They are input-only: keep them out of generation (bad words / suppressed tokens).\n"
    )


def _vocab_size(file: Path) -> int | None:
    if not file.is_file():
        return None
    size = json.loads(file.read_text()).get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _write_vocab_size(file: Path, size: int) -> None:
    config = json.loads(file.read_text())
    config["vocab_size"] = size
    file.write_text(json.dumps(config, indent=2) + "\n")


def _add_tokens(out: Path, tokens: list[str], vocab_size: int | None) -> list[str]:
    """Add ``tokens`` as special tokens; only when they get the ids of the appended rows."""
    try:
        from transformers import AddedToken, AutoTokenizer
    except ImportError:
        what = "adding virtual tokens to a tokenizer"
        raise SurgeonError(missing_extra("transformers", ["transformers"], what)) from None
    tokenizer = AutoTokenizer.from_pretrained(out)
    first = len(tokenizer)
    if vocab_size is not None and first != vocab_size:
        return [
            f"the tokenizer has {first} tokens but the embedding {vocab_size} rows, so the virtual tokens would "
            f"get other ids than their rows; it was left as it was: feed ids {vocab_size}… directly."
        ]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
    if tokenizer.convert_tokens_to_ids(tokens) != list(range(first, first + len(tokens))):
        raise SurgeonError(
            f"the base's tokenizer already holds some of the tokens {tokens[0]}…; merge into a base "
            "that has no merged prompt yet."
        )
    tokenizer.save_pretrained(out)
    return []


def _drop_tokens(out: Path, tokens: list[str]) -> list[str]:
    """Remove ``tokens`` from the saved tokenizer files (the inverse of :func:`_add_tokens`)."""
    names = set(tokens)
    file = out / "tokenizer.json"
    if file.is_file():
        data = json.loads(file.read_text())
        data["added_tokens"] = [t for t in data.get("added_tokens") or [] if t.get("content") not in names]
        file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    file = out / "tokenizer_config.json"
    if file.is_file():
        data = json.loads(file.read_text())
        decoder = data.get("added_tokens_decoder") or {}
        data["added_tokens_decoder"] = {i: t for i, t in decoder.items() if t.get("content") not in names}
        for field in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(data.get(field), list):
                data[field] = [t for t in data[field] if t not in names]
        file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return []


def _edit_readme(file: Path, section: str | None) -> None:
    """Append ``section`` to the README (made if missing); with None, remove the one appended before."""
    text = file.read_text() if file.is_file() else ""
    kept = text.split(_SECTION)[0].rstrip("\n")
    if section is None and not kept:
        file.unlink(missing_ok=True)
        return
    file.write_text(kept + "\n" if section is None else (kept + "\n\n" if kept else "") + section)

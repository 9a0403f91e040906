"""Runtime tokenizer: a thin wrapper over a `tokenizer.json` read by the `tokenizers` library.

The runtime never imports transformers; an artifact carries the HF tokenizer files, and this
module reads what it needs from them: the fast tokenizer itself, and the special ids (BOS, EOS,
padding) from the model spec first, then `generation_config.json`, `config.json` and
`tokenizer_config.json`.

BOS handling is explicit (`encode(text, add_bos=...)`) rather than left to the tokenizer's
post-processor, because the evaluation protocol must control exactly where BOS goes.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import tokenizers

from ..compiler.spec import ModelSpec
from ..errors import ConfigError, ModelImportError

log = logging.getLogger("mcomp.runtime")

REPLACEMENT_CHAR = "\ufffd"


def _read_json(path: Path) -> dict:
    """A JSON file as a dict; {} when it is absent (every file but tokenizer.json is optional)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value if v is not None)
    return (int(value),)


class Tokenizer:
    """Encode/decode plus the special ids generation and evaluation need.

    Construct with `Tokenizer.from_dir(folder, spec)`; the plain constructor takes an already
    loaded `tokenizers.Tokenizer` and explicit ids (useful for tests and artifact loaders).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_id: int | None = None,
                 eos_ids: Sequence[int] = (), pad_id: int | None = None,
                 add_bos_default: bool = True, folder: Path | None = None):
        self.backend = tokenizer
        self.folder = folder  # where the tokenizer files live (artifact writers copy them)
        self.bos_id = bos_id
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.pad_id = pad_id
        # Whether prompts get a BOS when the caller does not say (tokenizer_config's
        # `add_bos_token`; True otherwise, matching the perplexity protocol).
        self.add_bos_default = add_bos_default

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, spec: ModelSpec | None = None) -> "Tokenizer":
        """Load `folder/tokenizer.json`; special ids come from `spec` when it has them, else
        from the HF side files. EOS ids are the union of the spec's and generation_config's,
        because instruct models often stop on an extra end-of-turn token listed only there."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelImportError(f"no tokenizer.json in '{folder}'")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ModelImportError(f"cannot read tokenizer '{path}': {e}") from e

        gen = _read_json(folder / "generation_config.json")
        cfg = _read_json(folder / "config.json")
        tcfg = _read_json(folder / "tokenizer_config.json")

        def token_id(key: str) -> int | None:
            tok = tcfg.get(key)
            if isinstance(tok, dict):  # older files: {"content": "<s>", ...}
                tok = tok.get("content")
            return backend.token_to_id(tok) if isinstance(tok, str) else None

        def first(*candidates):
            return next((c for c in candidates if c is not None), None)

        bos = first(spec.bos_token_id if spec else None, gen.get("bos_token_id"),
                    cfg.get("bos_token_id"), token_id("bos_token"))
        eos = list(spec.eos_token_ids if spec else ())
        eos += _as_ids(gen.get("eos_token_id"))
        if not eos:
            eos += _as_ids(cfg.get("eos_token_id")) or _as_ids(token_id("eos_token"))
        pad = first(spec.pad_token_id if spec else None, gen.get("pad_token_id"),
                    cfg.get("pad_token_id"), token_id("pad_token"))
        add_bos = tcfg.get("add_bos_token")
        return cls(backend, bos_id=None if bos is None else int(bos), eos_ids=eos,
                   pad_id=None if pad is None else int(pad),
                   add_bos_default=True if add_bos is None else bool(add_bos), folder=folder)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; the tokenizer's own post-processor is bypassed so BOS appears
        exactly when `add_bos` asks for it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids) if add_bos else ids

    def encode_batch(self, texts: Iterable[str], add_bos: bool = False) -> list[list[int]]:
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids) if add_bos else e.ids for e in encs]

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is None:
            raise ConfigError("this tokenizer has no BOS token; encode with add_bos=False")
        return [self.bos_id, *ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenization that is safe for byte-level and SentencePiece vocabularies.

    One token may carry only part of a UTF-8 character (decoded alone it is U+FFFD), and
    SentencePiece decoders strip a leading space from the first token. So we decode a short
    window of ids that starts a few tokens back (`prefix`) twice, with and without the new
    tokens, emit the difference, and hold it back while it still ends in a replacement char.
    This is equivalent to decoding the whole growing list but costs O(1) per token.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0    # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final (possibly '')."""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        dec = self.tokenizer.decode
        before = dec(self.ids[self._prefix:self._read])
        after = dec(self.ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

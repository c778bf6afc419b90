"""Tokenization for jserve: sentencepiece or tokenizer.json, incremental detokenization, chat templates.

`Tokenizer.from_pretrained(dir)` reads what a Hugging Face checkpoint directory carries. The tokenization
library sits behind `_Backend`, so everything above it (special ids, BOS/EOS policy, chat templates, streaming
detokenization) is written once:

- `tokenizer.json` (preferred when present) goes through the `tokenizers` library, as transformers does;
- `tokenizer.model` goes through `sentencepiece`, with special-token strings in the text split out the way
  transformers' (non-legacy) Llama tokenizer does, so rendered chat templates tokenize to the same ids.

`IncrementalDetokenizer` decodes a small window of recent tokens and emits the text the window added, holding
back text that later tokens could still change (a partial UTF-8 character).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

_REPLACEMENT_CHAR = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class _AddedToken:
    """A token listed in `added_tokens_decoder`: matched as a whole string, never split by the model."""

    id: int
    content: str
    special: bool


class _Backend(Protocol):
    """The little that `Tokenizer` needs from a tokenization library."""

    vocab_size: int
    # ids the library itself treats as special (dropped by skip_special_tokens)
    special_ids: frozenset[int]
    # byte tokens whose consecutive runs decode all-or-nothing (HF's ByteFallback decoder)
    fused_byte_ids: frozenset[int]
    # whether encode(add_special_tokens=True) adds BOS/EOS by itself (a tokenizer.json post-processor)
    has_post_processor: bool
    # BOS policy when neither the config nor a post-processor says
    adds_bos_by_default: bool
    # the library's own BOS/EOS/PAD ids: the last fallback when no config file names them
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


# -- tokenizer.json backend ----------------------------------------------------------------------------------


class _HFTokenizersBackend:
    """`tokenizer.json` through the `tokenizers` library; its post-processor may add BOS/EOS by itself."""

    adds_bos_by_default = False
    bos_id = eos_id = pad_id = None

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = path
        self._tok = _HFTokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, token in added.items() if token.special)
        self.has_post_processor = self._tok.post_processor is not None
        self.fused_byte_ids = self._fused_byte_ids()

    def _fused_byte_ids(self) -> frozenset[int]:
        """ByteFallback decodes a run of `<0xNN>` tokens as one unit: one invalid byte turns the whole run
        into U+FFFD, so the detokenizer must not emit text from a run until the run has ended."""
        decoder = self._tok.decoder
        if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
            return frozenset()
        vocab = self._tok.get_vocab(with_added_tokens=False)
        return frozenset(i for token, i in vocab.items() if _BYTE_PIECE.fullmatch(token))

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


# -- sentencepiece backend -----------------------------------------------------------------------------------


class _SentencePieceBackend:
    """`tokenizer.model` through `sentencepiece`.

    sentencepiece knows nothing of special-token strings in the text, so they are split out first, as
    transformers does: the first text segment is encoded normally (with the model's dummy-prefix space), later
    segments, which follow a special token, without it. A second processor, loaded from the same model with
    `add_dummy_prefix` off, does that and the matching decode (which then strips no leading space).
    """

    fused_byte_ids: frozenset[int] = frozenset()  # sentencepiece decodes byte pieces character by character
    has_post_processor = False
    adds_bos_by_default = True  # Llama-style sentencepiece checkpoints expect BOS

    def __init__(self, path: Path, added_tokens: Mapping[int, _AddedToken]) -> None:
        import sentencepiece as spm

        proto = path.read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self._sp_inner = spm.SentencePieceProcessor(model_proto=_without_dummy_prefix(proto))
        self._num_pieces = self._sp.get_piece_size()
        sp_specials = [i for i in range(self._num_pieces) if self._sp.is_control(i) or self._sp.is_unknown(i)]
        # ids turned into text here rather than by sentencepiece: control/unknown pieces and added tokens
        self._added: dict[int, str] = {i: self._sp.id_to_piece(i) for i in sp_specials}
        self._added.update({i: token.content for i, token in added_tokens.items()})
        # content -> id; when two ids share a content, the lower id wins (it comes last here)
        self._by_content = {content: i for i, content in sorted(self._added.items(), reverse=True)}
        self._splitter = _alternation(self._by_content)
        self.special_ids = frozenset(sp_specials) | {i for i, t in added_tokens.items() if t.special}
        self.vocab_size = max([self._num_pieces, *(i + 1 for i in self._added)])
        self.bos_id = _non_negative(self._sp.bos_id())
        self.eos_id = _non_negative(self._sp.eos_id())
        self.pad_id = _non_negative(self._sp.pad_id())

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        for start, segment, token_id in _split_on_added(text, self._splitter, self._by_content):
            if token_id is not None:
                ids.append(token_id)
            elif segment:
                ids.extend((self._sp if start == 0 else self._sp_inner).encode(segment))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        run: list[int] = []

        def flush_run() -> None:
            if run:
                # a leading space is stripped only at the very start of the text, as transformers does
                processor = self._sp_inner if any(parts) else self._sp
                parts.append(processor.decode(run))
                run.clear()

        for token_id in ids:
            if token_id in self._added:
                flush_run()
                if not (skip_special_tokens and token_id in self.special_ids):
                    parts.append(self._added[token_id])
            elif 0 <= token_id < self._num_pieces:
                run.append(token_id)
            else:
                raise ValueError(f"token id {token_id} is out of range for a vocabulary of {self.vocab_size}")
        flush_run()
        return "".join(parts)

    def piece_bytes(self) -> list[bytes]:
        """Each id's bytes as it reads in text: the word-boundary mark is a space, byte pieces are their byte,
        control/unknown pieces and added tokens their content (they are special)."""
        out = []
        for i in range(self.vocab_size):
            if i in self._added:
                out.append(self._added[i].encode())
            elif i >= self._num_pieces:
                out.append(b"")
            elif self._sp.is_byte(i):
                out.append(bytes([int(self._sp.id_to_piece(i)[3:5], 16)]))
            else:
                out.append(self._sp.id_to_piece(i).replace("\u2581", " ").encode())
        return out

    def token_to_id(self, token: str) -> int | None:
        if token in self._by_content:
            return self._by_content[token]
        token_id = self._sp.piece_to_id(token)  # unknown pieces map to unk_id, hence the check
        return token_id if self._sp.id_to_piece(token_id) == token else None


def _non_negative(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def _alternation(strings: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of `strings`, longest first (so `</s>` is never cut short by a shorter match)."""
    ordered = sorted((s for s in strings if s), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


def _split_on_added(
    text: str, splitter: re.Pattern[str] | None, ids: Mapping[str, int]
) -> Iterator[tuple[int, str, int | None]]:
    """Yield (start offset, text, None) for plain segments and (start, content, id) for added tokens."""
    position = 0
    for match in splitter.finditer(text) if splitter is not None else ():
        yield position, text[position : match.start()], None
        yield match.start(), match.group(), ids[match.group()]
        position = match.end()
    yield position, text[position:], None


# The sentencepiece model is a protobuf. Rather than depend on protobuf to flip one bool, edit the wire
# format: ModelProto.normalizer_spec is field 3, NormalizerSpec.add_dummy_prefix is field 3 (varint).
def _without_dummy_prefix(model_proto: bytes) -> bytes:
    """Return the serialized model with `normalizer_spec.add_dummy_prefix = false`."""
    out = bytearray()
    for number, wire_type, raw, payload in _proto_fields(model_proto):
        if number == 3 and wire_type == 2:
            spec = b"".join(r for n, _, r, _ in _proto_fields(payload) if n != 3) + _varint(3 << 3) + b"\x00"
            out += _varint(3 << 3 | 2) + _varint(len(spec)) + spec
        else:
            out += raw
    return bytes(out)


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """Yield (field number, wire type, raw field bytes, length-delimited payload) for each field of `buf`."""
    position = 0
    while position < len(buf):
        start = position
        key, position = _read_varint(buf, position)
        wire_type, payload = key & 7, b""
        if wire_type == 0:
            _, position = _read_varint(buf, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _read_varint(buf, position)
            payload = buf[position : position + length]
            position += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} in the sentencepiece model")
        yield key >> 3, wire_type, buf[start:position], payload


def _read_varint(buf: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[position]
        position += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, position


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# -- checkpoint config files ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """Special tokens are written either as a string or as a serialized AddedToken `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    """`eos_token_id` may be an int, a list of ints, or absent."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def _added_tokens(tokenizer_config: Mapping[str, Any]) -> dict[int, _AddedToken]:
    tokens = {}
    for key, value in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        content = _token_content(value)
        if content is not None:
            special = bool(value.get("special", True)) if isinstance(value, dict) else True
            tokens[int(key)] = _AddedToken(int(key), content, special)
    return tokens


def _special_tokens(tokenizer_config: Mapping[str, Any], special_tokens_map: Mapping[str, Any]) -> dict[str, str]:
    """The named special-token strings (`bos_token`, ...), which chat templates also see."""
    tokens = {}
    for name in _SPECIAL_TOKEN_NAMES:
        content = _token_content(tokenizer_config.get(name)) or _token_content(special_tokens_map.get(name))
        if content is not None:
            tokens[name] = content
    return tokens


def _ids_for(
    name: str,
    token_ids: Mapping[str, int | None],
    generation_config: Mapping[str, Any],
    model_config: Mapping[str, Any],
    library_id: int | None,
) -> list[int]:
    """All ids configured for `name` ("bos", "eos", "pad"), most authoritative first: the tokenizer's own
    token, generation_config.json, config.json; the library's default only when none of them names one."""
    configured = [
        token_ids.get(f"{name}_token"),
        *_as_id_list(generation_config.get(f"{name}_token_id")),
        *_as_id_list(model_config.get(f"{name}_token_id")),
    ]
    ids = list(dict.fromkeys(i for i in configured if i is not None))
    return ids or ([library_id] if library_id is not None else [])


def _bos_eos_policy(tokenizer_config: Mapping[str, Any], backend: _Backend) -> tuple[bool | None, bool]:
    """Explicit `add_bos_token`/`add_eos_token` win, as in transformers; otherwise a tokenizer.json
    post-processor decides (None), or else the backend's default (BOS for Llama-style sentencepiece)."""
    explicit = "add_bos_token" in tokenizer_config or "add_eos_token" in tokenizer_config
    if backend.has_post_processor and not explicit:
        return None, False
    add_bos = tokenizer_config.get("add_bos_token", backend.adds_bos_by_default)
    return bool(add_bos), bool(tokenizer_config.get("add_eos_token", False))


def _chat_templates(tokenizer_config: Mapping[str, Any], directory: Path) -> dict[str, str]:
    """Named chat templates; a single template is called "default", as in transformers."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, list):
        return {entry["name"]: entry["template"] for entry in template}
    jinja_file = directory / "chat_template.jinja"  # where newer transformers versions save it
    if jinja_file.is_file():
        return {"default": jinja_file.read_text(encoding="utf-8")}
    return {}


# -- chat templates ------------------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
    # jinja's own tojson escapes HTML characters, which chat templates do not want
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile_chat_template(template: str) -> jinja2.Template:
    """Compile in a sandbox configured like transformers', so checkpoints' templates render identically."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


# -- Tokenizer -----------------------------------------------------------------------------------------------


class Tokenizer:
    """Encodes and decodes text for one checkpoint; built by `from_pretrained`."""

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: Mapping[str, str],
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None,
        add_bos_token: bool | None,
        add_eos_token: bool,
        extra_special_ids: frozenset[int] = frozenset(),
        chat_templates: Mapping[str, str] | None = None,
    ) -> None:
        """`add_bos_token=None` leaves BOS/EOS to the tokenizer.json post-processor."""
        self._backend = backend
        self._special_tokens = dict(special_tokens)
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
        self._chat_templates = dict(chat_templates or {})
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.vocab_size = backend.vocab_size
        # a pad id from config.json alone may be an ordinary token, so it is not counted as special here
        named = {i for i in (bos_token_id, *self.eos_token_ids) if i is not None}
        self._all_special_ids = frozenset(backend.special_ids | extra_special_ids | named)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a checkpoint directory: tokenizer.json if present, else tokenizer.model."""
        directory = Path(path)
        if not directory.is_dir():
            raise ValueError(f"tokenizer path {str(directory)!r} is not a directory")
        tokenizer_config = _read_json(directory / "tokenizer_config.json")
        added_tokens = _added_tokens(tokenizer_config)
        backend: _Backend
        if (directory / "tokenizer.json").is_file():
            backend = _HFTokenizersBackend(directory / "tokenizer.json")
        elif (directory / "tokenizer.model").is_file():
            backend = _SentencePieceBackend(directory / "tokenizer.model", added_tokens)
        else:
            raise ValueError(f"no tokenizer.json or tokenizer.model found in {str(directory)!r}")

        special_tokens = _special_tokens(tokenizer_config, _read_json(directory / "special_tokens_map.json"))
        token_ids = {name: backend.token_to_id(content) for name, content in special_tokens.items()}
        configs = (
            token_ids,
            _read_json(directory / "generation_config.json"),
            _read_json(directory / "config.json"),
        )
        bos_ids = _ids_for("bos", *configs, backend.bos_id)
        pad_ids = _ids_for("pad", *configs, backend.pad_id)
        add_bos, add_eos = _bos_eos_policy(tokenizer_config, backend)
        return cls(
            backend,
            special_tokens=special_tokens,
            bos_token_id=bos_ids[0] if bos_ids else None,
            eos_token_ids=_ids_for("eos", *configs, backend.eos_id),
            pad_token_id=pad_ids[0] if pad_ids else None,
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            extra_special_ids=frozenset(
                [i for i, token in added_tokens.items() if token.special]
                + [i for i in token_ids.values() if i is not None]
            ),
            chat_templates=_chat_templates(tokenizer_config, directory),
        )

    # -- ids -------------------------------------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (the tokenizer's own `eos_token` when it has one)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids dropped by `decode(..., skip_special_tokens=True)`."""
        return self._all_special_ids

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry or added token, or None."""
        return self._backend.token_to_id(token)

    def grammar_vocabulary(self) -> str | list[bytes]:
        """What a grammar engine (llguidance) builds its token trie from: the tokenizer.json text, whose byte
        mapping it reads itself, or for sentencepiece each id's bytes (see ``all_special_ids`` for specials)."""
        if isinstance(self._backend, _HFTokenizersBackend):
            return self._backend.path.read_text(encoding="utf-8")
        return self._backend.piece_bytes()

    # -- encode / decode -------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids. With `add_special_tokens`,
        BOS (and EOS) are added as the checkpoint's tokenizer config says."""
        if not add_special_tokens:
            return self._backend.encode(text, add_special_tokens=False)
        if self._add_bos_token is None:
            return self._backend.encode(text, add_special_tokens=True)
        ids = self._backend.encode(text, add_special_tokens=False)
        if self._add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if self._add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Skipping drops every id in `all_special_ids` before decoding, so a skipped token
        never changes the text around it (the detokenizer relies on this)."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._all_special_ids]
        return self._backend.decode(ids, skip_special_tokens)

    def detokenizer(
        self, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A streaming decoder for one request's generated tokens, with the prompt's tail as context."""
        return IncrementalDetokenizer(self, prompt_token_ids, skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's default chat template, if it has one."""
        return self._chat_templates.get("default")

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
    ) -> str | list[int]:
        """Render `messages` with the checkpoint's chat template, or with `chat_template` (a template string
        or the name of one of the checkpoint's templates). With `tokenize`, return ids; no BOS is added,
        because templates emit `bos_token` themselves. `tools`: OpenAI function definitions, passed to the
        template as HF templates expect (``tools``; None when there are none). A template that fails
        (`raise_exception`) raises ValueError."""
        template = self._resolve_chat_template(chat_template)
        conversation = [{k: v for k, v in message.items() if v is not None} for message in messages]
        try:
            text = _compile_chat_template(template).render(
                messages=conversation,
                add_generation_prompt=add_generation_prompt,
                tools=tools or None,
                documents=None,
                **self._special_tokens,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _resolve_chat_template(self, chat_template: str | None) -> str:
        if chat_template is not None:
            return self._chat_templates.get(chat_template, chat_template)
        if "default" not in self._chat_templates:
            raise ValueError(
                "this tokenizer has no chat template (no 'chat_template' in tokenizer_config.json); "
                "pass chat_template= explicitly"
            )
        return self._chat_templates["default"]


# -- streaming detokenization --------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas.

    Decoding token by token gets spaces and multi-byte characters wrong; re-decoding everything costs O(total)
    per step. Instead, as vLLM does, a small window is decoded: `_window[:_read]` holds tokens whose text was
    already emitted, kept as context so that e.g. sentencepiece's leading space of the next token comes out
    right; `_window[_read:]` holds tokens not emitted yet. The delta is the window's text past the context's.
    The window slides forward only once its text is final:

    - it does not end in U+FFFD (a partial UTF-8 character that later byte tokens may complete), and
    - with a ByteFallback decoder, the last token is not a byte token (a run of byte tokens is decoded as a
      whole, so one later invalid byte would turn all of it into U+FFFD).

    With `skip_special_tokens`, special ids never enter the window, as `Tokenizer.decode` drops them first. So
    the deltas plus `flush()` always add up to `tokenizer.decode(token_ids)`.
    """

    _CONTEXT_TOKENS = 5  # prompt tokens kept as the initial context
    _MAX_CONTEXT_BACKOFF = 16  # how far to look back for a context start outside a byte-token run

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._skipped = tokenizer.all_special_ids if skip_special_tokens else frozenset()
        self._fused = tokenizer._backend.fused_byte_ids
        context = [i for i in prompt_token_ids if i not in self._skipped]
        self._window: list[int] = context[self._context_start(context) :]
        self._read = len(self._window)
        self._chunks: list[str] = []
        self._text: str | None = ""
        self.token_ids: list[int] = []

    def _context_start(self, context: Sequence[int]) -> int:
        """Start the context a few tokens back, but not inside a run of fused byte tokens."""
        start = max(len(context) - self._CONTEXT_TOKENS, 0)
        floor = max(start - self._MAX_CONTEXT_BACKOFF, 0)
        while start > floor and context[start] in self._fused:
            start -= 1
        return start

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._text is None:
            self._text = "".join(self._chunks)
        return self._text

    def add(self, token_ids: Sequence[int]) -> str:
        """Append newly generated ids; return only the new text (empty while text is held back)."""
        self.token_ids.extend(token_ids)
        kept = [i for i in token_ids if i not in self._skipped]
        if not kept:
            return ""
        self._window.extend(kept)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of generation: emit whatever is held back, even an incomplete character."""
        return self._advance(final=True) if self._read < len(self._window) else ""

    def _advance(self, final: bool) -> str:
        decode = self._tokenizer.decode
        context_text = decode(self._window[: self._read], self._skip_special_tokens)
        window_text = decode(self._window, self._skip_special_tokens)
        if not final and not self._is_final(window_text, context_text):
            return ""
        delta = window_text[len(context_text) :]
        # the tokens just emitted become the next context; older ones are no longer needed
        del self._window[: self._read]
        self._read = len(self._window)
        if delta:
            self._chunks.append(delta)
            self._text = None
        return delta

    def _is_final(self, window_text: str, context_text: str) -> bool:
        """Whether the window's text can no longer change when more tokens arrive."""
        if len(window_text) <= len(context_text):
            return False  # nothing new yet; keep the context, whose text must not be empty
        if window_text.endswith(_REPLACEMENT_CHAR):
            return False
        return self._window[-1] not in self._fused

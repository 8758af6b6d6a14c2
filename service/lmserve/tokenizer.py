"""Text <-> token ids for one model: encoding, chat templates, streaming detokenization, stop strings.

The engine works on token ids only; everything that needs text lives here so that the
engine loop never has to know about a tokenizer's quirks (byte-level BPE, byte-fallback
pieces, leading-space markers, chat-template Jinja).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from tokenizers.decoders import DecodeStream

# How many prompt tokens seed a sequence's decoder. A few are enough for the decoder to know
# the context the first output token continues (e.g. whether its leading space is kept).
_PREFILL_TOKENS = 6

_REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """The tokenizer cannot do what was asked (no chat template, malformed messages, ...).

    A ValueError so that transports map it to a 400 without knowing this module.
    """


class Tokenizer:
    """A thin, typed wrapper around a Hugging Face *fast* tokenizer.

    Only the fast (Rust) tokenizer is supported: the streaming detokenizer relies on its
    `backend_tokenizer`, and the slow Python tokenizers are too slow for a serving loop.
    """

    def __init__(self, hf_tokenizer: Any, extra_eos_token_ids: Iterable[int] = ()) -> None:
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TokenizerError(
                f"{type(hf_tokenizer).__name__} is not a fast tokenizer (no tokenizer.json?); "
                "lmserve needs a fast tokenizer"
            )
        self._hf = hf_tokenizer
        self._backend = backend
        eos = set(int(i) for i in extra_eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        self._eos_token_ids = frozenset(eos)

    @classmethod
    def from_folder(cls, path: Path) -> Tokenizer:
        """Load the tokenizer of a local Hugging Face model folder (never the hub).

        The folder's generation_config.json can name extra EOS ids (e.g. Llama 3's
        <|eot_id|>) that the tokenizer itself does not know; generation must stop on them too.
        """
        from transformers import AutoTokenizer  # heavy import, only when a model is loaded

        path = Path(path)
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot load a tokenizer from {path}: {exc}") from exc
        return cls(hf, _generation_config_eos_ids(path))

    # ---------------------------------------------------------------- properties

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped transformers tokenizer, for the rare caller that needs more."""
        return self._hf

    @property
    def backend_tokenizer(self) -> Any:
        """The Rust `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (`len(tokenizer)`)."""
        return len(self._hf)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._hf, "chat_template", None))

    # ---------------------------------------------------------------- encode / decode

    @property
    def truncation_side(self) -> str:
        """The side the checkpoint's tokenizer truncates ("right" unless its config says "left")."""
        side = getattr(self._hf, "truncation_side", "right")
        return side if side in ("left", "right") else "right"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Readable text of each id on its own, as shown in logprobs.

        Raw vocab pieces of byte-level BPE look like 'Ġworld'; clients (OpenAI, vLLM) expect
        ' world', so each id is decoded alone (special tokens kept). A piece that is only
        part of a multi-byte character decodes to '\\ufffd', as in vLLM.
        """
        if not ids:
            return []
        return self._backend.decode_batch([[int(i)] for i in ids], skip_special_tokens=False)

    # ---------------------------------------------------------------- chat

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The model's chat template applied to `messages`, as text (special tokens inline).

        The template is used as is, including any default system prompt it adds.
        """
        if not self.has_chat_template:
            raise TokenizerError(
                "this model has no chat template; use the completions endpoint with a raw prompt"
            )
        _check_messages(messages)
        try:
            text = self._hf.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **template_kwargs,
            )
        except jinja2.TemplateError as exc:
            # Templates signal bad conversations with raise_exception(), which is a TemplateError.
            raise TokenizerError(f"chat template error: {exc}") from exc
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as exc:
            raise TokenizerError(f"cannot apply the chat template to these messages: {exc}") from exc
        if not isinstance(text, str):  # a template returning a batch would be a bug upstream
            raise TokenizerError(f"chat template rendered {type(text).__name__}, expected str")
        return text

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        add_special_tokens: bool = False,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered conversation.

        Rendered to text and then encoded without adding special tokens, because the template already
        writes them (BOS included when the model wants one); `add_special_tokens` adds them anyway (vLLM's
        chat field of that name).
        """
        text = self.render_chat(messages, add_generation_prompt, tools, **template_kwargs)
        return self.encode(text, add_special_tokens=add_special_tokens)


def _generation_config_eos_ids(folder: Path) -> list[int]:
    """eos_token_id (int or list) from generation_config.json, or [] when absent/unreadable."""
    cfg_path = folder / "generation_config.json"
    if not cfg_path.is_file():
        return []
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    eos = cfg.get("eos_token_id") if isinstance(cfg, dict) else None
    if isinstance(eos, int):
        return [eos]
    if isinstance(eos, list):
        return [int(i) for i in eos if isinstance(i, int)]
    return []


def _check_messages(messages: Any) -> None:
    """Reject conversations no template can render, with a message that says what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise TokenizerError(f"messages[{i}] must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise TokenizerError(f"messages[{i}].role must be a non-empty string")
        content = msg.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise TokenizerError(f"messages[{i}].content must be a string, a list of parts or null")


# -------------------------------------------------------------------- streaming detokenization


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text, one token at a time.

    Never emits part of a UTF-8 character: a token that ends mid-character (byte-level or
    byte-fallback pieces of an emoji, CJK, ...) yields "" until the character is complete.
    The stream is seeded with the last few prompt tokens so the first output token is
    decoded in context (its leading space kept or dropped exactly as in a full decode).

    The fast path is the Rust `DecodeStream`. Should it ever reject a step (its strict
    prefix check fails for decoders that rewrite earlier text), this falls back to the same
    prefix/read-offset algorithm in Python (vLLM's), which slices by length instead.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool,
    ) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._skip = skip_special_tokens
        prefill = [int(i) for i in prompt_token_ids[-_PREFILL_TOKENS:]]
        # A window that ends mid-character would make the stream count the prompt's tail as
        # new output; without context the first token is decoded alone instead.
        if prefill and self._backend.decode(prefill, skip_special_tokens=self._skip).endswith(
            _REPLACEMENT_CHAR
        ):
            prefill = []
        # Mirror of the stream's state, so the Python fallback can take over mid-sequence:
        # text of ids[_prefix_offset:_read_offset] has been emitted (or is prompt), and
        # ids[_read_offset:] are tokens whose text is still pending.
        self._ids: list[int] = prefill
        self._prefix_offset = 0
        self._read_offset = len(prefill)
        self._stream: DecodeStream | None = DecodeStream(prefill or None, skip_special_tokens=self._skip)
        self._text_parts: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text_parts)

    def step(self, token_id: int) -> str:
        """Add one output token; return the text it completes (possibly "")."""
        token_id = int(token_id)
        self._ids.append(token_id)
        new_text: str | None = None
        if self._stream is not None:
            try:
                new_text = self._stream.step(self._backend, token_id)
            except Exception:  # noqa: BLE001 - any stream failure: continue in Python
                self._stream = None
        if self._stream is None:
            new_text = self._python_step()
        if new_text:
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._text_parts.append(new_text)
            return new_text
        return ""

    def _python_step(self) -> str | None:
        """Text of the pending tokens, decoded after the context of the last emitted ones."""
        ids = self._ids
        prefix_text = self._backend.decode(
            ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip
        )
        full_text = self._backend.decode(ids[self._prefix_offset :], skip_special_tokens=self._skip)
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT_CHAR):
            return full_text[len(prefix_text) :]
        return None


# -------------------------------------------------------------------- stop strings


@dataclass(frozen=True)
class StopResult:
    """What a feed of new text produced: text safe to send now, and the stop that matched."""

    text_to_emit: str
    stop: str | None = None


class StopStringMatcher:
    """Finds stop strings in streamed text, across token (chunk) boundaries.

    Text that might still be the beginning of a stop string is held back (at most
    max(len(stop)) - 1 characters) and released once it cannot be; `flush()` releases it
    when generation ends for another reason. If several stops occur, the one that is
    completed first in the stream wins (ties: the one starting first), so the outcome does
    not depend on how the text was split into chunks. After a match the matcher is done:
    later feeds emit nothing.
    """

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stops if s))  # dedupe, keep order, drop ""
        self._include = include_stop_str_in_output
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self._stopped: str | None = None

    @property
    def stopped(self) -> str | None:
        """The stop string that matched, or None."""
        return self._stopped

    def feed(self, text: str) -> StopResult:
        if self._stopped is not None:
            return StopResult("", self._stopped)
        if not self._stops:
            return StopResult(text, None)
        buf = self._held + text
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = buf.find(stop)
            if start >= 0:
                cand = (start + len(stop), start, stop)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is not None:
            end, start, stop = best
            self._held = ""
            self._stopped = stop
            return StopResult(buf[: end if self._include else start], stop)
        hold = self._partial_match_len(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return StopResult(buf[: len(buf) - hold], None)

    def flush(self) -> str:
        """Release held-back text (generation ended without a stop string)."""
        held, self._held = self._held, ""
        return held

    def _partial_match_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop."""
        for k in range(min(len(buf), self._max_hold), 0, -1):
            suffix = buf[-k:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return k
        return 0

"""Constrained decoding: structured-output constraints compiled to token masks (llguidance).

    compiler = GrammarCompiler(tokenizer, vocab_size)
    compiler.validate(constraint)          # raises GrammarError naming the problem; cheap, cached; no tokenizer
    matcher = compiler.matcher(constraint) # one sequence's state (first call builds the token trie: ~1-3 s)
    fill_bitmask([m1, m2], bitmask)        # [num_rows, ceil(vocab / 32)] int32, one bit per token
    apply_bitmask(logits, rows, bitmask)         # disallowed tokens' logits -> -inf, only in `rows`
    matcher.accept(token_id)               # advance; matcher.is_finished once nothing but EOS may follow

Why llguidance (measured on SmolLM2's 49k vocabulary, this repo's 2-core machine; docs/benchmarks/structured-outputs.md): a
mid-sized schema with bounded strings compiles in ~8 ms (xgrammar 0.2.8: ~6.5 s, as it unrolls every
maxLength), its masks take tens of microseconds a token, it has no dependencies, it drops the GIL (so masks
are computed while the forward runs), and it refuses the JSON-schema keywords it cannot enforce (a clear
400) where xgrammar ignores some of them (output that does not validate).

Everything llguidance-specific stays in this module.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence

import llguidance as llg
import torch

from lmserve.engine.modeling import token_mask
from lmserve.tokenizer import Tokenizer
from lmserve.types import ConstraintKind, StructuredOutput

# JSON is generated as json.dumps writes it (", " and ": ", no other whitespace): a small model given free
# whitespace can spend its whole budget on newlines, and a fixed layout is what models see most.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Bounds on the work one grammar may cause, well under llguidance's defaults: an adversarial schema gets
# a clear error at validation (grammar size) or fails its own request (per-step fuel), never a stalled step.
LIMITS = dict(max_grammar_size=200_000, max_lexer_states=50_000, step_lexer_fuel=200_000, step_max_items=50_000)
DEFAULT_CACHE_SIZE = 256


class GrammarError(ValueError):
    """A constraint that cannot be compiled (bad syntax, unsupported keyword, too large)."""


def _limits() -> llg.LLParserLimits:
    return llg.LLParserLimits(**LIMITS)


def grammar_text(constraint: StructuredOutput) -> str:
    """The llguidance grammar for a constraint; raises GrammarError for malformed input."""
    kind, spec = constraint.kind, constraint.spec
    try:
        if kind == ConstraintKind.JSON_SCHEMA:
            schema = json.loads(spec)
            if not isinstance(schema, dict):
                raise GrammarError("the JSON schema must be an object")
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if kind == ConstraintKind.JSON_OBJECT:
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if kind == ConstraintKind.REGEX:
            return llg.LLMatcher.grammar_from_regex(spec)
        if kind == ConstraintKind.CHOICE:
            choices = json.loads(spec)
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
                raise GrammarError("choice must be a non-empty list of non-empty strings")
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        if kind == ConstraintKind.GRAMMAR:
            return llg.grammar_from("grammar", spec)  # Lark, or GBNF converted to Lark
    except GrammarError:
        raise
    except json.JSONDecodeError as exc:
        raise GrammarError(f"not valid JSON: {exc}") from None
    except Exception as exc:  # GBNF conversion, a schema llguidance cannot read: the client's input, not a bug
        raise GrammarError(_first_line(str(exc))) from None
    raise GrammarError(f"unknown constraint kind {kind!r}")


def json_schema_lark(schema: dict) -> str:
    """A Lark fragment that matches JSON for `schema` with this module's layout (for grammars that embed
    JSON, such as tool calls)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


class GrammarMatcher:
    """One sequence's position in its grammar. Used by the engine thread only."""

    def __init__(self, matcher: llg.LLMatcher) -> None:
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False when the grammar rejects it (then `error` says why)."""
        return self._matcher.consume_token(token_id)

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and nothing but EOS may follow."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return _first_line(self._matcher.get_error()) if self._matcher.is_error() else None

    @property
    def raw(self) -> llg.LLMatcher:
        return self._matcher


class GrammarCompiler:
    """Validates constraints and hands out matchers; compiled grammars are cached by value (LRU, bounded).

    Thread-safe: `validate` runs on the event loop (admission), `matcher` on the engine's grammar thread.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._ll_tokenizer: llg.LLTokenizer | None = None
        self._grammars: OrderedDict[StructuredOutput, str | GrammarError] = OrderedDict()
        # A compiled matcher at its start state per constraint: each sequence gets a deep copy, which
        # shares the lexer states the template and earlier copies have already built.
        self._templates: OrderedDict[StructuredOutput, llg.LLMatcher] = OrderedDict()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def validate(self, constraint: StructuredOutput) -> None:
        self._grammar(constraint)

    def _grammar(self, constraint: StructuredOutput) -> str:
        with self._lock:
            cached = self._grammars.get(constraint)
            if cached is not None:
                self._grammars.move_to_end(constraint)
        if cached is None:
            try:
                cached = grammar_text(constraint)
                is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(cached, None, limits=_limits())
                if is_error:
                    cached = GrammarError(_first_line(messages[0]) if messages else "invalid grammar")
            except GrammarError as exc:
                cached = exc
            with self._lock:
                self._grammars[constraint] = cached
                _trim(self._grammars, self._cache_size)
        if isinstance(cached, GrammarError):
            raise GrammarError(str(cached))
        return cached

    def ll_tokenizer(self) -> llg.LLTokenizer:
        """The token trie llguidance masks with; built once, on first use (1-3 s for a 49k vocabulary)."""
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                backend = self._tokenizer.backend_tokenizer
                # Serialise a copy without padding/truncation (as llguidance.hf does), so the trie sees
                # every token as the model does.
                copy = type(backend).from_str(backend.to_str())
                copy.no_padding()
                copy.no_truncation()
                self._ll_tokenizer = llg.LLTokenizer(
                    copy.to_str(), n_vocab=self._vocab_size, eos_token=sorted(self._tokenizer.eos_token_ids)
                )
            return self._ll_tokenizer

    def matcher(self, constraint: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher for one sequence; raises GrammarError if the grammar fails on this vocabulary."""
        grammar = self._grammar(constraint)
        with self._lock:
            template = self._templates.get(constraint)
            if template is not None:
                self._templates.move_to_end(constraint)
        if template is None:
            template = llg.LLMatcher(self.ll_tokenizer(), grammar, log_level=0, limits=_limits())
            if template.is_error():
                raise GrammarError(_first_line(template.get_error()))
            with self._lock:
                self._templates[constraint] = template
                _trim(self._templates, self._cache_size)
        return GrammarMatcher(template.deep_copy())

    @property
    def num_cached(self) -> int:
        with self._lock:
            return len(self._templates)


def _trim(cache: OrderedDict, size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)


def _first_line(message: str, limit: int = 400) -> str:
    """llguidance's multi-line diagnostics as one line (the caret drawings dropped), capped in length."""
    lines = [line.strip() for line in message.strip().splitlines()]
    text = " ".join(line for line in lines if line and set(line) - set("^ |0123456789")) or "invalid grammar"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """[num_rows, ceil(vocab / 32)] int32, one bit per token (bit t % 32 of word t // 32)."""
    return torch.full((num_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def fill_bitmask(matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
    """Row i of `bitmask` <- the tokens matchers[i] allows next, one row after another, without the GIL.

    llguidance's LLExecutor would spread the rows over a thread pool of its own, but on a small CPU its
    threads fight the forward's OpenMP threads for the cores: serially, 16 rows take ~1 ms.
    """
    assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.shape[0] >= len(matchers)
    row_bytes = bitmask.shape[1] * 4
    base = bitmask.data_ptr()
    for i, m in enumerate(matchers):
        m.raw.unsafe_compute_mask_ptr(base + i * row_bytes, row_bytes)


@torch.inference_mode()  # the runner's logits are inference tensors
def apply_bitmask(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
    """Set the logits of disallowed tokens to -inf in `rows` of `logits` ([num_rows, vocab], in place);
    bitmask row j belongs to logits row rows[j]. Other rows are not touched."""
    if not rows:
        return
    index = torch.tensor(list(rows), dtype=torch.long)
    mask = bitmask[: len(rows)]
    if token_mask.apply_token_bitmask(logits, index, mask):
        return
    # Elsewhere (a GPU, no C compiler): unpack the bits with tensor ops on the logits' device.
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (mask.to(logits.device).unsqueeze(-1) >> shifts) & 1  # [len(rows), words, 32]
    allowed = bits.flatten(1)[:, :vocab].bool()
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    index = index.to(logits.device)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(~allowed, float("-inf")))

"""The model runner: owns the weights and the KV cache tensors; runs one scheduled step."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from lmserve.checkpoints import CheckpointError, generation_architecture, load_weights, weight_files
from lmserve.checkpoints.gguf_blocks import GGUF_QUANTIZATIONS
from lmserve.config import EngineConfig
from lmserve.engine.gguf_weights import use_gguf_blocks
from lmserve.engine.modeling import kernel_loader
from lmserve.engine.modeling.attention import AttentionMetadata, SeqLayout, build_metadata
from lmserve.engine.lora_registry import LoraRegistry
from lmserve.engine.modeling.forward_path import ForwardPath, choose_forward_path
from lmserve.engine.modeling.lora import ModelLoras
from lmserve.engine.modeling.generic import TransformersCausalLM
from lmserve.engine.modeling.decoder import DecoderModel
from lmserve.engine.prompt_logprobs import SCORE_ROWS, PromptLogprobRow, score_prompt
from lmserve.engine.request import Request
from lmserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from lmserve.progress import progress_step, size_text

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux for 2 MiB pages (madvise MADV_HUGEPAGE) under a large CPU tensor not yet touched.

    The KV pool is read a 2 KiB block at a time from all over a gigabyte: with 4 KiB pages nearly every
    block costs a TLB miss, with 2 MiB pages the whole pool fits the TLB. Where transparent huge pages are
    off, or not Linux, nothing changes. Returns whether the advice was taken."""
    huge = 2 << 20
    start = tensor.data_ptr()
    first = (start + huge - 1) & ~(huge - 1)
    last = (start + tensor.numel() * tensor.element_size()) & ~(huge - 1)
    if last <= first:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(first, last - first, 14) == 0  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where the hardware computes it natively, float32 otherwise."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


@dataclass(frozen=True)
class KVCacheSpec:
    num_blocks: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


@dataclass
class StepLogits:
    """What a step's forward gives the sampler and the output step."""

    # [num_rows, vocab_size] float32 for the sampling rows (ModelRunner.execute says their order); None: none.
    logits: torch.Tensor | None
    # By request id: the prompt tokens this step scored for requests with prompt_logprobs, in order.
    prompt_logprobs: dict[str, list[PromptLogprobRow]]


# Test-only fault injection: called with each step's batch just before the forward; raising from it is a
# failed forward (tests/reliability/). A serving runner never sets it.
FaultHook = Callable[[SchedulerOutput], None]


class ModelRunner:
    """Owns the weights and the KV pool; `execute` runs one step's forward.

    `fault_hook` (None unless a test sets it) is the one injection point for engine faults: a hook that
    raises makes `execute` raise exactly where a real forward failure (a CUDA error, an out-of-memory)
    would, so the engine's handling of it is what gets tested, not a mock's.
    """

    fault_hook: FaultHook | None = None
    # With LoRA enabled (EngineConfig.lora_enabled): the model's adapter slots and the adapters known by name.
    loras: ModelLoras | None = None
    lora_registry: LoraRegistry | None = None

    def __init__(self, model_path: Path, config: EngineConfig) -> None:
        self.architecture = generation_architecture(model_path, config.model_impl)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            # Built now (once per machine), never on the engine thread's first step; and before the
            # weights are packed, which asks which kernels there are (gemm.c or oneDNN).
            kernel_loader.load_kernels(config.cache_dir, config.c_compiler, config.kernel_variant)
        hf_config: PretrainedConfig = AutoConfig.from_pretrained(model_path)
        self.hf_config = hf_config
        model_len = int(getattr(hf_config, "max_position_embeddings", 2048))
        self.max_model_len = min(model_len, config.max_model_len or model_len)
        num_bytes = sum(f.stat().st_size for f in weight_files(model_path, config.allow_pickle))
        loading = f"loading the weights of {Path(model_path).name} ({size_text(num_bytes)}) as {str(self.dtype).removeprefix('torch.')}"
        if self.architecture.path == "native":
            model = self._load_native(model_path, hf_config, config, loading)
            num_layers, attn = hf_config.num_hidden_layers, model.layers[0].self_attn
            num_kv_heads, head_dim = attn.num_kv_heads, attn.head_dim
        else:
            refusal = self.architecture.quantization_refusal(config.quantization, model_path)
            if refusal is not None:
                raise CheckpointError(refusal)
            if config.lora_enabled:
                raise CheckpointError(
                    f"LoRA adapters per request need lmserve's own modules, and {self.architecture.family} is served "
                    "through transformers' class here (--model-impl native where the family has them)"
                )
            with progress_step(loading + f" into transformers' {self.architecture.class_name}"):
                model = TransformersCausalLM.load(model_path, self.dtype, self.device, self.max_model_len)
            self.packed_weights = None
            num_layers, num_kv_heads, head_dim = model.num_cache_layers, model.num_kv_heads, model.head_dim
        self.model = model
        spec = KVCacheSpec(
            num_blocks=0,
            block_size=config.block_size,
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=model.kv_cache_dtype(),
        )
        num_blocks = config.num_kv_blocks or max(config.kv_cache_memory_bytes // spec.bytes_per_block, 1)
        self.kv_spec = KVCacheSpec(**{**spec.__dict__, "num_blocks": int(num_blocks)})
        # [num_layers, 2 (k, v), num_kv_heads, num_blocks, block_size, head_dim]
        self.kv_caches = torch.empty(
            self.kv_spec.num_layers,
            2,
            self.kv_spec.num_kv_heads,
            self.kv_spec.num_blocks,
            self.kv_spec.block_size,
            self.kv_spec.head_dim,
            dtype=self.kv_spec.dtype,
            device=self.device,
        )
        if self.device.type == "cpu":
            advise_huge_pages(self.kv_caches)  # before the first touch, which zero_ is
        self.kv_caches.zero_()
        # The one choice of how every step's forward runs; nothing below decides it again.
        self.forward_path = choose_forward_path(config.attention, model, self.dtype, self.device)
        self._forward = model.forward_for(self.forward_path)
        # A step with adapter rows: decoder.c adds their updates where it runs gemm.c's LoRA kernel (bf16), else
        # the layers run one by one, each projection adding its rows' updates (modeling/lora.py).
        lora_path = self.forward_path
        if lora_path is ForwardPath.DECODER_STACK and not (self.loras is not None and model.stack_runs_loras()):
            lora_path = ForwardPath.FUSED_OPS
        self._forward_lora = model.forward_for(lora_path)
        log.info(
            "model loaded: %s %s on %s%s, forward: %s, KV pool %d blocks x %d tokens (%.1f MiB, %s)",
            self.architecture.family if self.architecture.path == "native"
            else f"{self.architecture.family}, {self.architecture.class_name}",
            str(self.dtype).removeprefix("torch."),
            self.device,
            f" (weights prepacked for {self.packed_weights})" if self.packed_weights else "",
            self.forward_path.value,
            self.kv_spec.num_blocks,
            self.kv_spec.block_size,
            self.kv_spec.total_bytes / 2**20,
            str(self.kv_spec.dtype).removeprefix("torch."),
        )

    def _load_native(
        self, model_path: Path, hf_config: PretrainedConfig, config: EngineConfig, loading: str
    ) -> DecoderModel:
        with torch.device("meta"):
            model = DecoderModel(hf_config, self.max_model_len)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.init_positions(self.device)  # float32 rotary tables, built after to_empty
        try:
            with progress_step(loading):
                model.load_hf_weights(load_weights(model_path, allow_pickle=config.allow_pickle))
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{model_path}: weights do not fit the {hf_config.model_type} architecture: {exc}") from None
        model = model.eval()
        if config.lora_enabled:
            self.loras = model.enable_lora(config.max_loras, config.max_lora_rank)
            self.lora_registry = LoraRegistry(config.num_cpu_loras, config.max_lora_rank, self.loras.check)
        self.packed_weights = model.prepack_weights(config.quantization)
        if config.quantization in GGUF_QUANTIZATIONS:  # the source GGUF's own Q4_1 / Q8_0 blocks (gguf_weights.py)
            self.packed_weights = use_gguf_blocks(model, model_path, config)
        return model

    @property
    def kv_window(self) -> int | None:
        """The sliding window every layer has (the smallest, where they differ), or None where some layer
        attends over everything: then the block manager can release the blocks behind it."""
        windows = self.model.layer_windows()
        return None if not windows or None in windows else min(windows)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    def attention_metadata(self, layouts: list[SeqLayout]) -> AttentionMetadata:
        """A step's attention plan, for this runner's forward path."""
        return build_metadata(
            layouts, self.kv_spec.block_size, self.device, self.dtype, self.forward_path.uses_attention_kernel,
            seq_lengths=self.model.needs_seq_lengths,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states for a step laid out by `meta`, by this runner's forward path, over its KV cache."""
        return self._forward(input_ids, positions, self.kv_caches, meta)

    def load_loras(self, scheduled: SchedulerOutput) -> list[tuple[Request, CheckpointError]]:
        """Put each scheduled request's adapter in its slot where the slot holds another (before execute).
        Returns the requests whose adapter could not be read again from its folder (changed or gone since
        it was loaded, its host copy dropped): they fail alone, the step goes on without them."""
        failed: list[tuple[Request, CheckpointError]] = []
        if self.loras is None or self.lora_registry is None:
            return failed
        for item in scheduled.scheduled:
            req = item.request
            slot = req.lora_slot
            if slot < 0 or req.lora is None or self.loras.holds(slot, req.lora.id):
                continue
            try:
                weights = self.lora_registry.weights(req.lora)
            except CheckpointError as exc:
                failed.append((req, exc))
                continue
            self.loras.load_slot(slot, req.lora.id, weights)
        return failed

    def _forward_with_loras(
        self, items: list[ScheduledRequest], ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The forward of a step with adapter rows (their slots loaded: load_loras): every row's update added
        to its projections (modeling/lora.py)."""
        assert self.loras is not None
        row_slots = [(item.request.lora_slot, item.num_new_tokens) for item in items]
        self.loras.begin_step(row_slots, ids.shape[0])
        try:
            return self._forward_lora(ids, pos, self.kv_caches, meta)
        finally:
            self.loras.end_step()

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> StepLogits:
        """Run the forward for every scheduled token; return float32 logits for the sampling rows, and the
        prompt tokens scored for requests that ask for prompt logprobs.

        Rows come back in batch order of the requests whose `is_sampling` is true, `num_logit_rows` each
        (a request with draft tokens gets its last token's row, then one per draft).
        """
        input_ids: list[int] = []
        positions: list[int] = []
        layouts: list[SeqLayout] = []
        items = scheduled.scheduled
        has_lora = self.loras is not None and any(item.request.lora_slot >= 0 for item in items)
        if has_lora:  # rows of one adapter next to each other: each adapter's factors are read once (lora.py)
            items = sorted(items, key=lambda item: item.request.lora_slot)
        row_ends: dict[int, int] = {}  # by id(item): the end of its rows
        for item in items:
            req = item.request
            start = req.num_computed_tokens
            end = start + item.num_new_tokens
            layouts.append(SeqLayout(len(input_ids), item.num_new_tokens, start, req.block_ids, req.num_prompt_tokens))
            input_ids.extend(req.token_ids[start:end])
            input_ids.extend(item.draft_token_ids)
            positions.extend(range(start, end))
            row_ends[id(item)] = len(input_ids)
        if not input_ids:
            return StepLogits(None, {})
        if self.fault_hook is not None:
            self.fault_hook(scheduled)
        meta = self.attention_metadata(layouts)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        if has_lora:
            hidden = self._forward_with_loras(items, ids, pos, meta)
        else:
            hidden = self._forward(ids, pos, self.kv_caches, meta)
        sample_rows: list[int] = []  # in batch order, whatever order the rows were computed in
        for item in scheduled.scheduled:
            num_rows = item.num_logit_rows
            if num_rows:
                sample_rows.extend(range(row_ends[id(item)] - num_rows, row_ends[id(item)]))
        prompt_logprobs = self._score_prompts(scheduled.scheduled, hidden, row_ends)
        if not sample_rows:
            return StepLogits(None, prompt_logprobs)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return StepLogits(self.model.compute_logits(hidden[rows]).float(), prompt_logprobs)

    def _score_prompts(
        self, items: list[ScheduledRequest], hidden: torch.Tensor, row_ends: dict[int, int]
    ) -> dict[str, list[PromptLogprobRow]]:
        """The LM head over the prompt positions this step computed for requests with prompt_logprobs
        (position p's logits score prompt token p + 1): the same hidden states and head the sampler's
        rows get, so the scores are the model's own."""
        out: dict[str, list[PromptLogprobRow]] = {}
        for item in items:
            req = item.request
            if req.sampling.prompt_logprobs is None:
                continue
            start = req.num_computed_tokens
            positions = req.prompt_positions_to_score(start, start + item.num_new_tokens)
            if not positions:
                continue
            first_row = row_ends[id(item)] - item.num_new_tokens - start  # the row of position 0
            scored: list[PromptLogprobRow] = []
            out[req.request_id] = scored
            # A few hundred rows at a time: bounds the [rows, vocab_size] float32 logits of a long chunk.
            for p in range(positions.start, positions.stop, SCORE_ROWS):
                q = min(p + SCORE_ROWS, positions.stop)
                logits = self.model.compute_logits(hidden[first_row + p : first_row + q]).float()
                scored.extend(score_prompt(logits, req.token_ids[p + 1 : q + 1], req.sampling.prompt_logprobs))
        return out

"""LoRA adapters applied per token row inside the batched forward, many adapters and the base in one step.

Each projection some resident adapter targets gets a `LoraLinear` beside its (packed, quantized or plain)
base weight, which stays as it is: the update is added to the base projection's output. The LoraLinear
holds every slot's low-rank factors stacked:

    a:  [num_slots * width, in_features]    slot s's A factors in rows [s * width, (s + 1) * width)
    bt: [num_slots * width, out_features]   the same rows of B, transposed
    width = parts * max_rank, rounded up    q/k/v (3 parts), gate/up (2) or one projection; a factor of rank
            to a multiple of 16             r < max_rank fills its part's first r rows, the rest stay zero

The runner orders a step's rows by slot, so each adapter's rows form one run, and the update is, per run
of slot s with scaling c (Punica's SGMV):

    y[run] += (c * x[run] @ A_s^T) @ B_s^T

- bf16 where gemm.c runs (`use_kernel`): gemm.c's lora_bf16 over all runs at once, each slot's factors
  packed for it (`packed`), reading each adapter's bytes once; decoder.c calls it inside its one call.
- elsewhere (float32, held token-exact to transformers + PEFT): for steps of short runs (decodes) two
  matmuls over every slot, `((x @ a^T) * mask) @ bt` with each row's scaling in its slot's columns of the
  mask and 0 elsewhere (BGMV computed densely); for steps of long runs (prefill chunks), each run by its
  own slot's block.

Slot contents are loaded by the runner (`ModelLoras.load_slot`) when the scheduler hands a slot to
another adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmserve.checkpoints.lora_adapter import LoraAdapterWeights
from lmserve.engine.modeling import gemm


@dataclass
class LoraStep:
    """One step's rows by adapter slot; set on the shared context around a forward that has adapters."""

    masks: dict[int, torch.Tensor] | None  # by slot width: [num_tokens, num_slots * width]
    runs: list[tuple[int, int, int, float]] | None  # (slot, first row, end row, scaling) per run of one adapter
    # The runs for gemm.c's lora_bf16: [num_runs, 3] (first row, end row, slot) and [num_runs] scalings.
    kernel_runs: tuple[torch.Tensor, torch.Tensor] | None = None


class LoraContext:
    """What every LoraLinear of a model shares: the slot and rank layout, and the current step (None: no
    adapter rows, the base only)."""

    def __init__(self, num_slots: int, max_rank: int, use_kernel: bool = False) -> None:
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.use_kernel = use_kernel  # bf16 through gemm.c's lora_bf16 (module docstring)
        self.step: LoraStep | None = None

    def plan(
        self, row_slots: list[tuple[int, int]], scalings: dict[int, float], num_tokens: int, widths: set[int],
        device: torch.device, dtype: torch.dtype,
    ) -> LoraStep:  # fmt: skip
        """The step for rows laid out as (slot or -1, number of rows) runs in order."""
        runs: list[tuple[int, int, int, float]] = []
        start = 0
        for slot, count in row_slots:
            if slot >= 0:
                if runs and runs[-1][0] == slot and runs[-1][2] == start:
                    runs[-1] = (slot, runs[-1][1], start + count, scalings[slot])
                else:
                    runs.append((slot, start, start + count, scalings[slot]))
            start += count
        if self.use_kernel:
            table = torch.tensor([(first, end, slot) for slot, first, end, _ in runs], dtype=torch.int64)
            scales = torch.tensor([scaling for *_, scaling in runs], dtype=torch.float32)
            return LoraStep(None, runs, (table, scales))
        if len(runs) * 8 <= num_tokens:  # long runs: each run's own block, no product with other slots
            return LoraStep(None, runs)
        masks = {}
        for width in widths:
            mask = torch.zeros(num_tokens, self.num_slots, width, dtype=dtype)
            for slot, first, end, scaling in runs:
                mask[first:end, slot] = scaling
            masks[width] = mask.view(num_tokens, -1).to(device)
        return LoraStep(masks, None)


class LoraLinear:
    """The stacked factors of one projection over every slot (module docstring)."""

    def __init__(
        self, ctx: LoraContext, part_sizes: tuple[int, ...], in_features: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.ctx = ctx
        self.part_sizes = part_sizes  # output rows of each part (q, k, v), in the fused weight's order
        self.parts = len(part_sizes)
        self.width = -(-self.parts * ctx.max_rank // 16) * 16
        rows = ctx.num_slots * self.width
        self.a = torch.zeros(rows, in_features, dtype=dtype, device=device)
        self.bt = torch.zeros(rows, sum(part_sizes), dtype=dtype, device=device)
        # gemm.c's copies, per slot: A [width, in] and B [out, width] packed as weights (pack_slot).
        self.packed: tuple[torch.Tensor, torch.Tensor] | None = None
        if ctx.use_kernel:
            a = gemm.pack_lora_a(self.a[: self.width])
            b = gemm.pack_weight(self.bt[: self.width].t().contiguous()).data
            self.packed = (a.new_zeros(ctx.num_slots, a.numel()), b.new_zeros(ctx.num_slots, b.numel()))

    def clear(self, slot: int) -> None:
        """Zero one slot's factors (pack_slot then refreshes gemm.c's copy)."""
        block = slice(slot * self.width, (slot + 1) * self.width)
        self.a[block].zero_()
        self.bt[block].zero_()

    def pack_slot(self, slot: int) -> None:
        """Refresh gemm.c's copy of one slot's factors after they changed."""
        if self.packed is not None:
            block = slice(slot * self.width, (slot + 1) * self.width)
            self.packed[0][slot] = gemm.pack_lora_a(self.a[block])
            self.packed[1][slot] = gemm.pack_weight(self.bt[block].t().contiguous()).data.flatten()

    def load(self, slot: int, part: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Slot `slot`'s factors for part `part`: a [rank, in], b [part_rows, rank]."""
        rank = a.shape[0]
        first = slot * self.width + part * self.ctx.max_rank
        col = sum(self.part_sizes[:part])
        self.a[first : first + rank] = a.to(self.a.dtype)
        self.bt[first : first + rank, col : col + self.part_sizes[part]] = b.t().to(self.bt.dtype)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y (the base projection of x, [num_tokens, out]) plus each row's adapter update, in place."""
        step = self.ctx.step
        if step is None:
            return y
        if step.kernel_runs is not None and self.packed is not None:
            table, scales = step.kernel_runs
            gemm.lora_bf16(x.contiguous(), y, table, scales, self.packed[0], self.packed[1], self.width)
            return y
        if step.masks is not None:
            shrunk = F.linear(x, self.a)  # [num_tokens, num_slots * width]
            shrunk.mul_(step.masks[self.width])
            return y.addmm_(shrunk, self.bt)
        for slot, first, end, scaling in step.runs or ():
            block = slice(slot * self.width, (slot + 1) * self.width)
            shrunk = F.linear(x[first:end], self.a[block]).mul_(scaling)
            y[first:end].addmm_(shrunk, self.bt[block])
        return y


@dataclass(frozen=True)
class LoraTarget:
    """Where a Hugging Face module's update lands: a projection of ours and which of its parts."""

    module: torch.nn.Module  # a layers.Linear
    part: int
    part_sizes: tuple[int, ...]
    in_features: int


class ModelLoras:
    """A model's adapter slots: which base modules an adapter may target, and loading slots."""

    def __init__(self, targets: dict[str, LoraTarget], num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:  # fmt: skip
        self.targets = targets
        # gemm.c's lora_bf16 where gemm.c runs (every projection's in_features is even: gemm.c packs it).
        use_kernel = dtype == torch.bfloat16 and device.type == "cpu" and gemm.gemm_bf16_available()
        self.ctx = LoraContext(num_slots, max_rank, use_kernel)
        self.dtype = dtype
        self.device = device
        self.scalings: dict[int, float] = {}
        self.slot_adapter_ids: list[int | None] = [None] * num_slots  # what each slot holds now
        self._linears: list[LoraLinear] = []
        self._table: tuple[int, torch.Tensor] | None = None  # decoder.c's table, and how many LoraLinears it has

    def check(self, adapter: LoraAdapterWeights) -> None:
        """ValueError (one line) unless every factor fits a projection of this base."""
        for name, factors in adapter.factors.items():
            target = self.targets.get(name)
            if target is None:
                known = sorted({n.rsplit(".", 1)[-1] for n in self.targets})
                raise ValueError(
                    f"the adapter targets {name}, which this base has no projection of (targets here: {', '.join(known)}; "
                    "is the adapter for another base?)"
                )
            rows = target.part_sizes[target.part]
            if factors.a.shape[1] != target.in_features or factors.b.shape[0] != rows:
                raise ValueError(
                    f"the adapter's {name} maps {factors.a.shape[1]} -> {factors.b.shape[0]} features, but this base's "
                    f"maps {target.in_features} -> {rows}: it was trained for another base"
                )

    @property
    def widths_in_use(self) -> set[int]:
        return {lin.width for lin in self._linears}

    def holds(self, slot: int, adapter_id: int) -> bool:
        return self.slot_adapter_ids[slot] == adapter_id

    def load_slot(self, slot: int, adapter_id: int, adapter: LoraAdapterWeights) -> None:
        """Put `adapter` (the registry's adapter_id, checked already) in `slot`, replacing what it held."""
        for lin in self._linears:
            lin.clear(slot)
        for name, factors in adapter.factors.items():
            target = self.targets[name]
            lin = getattr(target.module, "lora", None)
            if lin is None:  # the first adapter that targets this projection: its stacks are made now
                lin = LoraLinear(self.ctx, target.part_sizes, target.in_features, self.dtype, self.device)
                target.module.lora = lin
                self._linears.append(lin)
            lin.load(slot, target.part, factors.a, factors.b)
        for lin in self._linears:
            lin.pack_slot(slot)
        self.scalings[slot] = adapter.scaling
        self.slot_adapter_ids[slot] = adapter_id

    def stack_table(self, projections: list[tuple[torch.nn.Module, ...]]) -> torch.Tensor:
        """decoder.c's LoRA table for `projections` (per layer: qkv, o, gate/up, down): [layers, 4, 3] int64 of
        (A address, B address, width), zeros where no adapter targets the projection."""
        table = torch.zeros(len(projections), len(projections[0]), 3, dtype=torch.int64)
        for i, layer in enumerate(projections):
            for j, module in enumerate(layer):
                lin = getattr(module, "lora", None)
                if lin is not None and lin.packed is not None:
                    table[i, j] = torch.tensor([lin.packed[0].data_ptr(), lin.packed[1].data_ptr(), lin.width])
        return table

    def stack_args(self, projections: list[tuple[torch.nn.Module, ...]]) -> tuple[torch.Tensor, ...] | None:
        """decoder_stack's lora argument for this step (None: no adapter rows, or not gemm.c's kernel)."""
        step = self.ctx.step
        if step is None or step.kernel_runs is None:
            return None
        if self._table is None or self._table[0] != len(self._linears):  # a projection got its first adapter
            self._table = (len(self._linears), self.stack_table(projections))
        return (self._table[1], *step.kernel_runs)

    def begin_step(self, row_slots: list[tuple[int, int]], num_tokens: int) -> None:
        self.ctx.step = self.ctx.plan(row_slots, self.scalings, num_tokens, self.widths_in_use, self.device, self.dtype)

    def end_step(self) -> None:
        self.ctx.step = None

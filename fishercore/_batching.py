"""Batches of inputs: a fixed ``batch_size``, or sized to a memory budget.

With ``batch_size=None`` the first batch holds up to :data:`FIRST_BATCH` inputs (fewer when
what the model declares says that many would not fit); its derivative blocks show what one
input costs — the model's arrays, the core's temporaries for the largest block, and the
model's own workspace when it declares one (:class:`~fishercore.DeclaresWorkspace`, bytes) —
and the remaining batches are sized so that one batch, one chunk of a layer's sums
(:data:`CHUNK_SHARE` of the budget) and what the call holds throughout stay within
``memory_budget`` bytes (and, on the CPU, at most :data:`MAX_AUTO_BATCH` inputs: the arrays'
``Ops.prefers_large_batches`` says where not).  Estimates count their label draws too, and
take one input's draws in chunks when they do not fit.  Results do not depend on the
batching (sums merge exactly), only memory and speed do.
"""

from __future__ import annotations

import math
import numbers

from ._protocol import ColumnBlock, DeclaresWorkspace, DenseBlock

#: Working memory per batch when ``batch_size`` is None (bytes), for arrays in host memory.
DEFAULT_MEMORY_BUDGET = 512 * 2**20

#: Share of an accelerator's free memory that the default budget takes for arrays on it.
DEVICE_SHARE = 0.25

#: Inputs in the first batch, which measures the per-input footprint.
FIRST_BATCH = 32

#: Largest automatic batch on the CPU: beyond a few hundred inputs larger batches stop paying
#: (measured: NumPy analyze of a 784-512-512-10 MLP is fastest at 512, of a 64-128-128-10 MLP
#: at 256, and 10-30 % slower at 1024; compiled JAX on the 64-128-128-10 MLP 110 ms at 512,
#: 174 ms in one batch of 1,797).  GPU arrays gain from larger batches and are limited by the
#: budget alone.
MAX_AUTO_BATCH = 512


#: Largest column block (bytes of one group's (n, C, size) columns) that an automatic batch builds on the CPU.
#: glibc serves a freed block again only up to its largest dynamic mmap threshold (32 MiB on 64-bit), and
#: gives the top of its heap back to the kernel once more than twice the largest freed block lies free there;
#: batches whose blocks pass that are faulted in afresh, page by page, every batch.  Measured on this
#: project's 2-core machine, the digits CNN's analysis (column blocks of 92 KB per input), in one process
#: alternating with BackPACK: batches of 128 and 176 inputs 0.79 s with 0.01–0.02 s of system time, of 256
#: inputs 1.08 s with 0.32 s, and the 65 that the memory budget alone gave 1.16 s (more, smaller passes).
#: Dense blocks (per-neuron factors) are not limited: the MLPs are fastest at :data:`MAX_AUTO_BATCH`.  Nor is a
#: batch cut below :data:`FIRST_BATCH` inputs: where one input's columns are that large, smaller batches cost
#: more than the faults they save (the report's character transformer, 10.8 MB of columns per sequence: its
#: report took 36.6 s at one sequence per batch, 27.6 s in the batches the budget alone gives).
CPU_BLOCK_BYTES = 12 * 2**20

#: Share of the budget that one chunk of a dense layer's sums may take.
CHUNK_SHARE = 0.25

#: Bytes of one (n, C, k) piece of columns whose statistics eager CPU code computes at once (and of the
#: pieces of other eager CPU passes): the core's ~20 elementwise passes and products over such a piece stay
#: in a core's L2 cache.  Measured on this project's 2-core machine (2 MiB L2 per core): the statistics of
#: 62 inputs × 10 classes × 1,152 columns, float64, took 16 ms whole and 9 ms in pieces of 192 columns
#: (NumPy 14 → 6 ms); the digits CNN's analyze, median of 4, 1.63 s whole, 1.43 s at 1 and 2 MiB, 1.57 s
#: at 4 MiB; a character transformer's first-order analysis (6 sequences, float32, pieces of 1,760 rows)
#: 3.67 s whole, 3.48 s at 1 MiB (more pieces, each a few dozen small calls), 3.13 s at 2 MiB.
CACHE_BYTES = 2**21

#: Arrays of a block's (C, k) size that the core holds at once while reducing it
#: (moments, centred columns, per-input statistics and their products).
CORE_TEMPORARIES = 16


def check_batching(batch_size, memory_budget):
    """Validate ``batch_size`` (positive int or None) and ``memory_budget`` (positive bytes)."""
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise TypeError(f"batch_size: expected a positive integer or None, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
        batch_size = int(batch_size)
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Real):
        raise TypeError(f"memory_budget: expected a number of bytes, got {memory_budget!r}")
    if not (math.isfinite(memory_budget) and memory_budget > 0):
        raise ValueError(f"memory_budget: must be a positive, finite number of bytes, got {memory_budget}")
    return batch_size, float(memory_budget)


def itemsize(x) -> int:
    """Bytes per number of the array x (8 where its dtype does not say)."""
    return int(getattr(x.dtype, "itemsize", 8))


def value_itemsize(model, X) -> int:
    """Bytes per number of the model's results: X's dtype, or the model's when X holds integer token ids."""
    from array_api_compat import array_namespace

    if array_namespace(X).isdtype(X.dtype, "real floating"):
        return itemsize(X)
    return int(getattr(getattr(model, "dtype", None), "itemsize", 8))


def _nbytes(x) -> int:
    if x is None:
        return 0
    n = 1
    for s in x.shape:
        n *= int(s)
    return n * itemsize(x)


def bytes_per_input(blocks, n_inputs: int, workspace: int = 0, chunk_budget: float = float("inf")) -> int:
    """Estimated peak bytes per input of one batch whose derivative blocks are ``blocks``."""
    held, largest = 0, 0
    for b in blocks:
        if isinstance(b, DenseBlock):
            arrays = _nbytes(b.jac) + _nbytes(b.diag_hess)
            held += arrays + _nbytes(b.inputs)
            largest = max(largest, CORE_TEMPORARIES * _nbytes(b.jac) + 6 * _nbytes(b.inputs))
        elif isinstance(b, ColumnBlock):  # the temporaries: a few columns at a time (sums.column_chunk)
            held += _nbytes(b.jac) + _nbytes(b.diag_hess)
            largest = max(largest, chunk_bytes(b, chunk_budget))
    return max(1, math.ceil((held + largest) / max(n_inputs, 1)) + int(workspace))


class Batches:
    """``for start, stop in batches: Xb, mask = batches.take(X, start, stop); ...; batches.fit(...)`` after the first.

    With ``pad`` (libraries that compile for each shape: JAX), a batch shorter than the batch size
    is filled up with copies of its last input, so that every batch after the first has one shape
    and is compiled for once; ``mask`` marks the real inputs (1) and the filler (0), and every sum
    over inputs weighs its rows by it (docs/math.md §5).  Without ``pad`` the mask is None.
    """

    def __init__(self, n: int, batch_size: int | None, memory_budget: float, cap: int | None = MAX_AUTO_BATCH,
                 pad: bool = False):
        batch_size, memory_budget = check_batching(batch_size, memory_budget)
        self.n, self.budget, self.cap, self.pad = n, memory_budget, cap, pad
        self.auto = batch_size is None
        self.size = min(n, FIRST_BATCH) if self.auto else batch_size
        self.fitted = not self.auto
        #: Bytes for one dense chunk's sums (:func:`fishercore.sums.chunk_rows`).
        self.chunk_budget = memory_budget * CHUNK_SHARE if self.auto else float("inf")
        #: Label draws per input taken at once (:func:`fishercore.estimate`); None: all.
        self.draws: int | None = None

    def first(self, model, itemsize: int, per_draw: int = 0) -> None:
        """Size the first, measuring batch from what the model declares, so that it too keeps to the budget.

        A dense model (:class:`~fishercore.DeclaresWorkspace`) holds about two (C, width) blocks
        per layer and input plus its workspace: at most ``2 C P`` numbers; any other model
        full columns, ``18 C P`` with the core's temporaries.  ``per_draw``: bytes per input
        and label draw beyond that (:func:`fishercore.estimate`).
        """
        if self.fitted:
            return
        n_params = sum(g.size for g in model.groups)
        if isinstance(model, DeclaresWorkspace):
            guess = 2 * model.n_outputs * n_params * itemsize + model.workspace_per_input(True)
        else:
            guess = 18 * model.n_outputs * n_params * itemsize
        self.size = max(1, min(self.size, int((self.budget - self.chunk_budget) // (guess + per_draw))))

    def take(self, X, start: int, stop: int):
        """``(inputs, mask)`` of the batch ``start:stop`` of X (padded to the batch size when ``pad``)."""
        from array_api_compat import array_namespace, device

        Xb = X[start:stop, ...]
        if not self.pad:
            return Xb, None
        xp = array_namespace(X)
        k, full = stop - start, max(stop - start, min(self.size, self.n))
        mask = xp.concat([xp.ones(k, dtype=X.dtype, device=device(X)),
                          xp.zeros(full - k, dtype=X.dtype, device=device(X))])
        if k < full:
            Xb = xp.concat([Xb, xp.broadcast_to(Xb[-1:, ...], (full - k, *Xb.shape[1:]))])
        return Xb, mask

    def one_at_a_time(self) -> None:
        """Batches of one input each (when even one input's blocks are taken a few groups at a time)."""
        self.size = self.first_size = 1
        self.fitted = True

    def __iter__(self):
        start = 0
        while start < self.n:
            stop = min(start + self.size, self.n)
            yield start, stop
            start = stop

    def __len__(self) -> int:
        if self.fitted and self.auto:
            return 1 + math.ceil((self.n - self.first_size) / self.size)
        return math.ceil(self.n / self.size)

    def fit(self, blocks, n_inputs: int, model, hessian: bool, per_draw: int = 0, n_draws: int = 1,
            resident: int = 0) -> None:
        """Size the remaining batches from the first batch's blocks (once; no-op for a fixed size).

        ``per_draw``: bytes per input and label draw held beyond the blocks, for ``n_draws``
        draws (:func:`fishercore.estimate`); ``resident``: bytes held whatever the batch (the
        final concatenation of the sums).  When one input with all its draws does not fit, the
        batches hold one input and its draws are taken :attr:`draws` at a time; when not even
        one input and one draw fit, ValueError names ``memory_budget`` and what would.
        """
        if self.fitted:
            return
        workspace = model.workspace_per_input(hessian) if isinstance(model, DeclaresWorkspace) else 0
        per_input = bytes_per_input(blocks, n_inputs, workspace, self.chunk_budget)
        chunk = max([chunk_bytes(b, self.chunk_budget) for b in blocks if isinstance(b, DenseBlock)], default=0)
        free = self.budget - chunk - resident
        if free < per_input + per_draw:
            need = per_input + per_draw + chunk + resident
            raise ValueError(f"memory_budget: {_mib(self.budget)} cannot hold the working memory of one input, "
                             f"{_mib(need)} for this model ({_mib(per_input + per_draw)} per input, {_mib(chunk)} "
                             f"for a chunk of a layer's sums, {_mib(resident)} to concatenate the sums); give at "
                             f"least {math.ceil(need):,} bytes, or a batch_size")
        self.first_size = min(self.n, self.size)
        with_draws = per_input + n_draws * per_draw
        size = min(self.n - self.first_size, int(free // with_draws))  # at most what remains
        if free < with_draws:  # one input at a time, its draws in chunks
            self.draws = max(1, int((free - per_input) // per_draw))
        if self.cap is not None:  # the CPU: at most MAX_AUTO_BATCH inputs, and column blocks within CPU_BLOCK_BYTES
            block = max((_nbytes(b.jac) for b in blocks if isinstance(b, ColumnBlock)), default=0) / max(n_inputs, 1)
            reused = max(FIRST_BATCH, int(CPU_BLOCK_BYTES // block)) if block else self.cap
            size = min(size, self.cap, reused)
        self.size = max(1, size)
        self.fitted = True


def _costs_per_input(model, itemsize: int):
    """({group: bytes of one input's columns and the Hessian diagonals the model computes for it — zeros where
    w = 0, none beyond max_params}, bytes of the model's declared workspace per input)."""
    workspace = model.workspace_per_input(True) if isinstance(model, DeclaresWorkspace) else 0
    linear, second = set(getattr(model, "linear_groups", ())), getattr(model, "second_order", True)
    cost = {g.name: (1 + (second or g.name in linear)) * model.n_outputs * g.size * itemsize for g in model.groups}
    return cost, workspace


def group_plan(model, itemsize: int, budget: float):
    """The groups to take at once when one input's full columns do not fit the budget, or None (all at once).

    Only for a model that can compute some groups' blocks
    (:class:`~fishercore.SupportsGroupSelection`).  A group costs, per input, its columns and
    their Hessian diagonals, two arrays of (C, size) (the core's temporaries are a few columns at
    a time, within a chunk's share of the budget); consecutive groups are taken together while
    their cost fits the rest of the budget beside the model's declared workspace
    (:class:`~fishercore.DeclaresWorkspace`), which every call holds.  A group that alone does
    not fit raises ValueError naming ``memory_budget``.
    """
    from ._protocol import SupportsGroupSelection

    if not isinstance(model, SupportsGroupSelection):
        return None
    free = budget * (1 - CHUNK_SHARE)
    cost, workspace = _costs_per_input(model, itemsize)
    if sum(cost.values()) + workspace <= free:
        return None
    plan, chunk, used = [], [], 0
    free -= workspace
    for g in model.groups:
        if cost[g.name] > free:
            held = f" beside the model's workspace ({_mib(workspace)})" if workspace else ""
            raise ValueError(f"memory_budget: {_mib(budget)} cannot hold the columns of group {g.name!r} for one "
                             f"input ({_mib(cost[g.name])}){held}; give at least "
                             f"{math.ceil((cost[g.name] + workspace) / (1 - CHUNK_SHARE)):,} bytes")
        if chunk and used + cost[g.name] > free:
            plan.append(tuple(chunk))
            chunk, used = [], 0
        chunk.append(g.name)
        used += cost[g.name]
    plan.append(tuple(chunk))
    return plan


def position_plan(model, family, itemsize: int, budget: float):
    """Spans ``(t0, t1)`` of the positions of sequence outputs to take at once, every group each time, when one
    input's full columns do not fit the budget; or None.

    Only for a model that computes the blocks of a few positions (``position_chunks`` true, and
    ``derivatives_of(..., positions=(t0, t1))``) under a :class:`~fishercore.Positions` family.  Each group's
    backward passes then run once per position, where a plan of groups (:func:`group_plan`) runs all of them
    once per set of groups; and a group whose columns alone exceed the budget still fits.  A position costs its
    share of the columns and of the Hessian diagonals the model holds (:func:`group_plan`'s cost); a span, what
    the model says its derivatives hold beyond them (``position_workspace(span)``, else the span's share of its
    declared workspace).  None also where one position does not fit: the plan of groups decides, and says what budget
    would do.
    """
    from ._protocol import SupportsGroupSelection
    from .families import Positions

    if not (isinstance(family, Positions) and getattr(model, "position_chunks", False)
            and isinstance(model, SupportsGroupSelection)):
        return None
    free, T = budget * (1 - CHUNK_SHARE), family.length
    cost, workspace = _costs_per_input(model, itemsize)
    columns = sum(cost.values())
    if columns + workspace <= free:
        return None
    by_span = getattr(model, "position_workspace", lambda s: workspace * s / T)
    span = max((s for s in range(1, T + 1) if columns * s / T + by_span(s) <= free), default=0)
    if span < 1:
        return None
    return [(t, min(T, t + span)) for t in range(0, T, span)]


def _mib(nbytes) -> str:
    return f"{nbytes / 2**20:.3g} MiB"


def chunk_bytes(block, budget: float) -> int:
    """Bytes of one chunk of a block's sums: for a dense block :data:`~fishercore.sums.CHUNK_TEMPORARIES` arrays
    of (rows, in), rows from :func:`~fishercore.sums.chunk_rows`; for a column block :data:`CORE_TEMPORARIES`
    arrays of (n, C, k), k from :func:`~fishercore.sums.column_chunk`."""
    from .sums import CHUNK_TEMPORARIES, chunk_rows, column_chunk

    if isinstance(block, DenseBlock):
        return CHUNK_TEMPORARIES * chunk_rows(block, budget) * block.inputs.shape[1] * itemsize(block.inputs)
    n, C = block.jac.shape[:2]
    return CORE_TEMPORARIES * n * C * column_chunk(block, budget) * itemsize(block.jac)


def default_memory_budget(X) -> float:
    """The budget when the caller gives none (``memory_budget=None``): :data:`DEFAULT_MEMORY_BUDGET` for arrays in
    host memory; for arrays on an accelerator, :data:`DEVICE_SHARE` of the memory free on it (the library's
    allocator's unused blocks counted), where a budget sized for a host would cut the work into many small
    launches (measured on an H200, a ReLU ResNet-8's analysis of 512 inputs: 6.4 s at 512 MiB, 0.40 s at
    16 GiB)."""
    from fishercore.backends.ops import ops_for

    free = ops_for(X).free_device_memory(X)
    return float(DEFAULT_MEMORY_BUDGET) if free is None else max(float(free) * DEVICE_SHARE, 1.0)


def batches_for(X, batch_size, memory_budget, *, statistics: bool = True) -> Batches:
    """The batches of the inputs X: fixed, or sized to the budget; padded to one shape for compiling libraries.

    Automatic batches hold at most :data:`MAX_AUTO_BATCH` inputs on the CPU — for compiled code
    (JAX) only where the batch's statistics are computed (``analyze``: their (n, C, k)
    temporaries outgrow the caches), not for estimates, which gain from larger batches (measured
    on the digits MLP: Î1 11 ms in one batch of 1,797, 21 ms in batches of 512; Î2 63 and 82 ms).
    """
    from fishercore.backends.ops import ops_for

    ops = ops_for(X)
    capped = not ops.prefers_large_batches(X) and (statistics or not ops.compiles)
    if memory_budget is None:
        memory_budget = default_memory_budget(X)
    return Batches(X.shape[0], batch_size, memory_budget, MAX_AUTO_BATCH if capped else None, pad=ops.compiles)

"""Batching and mixed precision for the learned models' inference (N2Q, D2IQA, LDCTIQA, Delta-IQA).

- ``resolve_batch``: the batch a model runs with. An explicit ``[analysis.<model>] batch`` (>= 1)
  is used as given; left out, it is the device's default: the model's CPU default (what the node
  always ran, so CPU results are unchanged), or on CUDA the model's CUDA default bounded by the
  GPU's free memory (a fraction of it over an estimate of one item's working set).
- ``run_batches``: calls ``fn(start, stop)`` over ``range(n)`` in batches; on CUDA an out-of-memory
  error halves the batch and repeats that batch (one WARNING), so a GPU shared with other work does
  not fail a series. Results do not depend on the batch (each slice or trial image is computed
  independently), so a smaller batch changes speed only.
- ``run_across``: series batching's runner (``[analysis] series_batch``, docs/series_batching.md):
  passes over the concatenated items of several series, each pass of exactly the batch (a short one
  padded with zero inputs whose outputs are dropped), so that a series' results do not depend on
  whether, or with what, it shared a pass; the same OOM back-off.
- ``autocast``: ``torch.autocast`` on CUDA with the option ``amp`` (``fp16``, ``bf16``; ``off`` =
  fp32); on the CPU a no-op, so the CPU path stays fp32.

Everything runs under ``torch.inference_mode()`` in the callers. This module imports torch only
inside its functions, so the model specs (``analysis.models``, torch-free) use its validators.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

AMP_MODES = ("fp16", "bf16", "off")
CUDA_MEMORY_FRACTION = 0.5  # of the free GPU memory a model's batch may plan for
T = TypeVar("T")


def validate_batch(batch: int | None) -> None:
    """The shared rule of the ``batch`` key: left out (None) or an integer >= 1 (raises ValueError
    naming the key, which node.config turns into a config error)."""
    if batch is None:
        return
    if isinstance(batch, bool) or not isinstance(batch, int):
        raise ValueError(f"key 'batch' must be an integer >= 1 (or left out for the device's default), got {batch!r}")
    if batch < 1:
        raise ValueError(f"key 'batch' must be >= 1 (or left out for the device's default), got {batch}")


def validate_amp(amp: str) -> None:
    if amp not in AMP_MODES:
        raise ValueError(f"key 'amp' must be one of {', '.join(AMP_MODES)}, got {amp!r}")


def _dtype(amp: str) -> torch.dtype:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def is_cuda(device: str | torch.device) -> bool:
    return str(device).split(":")[0] == "cuda"


def resolve_batch(requested: int | None, device: str | torch.device, *, cpu_default: int, cuda_default: int,
                  item_bytes: int) -> int:
    """The batch to run: ``requested`` when given, else the device's default (CUDA: at most
    ``cuda_default`` and at most what fits in ``CUDA_MEMORY_FRACTION`` of the free memory at
    ``item_bytes`` per item, never below 1)."""
    validate_batch(requested)
    if requested is not None:
        return requested
    if not is_cuda(device):
        return cpu_default
    import torch

    try:
        free, _total = torch.cuda.mem_get_info(torch.device(device))
    except (RuntimeError, AssertionError):  # no driver answer: the plain default, OOM back-off still applies
        return cuda_default
    return max(1, min(cuda_default, int(free * CUDA_MEMORY_FRACTION // max(item_bytes, 1))))


def autocast(device: str | torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (``amp`` fp16/bf16); fp32 (no-op) on the CPU or with ``amp = "off"``."""
    validate_amp(amp)
    if not is_cuda(device) or amp == "off":
        return contextlib.nullcontext()
    import torch

    return torch.autocast("cuda", dtype=_dtype(amp))


def amp_dtype(device: str | torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype ``autocast`` would use, None for fp32."""
    validate_amp(amp)
    return None if not is_cuda(device) or amp == "off" else _dtype(amp)


def _halved_after_oom(batch: int, device: str | torch.device, what: str, warned: bool) -> tuple[int, bool]:
    """Called while handling a CUDA out-of-memory error: (the halved batch, warned); re-raises the
    error at batch 1 or off CUDA. One WARNING per run (``warned``)."""
    import torch

    if batch == 1 or not is_cuda(device):
        raise  # noqa: PLE0704 - the out-of-memory error being handled
    torch.cuda.empty_cache()
    batch = max(1, batch // 2)
    if not warned:
        log.warning("%s: CUDA out of memory, batch reduced to %d", what, batch)
    return batch, True


def run_batches(fn: Callable[[int, int], T], n: int, batch: int, device: str | torch.device,
                what: str = "model") -> list[T]:
    """``[fn(0, b), fn(b, 2b), ...]`` over ``range(n)``; on a CUDA out-of-memory error the batch is
    halved and the failed span run again (down to 1; an error at batch 1 propagates)."""
    import torch

    if batch < 1:
        raise ValueError(f'Argument "batch" must be >= 1, got {batch}')
    out: list[T] = []
    i = 0
    warned = False
    while i < n:
        stop = min(i + batch, n)
        try:
            out.append(fn(i, stop))
        except torch.cuda.OutOfMemoryError:
            batch, warned = _halved_after_oom(batch, device, what, warned)
            continue
        i = stop
    return out


def deterministic_cuda() -> None:
    """cuDNN's deterministic kernels, no autotuning: on CUDA the same pass shape then gives the same
    bits whatever else is in the pass (what series batching relies on; to be checked on a GPU)."""
    import torch

    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def run_across(counts: list[int], batch: int, device: str | torch.device,
               prepare: Callable[[int, int, int], torch.Tensor],
               forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
               collect: Callable[[int, int, int, tuple[torch.Tensor, ...]], None],
               what: str = "model", pad: bool = True) -> int:
    """Series batching's slice runner: like ``run_batches``, over the concatenated item ranges of
    several volumes (``counts[v]`` items of volume v), so that a pass may span a volume boundary.

    For each pass: ``prepare(v, a, b)`` gives the model input of items ``a:b`` of volume v (each
    volume's own pre-processing), the parts are concatenated, a short pass is padded with zero
    inputs to ``batch`` items (``pad``: every pass has the same shape, so an item's result does not
    depend on the pass it shares, nor on whether it shared one), ``forward(x)`` returns a tuple of
    per-item outputs, and ``collect(v, a, b, outputs)`` gets each part's rows (padding dropped). On a
    CUDA out-of-memory error the batch is halved for this and every later pass (one WARNING), as in
    ``run_batches``. Returns the number of passes run."""
    import torch

    if batch < 1:
        raise ValueError(f'Argument "batch" must be >= 1, got {batch}')
    if is_cuda(device) and pad:
        deterministic_cuda()
    spans = [(v, n) for v, n in enumerate(counts) if n > 0]
    total = sum(n for _, n in spans)
    passes = 0
    warned = False
    # position of the next item: volume index into spans, item within it
    vi, item, done = 0, 0, 0
    while done < total:
        parts: list[tuple[int, int, int]] = []
        need, j, k = batch, vi, item
        while need and j < len(spans):
            v, n = spans[j]
            take = min(need, n - k)
            parts.append((v, k, k + take))
            need -= take
            k += take
            if k == n:
                j, k = j + 1, 0
        try:
            x = torch.cat([prepare(v, a, b) for v, a, b in parts]) if len(parts) > 1 else prepare(*parts[0])
            n_items = x.shape[0]
            if pad and n_items < batch:
                x = torch.cat([x, x.new_zeros((batch - n_items, *x.shape[1:]))])
            outs = forward(x)
        except torch.cuda.OutOfMemoryError:
            batch, warned = _halved_after_oom(batch, device, what, warned)
            continue
        passes += 1
        o = 0
        for v, a, b in parts:
            collect(v, a, b, tuple(t[o:o + (b - a)] for t in outs))
            o += b - a
        vi, item, done = j, k, done + (batch - need)
    return passes

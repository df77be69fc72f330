"""``backend="auto"``: per op, input dtype and size, the fastest backend that computes correctly.

On first use of an op with a given input dtype, size bucket and row bucket (a thousand rows, or
many more) on a device, every available backend runs the op on a small random probe (with a 0/1
row mask): a backend whose result disagrees with the PyTorch reference beyond the dtype's
tolerance, or that raises, is rejected for that key with one warning that says why; the others
are timed (best of a few runs after a warm-up) and the fastest is kept for the rest of the process. The PyTorch reference is always a
candidate and always correct, so ``auto`` is never slower than it beyond timing noise and never
uses a backend that failed its check. ``FISHER_KERNELS_BACKEND`` pins every ``auto`` choice.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch

logger = logging.getLogger(__name__)

# relative tolerance of a probe's result (max abs difference / max abs of the reference)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3, torch.float64: 1e-4}
PROBE_ROWS = 1024
LARGE_PROBE_ROWS = 8192  # calls with more than 2 × PROBE_ROWS rows are probed apart, on this many rows
SIZE_BUCKETS = (256, 1024, 4096)  # features up to each of these, and above the last
TIMING_RUNS = 3


def size_bucket(features: int) -> int:
    """The probe width standing for every op call whose feature dimension lands in its bucket."""
    for bound in SIZE_BUCKETS:
        if features <= bound:
            return bound
    return 2 * SIZE_BUCKETS[-1]


@dataclass
class Choice:
    """What ``auto`` chose for one (op, dtype, size bucket) on one device, and why."""

    backend: str
    seconds: dict[str, float] = field(default_factory=dict)   # probe time per correct backend
    rejected: dict[str, str] = field(default_factory=dict)    # backend -> why it was not eligible

    def speedups(self) -> dict[str, float]:
        """Each correct backend's speed relative to the PyTorch reference (> 1: faster)."""
        base = self.seconds.get("torch")
        return {name: base / s for name, s in self.seconds.items() if base and s > 0}


def row_bucket(rows: int) -> int:
    """The probe's row count standing for a call with ``rows`` rows: the fastest backend on a
    thousand rows need not be the fastest on tens of thousands (measured on an H200: Triton
    before cuBLAS on 1,024 bf16 rows of the outer product, cuBLAS 2.1× faster on 16,384)."""
    return PROBE_ROWS if rows <= 2 * PROBE_ROWS else LARGE_PROBE_ROWS


def probe_inputs(op: str, dtype: torch.dtype, features: int, device, seed: int = 0,
                 basis_dtype: torch.dtype = torch.float32, rows: int = PROBE_ROWS) -> tuple:
    """Arguments of ``op`` for a probe: a fresh zero accumulator first, then inputs, mask last
    (``basis_dtype``: the projected energy's basis, fp32 or a compact bf16/fp16 one; ``rows``:
    the rows of the probe, at most 2²⁵ entries in all)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)  # made where they are used: no host work, no copy
    rows = max(1, min(rows, 2**25 // max(features, 1)))
    x = torch.randn(rows, features, generator=g, device=device).to(dtype)
    mask = torch.rand(rows, generator=g, device=device) > 0.25
    if op == "masked_syrk_":
        return torch.zeros(features, features, device=device), x, mask
    if op == "masked_outer_":
        # a rectangular product; as aligned as the layers it stands for (an odd width, which no model layer
        # has, slowed cuBLAS's tensor-core GEMM so much that the H200's probe chose Triton, 2× slower on layers)
        other = features // 2 if features >= 16 else features // 2 + 3
        y = torch.randn(rows, other, generator=g, device=device).to(dtype)
        return torch.zeros(other, features, device=device), y, x, mask
    if op == "masked_column_sumsq_":
        return torch.zeros(features, device=device), x, mask
    if op == "masked_projected_energy_":
        basis = torch.linalg.qr(torch.randn(features, min(features, 256), generator=g, device=device))[0].to(basis_dtype)
        return torch.zeros(basis.shape[1], device=device), x, basis, mask
    raise ValueError(f"unknown op {op!r}")


def _result(op: str, acc: torch.Tensor) -> torch.Tensor:
    return acc.triu() if op == "masked_syrk_" else acc  # syrk backends need only the upper triangle


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device, runs: int = TIMING_RUNS) -> float:
    """Best wall time of ``runs`` calls after one warm-up, synchronising the device."""
    fn()
    _synchronize(device)
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def choose(op: str, candidates: dict[str, Callable], dtype: torch.dtype, features: int, device,
           timer: Callable = time_call, basis_dtype: torch.dtype = torch.float32, rows: int = PROBE_ROWS) -> Choice:
    """Check every candidate backend's ``op`` against ``candidates["torch"]`` (the reference) on
    one probe, time the correct ones and return the fastest. Rejections are warned once here."""
    reference = candidates["torch"]
    args = probe_inputs(op, dtype, features, device, basis_dtype=basis_dtype, rows=rows)
    expected = _result(op, reference(*(a.clone() for a in args)))
    scale = expected.abs().max().clamp_min(1e-30)
    choice = Choice(backend="torch")
    for name, fn in candidates.items():
        if name != "torch":
            try:
                got = _result(op, fn(*(a.clone() for a in args)))
                _synchronize(device)
                error = float((got.float() - expected).abs().max() / scale)
            except Exception as err:  # a backend that cannot run this case is not eligible
                choice.rejected[name] = f"raised {type(err).__name__}: {err}"
                continue
            if not error <= TOLERANCE.get(dtype, 1e-4):
                choice.rejected[name] = f"disagrees with the PyTorch reference (relative error {error:.1e})"
                continue
        fresh = [a.clone() for a in args]
        choice.seconds[name] = timer(lambda fn=fn, fresh=fresh: fn(*fresh), device)
    choice.backend = min(choice.seconds, key=choice.seconds.get)
    for name, reason in choice.rejected.items():
        warnings.warn(f"fisher_kernels: backend {name!r} disabled for {op} on {dtype} inputs of about {features} "
                      f"features on {device}: {reason}", RuntimeWarning, stacklevel=3)
    logger.debug("fisher_kernels auto %s %s %d on %s: %s (%s)", op, dtype, features, device, choice.backend,
                 choice.seconds)
    return choice


_FEATURE_ARG = {"masked_syrk_": 1, "masked_outer_": 2, "masked_column_sumsq_": 1, "masked_projected_energy_": 1}


class AutoOps(SimpleNamespace):
    """The ops of ``backend="auto"`` for one device: each call looks up (or makes, once) the
    :class:`Choice` for its op, input dtype and size bucket and runs that backend."""

    def __init__(self, device, backends: dict[str, SimpleNamespace], timer: Callable = time_call):
        super().__init__(name="auto")
        self.device, self.backends, self.timer = torch.device(device), backends, timer
        self.choices: dict[tuple[str, torch.dtype, int, torch.dtype, int], Choice] = {}
        for op in _FEATURE_ARG:
            setattr(self, op, self._dispatcher(op))

    def choice(self, op: str, dtype: torch.dtype, features: int, basis_dtype: torch.dtype = torch.float32,
               rows: int = PROBE_ROWS) -> Choice:
        key = (op, dtype, size_bucket(features), basis_dtype, row_bucket(rows))
        if key not in self.choices:
            candidates = {name: getattr(ops, op) for name, ops in self.backends.items()}
            self.choices[key] = choose(op, candidates, dtype, key[2], self.device, self.timer, basis_dtype, key[4])
        return self.choices[key]

    def _dispatcher(self, op: str):
        def run(*args):
            x = args[_FEATURE_ARG[op]]
            basis_dtype = args[2].dtype if op == "masked_projected_energy_" else torch.float32
            backend = self.choice(op, x.dtype, x.shape[-1], basis_dtype, x.shape[0]).backend
            return getattr(self.backends[backend], op)(*args)

        run.__name__ = op
        return run

    def report(self) -> dict[str, dict]:
        """``{"op dtype ≤features": {"backend", "speedup_vs_torch", "rejected"}}`` of the choices made."""
        def label(op, dtype, bucket, basis_dtype, rows):
            size = f"≤{bucket}" if bucket in SIZE_BUCKETS else f">{SIZE_BUCKETS[-1]}"
            basis = "" if basis_dtype == torch.float32 else f" basis {str(basis_dtype).removeprefix('torch.')}"
            many = "" if rows == PROBE_ROWS else f" >{2 * PROBE_ROWS} rows"
            return f"{op} {str(dtype).removeprefix('torch.')} {size}{basis}{many}"

        return {label(*key): {"backend": c.backend, "speedup_vs_torch": c.speedups(), "rejected": c.rejected}
                for key, c in self.choices.items()}

"""Batched LOBPCG vs a loop of ``torch.lobpcg`` vs batched ``torch.linalg.eigh``.

    python -m benchmarks.lobpcg                       # the full table (several minutes on 2 cores)
    python -m benchmarks.lobpcg --n 2048 --k 16 --b 8 # one configuration

Matrices: float32 Wishart ``G Gᵀ / 2n`` with ``G`` (n, 2n) Gaussian (Marchenko–Pastur spectrum
in about [0.09, 2.9]); the k largest eigenpairs. Accuracy is reported, not assumed: for each
method the largest relative residual ``max ‖A x − λ x‖ / ‖A‖₂`` over the returned pairs.
Both iterative solvers run with ``tol=1e-4``. Times are medians over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fisher_kernels.solvers import lobpcg


def wishart(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(b, n, 2 * n, generator=g)
    A = G @ G.mT / (2 * n)
    return (A + A.mT) / 2


def relative_residual(A, values, vectors, norm) -> float:
    """max over pairs of ‖A x − λ x‖ / ‖A‖₂ (``norm``: (b,) spectral norms)."""
    r = (A.double() @ vectors.double() - vectors.double() * values.double()[:, None, :]).norm(dim=1)
    return (r / norm.double()[:, None]).max().item()


def run(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def torch_lobpcg_loop(A, k, tol):
    values, vectors = [], []
    for i in range(A.shape[0]):
        v, x = torch.lobpcg(A[i], k=k, largest=True, tol=tol)
        values.append(v)
        vectors.append(x)
    return torch.stack(values), torch.stack(vectors)


def batched_eigh(A, k):
    values, vectors = torch.linalg.eigh(A)
    return values.flip(-1)[:, :k], vectors.flip(-1)[:, :, :k]


def bench(n, k, b, repeats, tol=1e-4):
    A = wishart(b, n)
    t_ours, ours = run(lambda: lobpcg(A, k, True, tol=tol), repeats)
    t_loop, loop = run(lambda: torch_lobpcg_loop(A, k, tol), repeats)
    t_eigh, exact = run(lambda: batched_eigh(A, k), repeats)
    norm = exact[0][:, 0]  # A is PSD: its largest eigenvalue is its spectral norm
    return {
        "n": n, "k": k, "b": b,
        "ours_s": t_ours, "torch_lobpcg_loop_s": t_loop, "eigh_s": t_eigh,
        "speedup_vs_eigh": t_eigh / t_ours, "speedup_vs_torch_lobpcg": t_loop / t_ours,
        "ours_residual": relative_residual(A, ours.eigenvalues, ours.eigenvectors, norm),
        "torch_lobpcg_residual": relative_residual(A, *loop, norm),
        "eigh_residual": relative_residual(A, *exact, norm),
        "ours_iterations": ours.iterations.float().mean().item(), "ours_used_eigh": int(ours.used_eigh.sum()),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="*", default=[1024, 2048, 4096])
    parser.add_argument("--k", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--b", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, k largest, tol 1e-4\n")
    print("| n | k | b | ours (s) | torch.lobpcg loop (s) | batched eigh (s) | vs eigh | vs torch.lobpcg | "
          "max rel. residual: ours / torch.lobpcg / eigh | iterations |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    rows = []
    for n in args.n:
        for k in args.k:
            for b in args.b:
                r = bench(n, k, b, args.repeats)
                rows.append(r)
                print(f"| {n} | {k} | {b} | {r['ours_s']:.2f} | {r['torch_lobpcg_loop_s']:.2f} | {r['eigh_s']:.2f} | "
                      f"{r['speedup_vs_eigh']:.2f}× | {r['speedup_vs_torch_lobpcg']:.2f}× | "
                      f"{r['ours_residual']:.1e} / {r['torch_lobpcg_residual']:.1e} / {r['eigh_residual']:.1e} | "
                      f"{r['ours_iterations']:.0f}{' (eigh fallback: %d)' % r['ours_used_eigh'] if r['ours_used_eigh'] else ''} |",
                      flush=True)
    return rows


if __name__ == "__main__":
    main()

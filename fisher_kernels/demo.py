"""Demo: ``init_lora`` with FILet and LoRA-DA on a small Llama built from a config (no download).

    python -m fisher_kernels.demo [--hidden 256 --layers 4 --samples 64 --r 8]

On several processes (``torchrun --nproc_per_node 2 -m fisher_kernels.demo``, or
``accelerate launch --cpu --num_processes 2 -m fisher_kernels.demo``) each rank
calibrates on its own shard (a ``DistributedSampler``), the statistics are summed over ranks,
and rank 0 checks that its initialisation equals one process's over all the data.

Prints, per layer, which singular directions FILet chose and how much Fisher energy they
carry compared with PiSSA's top-r, then the time of each stage next to one plain
forward+backward pass over the same calibration data.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.utils.data import DataLoader

from . import init_lora


def build_model(hidden: int, layers: int, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def calibration_samples(n: int, vocab: int, seed: int, min_len: int = 48, max_len: int = 128):
    """Sequences with learnable structure (noisy arithmetic progressions), of varying length."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        start, step = torch.randint(0, vocab, (2,), generator=g)
        ids = (start + step * torch.arange(length)) % vocab
        noise = torch.rand(length, generator=g) < 0.1
        ids = torch.where(noise, torch.randint(0, vocab, (length,), generator=g), ids)
        samples.append(ids)
    return samples


def pad_collate(samples, pad_id: int = 0):
    """Right-pad a list of 1-D token tensors; padding is masked out and ignored by the loss."""
    length = max(len(s) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def time_plain_forward_backward(model, loader) -> float:
    """Seconds for one ordinary training forward+backward pass over ``loader``."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    start = time.perf_counter()
    for batch in loader:
        model(**batch).loss.backward()
    return time.perf_counter() - start


def describe_filet(report, r: int) -> list[str]:
    lines = [f"{'layer':<36} {'chosen singular-value ranks':<34} {'energy captured':>16} {'PiSSA top-r':>12}"]
    for name, init in report.layers.items():
        energy = init.scores
        total = energy.sum().item()
        captured = energy[init.selected].sum().item() / total
        pissa = energy[:r].sum().item() / total
        ranks = sorted(init.selected.tolist())
        shown = ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
        lines.append(f"{name:<36} {shown:<34} {captured:>15.1%} {pissa:>11.1%}")
    return lines


def _start_distributed() -> tuple[int, int]:
    """Join the process group a launcher (torchrun, accelerate launch) set up: ``(rank, world size)``."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def distributed_main(args) -> dict:
    """Each rank initialises from its shard (statistics summed over ranks); rank 0 first computes
    one process's initialisation over all the data (before joining the group, so that its pass
    runs no collective) and then compares the two."""
    import os

    from torch.utils.data.distributed import DistributedSampler

    from . import compute_initialization

    model = build_model(args.hidden, args.layers, args.vocab, args.seed)
    samples = calibration_samples(args.samples, args.vocab, args.seed + 1)
    single = None
    if os.environ.get("RANK", "0") == "0":
        whole = DataLoader(samples, batch_size=args.batch_size, collate_fn=pad_collate)
        single = compute_initialization(model, whole, method="filet", r=args.r, progress=False)
    rank, world = _start_distributed()
    if len(samples) % world:
        raise SystemExit(f"--samples {args.samples} must split evenly over {world} ranks "
                         "(a DistributedSampler repeats samples otherwise)")
    sampler = DistributedSampler(samples, num_replicas=world, rank=rank, shuffle=False)
    shard = DataLoader(samples, batch_size=args.batch_size, sampler=sampler, collate_fn=pad_collate)
    report = compute_initialization(model, shard, method="filet", r=args.r, progress=False)
    tokens = next(iter(report.num_tokens.values()))  # every layer counts the same tokens here
    result = {"rank": rank, "world_size": world, "tokens": tokens}
    if single is not None:
        same = all(torch.equal(report.layers[n].selected.sort().values, single.layers[n].selected.sort().values)
                   for n in single.layers)
        single_tokens = next(iter(single.num_tokens.values()))
        result.update(single_process_tokens=single_tokens, same_selection=same)
        print(f"{world} ranks, {tokens} tokens in all (one process: {single_tokens}); FILet chose "
              f"{'the same' if same else 'DIFFERENT'} directions as one process over all the data")
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1:
        return distributed_main(args)

    model = build_model(args.hidden, args.layers, args.vocab, args.seed)
    samples = calibration_samples(args.samples, args.vocab, args.seed + 1)
    loader = DataLoader(samples, batch_size=args.batch_size, collate_fn=pad_collate)
    tokens = sum(len(s) for s in samples)
    print(f"Llama: hidden {args.hidden}, {args.layers} layers, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters; calibration: {args.samples} sequences, {tokens} tokens (padded batches of {args.batch_size})")

    with torch.no_grad():  # warm-up, so that no timed stage pays for first-call costs
        model(**next(iter(loader)))
    plain = time_plain_forward_backward(model, loader)
    results = {"fwd_bwd_seconds": plain}
    for method in ("filet", "lora_da"):
        peft_model = init_lora(copy.deepcopy(model), loader, method=method, r=args.r, progress=not args.no_progress)
        report = peft_model.fisher_kernels_report
        t = report.timings
        results[method] = dict(t, stats_bytes=report.stats_bytes)
        print(f"\n== {method}: {len(report.target_modules)} layers, r = {args.r}, statistics held "
              f"{report.stats_bytes / 2**20:.2f} MiB")
        if method == "filet":
            print("\n".join(describe_filet(report, args.r)))
        print(f"time: decomposition {t['decomposition']:.2f}s, calibration pass {t['statistics']:.2f}s, "
              f"selection {t['initialization']:.2f}s, PEFT wiring {t['peft']:.2f}s, total {t['total']:.2f}s")
        print(f"      = {t['total'] / plain:.2f}× one plain forward+backward pass over the same data ({plain:.2f}s)")
    return results


if __name__ == "__main__":
    main()

"""Per-layer work (decompositions and selections) split across ranks: time with 1 and 2 gloo ranks.

    python -m benchmarks.split_work [--hidden 1024 --layers 4 --method pissa] [--fsdp]

The same random Llama, ``method`` without data (``pissa``, ``milora``) so that only the split work is
timed: 2 processes with 1 thread each against one process with 1 thread (as one device against two)
and against one process with 2 threads (the same cores: multithreaded LAPACK already uses them).
Prints the decomposition + initialisation seconds of each and the speed-ups. ``--fsdp``: the ranks
shard the model with FSDP2 (``fully_shard`` on every block and the root), so each layer's weight is
gathered before its owner decomposes it (the gathers are in the timed work).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def build(hidden, layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256)
    return LlamaForCausalLM(config).eval()


def work_seconds(report):
    return report.timings["decomposition"] + report.timings["initialization"]


def _rank(rank, world, init_file, args, out):
    from fisher_kernels import compute_initialization

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = build(args.hidden, args.layers)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    dist.barrier()
    report = compute_initialization(model, None, method=args.method, r=args.r, progress=False)
    if rank == 0:
        torch.save({"seconds": work_seconds(report), "split": report.split_ranks}, out)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--method", default="pissa")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--fsdp", action="store_true", help="shard the model over the 2 ranks with FSDP2")
    args = parser.parse_args(argv)
    from fisher_kernels import compute_initialization

    single = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        single[threads] = work_seconds(compute_initialization(build(args.hidden, args.layers), None, method=args.method,
                                                              r=args.r, progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_rank, args=(2, os.path.join(tmp, "init"), args, out), nprocs=2, join=True)
        split = torch.load(out)
    seconds = split["seconds"]
    print(f"{args.method}, Llama hidden {args.hidden}, {args.layers} blocks: 2 ranks × 1 thread"
          f"{' (FSDP2-sharded)' if args.fsdp else ''} (work split over "
          f"{split['split']}) {seconds:.2f} s; one process × 1 thread {single[1]:.2f} s ({single[1] / seconds:.2f}×); "
          f"one process × 2 threads {single[2]:.2f} s ({single[2] / seconds:.2f}×)")
    return {"split_seconds": seconds, "single_1_thread_seconds": single[1], "single_2_threads_seconds": single[2]}


if __name__ == "__main__":
    main()

"""Per-rank statistics and bases of an FSDP2 model's calibration pass, on 1, 2 and 4 gloo ranks.

    python -m benchmarks.sharded_statistics [--hidden 256 --layers 4 --worlds 1,2,4] [--out results/x.json]

A random Llama sharded with FSDP2 (``fully_shard`` on every block and the root), each rank with
its own 2 batches of 2 × 64 tokens. For every method with a calibration pass it records, per rank,
the bytes of statistics the pass left on that rank (``report.stats_bytes``) and of prepared bases
(``report.prepared_bytes``, FILet's singular vectors). With one rank they are every layer's; with
N ranks each layer's live on its owner only (``fisher_kernels.distributed.owners``), so the
largest rank's share should fall about as 1/N (layers are dealt by bytes: the fall is as even as
the layer sizes allow). Figures are exact byte counts, not timings.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

METHODS = {"filet": {}, "lora_da": {"population_size": 100}, "lora_ga": {}}


def build(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128))
    return LlamaForCausalLM(config).eval()


def batches(rank: int, count: int = 2, size: int = 2, length: int = 64) -> list[dict]:
    generator = torch.Generator().manual_seed(rank)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 512, (size, length), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _rank(rank: int, world: int, init_file: str, args, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from fisher_kernels import compute_initialization

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = {}
    for method, options in METHODS.items():
        model = build(args.hidden, args.layers)
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        report = compute_initialization(model, batches(rank), method=method, r=8, progress=False, **options)
        rows[method] = {"stats_bytes": report.stats_bytes, "prepared_bytes": report.prepared_bytes}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, args) -> dict:
    """``{method: {"stats_bytes": [per rank], "prepared_bytes": [per rank]}}`` on ``world`` ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, os.path.join(tmp, "init"), args, tmp), nprocs=world, join=True)
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
    return {method: {key: [rank[method][key] for rank in ranks] for key in ("stats_bytes", "prepared_bytes")}
            for method in METHODS}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = {"hidden": args.hidden, "layers": args.layers, "worlds": {}}
    for world in [int(w) for w in args.worlds.split(",")]:
        results["worlds"][str(world)] = measure(world, args)
    whole = results["worlds"].get("1")
    for world, rows in results["worlds"].items():
        for method, row in rows.items():
            held = [s + p for s, p in zip(row["stats_bytes"], row["prepared_bytes"])]
            line = f"{world} rank(s) {method:8s} per rank statistics+bases MB: " + " ".join(f"{b / 1e6:.2f}" for b in held)
            if whole:
                one = whole[method]["stats_bytes"][0] + whole[method]["prepared_bytes"][0]
                line += f"  (largest / one process: {max(held) / one:.3f}, 1/N = {1 / int(world):.3f})"
            print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()

"""Per-rank statistics and bases of an FSDP2 model's calibration pass, on 1, 2 and 4 gloo ranks.

    python -m benchmarks.sharded_statistics [--hidden 256 --layers 4 --worlds 1,2,4] [--out results/x.json]

A random Llama sharded with FSDP2 (``fully_shard`` on every block and the root), each rank with
its own 2 batches of 2 × 64 tokens. For every method with a calibration pass it records, per rank,
the bytes of statistics the pass left on that rank (``report.stats_bytes``) and of prepared bases
(``report.prepared_bytes``, FILet's singular vectors). With one rank they are every layer's; with
N ranks each layer's live on its owner only (``fisher_kernels.distributed.owners``), so the
largest rank's share should fall about as 1/N (layers are dealt by bytes: the fall is as even as
the layer sizes allow). Those are exact byte counts. Each rank's peak resident memory above its
loaded shard (``VmHWM`` reset before the call, one pass of whole batches) is recorded too: it
includes the activations and FSDP's gathered blocks, which do not shrink with N, and is noisy.
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
    import gc

    from benchmarks.memory import _process_bytes, _reset_peak

    rows = {}
    for method, options in METHODS.items():
        if method not in args.methods.split(","):
            continue
        model = build(args.hidden, args.layers)
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        data = batches(rank)
        gc.collect()
        dist.barrier()
        _reset_peak()
        before = _process_bytes("VmRSS")
        report = compute_initialization(model, data, method=method, r=8, progress=False, max_stats_memory=None,
                                        micro_batch_size=None, **options)
        rows[method] = {"stats_bytes": report.stats_bytes, "prepared_bytes": report.prepared_bytes,
                        "peak_above_start_bytes": _process_bytes("VmHWM") - before}
        del model, report
        gc.collect()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, args) -> dict:
    """``{method: {"stats_bytes": [per rank], "prepared_bytes": [...], "peak_above_start_bytes": [...]}}``
    on ``world`` ranks, each method in fresh processes (glibc returns freed blocks of 128 KiB and more
    to the system, as in ``benchmarks.memory``)."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # inherited by the spawned ranks
    out = {}
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            one = argparse.Namespace(**{**vars(args), "methods": method})
            mp.spawn(_rank, args=(world, os.path.join(tmp, "init"), one, tmp), nprocs=world, join=True)
            ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
        out[method] = {key: [rank[method][key] for rank in ranks]
                       for key in ("stats_bytes", "prepared_bytes", "peak_above_start_bytes")}
    return out


NAMES = {"filet": "FILet", "lora_da": "LoRA-DA", "lora_ga": "LoRA-GA"}


def table(result: dict) -> str:
    """Markdown: per method and number of ranks, the fullest rank's statistics + bases (and its share
    of one process's) and the ranks' largest peak above their loaded shard."""
    worlds = sorted(result["worlds"], key=int)
    lines = [f"Random Llama, hidden {result['hidden']}, {result['layers']} blocks, FSDP2 on gloo, 2 batches of "
             "2 × 64 tokens per rank. MB; share: of one process's statistics + bases.", "",
             "| method | " + " | ".join(f"{w} rank{'s' if int(w) > 1 else ''}: statistics + bases (share) / peak"
                                        for w in worlds) + " |",
             "| --- |" + " ---: |" * len(worlds)]
    for method in result["worlds"][worlds[0]]:
        one = None
        cells = []
        for w in worlds:
            row = result["worlds"][w][method]
            held = max(s + p for s, p in zip(row["stats_bytes"], row["prepared_bytes"]))
            one = held if one is None else one
            cells.append(f"{held / 1e6:.1f} ({held / one:.3f}) / {max(row['peak_above_start_bytes']) / 1e6:.0f}")
        lines.append(f"| {NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--methods", default=",".join(METHODS), help=argparse.SUPPRESS)
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
            print(f"{'':13s}{method:8s} per rank peak above the loaded shard MB (RSS): "
                  + " ".join(f"{b / 1e6:.1f}" for b in row["peak_above_start_bytes"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()

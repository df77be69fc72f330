"""Init time and memory of every LoRA initialisation on the same model, data, rank and targets.

    python -m benchmarks.init_time --preset smoke            # tiny Llama, under a minute
    python -m benchmarks.init_time --preset cpu --json out.json --png out.png

Each method runs in its own fresh process (so peak memory is its own), on the same random-weight
model (same seed) and the same calibration batches. Per method:

- ``seconds``: wall time of the whole initialisation (median of ``--repeats``), PEFT wiring included;
- ``ratio_to_fwd_bwd``: that time over one plain forward+backward pass over the same data,
  measured in a process of the same run;
- ``decomposition_seconds``: time outside the calibration pass (weight SVDs, eigen-solves,
  selection); for PEFT's own methods, the time of the step that does its decompositions;
- ``peak_bytes``: peak resident memory of the process (CPU) or peak CUDA memory (GPU);
- ``stats_bytes``: bytes of calibration statistics the method held at once.

Notes printed with the table say where PEFT needs batch size 1 or cycles the loader.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time

import torch

from benchmarks.models import PRESETS, build_model, calibration_batches, target_module_names, training_copy

OURS = {
    "filet": dict(method="filet", route="full"),
    "filet_projected": dict(method="filet", route="projected"),
    "lora_da": dict(method="lora_da"),
    "lora_ga": dict(method="lora_ga"),
    "kasa": dict(method="kasa"),
    "pissa": dict(method="pissa"),
    "gaussian": dict(method="gaussian"),
}
PEFT = ["peft_lora_ga", "peft_pissa", "peft_corda", "peft_eva"]
ALL_METHODS = ["filet", "filet_projected", "lora_da", "lora_ga", "kasa", "pissa", "peft_lora_ga", "peft_pissa",
               "peft_corda", "peft_eva", "gaussian"]
NOTES = {
    "peft_lora_ga": "PEFT's port: S[r:2r] in B, only B scaled; one fwd+bwd pass holding a full fp32 gradient per layer",
    "peft_corda": "forward passes only, batch size 1 (PEFT's CorDA hooks require it); holds a d_in × d_in "
                  "covariance per layer; one eigen-decomposition per layer",
    "peft_eva": "forward passes only; cycles the loader until the incremental SVD of every layer's inputs converges",
    "peft_pissa": "full torch.linalg.svd per layer inside get_peft_model",
}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(model, batches, device, frozen: bool = False):
    """One training forward+backward over ``batches``; ``frozen``: parameters without gradients
    (the input embeddings' output made to require one), what a calibration pass differentiates."""
    model = training_copy(model, frozen)
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        model(**batch).loss.backward()
    _sync(device)
    return {"seconds": time.perf_counter() - start, "decomposition_seconds": 0.0, "stats_bytes": 0}


def _lora_config(preset, r):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=r, target_modules=target_module_names(preset),
                      fan_in_fan_out=preset["kind"] == "gpt2")


def _run_ours(name, model, batches, preset):
    from fisher_kernels import init_lora

    options = dict(OURS[name])
    start = time.perf_counter()
    peft_model = init_lora(model, batches, r=preset["r"], target_modules=target_module_names(preset),
                           progress=False, **options)
    seconds = time.perf_counter() - start
    report = peft_model.fisher_kernels_report
    return {"seconds": seconds, "decomposition_seconds": report.timings["decomposition"] + report.timings["initialization"],
            "stats_bytes": report.stats_bytes, "timings": dict(report.timings)}


def _run_peft(name, model, batches, preset, device):
    from peft import get_peft_model

    config = _lora_config(preset, preset["r"])
    stats_bytes = 0
    start = time.perf_counter()
    if name == "peft_pissa":
        config.init_lora_weights = "pissa"
        t = time.perf_counter()
        get_peft_model(model, config)
        decomposition = time.perf_counter() - t
    elif name == "peft_lora_ga":
        from peft import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config.init_lora_weights = "lora_ga"
        config.lora_ga_config = LoraGAConfig()

        def train_step():
            for batch in batches:
                model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step)
        stats_bytes = sum(m._peft_loraga_grad.numel() * m._peft_loraga_grad.element_size()
                          for m in model.modules() if hasattr(m, "_peft_loraga_grad"))
        t = time.perf_counter()
        get_peft_model(model, config)
        decomposition = time.perf_counter() - t
    elif name == "peft_corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        config.init_lora_weights = "corda"
        config.corda_config = CordaConfig(corda_method="kpm")

        def run_model():  # PEFT's CorDA hooks need batch size 1: feed each sequence alone, unpadded
            with torch.no_grad():
                for batch in batches:
                    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                        model(input_ids=ids[mask.bool()][None])

        t = time.perf_counter()
        preprocess_corda(model, config, run_model=run_model)
        decomposition = time.perf_counter() - t  # includes the forward passes: PEFT interleaves them
        stats_bytes = sum(m.in_features ** 2 * 4 for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in config.target_modules)
        get_peft_model(model, config)
    elif name == "peft_eva":
        from peft import initialize_lora_eva_weights
        from peft.tuners.lora.config import EvaConfig

        config.init_lora_weights = "eva"
        config.eva_config = EvaConfig(rho=2.0)
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
        t = time.perf_counter()
        initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False)
        decomposition = time.perf_counter() - t  # includes the forward passes: EVA interleaves them
    else:
        raise ValueError(name)
    _sync(device)
    return {"seconds": time.perf_counter() - start, "decomposition_seconds": decomposition, "stats_bytes": stats_bytes}


def _warm_up(model, batches, device):
    """First calls of the linear-algebra back-ends and of the model cost extra; pay them untimed."""
    small = torch.randn(8, 8, device=device)
    spd = small @ small.T + torch.eye(8, device=device)
    torch.linalg.svd(small)
    torch.linalg.eigh(spd)
    torch.linalg.cholesky(spd)
    torch.svd_lowrank(small, q=4)
    _fwd_bwd(model, batches[:1], device)


def _measure(name, preset, device, repeats):
    torch.manual_seed(0)
    base = build_model(preset, device=device, dtype=getattr(torch, preset.get("dtype", "float32")))
    batches = calibration_batches(preset, device=device)
    _warm_up(base, batches, device)
    runs = []
    for _ in range(repeats):
        model = copy.deepcopy(base)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if name in ("fwd_bwd", "fwd_bwd_frozen"):
            runs.append(_fwd_bwd(model, batches, device, frozen=name == "fwd_bwd_frozen"))
        elif name in OURS:
            runs.append(_run_ours(name, model, batches, preset))
        else:
            runs.append(_run_peft(name, model, batches, preset, device))
        del model
    result = dict(runs[0])
    result["seconds"] = statistics.median(r["seconds"] for r in runs)
    result["peak_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()
    return result


def _child(name, preset, device, repeats, queue):
    try:
        queue.put((name, _measure(name, preset, device, repeats), None))
    except Exception as err:  # report, do not hide: the table shows the failure
        queue.put((name, None, f"{type(err).__name__}: {err}"))


def run_method(name, preset, device, repeats, in_process=False):
    """Measure one method in a fresh process (or, with ``in_process``, here: faster, but the
    peak memory is then this process's running peak, not the method's own)."""
    if in_process:
        try:
            return _measure(name, preset, device, repeats), None
        except Exception as err:
            return None, f"{type(err).__name__}: {err}"
    ctx = mp.get_context("spawn")

    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(name, preset, device, repeats, queue))
    process.start()
    name, result, error = queue.get()
    process.join()
    return result, error


def weights_bytes(preset) -> int:
    model = build_model(dict(preset, layers=1, vocab=16))
    names = target_module_names(preset)
    per_layer = sum(m.weight.numel() * 4 for n, m in model.named_modules() if n.split(".")[-1] in names and hasattr(m, "weight"))
    return per_layer * preset["layers"]


def markdown(rows, fwd_bwd, preset_name, preset, device, target_bytes, errors) -> str:
    tokens = preset["samples"] * preset["seq_len"]
    lines = [f"Preset `{preset_name}` on {device}, {preset.get('dtype', 'float32')} model: {preset['kind']} hidden {preset['hidden']}, {preset['layers']} layers, "
             f"{preset['samples']}×{preset['seq_len']} tokens ({tokens}), r = {preset['r']}, all linear layers of the "
             f"blocks ({target_bytes / 2**20:.0f} MiB of fp32 target weights). One plain forward+backward: "
             f"{fwd_bwd:.2f} s.", "",
             "| method | seconds | × fwd+bwd | outside the pass (s) | peak memory (MiB) | statistics (MiB) | "
             "statistics / weights |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seconds']:.2f} | {r['ratio_to_fwd_bwd']:.2f} | {r['decomposition_seconds']:.2f} | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {r['stats_bytes'] / 2**20:.1f} | "
                     f"{r['stats_bytes'] / target_bytes:.1%} |")
    for name, error in errors.items():
        lines.append(f"| {name} | failed: {error} | | | | | |")
    lines.append("")
    lines += [f"- `{name}`: {note}" for name, note in NOTES.items()]
    return "\n".join(lines)


def bar_chart(rows, fwd_bwd, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [r["method"] for r in rows]
    ax.bar(names, [r["seconds"] for r in rows], color=["tab:blue" if not n.startswith("peft_") else "tab:gray" for n in names])
    ax.axhline(fwd_bwd, color="tab:red", linestyle="--", label=f"one forward+backward ({fwd_bwd:.1f} s)")
    ax.set_ylabel("initialisation time (s)")
    ax.set_title(title)
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the model's weights (the calibration statistics are fp32 either way)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every method in this process (default for the smoke preset): faster, but the "
                             "peak-memory column is then the running peak of the whole run")
    parser.add_argument("--json")
    parser.add_argument("--png")
    args = parser.parse_args(argv)
    in_process = args.in_process or args.preset == "smoke"
    preset = dict(PRESETS[args.preset], dtype=args.dtype)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {ALL_METHODS}")

    fwd_bwd, error = run_method("fwd_bwd", preset, args.device, args.repeats, in_process)
    if error:
        raise RuntimeError(f"the forward+backward reference failed: {error}")
    frozen, error = run_method("fwd_bwd_frozen", preset, args.device, args.repeats, in_process)
    frozen_seconds = None if error else frozen["seconds"]
    print(f"one forward+backward: {fwd_bwd['seconds']:.2f} s; with frozen parameters (what the calibration pass "
          f"differentiates): {frozen_seconds if frozen_seconds is None else round(frozen_seconds, 2)} s", flush=True)
    rows, errors = [], {}

    def save(target_bytes=None):  # after every method too: a run cut short (a time limit) keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"preset": args.preset, "device": args.device, "dtype": args.dtype,
                           "fwd_bwd_seconds": fwd_bwd["seconds"], "fwd_bwd_frozen_seconds": frozen_seconds,
                           "target_weight_bytes": target_bytes,
                           "methods": rows, "errors": errors}, f, indent=2)

    for name in methods:
        result, error = run_method(name, preset, args.device, args.repeats, in_process)
        if error:
            errors[name] = error
            print(f"{name}: FAILED {error}", file=sys.stderr, flush=True)
            continue
        result = {"method": name, **result, "ratio_to_fwd_bwd": result["seconds"] / fwd_bwd["seconds"]}
        rows.append(result)
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in result.get("timings", {}).items())
        print(f"{name}: {result['seconds']:.2f} s ({result['ratio_to_fwd_bwd']:.2f}× fwd+bwd{'; ' + stages if stages else ''})",
              file=sys.stderr, flush=True)
        save()
    target_bytes = weights_bytes(preset)
    table = markdown(rows, fwd_bwd["seconds"], args.preset, preset, args.device, target_bytes, errors)
    if in_process:
        table += "\n- peak memory: measured in one process for all methods (running peak), not per method"
    print(table)
    save(target_bytes)
    if args.png:
        bar_chart(rows, fwd_bwd["seconds"], args.png, f"init time, preset {args.preset} ({args.device})")
    return rows, errors


if __name__ == "__main__":
    main()

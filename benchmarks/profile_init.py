"""Where init_lora spends its time: one run under torch.profiler, the heaviest operators by device and by
host time, and the report's stage times.

    python -m benchmarks.profile_init --preset llama-1b --device cuda --dtype bfloat16 --method filet_projected
"""
import argparse
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.init_time import OURS, _warm_up
from benchmarks.models import PRESETS, build_model, calibration_batches, target_module_names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--method", default="filet_projected", choices=sorted(OURS))
    parser.add_argument("--samples", type=int, help="calibration samples (default: the preset's)")
    parser.add_argument("--rows", type=int, default=25, help="operators listed per table")
    args = parser.parse_args(argv)
    from fisher_kernels import init_lora

    preset = dict(PRESETS[args.preset], dtype=args.dtype)
    if args.samples:
        preset["samples"] = args.samples
    torch.manual_seed(0)
    base = build_model(preset, device=args.device, dtype=getattr(torch, args.dtype))
    batches = calibration_batches(preset, device=args.device)
    _warm_up(base, batches, args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    model = copy.deepcopy(base)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        peft_model = init_lora(model, batches, r=preset["r"], target_modules=target_module_names(preset),
                               progress=False, **OURS[args.method])
        if args.device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in peft_model.fisher_kernels_report.timings.items())
    print(f"{args.method}, preset {args.preset}, {args.dtype} on {args.device}: {seconds:.2f} s under the profiler "
          f"({timings})")
    averages = prof.key_averages()
    if args.device == "cuda":
        print("\nby device time\n" + averages.table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                                      max_name_column_width=60))
    print("\nby host time\n" + averages.table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                               max_name_column_width=60))


if __name__ == "__main__":
    main()

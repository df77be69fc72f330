"""The ``fisher-kernels`` command.

    fisher-kernels init MODEL_DIR DATA.jsonl --method filet --r 16 --out OUT
    fisher-kernels estimate MODEL_DIR --method filet --r 16 --batch-size 8 --seq-len 512 [--world-size 8 --device-gb 80]
    fisher-kernels plot OUT/adapter/fisher_kernels_report.json --out PLOTS

``init`` loads a causal LM and its tokenizer from a local directory, tokenises a JSONL file (one
object per line: ``{"text": ...}``, or ``{"messages": [...]}`` rendered with the tokenizer's chat
template), runs ``init_lora`` with a progress bar and saves ``OUT/adapter`` (the PEFT adapter and
``fisher_kernels_report.json``: how it was made) and, when the method changed the base weights,
``OUT/base`` (the residual base model; load the adapter onto it). ``estimate`` builds the model
on the ``meta`` device from its config (no weights read) and prints the memory estimate.
``plot`` draws each layer's candidate scores (FILet's Fisher energy) over the candidate index
with the chosen directions marked, and the ranks across layers. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from ..device_memory import process_memory
from ..adapters.saving import check_output_dirs

REPORT_NAME = "fisher_kernels_report.json"
INIT_DESCRIPTION = """Initialise a LoRA adapter from data and save it.

Loads a causal LM and its tokenizer from a local directory, tokenises a JSONL file (one object a line:
{"text": ...}, {"messages": [...]} through the tokenizer's chat template, or TRL's {"prompt": ...,
"completion": ...} with the loss on the completion), runs init_lora with progress, and saves OUT/adapter
(the PEFT adapter, how it was made, the initial adapter) and, when the method changed the base weights,
OUT/base (the residual base the adapter's config names)."""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default (where it has one the help does not state)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)".strip()


def _json_options(text: str | None) -> dict:
    """``--options``: a JSON object of method options."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--options must be a JSON object such as '{{\"energy\": \"component\"}}' ({err.msg}: "
                         f"{text!r})") from None
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a JSON object of method options, got {text!r}")
    return options


def _loaded(load, directory: str, what: str, **kwargs):
    """``load(directory)``; a failure (corrupt or missing files) as one line naming the directory."""
    try:
        return load(directory, **kwargs)
    except Exception as err:  # transformers/safetensors raise many types, often with multi-line messages
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{directory}: cannot load {what} ({type(err).__name__}: {first})") from None


def _auto_or_positive_int(text: str):
    """``--max-stats-memory`` (bytes) and ``--micro-batch-size``: a positive integer, or ``auto``."""
    return text if text == "auto" else _positive_int(text)


def _checked(convert, ok, what: str):
    """An argparse ``type``: ``convert(text)``, refused unless ``ok(value)``, as "must be ``what``"."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


# counts (a rank, a batch size, tokens); --lora-alpha; --lora-dropout; --seed (random.Random, torch.manual_seed)
_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number")
_probability = _checked(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")
_seed = _checked(int, lambda v: v >= 0, "a non-negative integer")


def _messages_ok(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)


def _check_row(row, where: str) -> None:
    if not isinstance(row, dict) or not ({"text", "messages", "prompt"} & set(row)):
        raise ValueError(f"{where}: expected an object with 'text', 'messages' or 'prompt' and 'completion'")
    if "prompt" in row:
        prompt, completion = row["prompt"], row.get("completion")
        if not ((isinstance(prompt, str) and isinstance(completion, str))
                or (_messages_ok(prompt) and _messages_ok(completion))):
            raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of "
                             "{'role': str, 'content': str} objects")
        return
    if "text" in row and not isinstance(row["text"], str):
        raise ValueError(f"{where}: 'text' must be a string, got {type(row['text']).__name__}")
    if "messages" in row:
        if not _messages_ok(row["messages"]):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}} objects")


def read_jsonl(path) -> list[dict]:
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
            _check_row(row, f"{path}:{number}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def _chat(tokenizer, messages, **kwargs) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the data has chat messages but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def tokenise(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Examples for ``init_lora``: input ids, attention mask and labels. ``text`` and ``messages``
    rows: the loss covers the whole text; TRL's ``prompt``/``completion`` rows (plain strings, or
    lists of chat messages): the loss covers the completion only, as TRL's completion-only loss."""
    examples = []
    for row in rows:
        if "prompt" in row:
            chat = isinstance(row["prompt"], list)
            prompt = _chat(tokenizer, row["prompt"], add_generation_prompt=True) if chat else row["prompt"]
            whole = _chat(tokenizer, row["prompt"] + row["completion"]) if chat else row["prompt"] + row["completion"]
            if not whole.startswith(prompt):
                raise ValueError("the chat template renders the prompt differently inside the whole conversation: "
                                 "cannot tell where the completion starts")
            prompt_ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
            ids = tokenizer(whole, truncation=True, max_length=max_length)["input_ids"]
            start = min(len(prompt_ids), len(ids))
            if ids and start < len(ids):
                examples.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                                 "labels": [-100] * start + ids[start:]})
            continue
        if "messages" in row:
            text = _chat(tokenizer, row["messages"])
        else:
            text = row["text"]
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if ids:
            examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return examples


def command_init(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft import LoraConfig

    from .. import (Calibration, KFACStatistics, RankBudget, Resources, collect_statistics, full_statistics_requests,
                    init_lora, resolve_target_modules, save_residual_model)
    from ..methods import METHODS
    from ..statistics.batches import CollatedExamples

    options = _json_options(args.options)
    _check_init_arguments(args, options, METHODS)
    out = Path(args.out)
    if not Path(args.model).is_dir():
        raise ValueError(f"{args.model} is not a directory: give the local directory of a transformers model "
                         "(with its config.json and tokenizer)")
    if not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"{args.model} holds no config.json: it is not a transformers model directory")
    check_output_dirs(out / "adapter", out / "base", args.model)  # before any work: never overwrite the model
    needs_data = METHODS[args.method].needs_data and args.statistics is None
    if args.statistics is not None and not Path(args.statistics).is_file():
        raise ValueError(f"--statistics {args.statistics}: no such file")
    if needs_data and args.data is None:
        raise ValueError(f"method {args.method!r} needs calibration data: give a JSONL file after the model directory")
    rows = read_jsonl(args.data) if needs_data else []  # bad data fails before any model is loaded
    dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tokenizer = _loaded(AutoTokenizer.from_pretrained, args.model, "its tokenizer")
    examples = tokenise(rows, tokenizer, args.max_length) if needs_data else []
    if args.shuffle:  # else --num-batches takes the first examples of the file
        random.Random(args.seed).shuffle(examples)
    if args.quantize:  # QLoRA: loaded by bitsandbytes onto the device; residual bases from this checkpoint
        from transformers import BitsAndBytesConfig

        compute = dtype if isinstance(dtype, torch.dtype) else torch.float32
        quantization = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
                        if args.quantize == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        model = _loaded(AutoModelForCausalLM.from_pretrained, args.model, "the model's weights",
                        quantization_config=quantization, device_map=args.device)
        options.setdefault("base_weights", args.model)
    else:
        model = _loaded(AutoModelForCausalLM.from_pretrained, args.model, "the model's weights",
                        dtype=dtype).to(args.device)
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    loader = CollatedExamples(examples, int(pad_id), batch_size=args.batch_size) if needs_data else None
    lora_config = LoraConfig(r=args.r, lora_alpha=args.lora_alpha if args.lora_alpha is not None else args.r,
                             lora_dropout=args.lora_dropout, task_type="CAUSAL_LM",
                             target_modules=args.target_modules.split(",") if args.target_modules else None)
    budget = RankBudget(args.rank_budget, args.min_rank, args.max_rank) if args.rank_budget is not None else None
    calibration = Calibration(num_batches=args.num_batches, token_mask=args.token_mask, fisher=args.fisher,
                              label_seed=args.seed, micro_batch_size=args.micro_batch_size)
    statistics = None
    if args.statistics is not None:  # an earlier pass's, checked against this model
        statistics = KFACStatistics.load(args.statistics, model=model, device=args.device)
    elif args.save_statistics is not None and needs_data:  # one pass of everything, saved for other methods
        targets = resolve_target_modules(model, lora_config.target_modules)
        statistics = collect_statistics(model, loader, full_statistics_requests(model, targets),
                                        calibration=calibration, loss_weighting=METHODS[args.method].loss_weighting)
        statistics.save(args.save_statistics)
        print(f"statistics of every target layer saved to {args.save_statistics} (reuse: --statistics, with a "
              f"method whose loss weighting is {statistics.loss_weighting!r})")
    if "seed" in METHODS[args.method].option_names():  # --seed is the method's seed too (KaSA, LoRA-GA)
        options.setdefault("seed", args.seed)
    peft_model = init_lora(model, None if statistics is not None else loader, method=args.method,
                           lora_config=lora_config, statistics=statistics, calibration=calibration,
                           resources=Resources(max_stats_memory=args.max_stats_memory, progress=True),
                           rank_budget=budget, **options)
    report = peft_model.fisher_kernels_report
    if report.residual_base:
        save_residual_model(peft_model, out / "adapter", out / "base")
        tokenizer.save_pretrained(out / "base")
        where = f"{out / 'adapter'} (load it onto the residual base {out / 'base'})"
    else:
        peft_model.save_pretrained(out / "adapter")
        where = f"{out / 'adapter'} (load it onto the original model)"
    if not report.residual_base:  # save_residual_model writes it for the others
        report.save(out / "adapter" / REPORT_NAME)
    print(f"{args.method}: {len(report.layers)} layers, r = {report.r}, {report.num_batches} batches; "
          f"{report.timings['total']:.1f} s. Adapter: {where}")


def _check_init_arguments(args, options: dict, methods) -> None:
    """What ``init_lora`` would refuse, refused before the model loads (one line naming the flag)."""
    if args.rank_budget is None and (args.min_rank != 1 or args.max_rank is not None):
        raise ValueError("--min-rank and --max-rank bound the per-layer ranks of a --rank-budget: give --rank-budget "
                         "too (without it every layer gets --r)")
    if args.rank_budget is not None and args.method != "filet":
        raise ValueError(f"--rank-budget spreads ranks by FILet's Fisher energies: use --method filet, not "
                         f"{args.method}")
    if args.max_rank is not None and args.max_rank < args.min_rank:
        raise ValueError(f"--max-rank {args.max_rank} is below --min-rank {args.min_rank}")
    if args.statistics is not None and args.save_statistics is not None:
        raise ValueError("--statistics reuses saved statistics and --save-statistics collects new ones: give one")
    unknown = sorted(set(options) - set(methods[args.method].option_names()))
    if unknown:
        raise ValueError(f"--options: method {args.method!r} has no option {', '.join(unknown)}; it accepts "
                         f"{', '.join(methods[args.method].option_names()) or 'none'}")


def command_convert(args) -> None:
    """A (trained) adapter saved with its residual base -> a plain LoRA adapter for the original model."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from .. import save_as_plain_lora
    from ..adapters.conversion import load_initial_adapter

    initial = load_initial_adapter(args.adapter)  # checked before any model is loaded
    base_dir = args.base or PeftConfig.from_pretrained(args.adapter).base_model_name_or_path
    if not base_dir or not Path(base_dir).is_dir():
        raise ValueError(f"the residual base {base_dir!r} named by {args.adapter}/adapter_config.json is not a "
                         "directory: pass --base")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), args.adapter)
    save_as_plain_lora(model, args.out, initial_adapter=initial)
    print(f"wrote {args.out}: a plain LoRA adapter (rank {2 * model.peft_config['default'].r}) for the original model")


def command_estimate(args) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import estimate_memory

    config = AutoConfig.from_pretrained(args.model)
    if args.dtype == "auto":  # what 'init --dtype auto' loads: the checkpoint's own dtype
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, stored) if isinstance(stored, str) else stored
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    device_bytes = None if args.device_gb is None else int(args.device_gb * 10**9)
    estimate = estimate_memory(model, method=args.method, r=args.r, batch_size=args.batch_size, seq_len=args.seq_len,
                               quantization=args.quantize, device_bytes=device_bytes, world_size=args.world_size)
    print(estimate)
    if estimate.plan is not None:
        print(f"init's default settings plan: {estimate.plan.reason}")
    resident = process_memory("VmRSS")
    if resident is not None and args.device_kind == "cpu":  # on a GPU the process's host memory is not the device's
        print(f"plus this process's own memory (Python, torch, transformers; measured now): {resident / 2**30:.2f} GiB, "
              f"so about {(estimate.peak_bytes + resident) / 2**30:.2f} GiB of RAM in all")


def command_plot(args) -> None:
    try:
        from . import plots  # matplotlib: an optional dependency
    except ImportError:
        raise RuntimeError("plot needs matplotlib: pip install matplotlib") from None
    try:
        with open(args.report) as f:
            report = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{args.report}: not JSON ({err})") from None
    if not isinstance(report, dict) or not isinstance(report.get("layers"), dict) or "method" not in report:
        raise ValueError(f"{args.report} is not a fisher_kernels report (no 'method' and 'layers'): plot the "
                         f"{REPORT_NAME} that 'fisher-kernels init' writes beside the adapter")
    if not plots.layer_summaries(report):
        raise ValueError(f"{args.report}: the report holds no per-candidate scores (method {report['method']!r})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [plots.summary_figure(report, out / "summary.png")]
    if args.detail:
        written.append(plots.detail_figure(report, out / "scores.png"))
    ranks = plots.ranks_figure(report, out / "ranks.png")
    written += [ranks] if ranks is not None else []
    print("wrote " + ", ".join(str(p) for p in written))


def parser() -> argparse.ArgumentParser:
    from ..methods import METHODS

    main = argparse.ArgumentParser(prog="fisher-kernels", description="Data-aware LoRA initialisation (fisher_kernels).")
    sub = main.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="initialise a LoRA adapter for a local causal LM from a JSONL file",
                          description=INIT_DESCRIPTION, formatter_class=_Help)
    init.add_argument("model", help="local directory of a transformers causal LM and its tokenizer")
    init.add_argument("data", nargs="?", help="JSONL: one {'text': ...}, {'messages': [...]} or {'prompt': ..., "
                      "'completion': ...} per line (not needed by pissa, milora, kasa, gaussian)")
    init.add_argument("--method", default="filet", choices=sorted(METHODS), help="the initialisation")
    init.add_argument("--r", type=_positive_int, default=16, help="LoRA rank")
    init.add_argument("--lora-alpha", type=_positive_float, default=None, help="LoRA alpha (default: r, a scale of 1)")
    init.add_argument("--max-length", type=_positive_int, default=512, help="tokens per example (truncated)")
    init.add_argument("--num-batches", type=_positive_int, default=None, help="use at most this many batches (default: all)")
    init.add_argument("--batch-size", type=_positive_int, default=8, help="examples per calibration batch")
    init.add_argument("--micro-batch-size", type=_auto_or_positive_int, default="auto",
                      help="run each batch as forward+backward passes of at most this many examples (less memory)")
    init.add_argument("--shuffle", action="store_true", help="shuffle the examples (with --seed) before batching")
    init.add_argument("--seed", type=_seed, default=0, help="seed of --shuffle and of the method")
    init.add_argument("--target-modules", default=None,
                      help="comma-separated layer names, as LoraConfig's target_modules (default: every linear "
                           "layer of the blocks)")
    init.add_argument("--lora-dropout", type=_probability, default=0.0, help="LoRA dropout of the saved adapter")
    init.add_argument("--token-mask", default="attention", choices=["attention", "labels"],
                      help="which tokens the statistics count (default: every non-padding token)")
    init.add_argument("--fisher", default="empirical", choices=["empirical", "true"],
                      help="labels from the data, or sampled from the model's own predictions")
    init.add_argument("--rank-budget", type=_positive_int, default=None,
                      help="FILet: the total rank over all layers, spread by Fisher energy")
    init.add_argument("--min-rank", type=_positive_int, default=1, help="with --rank-budget: the least rank of a layer")
    init.add_argument("--max-rank", type=_positive_int, default=None, help="with --rank-budget: the most rank of a layer")
    init.add_argument("--max-stats-memory", type=_auto_or_positive_int, default="auto",
                      help="bytes of statistics held at once, or 'auto' (several passes when they do not fit)")
    init.add_argument("--quantize", default=None, choices=["4bit", "8bit"],
                      help="QLoRA: load the model with bitsandbytes (4-bit: nf4, computing in --dtype); residual bases "
                           "are computed from the model directory's full-precision weights and quantized once")
    init.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                      help="the weights' dtype (auto: the checkpoint's)")
    init.add_argument("--device", default="cuda" if _cuda() else "cpu", help="where the model runs")
    init.add_argument("--save-statistics", default=None, metavar="FILE",
                      help="collect every statistic any method uses in this pass and save them to FILE")
    init.add_argument("--statistics", default=None, metavar="FILE",
                      help="reuse statistics saved with --save-statistics (no calibration pass, no data file)")
    init.add_argument("--options", default=None, help='method options as JSON, e.g. \'{"energy": "component"}\'')
    init.add_argument("--out", required=True, help="output directory (adapter/, and base/ for residual methods)")
    init.set_defaults(run=command_init)
    estimate = sub.add_parser("estimate", help="estimate peak memory without loading any weight",
                              description="Peak memory of 'init' for this model, method and batch shape, from the "
                                          "model's config alone (built on the meta device).", formatter_class=_Help)
    estimate.add_argument("model", help="local directory (or hub id, if cached) holding the model's config.json")
    estimate.add_argument("--method", default="filet", choices=sorted(METHODS), help="the initialisation")
    estimate.add_argument("--r", type=_positive_int, default=16, help="LoRA rank")
    estimate.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per calibration batch")
    estimate.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per sequence (init pads to the longest)")
    estimate.add_argument("--device-kind", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"],
                          help="where init will run (on the CPU the process's own memory is added)")
    estimate.add_argument("--quantize", default=None, choices=["4bit", "8bit"],
                          help="estimate as if loaded with bitsandbytes in 4-bit or 8-bit (QLoRA)")
    estimate.add_argument("--world-size", type=_positive_int, default=1,
                          help="one rank of the model sharded with FSDP2 over this many ranks (each with its own batches)")
    estimate.add_argument("--device-gb", type=_positive_float, default=None,
                          help="what init's default settings plan on a device of this many GB (micro-batches, passes)")
    estimate.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                          help="weights' dtype (default: the checkpoint's, as 'init --dtype auto' loads it)")
    estimate.set_defaults(run=command_estimate)
    convert = sub.add_parser("convert", help="a trained residual adapter -> a plain LoRA adapter for the original "
                             "model (rank 2r)", formatter_class=_Help,
                             description="W' + s·B A = W + s·(B A − B₀A₀): the trained adapter on its residual base "
                                         "as a rank-2r adapter for the original weights.")
    convert.add_argument("adapter", help="the adapter directory 'init' or save_residual_model wrote (and training "
                         "updated)")
    convert.add_argument("--base", default=None, help="the residual base directory (default: the one the adapter "
                         "config names)")
    convert.add_argument("--out", required=True, help="where the plain adapter goes")
    convert.set_defaults(run=command_convert)
    plot = sub.add_parser("plot", help="plot the scores and ranks of an init report", formatter_class=_Help,
                          description="One summary figure of an init report (and the per-layer detail on request).")
    plot.add_argument("report", help=f"a {REPORT_NAME} written by 'fisher-kernels init' or InitReport.save")
    plot.add_argument("--out", default=".", help="directory for summary.png (and ranks.png when ranks differ)")
    plot.add_argument("--detail", action="store_true", help="also scores.png: every layer's candidate scores")
    plot.set_defaults(run=command_plot)
    return main


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not _cuda():  # DeepSpeed (imported by accelerate when it is installed) would warn that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("fisher-kernels: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line, not a traceback
        print(f"fisher-kernels: error: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

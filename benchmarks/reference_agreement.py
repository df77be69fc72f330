"""Run the methods' public reference code side by side with ours on a tiny random Llama.

    python -m benchmarks.reference_agreement --lora-da PATH --lora-ga PATH --kasa PATH [--json OUT]

``PATH`` is a checkout of the reference repository (github zqy0126/LoRA-DA, Outsider565/LoRA-GA,
juyongjiang/KaSA);
nothing of it is copied here: its modules are imported from the checkout, and the few functions
that live in files importing GPU-only or training-only packages (the reference's gradient
estimator in LoRA-DA's ``run_exp.py``, LoRA-GA's per-layer ``lora_ga_init`` method, KaSA's
``update_layer``) are read out of those files and run unchanged on a stand-in for the layer. KaSA
is also compared with PEFT's own KaSA (``KasaConfig``), which needs no checkout.

Every comparison uses the same model, the same calibration sequences (unequal lengths; ours padded
into batches of 3, the references at their own batch sizes) and the reference's default
hyper-parameters. Two rows per method: the reference with its own solvers (seeded ``torch.lobpcg``
with 10 iterations and ``svd_lowrank`` for LoRA-DA, ``svd_lowrank`` for LoRA-GA) and the reference
with those replaced by exact float64 decompositions, against ours with exact solvers. Reported per
method: the largest principal angle (radians) between our and the reference's ``lora_A`` row spaces
and ``lora_B`` column spaces over all layers, and the largest relative difference of ``B A``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import torch

R = 2


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.train()


def sequences(n: int = 12, seed: int = 1) -> list[dict]:
    """Unpadded sequences of unequal lengths, each a dict of 1-D tensors (a dataset row)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, 97, (6 + (5 * i) % 15,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def padded_batches(rows: list[dict], batch_size: int) -> list[dict]:
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        length = max(len(r["input_ids"]) for r in chunk)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, length - len(t)), value=v)  # noqa: E731
        batches.append({"input_ids": torch.stack([pad(r["input_ids"], 0) for r in chunk]),
                        "attention_mask": torch.stack([pad(r["attention_mask"], 0) for r in chunk]),
                        "labels": torch.stack([pad(r["labels"], -100) for r in chunk])})
    return batches


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extract_function(path: Path, name: str, namespace: dict):
    """Compile one function (module level or a method) out of a source file, unchanged."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            module = ast.Module(body=[node], type_ignores=[])
            exec(compile(module, str(path), "exec"), namespace)
            return namespace[name]
    raise LookupError(f"{name} not found in {path}")


def max_angle(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Largest principal angle (radians) between the column spaces of X and Y."""
    Qx, _ = torch.linalg.qr(X.double())
    Qy, _ = torch.linalg.qr(Y.double())
    cosines = torch.linalg.svdvals(Qx.T @ Qy).clamp(max=1.0)
    return float(torch.arccos(cosines.min()))


def compare(ours: dict, reference: dict) -> dict:
    """``{name: (lora_A, lora_B)}`` on both sides -> worst angles and relative product difference."""
    a_angle = b_angle = product = 0.0
    for name, (A, B) in ours.items():
        A_ref, B_ref = reference[name]
        a_angle = max(a_angle, max_angle(A.T, A_ref.T))
        b_angle = max(b_angle, max_angle(B, B_ref))
        P, P_ref = B.double() @ A.double(), B_ref.double() @ A_ref.double()
        product = max(product, float((P - P_ref).norm() / P_ref.norm()))
    return {"layers": len(ours), "max_angle_A_rad": a_angle, "max_angle_B_rad": b_angle,
            "max_rel_diff_BA": product}


def ours(model, rows, method: str, **options) -> dict:
    from fisher_kernels import compute_initialization

    report = compute_initialization(model, padded_batches(rows, 3), method=method, r=R, progress=False,
                                    **options)
    return {name: (init.lora_A, init.lora_B) for name, init in report.layers.items()}


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------------------------- LoRA-DA

def reference_lora_da(checkout: Path, model, rows, exact: bool) -> dict:
    import logging

    from tqdm import tqdm

    lora_da = load_module(checkout / "lora_da.py", "reference_lora_da")
    namespace = {"torch": torch, "tqdm": tqdm, "log": logging.getLogger("reference"),
                 "Dict": dict, "List": list}
    estimate_gradient = extract_function(checkout / "run_exp.py", "estimate_gradient", namespace)
    if exact:  # the same functions with exact float64 decompositions inside
        def exact_lobpcg(matrix, rank, largest, niter, *seed_parts):
            values, vectors = torch.linalg.eigh(matrix.double())
            chosen = slice(-rank, None) if largest else slice(0, rank)
            return values[chosen].to(matrix.dtype), lora_da._canonicalize_columns(vectors[:, chosen].to(matrix.dtype))

        def exact_svd_lowrank(matrix, q, niter, *seed_parts):
            U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
            return U[:, :q].to(matrix.dtype), S[:q].to(matrix.dtype), Vh[:q].T.to(matrix.dtype)

        lora_da._deterministic_lobpcg = exact_lobpcg
        lora_da._deterministic_svd_lowrank = exact_svd_lowrank
    for p in model.parameters():
        p.requires_grad_(True)
    named_grads = estimate_gradient(model, rows, 1)  # the reference recipe: batch size 1
    inits = lora_da.estimate_lora_da_initializations(
        model=model, dataset=rows, named_grads=named_grads, target_modules=TARGETS, rank=R,
        population_size=len(rows), batch_size=1, bias_alpha=1.0, variance_beta=0.03, damping=1e-6,
        gamma=1024, lobpcg_niter=10, fisher_layers_per_pass=8, normalize_delta=True, delta_svd_niter=16,
        deterministic_seed=9)
    return {name[: -len(".weight")]: (v["lora_A"], v["lora_B"]) for name, v in inits.items()}


def run_lora_da(checkout: Path) -> dict:
    model, rows = tiny_llama(), sequences()
    result, references = {}, {}
    for exact in (False, True):
        references[exact] = reference_lora_da(checkout, copy.deepcopy(model), rows, exact)
        mine = ours(copy.deepcopy(model).eval(), rows, "lora_da", population_size=len(rows), stable_gamma=1024)
        result["exact solvers" if exact else "reference solvers"] = compare(mine, references[exact])
    # what the reference's own solvers (10 LOBPCG iterations) change in the reference itself
    result["reference vs itself with exact solvers"] = compare(references[False], references[True])
    return result


# --------------------------------------------------------------------------------------------- LoRA-GA

class _LayerShim:
    """What ``LoraLayer.lora_ga_init`` reads from ``self``: one target layer and its adapter."""

    def __init__(self, linear, grad, scaling, config):
        self.kwargs = {"grad": grad, "peft_config": config}
        self.r, self.scaling = {"default": R}, {"default": scaling}
        self.base = linear
        self.lora_A = {"default": torch.nn.Linear(linear.in_features, R, bias=False)}
        self.lora_B = {"default": torch.nn.Linear(R, linear.out_features, bias=False)}

    def get_base_layer(self):
        return self.base


def _torch_with_exact_svd_lowrank():
    def exact(matrix, q, niter):
        U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return U[:, :q].to(matrix.dtype), S[:q].to(matrix.dtype), Vh[:q].T.to(matrix.dtype)

    shim = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    shim.svd_lowrank = exact
    return shim


def reference_lora_ga(checkout: Path, model, batches, exact: bool) -> dict:
    sys.path.insert(0, str(checkout / "peft" / "src" / "peft" / "utils"))
    try:
        import lora_ga_utils
    finally:
        sys.path.pop(0)
    for p in model.parameters():
        p.requires_grad_(True)
    named_grads = lora_ga_utils.estimate_gradient(model, batches, accelerator=None)
    namespace = {"torch": _torch_with_exact_svd_lowrank() if exact else torch}
    lora_ga_init = extract_function(checkout / "peft/src/peft/tuners/lora/layer.py", "lora_ga_init", namespace)
    config = types.SimpleNamespace(direction="ArB2r", scale="stable", stable_gamma=16, dtype="fp32")  # LoraGAConfig defaults
    out = {}
    for name, grad in named_grads.items():
        if name.split(".")[-1] not in TARGETS:
            continue
        shim = _LayerShim(copy.deepcopy(model.get_submodule(name)), grad, 1.0, config)
        torch.manual_seed(0)  # ours seeds svd_lowrank the same way
        lora_ga_init(shim, "default")
        out[name] = (shim.lora_A["default"].weight.detach(), shim.lora_B["default"].weight.detach())
    return out


def run_lora_ga(checkout: Path) -> dict:
    model, rows = tiny_llama(), sequences()
    result = {}
    for exact in (False, True):
        reference = reference_lora_ga(checkout, copy.deepcopy(model), padded_batches(rows, 3), exact)
        mine = ours(copy.deepcopy(model).eval(), rows, "lora_ga", svd="exact" if exact else "lowrank")
        result["exact solvers" if exact else "reference solvers"] = compare(mine, reference)
    return result


# ------------------------------------------------------------------------------------------------ KaSA

class _KasaLayerShim:
    """What the KaSA reference's ``LoraLayer.update_layer`` reads and writes on ``self``."""

    def __init__(self, linear):
        self.base, self.in_features, self.out_features = linear, linear.in_features, linear.out_features
        self.r, self.lora_alpha, self.scaling, self.use_dora = {}, {}, {}, {}
        self.lora_dropout, self.lora_A, self.lora_B = (torch.nn.ModuleDict() for _ in range(3))
        self.lora_embedding_A, self.lora_diag = {}, torch.nn.ParameterDict()
        self.active_adapters = ["default"]

    def get_base_layer(self):
        return self.base

    def _move_adapter_to_device_of_base_layer(self, adapter_name):
        pass

    def set_adapter(self, adapter_names):
        pass


def reference_kasa_bases(checkout: Path, model) -> dict:
    source = checkout / "peft/src/peft/tuners/lora/layer.py"
    namespace = {"torch": torch, "nn": torch.nn, "math": math}
    update_layer = extract_function(source, "update_layer", namespace)
    reset = extract_function(source, "reset_lora_parameters", namespace)
    bases = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in TARGETS:
            shim = _KasaLayerShim(copy.deepcopy(module))
            shim.reset_lora_parameters = types.MethodType(reset, shim)
            update_layer(shim, "default", R, R, 0.0, True, False)
            bases[name] = shim.base.weight.detach()
    return bases


def run_kasa(checkout: Path | None) -> dict:
    """Ours vs PEFT's KaSA and the reference's truncation: the truncated base weights."""
    from peft import KasaConfig, LoraConfig, get_peft_model

    from fisher_kernels import init_lora

    model = tiny_llama().eval()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=R, target_modules=TARGETS,
                                                                 kasa_config=KasaConfig()))
    peft_bases = {name: module.get_base_layer().weight.detach()
                  for name, module in peft_model.base_model.model.named_modules() if hasattr(module, "lora_diag")}
    reference_bases = reference_kasa_bases(checkout, model) if checkout else {}
    result = {}
    for driver in ("svd", "gram64"):
        mine = init_lora(copy.deepcopy(model), None, method="kasa", r=R, target_modules=TARGETS, progress=False,
                         svd_driver=driver).base_model.model
        row = {"layers": len(peft_bases), "max_rel_diff_vs_peft": 0.0}
        for name, W_peft in peft_bases.items():
            W = mine.get_submodule(name).get_base_layer().weight.detach()
            row["max_rel_diff_vs_peft"] = max(row["max_rel_diff_vs_peft"], float((W - W_peft).norm() / W_peft.norm()))
            if name in reference_bases:
                differs = float((W - reference_bases[name]).norm() / reference_bases[name].norm())
                key = "wide" if W.shape[1] > W.shape[0] else "other"  # d_in > d_out: the reference keeps d_in − r
                row[f"max_rel_diff_vs_reference_{key}_layers"] = max(row.get(f"max_rel_diff_vs_reference_{key}_layers", 0.0), differs)
        result[f"svd_driver={driver}"] = row
    return result


def markdown(results: dict) -> str:
    lines = ["| method | compared | layers | max angle A (rad) | max angle B (rad) | max rel. diff B A |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for method in ("lora_da", "lora_ga"):
        for solvers, row in results.get(method, {}).items():
            solvers = solvers if solvers.startswith("reference vs") else f"ours vs reference, {solvers}"
            lines.append(f"| {method} | {solvers} | {row['layers']} | {row['max_angle_A_rad']:.2e} | "
                         f"{row['max_angle_B_rad']:.2e} | {row['max_rel_diff_BA']:.2e} |")
    lines += ["", "| KaSA | layers | vs PEFT KaSA | vs reference, d_in ≤ d_out | vs reference, d_in > d_out |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for driver, row in results.get("kasa", {}).items():
        cells = [row.get(k) for k in ("max_rel_diff_vs_peft", "max_rel_diff_vs_reference_other_layers",
                                      "max_rel_diff_vs_reference_wide_layers")]
        lines.append(f"| {driver} | {row['layers']} | " + " | ".join("n/a" if c is None else f"{c:.2e}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora-da", type=Path, help="checkout of github zqy0126/LoRA-DA")
    parser.add_argument("--lora-ga", type=Path, help="checkout of github Outsider565/LoRA-GA")
    parser.add_argument("--kasa", type=Path, help="checkout of github juyongjiang/KaSA")
    parser.add_argument("--json", type=Path, help="write the results here (and a .md beside it)")
    args = parser.parse_args(argv)
    results = {"torch": torch.__version__, "r": R}
    if args.lora_da:
        results["lora_da"] = run_lora_da(args.lora_da)
    if args.lora_ga:
        results["lora_ga"] = run_lora_ga(args.lora_ga)
    results["kasa"] = run_kasa(args.kasa)
    table = markdown(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        args.json.with_suffix(".md").write_text(table)
    return results


if __name__ == "__main__":
    main()

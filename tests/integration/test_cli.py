"""The ``fisher-kernels`` command: init from a local model directory and a JSONL file (texts and
chat messages), estimate from a config alone, plot a report; one-line errors."""

import json
import tomllib
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from fisher_kernels.integrations.cli import REPORT_NAME, main
from tiny_models import make_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    make_model("llama").save_pretrained(path)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    lines = [{"text": " ".join(f"t{(5 * i + 3 * j) % 50 + 3}" for j in range(4 + i % 5))} for i in range(10)]
    lines += [{"messages": [{"role": "user", "content": "t5 t6 t7"}, {"role": "assistant", "content": "t8 t9"}]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_init_saves_adapter_residual_base_and_report_which_reload_to_the_original_function(model_dir, data_file,
                                                                                          tmp_path, capsys):
    assert main(["init", str(model_dir), str(data_file), "--method", "filet", "--r", "2", "--out",
                 str(tmp_path / "out"), "--options", '{"energy": "component"}']) == 0
    assert "Adapter:" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "adapter" / REPORT_NAME).read_text())
    assert report["method"] == "filet" and report["options"]["energy"] == "component" and report["version"]
    first = next(iter(report["layers"].values()))
    assert len(first["selected"]) == 2 and len(first["scores"]) > 2
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "out" / "base"),
                                         tmp_path / "out" / "adapter")
    ids = torch.tensor([[3, 8, 13, 18, 23]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, make_model("llama")(input_ids=ids).logits, atol=1e-5)

    assert main(["plot", str(tmp_path / "out" / "adapter" / REPORT_NAME), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "summary.png").stat().st_size > 0
    assert not (tmp_path / "plots" / "ranks.png").exists()  # a uniform rank: nothing to show
    assert not (tmp_path / "plots" / "scores.png").exists()  # the per-layer detail only on request
    assert main(["plot", str(tmp_path / "out" / "adapter" / REPORT_NAME), "--out", str(tmp_path / "plots"),
                 "--detail"]) == 0
    assert (tmp_path / "plots" / "scores.png").stat().st_size > 0


def test_init_without_base_change_saves_only_the_adapter(model_dir, data_file, tmp_path):
    assert main(["init", str(model_dir), str(data_file), "--method", "lora_da", "--r", "2", "--out",
                 str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "out" / "base").exists()


def test_estimate_reads_only_the_config(model_dir, capsys):
    assert main(["estimate", str(model_dir), "--method", "filet", "--r", "2", "--batch-size", "2", "--seq-len", "16",
                 "--device-kind", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "filet: peak" in out and "plus this process's own memory" in out  # on the CPU it shares the RAM


def test_estimate_per_fsdp2_rank_and_planned_for_a_device(model_dir, capsys):
    args = ["estimate", str(model_dir), "--method", "lora_ga", "--r", "2", "--batch-size", "2", "--seq-len", "16",
            "--device-kind", "cuda"]
    assert main(args) == 0
    whole = capsys.readouterr().out
    assert main(args + ["--world-size", "2", "--device-gb", "80"]) == 0
    sharded = capsys.readouterr().out
    assert "gathered" not in whole and "gathered" in sharded
    assert "init's default settings plan:" in sharded and "2 ranks" in sharded
    with pytest.raises(SystemExit):
        main(args + ["--world-size", "0"])
    assert "--world-size: must be a positive integer, got '0'" in capsys.readouterr().err


def test_errors_are_one_line(tmp_path, model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "t3"}\nnot json\n')
    assert main(["init", str(model_dir), str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fisher-kernels: error: ValueError:") and "bad.jsonl:2: not JSON" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["init", "--help"])


def test_the_console_script_is_declared():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["fisher-kernels"] == "fisher_kernels.integrations.cli:main"


def _files(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_init_never_overwrites_the_model_it_loads(model_dir, data_file, tmp_path, capsys):
    """``--out`` whose base directory is the model directory would overwrite its weights with W − s·B A."""
    import shutil

    source = tmp_path / "out" / "base"
    shutil.copytree(model_dir, source)
    before = _files(tmp_path / "out")
    assert main(["init", str(source), str(data_file), "--r", "2", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "is where the model was loaded from" in err and "\n" not in err.strip()
    assert _files(tmp_path / "out") == before


def test_init_refuses_a_file_where_the_base_directory_goes(model_dir, data_file, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "base").write_text("in the way")
    assert main(["init", str(model_dir), str(data_file), "--r", "2", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "base directory" in err and "exists and is not a directory" in err
    assert not (tmp_path / "out" / "adapter").exists() and (tmp_path / "out" / "base").read_text() == "in the way"


def test_save_residual_model_refuses_unusable_directories(model_dir, tmp_path):
    from fisher_kernels import init_lora, save_residual_model

    peft_model = init_lora(LlamaForCausalLM.from_pretrained(model_dir), [{"input_ids": torch.tensor([[3, 4, 5, 6]]),
                                                                        "labels": torch.tensor([[3, 4, 5, 6]])}],
                           r=2, target_modules=["q_proj"], progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save_residual_model(peft_model, tmp_path / "adapter", tmp_path / "file")
    with pytest.raises(ValueError, match="both be written to"):
        save_residual_model(peft_model, tmp_path / "same", tmp_path / "same")
    before = _files(model_dir)
    with pytest.raises(ValueError, match="where the model was loaded from"):
        save_residual_model(peft_model, tmp_path / "adapter", model_dir)
    assert _files(model_dir) == before and not (tmp_path / "adapter").exists()


def test_a_saved_residual_adapter_loads_with_autopeftmodel_onto_its_residual_base(model_dir, data_file, tmp_path):
    """PEFT users load adapters with AutoPeftModel...from_pretrained(adapter_dir), which reads the base
    model from the adapter config: it must be the residual base, not the original model."""
    from peft import AutoPeftModelForCausalLM

    assert main(["init", str(model_dir), str(data_file), "--method", "filet", "--r", "2", "--out",
                 str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (tmp_path / "out" / "base").resolve()
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out" / "adapter")
    ids = torch.tensor([[3, 8, 13, 18, 23]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, make_model("llama")(input_ids=ids).logits, atol=1e-5)


def test_init_exposes_the_api_options(model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    assert main(["init", str(model_dir), str(data_file), "--method", "filet", "--r", "2", "--out", str(out),
                 "--target-modules", "q_proj,v_proj", "--lora-dropout", "0.1", "--batch-size", "3",
                 "--micro-batch-size", "1", "--token-mask", "labels", "--rank-budget", "9", "--max-rank", "3",
                 "--shuffle", "--seed", "5", "--num-batches", "2", "--max-stats-memory", "auto"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["lora_dropout"] == 0.1
    assert sorted(config["target_modules"]) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                                "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    report = json.loads((out / "adapter" / REPORT_NAME).read_text())
    assert report["num_batches"] == 2 and report["options"]["token_mask"] == "labels"
    assert sum(layer["rank"] for layer in report["layers"].values()) == 9  # the budget, spread over 4 layers
    assert report["options"]["micro_batch_size"] == 1


def test_init_refuses_options_that_are_not_a_json_object_in_one_line(model_dir, data_file, tmp_path, capsys):
    assert main(["init", str(model_dir), str(data_file), "--out", str(tmp_path / "o"), "--options", "energy=component"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--options must be a JSON object" in err and "\n" not in err and "JSONDecodeError" not in err


def test_estimate_assumes_the_dtype_init_loads(model_dir, monkeypatch):
    """'init --dtype auto' loads the checkpoint's dtype (fp32 here); 'estimate' assumed bf16."""
    import fisher_kernels

    seen = []
    real = fisher_kernels.estimate_memory
    monkeypatch.setattr(fisher_kernels, "estimate_memory",
                        lambda model, **kw: seen.append(next(model.parameters()).dtype) or real(model, **kw))
    for dtype in ([], ["--dtype", "bf16"]):
        assert main(["estimate", str(model_dir), "--r", "2", "--batch-size", "2", "--seq-len", "16", *dtype]) == 0
    assert seen == [torch.float32, torch.bfloat16]


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(61)}, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", unk_token="t1")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def test_trl_prompt_completion_rows_put_the_loss_on_the_completion():
    from fisher_kernels.integrations.cli import tokenise

    plain, chat = tokenise([{"prompt": "t5 t6 t7", "completion": " t8 t9"},
                            {"prompt": [{"role": "user", "content": "t5 t6"}],
                             "completion": [{"role": "assistant", "content": "t8"}]}], _word_tokenizer(), 64)
    assert plain["input_ids"] == [5, 6, 7, 8, 9] and plain["labels"] == [-100, -100, -100, 8, 9]
    assert chat["input_ids"] == [5, 6, 8] and chat["labels"] == [-100, -100, 8]


def test_init_reads_prompt_completion_files(model_dir, tmp_path):
    data = tmp_path / "pc.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"t{3 + i} t{4 + i} t{5 + i}", "completion": f" t{9 + i} t{10 + i}"})
                              for i in range(8)) + "\n")
    assert main(["init", str(model_dir), str(data), "--r", "2", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()


def test_the_summary_figure_is_one_readable_image_and_ranks_appear_when_they_differ(model_dir, data_file, tmp_path):
    from PIL import Image

    assert main(["init", str(model_dir), str(data_file), "--r", "2", "--rank-budget", "30", "--out",
                 str(tmp_path / "out")]) == 0
    assert main(["plot", str(tmp_path / "out" / "adapter" / REPORT_NAME), "--out", str(tmp_path / "plots")]) == 0
    width, height = Image.open(tmp_path / "plots" / "summary.png").size
    assert width <= 1600 and height <= 1200  # was 1920 × 16,536 px for 210 layers
    assert (tmp_path / "plots" / "ranks.png").exists()


def test_methods_without_data_need_no_data_file(model_dir, tmp_path, capsys):
    assert main(["init", str(model_dir), "--method", "pissa", "--r", "2", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "base" / "config.json").exists()
    assert main(["init", str(model_dir), "--method", "filet", "--out", str(tmp_path / "o2")]) == 1
    assert "method 'filet' needs calibration data" in capsys.readouterr().err


def test_convert_writes_a_plain_adapter_for_the_original_model(model_dir, data_file, tmp_path):
    from safetensors.torch import load_file, save_file

    assert main(["init", str(model_dir), str(data_file), "--r", "2", "--out", str(tmp_path / "out")]) == 0
    weights = tmp_path / "out" / "adapter" / "adapter_model.safetensors"  # "training": move the adapter
    save_file({k: v + 0.05 * torch.ones_like(v) for k, v in load_file(weights).items()}, weights)
    trained = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "out" / "base"),
                                        tmp_path / "out" / "adapter")
    assert main(["convert", str(tmp_path / "out" / "adapter"), "--out", str(tmp_path / "plain")]) == 0
    plain = PeftModel.from_pretrained(make_model("llama"), tmp_path / "plain")
    ids = torch.tensor([[3, 8, 13, 18, 23]])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4)
        assert not torch.allclose(plain(input_ids=ids).logits, make_model("llama")(input_ids=ids).logits, atol=1e-3)


def test_help_states_every_default_and_no_raw_docstring(capsys):
    with pytest.raises(SystemExit):
        main(["init", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text  # no reST of a module docstring
    options = text[text.index("options:"):]
    for option, default in (("--r R", "16"), ("--batch-size", "8"), ("--method", "filet"), ("--lora-dropout", "0.0")):
        after = options[options.index(option):]
        assert f"(default: {default})" in after[:200], option


def test_corrupt_weights_are_named_in_one_line(model_dir, data_file, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["init", str(broken), str(data_file), "--r", "2", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{broken}: cannot load the model's weights" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_a_failed_save_leaves_the_output_directories_as_they_were(model_dir, tmp_path, monkeypatch):
    """Written under temporary names, then moved: a failure half-way (here: the base model's weights)
    leaves an earlier save whole and no partial directory behind."""
    from transformers import PreTrainedModel

    from fisher_kernels import init_lora, save_residual_model

    peft_model = init_lora(LlamaForCausalLM.from_pretrained(model_dir), [{"input_ids": torch.tensor([[3, 4, 5, 6]]),
                                                                        "labels": torch.tensor([[3, 4, 5, 6]])}],
                           r=2, target_modules=["q_proj"], progress=False)
    save_residual_model(peft_model, tmp_path / "adapter", tmp_path / "base")
    before = {d: _files(tmp_path / d) for d in ("adapter", "base")}
    real = PreTrainedModel.save_pretrained

    def failing(self, directory, *args, **kwargs):
        real(self, directory, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing)
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).add_(1.0)  # a different adapter
    with pytest.raises(OSError, match="disk full"):
        save_residual_model(peft_model, tmp_path / "adapter", tmp_path / "base")
    assert {d: _files(tmp_path / d) for d in ("adapter", "base")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_one_pass_saved_serves_a_later_init_without_data(model_dir, data_file, tmp_path):
    from safetensors.torch import load_file

    stats = tmp_path / "stats.safetensors"
    assert main(["init", str(model_dir), str(data_file), "--method", "filet", "--r", "2", "--out",
                 str(tmp_path / "first"), "--save-statistics", str(stats)]) == 0
    assert stats.stat().st_size > 0
    assert main(["init", str(model_dir), "--method", "filet", "--r", "2", "--out", str(tmp_path / "second"),
                 "--statistics", str(stats), "--options", '{"energy": "component"}']) == 0
    assert main(["init", str(model_dir), "--method", "filet", "--r", "2", "--out", str(tmp_path / "again"),
                 "--statistics", str(stats)]) == 0
    first = load_file(tmp_path / "first" / "adapter" / "adapter_model.safetensors")
    again = load_file(tmp_path / "again" / "adapter" / "adapter_model.safetensors")
    assert first.keys() == again.keys() and all(torch.allclose(first[k], again[k], atol=1e-6) for k in first)


def test_a_cpu_run_prints_no_deepspeed_accelerator_warning(model_dir, data_file, tmp_path):
    """accelerate imports DeepSpeed (when installed) while saving; without a GPU it warned on every run."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-m", "fisher_kernels.integrations.cli", "init", str(model_dir), str(data_file),
                           "--method", "pissa", "--r", "2", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "base" / "config.json").exists()
    output = done.stdout + done.stderr
    assert "Setting accelerator" not in output and "FutureWarning" not in output


def test_init_quantizes_with_bitsandbytes_and_saves_a_4bit_residual_base(tmp_path, data_file, capsys):
    """``--quantize 4bit``: the model loaded in 4-bit, residual bases from the directory's full-precision
    weights (quantized once), the base saved in 4-bit and reloaded so."""
    pytest.importorskip("bitsandbytes")
    model_dir = tmp_path / "model"
    make_model("llama-wide").save_pretrained(model_dir)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(model_dir)
    assert main(["init", str(model_dir), str(data_file), "--method", "filet", "--r", "2", "--quantize", "4bit",
                 "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "adapter" / REPORT_NAME).read_text())
    errors = report["quantization_errors"]
    assert errors and all(e["loaded"] > 0 for e in errors.values())  # the checkpoint route
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base", device_map="cpu")
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert main(["estimate", str(model_dir), "--method", "filet", "--r", "2", "--batch-size", "2", "--seq-len", "16",
                 "--device-kind", "cpu", "--quantize", "4bit"]) == 0
    assert "filet: peak" in capsys.readouterr().out

"""Bad input to the public entry points: each refused with one line naming the argument or file,
and the model left as it was."""


import pytest
import torch

from conftest import assert_same_snapshot, snapshot
from fisher_kernels import Calibration, FisherInitCallback, RankBudget, Resources, init_lora, save_residual_model
from fisher_kernels.integrations.cli import main
from tiny_models import make_model, make_samples, pad_batches

INIT_CASES = {  # keyword arguments: (exception, what the message must say)
    "rank_budget=0": (dict(rank_budget=0), ValueError, "rank_budget must be a positive integer, got 0"),
    "rank_budget=-5": (dict(rank_budget=-5), ValueError, "rank_budget must be a positive integer, got -5"),
    "rank_budget=14.0": (dict(rank_budget=14.0), ValueError, "rank_budget must be a positive integer, got 14.0"),
    "lora_alpha='8'": (dict(lora_alpha="8"), ValueError, "lora_alpha must be a positive number, got '8'"),
    "lora_alpha=inf": (dict(lora_alpha=float("inf")), ValueError, "lora_alpha must be a positive number, got inf"),
    "lora_alpha=0": (dict(lora_alpha=0), ValueError, "lora_alpha must be positive"),
    "r=0": (dict(r=0), ValueError, "r must be a positive integer, got 0"),
    "min_rank as a keyword": (dict(rank_budget=20, min_rank=2), TypeError,
                              "min_rank and max_rank go into rank_budget=RankBudget"),
    "seed as a keyword for filet": (dict(seed=3), TypeError, "Calibration(label_seed=...)"),
    "num_batches given twice": (dict(num_batches=2, calibration="set below"), TypeError,
                                "give num_batches either in Calibration"),
    "adapter_name on a base model": (dict(adapter_name="mine"), ValueError, "adapter_name='mine'"),
}


@pytest.mark.parametrize("case", list(INIT_CASES))
def test_init_lora_refuses_bad_arguments_in_one_line(case):
    options, error, message = INIT_CASES[case]
    if options.get("calibration") == "set below":
        options = dict(options, calibration=Calibration())
    model = make_model("llama")
    before = snapshot(model)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")) as raised:
        init_lora(model, pad_batches(make_samples("llama", n=2), 2), progress=False, **options)
    assert "\n" not in str(raised.value)
    assert_same_snapshot(before, snapshot(model))


SETTINGS_CASES = {  # a settings group made with a bad value: (exception, what the one line says)
    "Calibration(num_batches=0)": (lambda: Calibration(num_batches=0), ValueError, "num_batches must be a positive"),
    "Calibration(micro_batch_size=1.5)": (lambda: Calibration(micro_batch_size=1.5), ValueError,
                                          "micro_batch_size must be a positive integer, got 1.5"),
    "Calibration(loss_fn=3)": (lambda: Calibration(loss_fn=3), TypeError, "loss_fn must be callable"),
    "Calibration(token_mask='x')": (lambda: Calibration(token_mask="x"), ValueError, "token_mask must be"),
    "Calibration(fisher='x')": (lambda: Calibration(fisher="x"), ValueError, "fisher must be 'empirical' or 'true'"),
    "Calibration(label_seed=-1)": (lambda: Calibration(label_seed=-1), ValueError, "label_seed must be a non-negative"),
    "Resources(max_stats_memory=-1)": (lambda: Resources(max_stats_memory=-1), ValueError,
                                       "max_stats_memory must be a positive number of bytes or 'auto', got -1"),
    "Resources(distributed='yes')": (lambda: Resources(distributed="yes"), ValueError, "distributed must be None"),
    "Resources(backend=3)": (lambda: Resources(backend=3), TypeError, "backend must be a name"),
    "RankBudget(0)": (lambda: RankBudget(0), ValueError, "rank_budget must be a positive integer, got 0"),
    "RankBudget(20, min_rank=0)": (lambda: RankBudget(20, min_rank=0), ValueError, "min_rank must be a positive"),
    "RankBudget(20, max_rank=0)": (lambda: RankBudget(20, max_rank=0), ValueError, "max_rank must be a positive"),
    "RankBudget(20, 4, 2)": (lambda: RankBudget(20, 4, 2), ValueError, "max_rank=2 is below min_rank=4"),
    "init_lora(calibration=dict)": (lambda: init_lora(make_model("llama"), calibration={"num_batches": 2}), TypeError,
                                    "calibration must be a Calibration"),
}


@pytest.mark.parametrize("case", list(SETTINGS_CASES))
def test_settings_refuse_bad_values_when_made(case):
    make, error, message = SETTINGS_CASES[case]
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
        make()
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("num_batches", [0, -1, 2.5, "2", True])
def test_the_callback_refuses_a_bad_batch_count_when_made(num_batches):
    with pytest.raises(ValueError, match=f"num_batches must be a positive integer, got {num_batches!r}"):
        FisherInitCallback(num_batches=num_batches)


def test_save_residual_model_refuses_a_plain_module(tmp_path):
    with pytest.raises(TypeError, match="save_residual_model saves a PeftModel .* got LlamaForCausalLM"):
        save_residual_model(make_model("llama"), tmp_path / "a", tmp_path / "b")
    assert not (tmp_path / "a").exists()


def test_cli_refuses_a_missing_or_foreign_model_directory_at_once(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "t3 t4"}\n')
    assert main(["init", str(tmp_path / "nowhere"), str(data), "--out", str(tmp_path / "o")]) == 1
    assert "nowhere is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["init", str(tmp_path / "empty"), str(data), "--out", str(tmp_path / "o")]) == 1
    assert "holds no config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", ['{"rows": []}', "[1, 2]", "not json"])
def test_cli_plot_refuses_a_foreign_file_in_one_line(tmp_path, capsys, content):
    report = tmp_path / "foreign.json"
    report.write_text(content)
    assert main(["plot", str(report), "--out", str(tmp_path / "plots")]) == 1
    err = capsys.readouterr().err.strip()
    assert "foreign.json" in err and "\n" not in err and "KeyError" not in err


def test_statistics_of_other_settings_are_refused_and_the_report_records_theirs():
    from fisher_kernels import collect_statistics, compute_initialization, full_statistics_requests

    model = make_model("llama")
    data = pad_batches(make_samples("llama", n=4), 2)
    plain = collect_statistics(model, data, full_statistics_requests(model), progress=False)
    with pytest.raises(ValueError, match="token_mask='labels', but the given statistics were collected with "
                                         "token_mask='attention'"):
        compute_initialization(model, method="filet", r=2, statistics=plain, token_mask="labels", progress=False)
    stats = collect_statistics(model, data, full_statistics_requests(model), token_mask="labels", progress=False)
    with pytest.raises(ValueError, match="fisher='true', but the given statistics were collected with fisher='empirical'"):
        compute_initialization(model, method="filet", r=2, statistics=stats, fisher="true", progress=False)
    report = compute_initialization(model, method="filet", r=2, statistics=stats, progress=False)
    assert report.options["token_mask"] == "labels" and report.options["fisher"] == "empirical"


@pytest.mark.parametrize("batch,message", [
    ({"input_ids": torch.full((2, 5), 99), "labels": torch.full((2, 5), 3)},
     "input ids range from 99 to 99, outside the model's vocabulary of 61"),
    ({"input_ids": torch.zeros((0, 5), dtype=torch.long),
      "labels": torch.zeros((0, 5), dtype=torch.long)}, "batch 0 is empty"),
    ({"input_ids": torch.zeros((2, 0), dtype=torch.long),
      "labels": torch.zeros((2, 0), dtype=torch.long)}, "batch 0 is empty"),
])
def test_bad_batches_are_named_in_one_line(batch, message):
    model = make_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as raised:
        init_lora(model, [batch], r=2, progress=False)
    assert "\n" not in str(raised.value) and "batch 0" in str(raised.value)
    assert_same_snapshot(before, snapshot(model))


def test_estimate_refuses_a_rank_that_init_refuses():
    from fisher_kernels import estimate_memory

    with pytest.raises(ValueError, match="r=1000 is larger than min\\(d_out, d_in\\)"):
        estimate_memory(make_model("llama"), method="filet", r=1000)


@pytest.mark.parametrize("line,message", [
    (b'{"text": 5}', "'text' must be a string, got int"),
    (b'{"text": null}', "'text' must be a string, got NoneType"),
    (b'{"messages": "hi"}', "'messages' must be a list of"),
    (b'{"messages": [{"role": "user"}]}', "'messages' must be a list of"),
    (b'{"text": "caf\xe9"}', "not UTF-8 text"),
])
def test_cli_names_the_file_and_line_of_bad_data(tmp_path, capsys, line, message):
    from fisher_kernels.integrations.cli import read_jsonl

    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "fine"}\n' + line + b"\n")
    with pytest.raises(ValueError, match=f"d.jsonl:2: .*{message}".replace("(", r"\(")):
        read_jsonl(data)


def test_rank_budget_on_an_existing_adapter_is_refused_not_ignored():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="an existing adapter's ranks are fixed by its config"):
        init_lora(peft_model, pad_batches(make_samples("llama", n=2), 2), rank_budget=8, progress=False)


def _entry_point_cases():
    from fisher_kernels import (KFACStatistics, StatisticsRequest, collect_statistics, compute_initialization,
                                estimate_memory, save_as_plain_lora)

    data = pad_batches(make_samples("llama", n=2), 2)
    request = {"model.layers.0.mlp.up_proj": StatisticsRequest(input_factor=True)}
    return {  # name: (call on a model, exception, what the one line must say)
        "collect: requests a list": (lambda m: collect_statistics(m, data, ["a"], progress=False), TypeError,
                                     "requests must be a dict"),
        "collect: unknown layer": (lambda m: collect_statistics(m, data, {"nope": StatisticsRequest(input_factor=True)},
                                                                progress=False), ValueError, "does not have: \\['nope'\\]"),
        "collect: num_batches=2.5": (lambda m: collect_statistics(m, data, request, num_batches=2.5, progress=False),
                                     ValueError, "num_batches must be a positive integer, got 2.5"),
        "collect: loader=5": (lambda m: collect_statistics(m, 5, request, progress=False), TypeError,
                              "loader must be an iterable of batches"),
        "collect: backend='x'": (lambda m: collect_statistics(m, data, request, backend="x", progress=False), ValueError,
                                 "backend must be 'auto' or one of"),
        "compute: method=5": (lambda m: compute_initialization(m, data, method=5, progress=False), TypeError,
                              "method must be a method name"),
        "compute: scale=-1": (lambda m: compute_initialization(m, data, r=2, scale=-1, progress=False), ValueError,
                              "scale \\(lora_alpha / r\\) must be a positive number, got -1"),
        "compute: target_modules=['nope']": (lambda m: compute_initialization(m, data, r=2, target_modules=["nope"],
                                                                              progress=False), ValueError,
                                             "matched no layer"),
        "compute: max_stats_memory=-1": (lambda m: compute_initialization(m, data, r=2, max_stats_memory=-1,
                                                                          progress=False), ValueError,
                                         "max_stats_memory must be a positive number of bytes"),
        "estimate: r=0": (lambda m: estimate_memory(m, r=0), ValueError, "r must be a positive integer, got 0"),
        "estimate: batch_size=0": (lambda m: estimate_memory(m, batch_size=0), ValueError, "batch_size and seq_len"),
        "estimate: method='x'": (lambda m: estimate_memory(m, method="x"), ValueError, "unknown method 'x'"),
        "load: a directory": (lambda m: KFACStatistics.load("tests"), ValueError, "tests: cannot read it"),
        "plain lora: a plain module": (lambda m: save_as_plain_lora(m, "unused"), TypeError,
                                       "save_as_plain_lora converts a PeftModel, got LlamaForCausalLM"),
        "callback: method='x'": (lambda m: FisherInitCallback(method="x"), ValueError, "unknown method 'x'"),
    }


@pytest.mark.parametrize("case", list(_entry_point_cases()))
def test_every_entry_point_refuses_bad_input_in_one_line_and_touches_nothing(case, tmp_path, monkeypatch):
    call, error, message = _entry_point_cases()[case]
    monkeypatch.chdir(tmp_path.parent)  # "tests" and "unused" name nothing there
    (tmp_path.parent / "tests").mkdir(exist_ok=True)
    model = make_model("llama")
    before, files = snapshot(model), sorted(p.name for p in tmp_path.parent.iterdir())
    with pytest.raises(error, match=message) as raised:
        call(model)
    assert "\n" not in str(raised.value)
    assert_same_snapshot(before, snapshot(model))
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == files  # nothing written


CLI_CASES = {  # command line after the command's own positional arguments: (exit code, what stderr's last line says)
    "init --r 0": (["--r", "0"], 2, "argument --r: must be a positive integer, got '0'"),
    "init --r x": (["--r", "x"], 2, "argument --r: must be a positive integer, got 'x'"),
    "init --lora-alpha -1": (["--lora-alpha", "-1"], 2, "argument --lora-alpha: must be a positive number"),
    "init --lora-alpha inf": (["--lora-alpha", "inf"], 2, "argument --lora-alpha: must be a positive number"),
    "init --max-length 0": (["--max-length", "0"], 2, "argument --max-length: must be a positive integer"),
    "init --num-batches 2.5": (["--num-batches", "2.5"], 2, "argument --num-batches: must be a positive integer"),
    "init --batch-size 0": (["--batch-size", "0"], 2, "argument --batch-size: must be a positive integer"),
    "init --micro-batch-size -1": (["--micro-batch-size", "-1"], 2, "argument --micro-batch-size: must be a positive"),
    "init --seed -1": (["--seed", "-1"], 2, "argument --seed: must be a non-negative integer"),
    "init --lora-dropout 1": (["--lora-dropout", "1"], 2, "argument --lora-dropout: must be a probability in"),
    "init --rank-budget 0": (["--rank-budget", "0"], 2, "argument --rank-budget: must be a positive integer"),
    "init --min-rank 0": (["--rank-budget", "8", "--min-rank", "0"], 2, "argument --min-rank: must be a positive"),
    "init --max-stats-memory -5": (["--max-stats-memory", "-5"], 2, "argument --max-stats-memory: must be a positive"),
    "init --method x": (["--method", "x"], 2, "argument --method: invalid choice: 'x'"),
    "init --token-mask x": (["--token-mask", "x"], 2, "argument --token-mask: invalid choice"),
    "init --dtype x": (["--dtype", "x"], 2, "argument --dtype: invalid choice"),
    "init --min-rank without budget": (["--min-rank", "2"], 1, "--min-rank and --max-rank bound the per-layer ranks"),
    "init --max-rank below --min-rank": (["--rank-budget", "8", "--min-rank", "4", "--max-rank", "2"], 1,
                                         "--max-rank 2 is below --min-rank 4"),
    "init --rank-budget with lora_da": (["--rank-budget", "8", "--method", "lora_da"], 1, "use --method filet"),
    "init --statistics and --save-statistics": (["--statistics", "a", "--save-statistics", "b"], 1, "give one"),
    "init --options unknown": (["--options", '{"nope": 1}'], 1, "--options: method 'filet' has no option nope"),
    "init --options not JSON": (["--options", "energy=component"], 1, "--options must be a JSON object"),
    "estimate --r 0": (["--r", "0"], 2, "argument --r: must be a positive integer"),
    "estimate --batch-size 0": (["--batch-size", "0"], 2, "argument --batch-size: must be a positive integer"),
    "estimate --seq-len -3": (["--seq-len", "-3"], 2, "argument --seq-len: must be a positive integer"),
    "estimate --device-kind tpu": (["--device-kind", "tpu"], 2, "argument --device-kind: invalid choice"),
    "convert: no initial adapter": ([], 1, "initial"),
    "plot: no such file": ([], 1, "No such file"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_every_cli_flag_refuses_bad_values_in_one_line_before_loading_anything(case, tmp_path, capsys, monkeypatch):
    """Each command's flags: argparse's one ``error:`` line (exit 2) or the command's one line (exit 1), before any
    model is loaded, and nothing written."""
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    extra, code, message = CLI_CASES[case]
    command = case.split()[0].rstrip(":")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "t3 t4"}\n')
    positional = {"init": [str(model_dir), str(data), "--out", str(tmp_path / "out")], "estimate": [str(model_dir)],
                  "convert": [str(model_dir), "--out", str(tmp_path / "out")],
                  "plot": [str(tmp_path / "none.json"), "--out", str(tmp_path / "out")]}[command]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    try:
        result = main([command, *positional, *extra])
    except SystemExit as exit_:  # argparse
        result = exit_.code
    assert result == code
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last, last
    assert sorted(p.name for p in tmp_path.rglob("*")) == before

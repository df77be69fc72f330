"""What a person sees: one line saying what is about to happen, a bar for every stage that takes
more than a second, no warning from other packages' deprecations."""

import warnings

from fisher_kernels import init_lora
from fisher_kernels.pipeline import executor
from tiny_models import make_model, make_samples, pad_batches


def test_a_summary_line_then_a_bar_for_each_stage(monkeypatch, capsys):
    stages = []
    real = executor.stage_bar
    monkeypatch.setattr(executor, "stage_bar", lambda items, name, progress, total=None: stages.append((name, progress))
                        or real(items, name, progress, total))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # PEFT's read of a deprecated transformers property is hidden
        init_lora(make_model("llama"), pad_batches(make_samples("llama", n=4), 2), method="filet", r=2)
    err = capsys.readouterr().err
    assert "fisher_kernels: filet, r 2, 14 layers; 2 calibration batches;" in err
    assert ("decomposition", True) in stages and ("initialisation", True) in stages
    assert "fisher_kernels: calibration" in err and "fisher_kernels: base weights" in err


def test_progress_off_prints_nothing(capsys):
    init_lora(make_model("llama"), pad_batches(make_samples("llama", n=4), 2), method="filet", r=2, progress=False)
    captured = capsys.readouterr()
    assert "fisher_kernels" not in captured.err + captured.out

"""accelerate on CPU (two gloo processes, ``Accelerator(cpu=True)``): a loader sharded by
``accelerator.prepare`` gives the initialisation of one process over all the data, also with
uneven shards; accelerate's sample-repeating ``even_batches`` and a loader that was never sharded
are refused on every rank with the fix."""

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the shared helpers
pytest.importorskip("accelerate")

N_SAMPLES, BATCH = 7, 2  # 7 samples: the shards cannot be even


def collate(chunk):
    from tiny_models import pad_batches

    return pad_batches(chunk, len(chunk))[0]


def _rank_main(rank, world, port, case, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from accelerate import Accelerator, DataLoaderConfiguration
    from torch.utils.data import DataLoader

    from fisher_kernels import compute_initialization
    from tiny_models import make_model, make_samples

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(even_batches=case == "even_batches"))
    loader = DataLoader(make_samples("llama", n=N_SAMPLES), batch_size=BATCH, collate_fn=collate)
    if case != "unsharded":
        loader = accelerator.prepare(loader)
    result = {}
    try:
        for method in ("filet", "lora_ga"):
            report = compute_initialization(make_model("llama"), loader, method=method, r=2, progress=False)
            result[method] = {n: (i.lora_A, i.lora_B) for n, i in report.layers.items()}
            result[method + ":tokens"] = report.num_tokens
    except ValueError as err:
        result["error"] = str(err)
    torch.save(result, os.path.join(out_dir, f"{case}{rank}.pt"))
    accelerator.end_training()


def run(case, tmp_path, port):
    mp.spawn(_rank_main, args=(2, port, case, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"{case}{r}.pt") for r in range(2)]


def test_accelerate_uneven_shards_equal_one_process(tmp_path):
    from fisher_kernels import compute_initialization
    from tiny_models import make_model, make_samples, pad_batches

    ranks = run("uneven", tmp_path, 29611)
    samples = make_samples("llama", n=N_SAMPLES)
    # accelerate deals batches round-robin: rank 0 [0, 1], [4, 5]; rank 1 [2, 3], [6]
    union = pad_batches(samples, BATCH)
    for method in ("filet", "lora_ga"):
        single = compute_initialization(make_model("llama"), union, method=method, r=2, progress=False)
        assert ranks[0][method + ":tokens"] == ranks[1][method + ":tokens"] == single.num_tokens
        for name, init in single.layers.items():
            expected = init.lora_B @ init.lora_A
            for rank in ranks:
                A, B = rank[method][name]
                assert torch.allclose(B @ A, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item()), (method, name)


@pytest.mark.parametrize("case,message", [("even_batches", "even_batches=False"),
                                          ("unsharded", "not sharded")])
def test_duplicated_samples_are_refused_on_every_rank(tmp_path, case, message):
    ranks = run(case, tmp_path, 29621 if case == "even_batches" else 29631)
    for rank in ranks:
        assert message in rank.get("error", ""), rank.keys()


def test_the_readme_torchrun_command_runs_the_demo_on_two_ranks():
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "fisher_kernels.demo", "--hidden", "32", "--layers", "1", "--samples", "8"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FILet chose the same directions as one process over all the data" in done.stdout

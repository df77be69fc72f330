"""Two processes on the gloo backend, each with half of the data, give the same initialisation
as one process over all of it."""

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

METHODS = [("lora_da", dict(population_size=100)), ("filet", dict(route="full")), ("lora_ga", {})]


@contextlib.contextmanager
def process_group(rank, world_size, init_file, timeout_s=None):
    """One gloo rank of a test (a deadlock fails after ``timeout_s`` instead of hanging)."""
    torch.set_num_threads(1)
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, **timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _rank_main(rank, world_size, init_file, out_dir):
    from fisher_kernels import compute_initialization
    from tiny_models import make_model, make_samples, pad_batches

    with process_group(rank, world_size, init_file):
        model = make_model("llama")
        shard = pad_batches(make_samples("llama", n=8), 2)[rank::world_size]
        results = {}
        for method, options in METHODS:
            report = compute_initialization(model, shard, method=method, r=3, progress=False, **options)
            results[method] = {n: (i.lora_A, i.lora_B) for n, i in report.layers.items()}
            results[method + ":tokens"] = report.num_tokens
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_ranks_equal_one_process_over_the_union(tmp_path):
    from fisher_kernels import compute_initialization
    from tiny_models import make_model, make_samples, pad_batches

    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = make_model("llama")
    union = pad_batches(make_samples("llama", n=8), 2)
    for method, options in METHODS:
        single = compute_initialization(model, union, method=method, r=3, progress=False, **options)
        assert ranks[0][method + ":tokens"] == single.num_tokens
        for name, init in single.layers.items():
            for rank in ranks:
                A, B = rank[method][name]
                product, expected = B @ A, init.lora_B @ init.lora_A
                # float tolerance: summation order differs, and LoRA-DA solves with a 1e-6-damped factor
                assert torch.allclose(product, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item()), (method, name)
            assert torch.equal(ranks[0][method][name][0], ranks[1][method][name][0])  # every rank writes the same


def _uneven_rank_main(rank, world_size, init_file, out_dir, case):
    from fisher_kernels import compute_initialization
    from tiny_models import make_model, make_samples, pad_batches

    with process_group(rank, world_size, init_file, timeout_s=90):
        model = make_model("llama")
        if rank == 0:
            shard = pad_batches(make_samples("llama", n=6), 2)
        elif case == "empty":
            shard = []
        else:
            def failing():
                yield pad_batches(make_samples("llama", n=2, seed=7), 2)[0]
                raise OSError("read error on shard 1")
            shard = failing()
        results = {}
        for method, options in METHODS + [("filet", {})]:
            key = method + str(options)
            try:
                report = compute_initialization(model, shard, method=method, r=3, progress=False, **options)
                results[key] = {n: (i.lora_A, i.lora_B) for n, i in report.layers.items()}
            except Exception as err:
                results[key] = f"{type(err).__name__}: {err}"
            if case == "fails":
                break
        torch.save(results, os.path.join(out_dir, f"{case}{rank}.pt"))


def test_a_rank_with_an_empty_shard_neither_crashes_nor_changes_the_result(tmp_path):
    from fisher_kernels import compute_initialization
    from tiny_models import make_model, make_samples, pad_batches

    mp.spawn(_uneven_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), "empty"), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"empty{r}.pt") for r in range(2)]
    model = make_model("llama")
    for method, options in METHODS + [("filet", {})]:
        key = method + str(options)
        single = compute_initialization(model, pad_batches(make_samples("llama", n=6), 2), method=method, r=3,
                                        progress=False, **options)
        for rank in ranks:
            assert isinstance(rank[key], dict), rank[key]
            for name, init in single.layers.items():
                A, B = rank[key][name]
                expected = init.lora_B @ init.lora_A
                assert torch.allclose(B @ A, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item()), (key, name)


def test_a_rank_that_fails_tells_the_others_which_raise_instead_of_waiting(tmp_path):
    mp.spawn(_uneven_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), "fails"), nprocs=2, join=True)
    failed, other = (torch.load(tmp_path / f"fails{r}.pt") for r in (1, 0))
    (message,) = failed.values()
    assert "read error on shard 1" in message and message.startswith("OSError")
    (message,) = other.values()
    assert message.startswith("RuntimeError: rank 1 failed during the calibration pass") and "read error" in message


def _split_rank_main(rank, world_size, init_file, out_dir):
    from fisher_kernels import compute_initialization
    from tiny_models import make_model, make_samples, pad_batches

    with process_group(rank, world_size, init_file):
        model = make_model("llama")
        shard = pad_batches(make_samples("llama", n=8), 2)[rank::world_size]
        results = {}
        for method in ("pissa", "filet", "lora_da", "kasa"):
            report = compute_initialization(model, shard if method != "pissa" else None, method=method, r=3,
                                            progress=False)
            results[method] = ({n: (i.lora_A, i.lora_B, i.base_update) for n, i in report.layers.items()},
                               report.split_ranks)
        torch.save(results, os.path.join(out_dir, f"split{rank}.pt"))


def test_the_per_layer_work_is_split_across_ranks_and_every_rank_gets_every_result(tmp_path):
    """Decompositions and selections are dealt over the ranks and broadcast: each rank holds the
    same results as one process (KaSA, whose random stream runs over the layers in order, is not split)."""
    from fisher_kernels import compute_initialization
    from tiny_models import make_model, make_samples, pad_batches

    mp.spawn(_split_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"split{r}.pt") for r in range(2)]
    model = make_model("llama")
    for method in ("pissa", "filet", "lora_da", "kasa"):
        single = compute_initialization(model, pad_batches(make_samples("llama", n=8), 2) if method != "pissa" else None,
                                        method=method, r=3, progress=False)
        assert ranks[0][method][1] == (1 if method == "kasa" else 2)
        for name, init in single.layers.items():
            A0, B0, update0 = ranks[0][method][0][name]
            A1, B1, update1 = ranks[1][method][0][name]
            assert torch.equal(A0, A1) and torch.equal(B0, B1), (method, name)
            expected = init.lora_B @ init.lora_A
            assert torch.allclose(B0 @ A0, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item()), (method, name)
            if init.base_update is not None:
                assert torch.equal(update0[0], update1[0]) and torch.equal(update0[1], update1[1])


def _local_rank_main(rank, world_size, init_file, out_dir):
    from fisher_kernels import compute_initialization
    from tiny_models import make_model, make_samples, pad_batches

    with process_group(rank, world_size, init_file):
        if rank == 0:  # only rank 0 initialises, on its own data: no collective may run
            report = compute_initialization(make_model("llama"), pad_batches(make_samples("llama", n=4), 2),
                                            method="lora_da", r=2, progress=False, distributed=False)
            torch.save({n: i.lora_A for n, i in report.layers.items()}, os.path.join(out_dir, "local.pt"))
        dist.barrier()


def test_distributed_false_runs_a_local_initialisation_inside_a_process_group(tmp_path):
    from fisher_kernels import compute_initialization
    from tiny_models import make_model, make_samples, pad_batches

    mp.spawn(_local_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    local = torch.load(tmp_path / "local.pt")
    single = compute_initialization(make_model("llama"), pad_batches(make_samples("llama", n=4), 2), method="lora_da",
                                    r=2, progress=False)
    for name, init in single.layers.items():
        assert torch.allclose(local[name], init.lora_A, atol=1e-5), name


def _fsdp_rank_main(rank, world_size, init_file, out_dir):
    from torch.distributed.fsdp import fully_shard

    from fisher_kernels import init_lora
    from tiny_models import make_model, make_samples, pad_batches

    with process_group(rank, world_size, init_file):
        model = make_model("llama")
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        try:
            init_lora(model, pad_batches(make_samples("llama", n=4), 2), r=2, progress=False)
            message = "no error"
        except TypeError as err:
            message = str(err)
        torch.save(message, os.path.join(out_dir, f"fsdp{rank}.pt"))


def test_fsdp2_sharded_models_are_refused_with_the_workaround(tmp_path):
    mp.spawn(_fsdp_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        message = torch.load(tmp_path / f"fsdp{rank}.pt")
        assert "is sharded (a DTensor: FSDP2" in message and "init_lora before fully_shard" in message, message

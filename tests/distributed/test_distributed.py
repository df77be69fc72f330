"""Two processes on the gloo backend, each with half of the data, give the same initialisation
as one process over all of it."""

import contextlib
import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the shared helpers

METHODS = [("lora_da", dict(population_size=100)), ("filet", dict(route="full")), ("lora_ga", {})]


@contextlib.contextmanager
def process_group(rank, world_size, init_file, timeout_s=None):
    """One gloo rank of a test (a deadlock fails after ``timeout_s`` instead of hanging)."""
    torch.set_num_threads(1)
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, **timeout)
    try:
        yield
        dist.barrier()
    finally:
        _wait_for_every_rank(f"{init_file}.done", rank, world_size)
        dist.destroy_process_group()


def _wait_for_every_rank(prefix: str, rank: int, world_size: int, timeout_s: float = 30.0) -> None:
    """Close the process group only once every rank is done with it (through files, not gloo): a
    rank that closes its sockets while another still reads from them resets the connection, and
    gloo aborts the reader (SIGABRT, "terminate called without an active exception")."""
    import time

    open(f"{prefix}{rank}", "w").close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(os.path.exists(f"{prefix}{r}") for r in range(world_size)):
        time.sleep(0.05)


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


FSDP_CASES = [("llama", "filet", {}), ("llama", "lora_da", dict(population_size=100)), ("llama", "lora_ga", {}),
              ("llama", "pissa", {}), ("llama", "kasa", {}), ("gpt2", "filet", {}), ("llama", "filet-existing", {})]


def _sharded(model):
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = base.model.layers if hasattr(base, "model") else base.transformer.h
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _lora_modules(model):
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _fsdp_rank_main(rank, world_size, init_file, out_dir):
    from peft import LoraConfig, get_peft_model

    from fisher_kernels import init_lora, save_residual_model
    from fisher_kernels.distributed.sharded import whole
    from tiny_models import make_model, make_samples, pad_batches

    with process_group(rank, world_size, init_file, timeout_s=120):
        results = {}
        for kind, method, options in FSDP_CASES:
            batches = pad_batches(make_samples(kind, n=8), 2)
            model = make_model(kind)
            if method == "filet-existing":  # TRL / accelerate: the PeftModel is made first, then sharded
                model = _sharded(get_peft_model(model, LoraConfig(r=3, target_modules=["q_proj", "down_proj"])))
                peft_model = init_lora(model, batches[rank::world_size], progress=False)
            else:
                peft_model = init_lora(_sharded(model), batches[rank::world_size], method=method, r=3,
                                       progress=False, **options)
            layers = _lora_modules(peft_model)
            case = {"split_ranks": peft_model.fisher_kernels_report.split_ranks}
            for name, layer in layers.items():
                case[name] = (whole(layer.lora_A["default"].weight), whole(layer.lora_B["default"].weight),
                              whole(layer.base_layer.weight))
            with torch.no_grad():
                case["logits"] = peft_model(**batches[0]).logits
            if method == "filet":  # the adapter saves as usual; the sharded residual base is refused with the recipe
                peft_model.save_pretrained(os.path.join(out_dir, f"adapter{rank}-{kind}"))
                try:
                    save_residual_model(peft_model, os.path.join(out_dir, "a"), os.path.join(out_dir, "b"))
                except TypeError as err:
                    case["save_residual"] = str(err)
            peft_model(**batches[rank]).loss.backward()  # each rank its own batch (eval mode: no dropout)
            case["grads"] = {name: whole(layer.lora_A["default"].weight.grad) for name, layer in layers.items()}
            results[kind, method] = case
        torch.save(results, os.path.join(out_dir, f"fsdp{rank}.pt"))


def test_fsdp2_sharded_models_get_the_adapters_of_one_process_with_the_whole_model(tmp_path):
    """FSDP2 (fully_shard) on two gloo ranks, each with half of the data: the same adapters, residual
    base weights and step-0 outputs as one process with the whole model and all of the data, for
    split (FILet, LoRA-DA, LoRA-GA, PiSSA), unsplit (KaSA) and GPT-2 Conv1D layers, and for an
    adapter of a PeftModel sharded before initialisation; the adapters' gradients are averaged."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from fisher_kernels import init_lora
    from tiny_models import make_model, make_samples, pad_batches

    mp.spawn(_fsdp_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"fsdp{r}.pt") for r in range(2)]
    for kind, method, options in FSDP_CASES:
        batches = pad_batches(make_samples(kind, n=8), 2)
        if method == "filet-existing":
            single = init_lora(get_peft_model(make_model(kind), LoraConfig(r=3, target_modules=["q_proj", "down_proj"])),
                               batches, progress=False)
        else:
            single = init_lora(make_model(kind), batches, method=method, r=3, progress=False, **options)
        with torch.no_grad():
            logits = single(**batches[0]).logits
        for index in (0, 1):  # the mean of the two ranks' losses, as FSDP averages gradients
            (single(**batches[index]).loss / 2).backward()
        layers = _lora_modules(single)
        assert layers and ranks[0][kind, method].keys() - {"split_ranks", "logits", "grads", "save_residual"} == layers.keys()
        if method == "filet":
            assert "get_model_state_dict" in ranks[0][kind, method]["save_residual"]
            saved = load_file(tmp_path / f"adapter0-{kind}" / "adapter_model.safetensors")
            assert len(saved) == 2 * len(layers)
            for key, value in saved.items():  # the adapter saved from rank 0 holds every layer's whole factors
                layer = layers[key.removeprefix("base_model.model.").split(".lora_")[0]]
                expected = (layer.lora_A if ".lora_A." in key else layer.lora_B)["default"].weight.detach()
                assert value.shape == expected.shape, key
        assert ranks[0][kind, method]["split_ranks"] == (1 if method == "kasa" else 2)
        for rank in ranks:
            case = rank[kind, method]
            for name, layer in layers.items():
                A, B, W = case[name]
                # a singular vector's sign is arbitrary: each component (row of A, column of B) is aligned first
                sign = torch.where((A * layer.lora_A["default"].weight).sum(1) < 0, -1.0, 1.0)
                for got, expected in ((A * sign[:, None], layer.lora_A["default"].weight),
                                      (B * sign, layer.lora_B["default"].weight), (W, layer.base_layer.weight),
                                      (case["grads"][name] * sign[:, None], layer.lora_A["default"].weight.grad)):
                    expected = expected.detach()
                    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item()), (
                        kind, method, name, (got - expected).abs().max())
            assert torch.allclose(case["logits"], logits, atol=1e-4), (kind, method)
        for name in layers:  # every rank holds the same adapters
            assert torch.equal(ranks[0][kind, method][name][0], ranks[1][kind, method][name][0])


def _fsdp_uneven_rank_main(rank, world_size, init_file, out_dir, case):
    from fisher_kernels import init_lora
    from tiny_models import make_model, make_samples, pad_batches

    samples = make_samples("llama", n=8)
    with process_group(rank, world_size, init_file, timeout_s=60):
        if case == "refused":  # a tensor-parallel DTensor outside FSDP, and HSDP's 2-D mesh
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor import Shard, distribute_tensor

            messages = []
            tensor_parallel = make_model("llama")
            layer = tensor_parallel.model.layers[0].mlp.down_proj
            layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), init_device_mesh("cpu", (2,)),
                                                                [Shard(1)]))
            hsdp = fully_shard(make_model("llama"), mesh=init_device_mesh("cpu", (1, 2), mesh_dim_names=("r", "s")))
            for model in (tensor_parallel, hsdp):
                try:
                    init_lora(model, pad_batches(samples, 2), r=3, progress=False)
                    messages.append("no error")
                except TypeError as err:
                    messages.append(str(err))
            torch.save(messages, os.path.join(out_dir, f"{case}{rank}.pt"))
            return
        model = _sharded(make_model("llama"))
        if case in ("forward_hook", "backward_hook"):  # a statistics kernel fails on rank 1 only
            from fisher_kernels.ops import get_ops

            ops = get_ops("torch")
            original = ops.masked_projected_energy_

            def failing(*args):
                if rank == 1 and torch.is_grad_enabled() == (case == "forward_hook"):  # backward: grad mode off
                    raise RuntimeError(f"kernel fault in the {case}")
                return original(*args)

            ops.masked_projected_energy_ = failing
            try:
                init_lora(model, pad_batches(samples, 2)[rank::2], r=3, progress=False, backend="torch")
                outcome = "no error"
            except RuntimeError as err:
                outcome = str(err)
            torch.save(outcome, os.path.join(out_dir, f"{case}{rank}.pt"))
            return
        if case == "fault":  # the last stage fails after the residual went into the shards: all is put back
            import fisher_kernels.pipeline.write as write
            from fisher_kernels.distributed.sharded import whole

            before = {name: whole(p).clone() for name, p in model.named_parameters()}
            requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}

            def injected(*args, **kwargs):
                raise RuntimeError("injected fault")

            write.average_gradients_over_ranks = injected
            try:
                init_lora(model, pad_batches(samples, 2)[rank::2], r=3, progress=False)
                outcome = "no error"
            except RuntimeError as err:
                after = {name: whole(p) for name, p in model.named_parameters()}
                outcome = {"error": str(err), "names": before.keys() == after.keys(),
                           "weights": all(torch.allclose(after[n], before[n], atol=1e-6) for n in before),
                           "requires_grad": requires_grad == {n: p.requires_grad for n, p in model.named_parameters()},
                           "unwrapped": not any("lora" in name for name, _ in model.named_modules())}
            torch.save(outcome, os.path.join(out_dir, f"{case}{rank}.pt"))
            return
        if case == "uneven":  # 3 batches of 2 sequences (2 micro-batches each) against 2 batches of 1
            shard = pad_batches(samples[:6], 2) if rank == 0 else pad_batches(samples[6:], 1)
        elif case == "empty":
            shard = pad_batches(samples, 2) if rank == 0 else []
        else:
            def failing():
                yield pad_batches(samples[6:], 1)[0]
                raise OSError("read error on shard 1")
            shard = pad_batches(samples[:6], 2) if rank == 0 else failing()
        try:
            peft_model = init_lora(model, shard, r=3, progress=False, micro_batch_size=1)
            from fisher_kernels.distributed.sharded import whole
            outcome = {name: whole(m.weight) for name, m in peft_model.named_modules()
                       if name.endswith("lora_A.default")}
        except Exception as err:
            outcome = f"{type(err).__name__}: {err}"
        torch.save(outcome, os.path.join(out_dir, f"{case}{rank}.pt"))


def test_fsdp2_ranks_with_unequal_batches_stay_in_step(tmp_path):
    """FSDP gathers weights in every forward and backward, so every rank must run each one: ranks
    with fewer batches or micro-batches repeat one with the hooks paused, and the statistics equal
    one process over the union of the shards."""
    from fisher_kernels import init_lora
    from tiny_models import make_model, make_samples, pad_batches

    mp.spawn(_fsdp_uneven_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), "uneven"), nprocs=2, join=True)
    samples = make_samples("llama", n=8)
    single = init_lora(make_model("llama"), pad_batches(samples[:6], 2) + pad_batches(samples[6:], 1), r=3,
                       progress=False, micro_batch_size=1)
    expected = {name: m.weight.detach() for name, m in single.named_modules() if name.endswith("lora_A.default")}
    for rank in range(2):
        got = torch.load(tmp_path / f"uneven{rank}.pt")
        assert isinstance(got, dict), got
        assert got.keys() == expected.keys()
        for name, A in expected.items():
            sign = torch.where((got[name] * A).sum(1) < 0, -1.0, 1.0)[:, None]
            assert torch.allclose(got[name] * sign, A, atol=1e-4 * A.abs().max().item()), name


@pytest.mark.parametrize("case", ["empty", "failing", "refused", "fault", "forward_hook", "backward_hook"])
def test_fsdp2_faults_and_refusals(tmp_path, case):
    """A rank without data, or failing during the pass (its loader, or a hook inside a forward or a
    backward), makes every rank raise; a failure after the residual was written leaves the sharded
    model as it was; other shardings are refused."""
    mp.spawn(_fsdp_uneven_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), case), nprocs=2, join=True)
    messages = [torch.load(tmp_path / f"{case}{rank}.pt") for rank in range(2)]
    if case.endswith("_hook"):  # raised inside a forward / backward: kept until the ranks exchange errors
        assert f"kernel fault in the {case}" in messages[1], messages[1]
        assert "rank 1 failed" in messages[0] and f"kernel fault in the {case}" in messages[0], messages[0]
    elif case == "fault":
        for outcome in messages:
            assert outcome == {"error": "injected fault", "names": True, "weights": True, "requires_grad": True,
                               "unwrapped": True}, outcome
    elif case == "refused":
        for tensor_parallel, hsdp in messages:
            assert "'model.layers.0.mlp.down_proj.weight' is a DTensor outside FSDP2" in tensor_parallel, tensor_parallel
            assert "over a 2-D mesh" in hsdp and "not HSDP" in hsdp, hsdp
    elif case == "empty":
        for message in messages:
            assert "rank 1 has no calibration batch" in message and "FSDP" in message, message
    else:
        assert "OSError" in messages[1] and "read error on shard 1" in messages[1], messages[1]
        assert "rank 1 failed during the calibration pass" in messages[0] and "read error" in messages[0], messages[0]

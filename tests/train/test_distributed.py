"""Data-parallel training on CPUs (gloo, 2 processes, tiny models): codebooks identical on every rank and
equal to one process on the concatenated batch, the same training as one process with the same global
batch, resume after a rank is killed, uneven data, and collectives that fail by name instead of hanging."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import BertModel

from keydistill.bottleneck import BottleneckConfig, DiscreteKeyBottleneck
from keydistill.train.config import RunError
from keydistill.train.distributed import CodebookSync, Dist, all_reduce_sum_, chunk
from tests.helpers.train_fixtures import REPO, tiny_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---- one EMA step, in processes spawned here ---------------------------------------------------------------


def _bottleneck(seed: int) -> DiscreteKeyBottleneck:
    torch.manual_seed(seed)
    # a high dead-key threshold makes this step restart keys too
    return DiscreteKeyBottleneck(
        12, BottleneckConfig(num_heads=3, num_keys=7, pooling="mean", decay=0.1, dead_key_threshold=0.5)
    ).train()


def _batches(seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.randn(3, 5, 12, generator=g), (torch.rand(3, 5, generator=g) < 0.8).long()
    b = torch.randn(2, 4, 12, generator=g), (torch.rand(2, 4, generator=g) < 0.8).long()
    return a, b


def _ema_rank(rank: int, world: int, init_file: str, seed: int, empty_rank1: bool, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    bn = _bottleneck(seed)
    bn.sync = CodebookSync(Dist(rank, world))
    a, b = _batches(seed)
    hidden, mask = a if rank == 0 else (b[0][:0], b[1][:0]) if empty_rank1 else b
    torch.manual_seed(seed + 2)  # rank 0 draws the restarts, as the single process does
    bn(hidden, mask)
    torch.save({k: v.clone() for k, v in bn.state_dict().items()}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("empty_rank1", [False, True])
def test_one_ema_step_on_two_ranks_equals_one_process_on_both_batches(tmp_path, seed, empty_rank1):
    out = str(tmp_path / "state")
    mp.start_processes(
        _ema_rank, args=(2, str(tmp_path / "init"), seed, empty_rank1, out), nprocs=2, start_method="spawn"
    )
    rank0, rank1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    for name in ("keys", "cluster_size", "embed_sum", "values"):
        assert torch.equal(rank0[name], rank1[name]), name  # identical on every rank
    bn = _bottleneck(seed)  # one process, one batch: A and B padded to a common length
    (ha, ma), (hb, mb) = _batches(seed)
    if empty_rank1:
        hidden, mask = ha, ma
    else:
        hb = torch.cat([hb, torch.zeros(2, 1, 12)], 1)
        hidden, mask = torch.cat([ha, hb]), torch.cat([ma, torch.cat([mb, torch.zeros(2, 1, dtype=torch.long)], 1)])
    torch.manual_seed(seed + 2)
    bn(hidden, mask)
    for name in ("keys", "cluster_size", "embed_sum"):
        torch.testing.assert_close(rank0[name], bn.state_dict()[name], rtol=1e-6, atol=1e-6, msg=name)
    # dead keys were restarted, on a vector of either batch: some keys now equal a query exactly
    queries = hidden[mask.bool()].view(-1, 3, 4)  # split projection: heads are slices of the vector
    restarted = (rank0["keys"].unsqueeze(1) == queries.transpose(0, 1).unsqueeze(2)).all(-1).any(1)  # [H, K]
    assert restarted.any()


def _stuck_rank(rank: int, init_file: str, out: str):
    from datetime import timedelta

    from keydistill.train import distributed

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=3)
    )
    if rank == 0:
        try:
            all_reduce_sum_(torch.ones(3), "codebook statistics")
        except RunError as e:
            with open(out, "w") as f:
                f.write(str(e))
        distributed.shutdown(2)  # as keydistill.train's main after the error: the CLI's status, at once
        os._exit(0)  # not reached unless shutdown returned
    time.sleep(8)  # rank 1 is stuck: never joins the collective
    os._exit(0)  # gloo's teardown of the timed-out group could abort this rank (not under test here)


def test_a_stuck_rank_is_an_error_naming_the_collective(tmp_path):
    """The waiting rank's error names the collective, and the process leaves with the job's exit status: a
    failed group is not torn down (gloo's teardown after a timeout can abort the process with SIGABRT)."""
    out = tmp_path / "error.txt"
    started = time.time()
    with pytest.raises(mp.ProcessExitedException) as exited:
        mp.start_processes(_stuck_rank, args=(str(tmp_path / "init"), str(out)), nprocs=2, start_method="spawn")
    assert exited.value.error_index == 0 and exited.value.exit_code == 2
    message = out.read_text()
    assert "rank 0: the collective 'codebook statistics' failed" in message and "--dist-timeout" in message
    assert time.time() - started < 120  # the 3 s timeout, plus starting two Python processes


def _torchrun_env(monkeypatch, gpus: int, rank: int = 1, world: int = 2):
    """This process as rank `rank` of torchrun's `world` on one node with `gpus` CUDA devices (none needed)."""
    from keydistill.train import distributed

    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", rank), ("LOCAL_WORLD_SIZE", world)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)  # restored after the test, also once set
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    groups = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, timeout: groups.append(backend))
    return distributed, groups


def test_more_ranks_than_gpus_is_a_one_line_error(monkeypatch):
    """Two ranks on a one-GPU node: nccl cannot share it; every rank says so (not "invalid device ordinal")."""
    distributed, groups = _torchrun_env(monkeypatch, gpus=1)
    for setting in ("auto", "cuda"):
        with pytest.raises(RunError, match=r"2 ranks on this node but 1 CUDA device\(s\).*--device cpu"):
            distributed.init(setting, 60.0)
    assert groups == []
    assert distributed.init("cpu", 60.0) == (Dist(1, 2, 1), torch.device("cpu")) and groups == ["gloo"]


def test_gpu_ranks_use_nccl_with_blocking_waits(monkeypatch):
    """nccl, one GPU per rank, and blocking waits: a timed-out collective then raises (and is named) instead
    of nccl's watchdog killing the process."""
    distributed, groups = _torchrun_env(monkeypatch, gpus=2)
    assert distributed.init("auto", 60.0) == (Dist(1, 2, 1), torch.device("cuda", 1))
    assert groups == ["nccl"] and os.environ["TORCH_NCCL_BLOCKING_WAIT"] == "1"


def test_data_parallel_bottlenecks_take_dense_value_gradients():
    """DDP's reducer takes dense gradients only: under torchrun sparse_values falls back to the dense path."""
    from keydistill.train.distributed import attach_codebook_sync

    model = torch.nn.Sequential(
        DiscreteKeyBottleneck(12, BottleneckConfig(num_heads=3, num_keys=7, sparse_values=True))
    )
    hidden = torch.randn(4, 1, 12)
    model[0](hidden).pooled.sum().backward()
    assert model[0].values.grad.is_sparse  # alone: row-sparse
    model[0].values.grad = None
    attach_codebook_sync(model, Dist(0, 2))
    assert model[0].sync is not None and not model[0].sparse_gradients
    model[0](hidden).pooled.sum().backward()
    assert not model[0].values.grad.is_sparse
    attach_codebook_sync(model, Dist())  # alone again
    assert model[0].sync is None and model[0].sparse_gradients


def test_reduced_dense_value_gradients_step_the_rows_one_process_steps(seed):
    """DDP reduces the value table's gradient dense; before the step it becomes the row-sparse gradient one
    process has (same rows, same values), so LazyAdamW leaves unselected rows alone as it does alone. The soft
    assignment without straight-through mixes every row: that gradient stays dense, as alone."""
    from keydistill.train.distributed import attach_codebook_sync, row_sparse_value_gradients_

    model = torch.nn.Sequential(
        DiscreteKeyBottleneck(12, BottleneckConfig(num_heads=3, num_keys=9, sparse_values=True))
    )
    model[0].freeze_keys()
    hidden = torch.randn(5, 1, 12)
    model[0](hidden).pooled.pow(2).sum().backward()
    alone = model[0].values.grad.coalesce()
    model[0].values.grad = None
    attach_codebook_sync(model, Dist(0, 2))
    model[0](hidden).pooled.pow(2).sum().backward()
    row_sparse_value_gradients_(model)
    reduced = model[0].values.grad
    assert reduced.is_sparse and reduced.is_coalesced() and alone._nnz() < 3 * 9  # some rows unselected
    assert torch.equal(reduced.indices(), alone.indices())
    torch.testing.assert_close(reduced.values(), alone.values())
    soft = torch.nn.Sequential(
        DiscreteKeyBottleneck(12, BottleneckConfig(num_heads=3, num_keys=9, sparse_values=True, soft_temperature=1.0))
    )
    attach_codebook_sync(soft, Dist(0, 2))
    soft[0](hidden).pooled.pow(2).sum().backward()
    row_sparse_value_gradients_(soft)
    assert not soft[0].values.grad.is_sparse


def test_chunks_cover_a_global_batch_once():
    batch = list(range(7))
    parts = [chunk(batch, Dist(r, 3)) for r in range(3)]
    assert sum(parts, []) == batch and [len(p) for p in parts] == [2, 2, 3]
    assert [chunk([5], Dist(r, 2)) for r in range(2)] == [[], [5]]


def test_gathered_values_land_where_asked(monkeypatch):
    """Other ranks' evaluation outputs come back through the CPU: they go to the run's device by default, and
    stay on the CPU when asked (the teacher's layer-output cache, up to 2 GiB, must not fill an accelerator)."""
    from types import SimpleNamespace

    from keydistill.train import distributed, features

    shares = [{0: torch.zeros(2)}, {1: torch.ones(3)}]
    monkeypatch.setattr(distributed, "all_gather_objects", lambda part, name: shares)
    run = SimpleNamespace(ranks=Dist(0, 2), device=torch.device("meta"))  # meta: an accelerator stand-in
    assert [v.device.type for v in features.gathered(run, shares[0], 2, "test")] == ["meta", "meta"]
    kept = features.gathered(run, shares[0], 2, "test", store=torch.device("cpu"))
    assert [v.device.type for v in kept] == ["cpu", "cpu"] and [len(v) for v in kept] == [2, 3]


# ---- whole runs under torchrun ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_dropout(tiny, tmp_path_factory):
    """The tiny BERT without dropout: 1 and 2 processes then compute the same thing."""
    folder = tmp_path_factory.mktemp("no_dropout")
    model = BertModel.from_pretrained(tiny / "model", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(folder)
    for f in (tiny / "model").iterdir():
        if f.name.startswith(("vocab", "tokenizer", "special")):
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def train_args(tiny, model, out, batch_size, *extra):
    """Per-rank batch sizes: training batch_size, evaluation (and EMA key passes) 2 * batch_size."""
    # on the CPUs also where a GPU is: the tests start more ranks than a one-GPU machine has GPUs
    args = tiny_args(tiny, out, "--teacher", str(model), "--checkpoint-every", "2", "--device", "cpu", *extra)
    args[args.index("--batch-size") + 1] = str(batch_size)
    args[args.index("--eval-batch-size") + 1] = str(2 * batch_size)
    return args


def torchrun(args, nproc=2, timeout=240, wait=True):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "keydistill.train",
        *args,
    ]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def alone(args, timeout=240):
    result = subprocess.run(
        [sys.executable, "-m", "keydistill.train", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def teacher_without_dropout(tiny, no_dropout, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher_without_dropout")
    alone(train_args(tiny, no_dropout, out, 8, "--epochs", "1"))
    return out / "teacher"


# Second case: the augmented copies and the teacher's layer outputs are computed in shares and gathered, and the
# student is validated as its weight average (identical on every rank). Its weights are compared to one Adam
# step (lr 1e-3): there, near-zero gradients (attention keys, rare positions) take lr-sized steps of either sign
# under rounding; a wrong gather would move them by many steps.
@pytest.mark.parametrize(
    "extra, steps, weight_atol",
    [
        ([], 14, 1e-5),
        (
            [
                "--hidden-weight",
                "1",
                "--attention-weight",
                "1",
                "--value-relation-weight",
                "1",
                "--augment",
                "1",
                "--weight-average",
                "0.5",
            ],
            28,
            1e-3,
        ),
    ],
)
def test_two_ranks_distil_as_one_process_with_the_same_global_batch(
    tiny, teacher_without_dropout, tmp_path, extra, steps, weight_atol
):
    # The soft assignment keeps the loss continuous in the student's outputs: under the hard lookup, rounding
    # differences from the order of the gradient sums can flip a rare near-tie lookup and change that
    # example's loss by a step, which no tolerance for reduction order should have to absorb.
    args = ["--teacher-checkpoint", str(teacher_without_dropout), "--soft-temperature", "1.0", "--epochs", "2", *extra]
    two = torchrun(train_args(tiny, teacher_without_dropout, tmp_path / "two", 4, *args))
    alone(train_args(tiny, teacher_without_dropout, tmp_path / "one", 8, *args))
    assert "global batch = 4 per rank x 2 ranks x 1 accumulation = 8 examples per step" in two.stdout
    one_m, two_m = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    one_curve, two_curve = one_m["curves"]["student"], two_m["curves"]["student"]
    assert [s for s, _ in one_curve] == [s for s, _ in two_curve] and len(one_curve) == steps  # step for step
    # float32 sums in another order, compounded over 28 steps: a few 1e-6 (a wrong gather would be far off)
    torch.testing.assert_close(
        torch.tensor([v for _, v in two_curve]), torch.tensor([v for _, v in one_curve]), rtol=5e-5, atol=1e-5
    )
    for one_e, two_e in zip(one_m["history"], two_m["history"]):
        # epoch means of losses near 1e-3: reduction order moves them by a few 1e-7
        assert two_e["loss"] == pytest.approx(one_e["loss"], rel=1e-5, abs=1e-6) and two_e["val"] == one_e["val"]
    # the kept weights (the average's, with --weight-average): the finished run keeps no other checkpoint
    final = [load_file(str(tmp_path / d / "checkpoints" / "student.best.safetensors")) for d in ("one", "two")]
    weights = [k for k in final[0] if k.startswith("model.")]
    assert len(weights) > 40  # every tensor of the 2-layer student
    for name in weights:
        torch.testing.assert_close(
            final[1][name], final[0][name], rtol=1e-4, atol=weight_atol, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_kill_9_of_one_rank_then_resume_on_two_ranks_matches_an_uninterrupted_run(tiny, tmp_path):
    args = ["--epochs", "3"]
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    torchrun(train_args(tiny, tiny / "model", whole_dir, 4, *args))
    proc = torchrun(train_args(tiny, tiny / "model", killed_dir, 4, *args), wait=False)
    latest = killed_dir / "checkpoints" / "student.latest.safetensors"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "torchrun's workers must still be running"
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies mid-epoch; torchrun then stops the other
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (killed_dir / "metrics.json").exists()
    torchrun(train_args(tiny, tiny / "model", killed_dir, 4, *args, "--resume"))
    whole, resumed = (json.loads((d / "metrics.json").read_text()) for d in (whole_dir, killed_dir))
    for model in ("teacher", "student"):
        assert resumed[model] == whole[model]
    assert [s for s, _ in resumed["curves"]["student"]] == [s for s, _ in whole["curves"]["student"]]
    assert [v for _, v in resumed["curves"]["student"]] == pytest.approx([v for _, v in whole["curves"]["student"]])


def test_uneven_data_with_an_empty_last_chunk_finishes(tiny, tmp_path):
    # 49 training rows: the last global batch of 8 holds one example, so rank 0's chunk of it is empty
    result = torchrun(
        train_args(tiny, tiny / "model", tmp_path, 4, "--max-train-samples", "49", "--student-ema", "--epochs", "1"),
        timeout=240,
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rows"]["train"] == 49
    assert all(e["examples_per_s"] > 0 for e in metrics["history"])
    assert "Traceback" not in result.stdout + result.stderr

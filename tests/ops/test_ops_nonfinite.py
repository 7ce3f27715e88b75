"""kd_loss and kd_loss_linear on non-finite logits, and independent oracles for kd_loss and ema_update_.

One semantics on every backend (documented in keydistill.ops.kd_loss): a -inf logit is probability 0; terms
of teacher probability 0 contribute 0; a student -inf under teacher mass gives +inf (with the finite gradient
T * (p_s - p_t)); a teacher row that is all -inf gives loss 0 and gradient 0; NaN or +inf in a row, or a
student row that is all -inf, makes the row's loss and gradient NaN; masked-out rows are 0 whatever they hold.

Two oracles: keydistill.ops.reference in float64 (which implements these rules), and, independently of this
project's code, T^2 * F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True) in float64, which agrees
wherever it is defined (with log_target, kl_div gives NaN at a teacher -inf, 0 * -inf: the oracle sets those
terms to 0, the limit of p log p; it is undefined on teacher rows that are all -inf, which it never sees).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from keydistill import ops
from keydistill.ops import reference
from tests.helpers.backends import backend_device

# The Triton interpreter evaluates masked-off lanes too, where numpy reports inf - inf and log(0): expected here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:divide by zero encountered:RuntimeWarning"
)
INF = float("inf")
EPS32 = torch.finfo(torch.float32).eps


# ---- helpers ------------------------------------------------------------------------------------------------


def loss_and_grad(fn, student, upstream=None):
    """(loss, d(sum(loss * upstream))/d student) of fn(student)."""
    s = student.detach().clone().requires_grad_()
    loss = fn(s)
    upstream = torch.ones_like(loss) if upstream is None else upstream
    (loss * upstream).sum().backward()
    return loss.detach(), s.grad, upstream


def assert_same_nonfinite(got, want, atol, what):
    """NaN, +inf and -inf at the same places; the finite entries within atol (+ 1e-5 relative) of want."""
    got, want = got.double().cpu(), want.double().cpu()
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(test(got), test(want)), (
            f"{what}: {name} at {test(got).nonzero().tolist()}, expected at {test(want).nonzero().tolist()}"
        )
    finite = torch.isfinite(want)
    if finite.any():
        err = (got[finite] - want[finite]).abs()
        bound = atol + 1e-5 * want[finite].abs()
        assert (err <= bound).all(), f"{what}: max error {err.max():.3g} (bound {bound.max():.3g})"


def tolerances(student, teacher, temperature, upstream):
    """(loss, gradient) absolute tolerances of fp32 maths on these logits: log-probabilities carry about eps
    times |logit| / T of error, the loss T^2 times that, each gradient entry T * p * that."""
    finite = [t[torch.isfinite(t)].abs().max().item() for t in (student, teacher) if torch.isfinite(t).any()]
    scale = max(finite + [1.0])
    return 64 * EPS32 * scale * temperature, 16 * EPS32 * scale * upstream.max().item()


def check_against_float64(backend, student, teacher, temperature, mask, reduction):
    """Loss and gradient of `backend` against reference.kd_loss in float64, non-finite values included."""
    upstream = None
    if reduction == "none":
        upstream = torch.rand(student.shape[0], device=student.device) + 0.5
    loss, grad, upstream = loss_and_grad(
        lambda s: ops.kd_loss(s, teacher, temperature=temperature, mask=mask, reduction=reduction, backend=backend),
        student,
        upstream,
    )
    want, want_grad, _ = loss_and_grad(
        lambda s: reference.kd_loss(s, teacher.double(), temperature=temperature, mask=mask, reduction=reduction),
        student.double(),
        upstream.double(),
    )
    loss_tol, grad_tol = tolerances(student, teacher, temperature, upstream)
    assert_same_nonfinite(loss, want, loss_tol, f"{backend} loss")
    assert_same_nonfinite(grad, want_grad, grad_tol, f"{backend} gradient")
    return loss, grad


def inf_logits(n, v, device, student_inf_under_teacher_mass=False):
    """Random logits with -inf in random places of both: the teacher's in ~30% of entries, the student's in
    about half of those (both -inf) and, if asked, in one random entry per row where the teacher is finite.
    Every teacher row keeps at least one finite logit."""
    student, teacher = 3 * torch.randn(n, v, device=device), 3 * torch.randn(n, v, device=device)
    teacher_inf = torch.rand(n, v, device=device) < 0.3
    teacher_inf[torch.arange(n, device=device), torch.randint(0, v, (n,), device=device)] = False
    teacher[teacher_inf] = -INF
    student[teacher_inf & (torch.rand(n, v, device=device) < 0.5)] = -INF
    if student_inf_under_teacher_mass:
        finite_cols = torch.multinomial((~teacher_inf).float(), 1).squeeze(1)
        student[torch.arange(n, device=device), finite_cols] = -INF
    return student, teacher


def kl_div_oracle(student, teacher, temperature, mask, reduction):
    """T^2 * F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True), per row, masked and reduced."""
    log_p_s = F.log_softmax(student / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher / temperature, dim=-1)
    terms = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none")
    # kl_div gives exp(-inf) * (-inf - x) = NaN at a teacher -inf: the term is p log p -> 0 there.
    terms = torch.where(torch.isneginf(log_p_t), torch.zeros_like(terms), terms)
    rows = temperature**2 * terms.sum(-1)
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (mask.sum().clamp_min(1) if mask is not None else rows.shape[0])


# ---- the issue's example ------------------------------------------------------------------------------------


def test_issue_example_gives_one_finite_value_on_every_backend(backend):
    """t[:, 0] = -inf (a class the teacher never predicts): the same finite loss on every backend, the
    float64 oracle's."""
    device = backend_device(backend)
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    t[:, 0] = -INF
    got = ops.kd_loss(s.to(device), t.to(device), temperature=2.0, backend=backend)
    want = kl_div_oracle(s.double(), t.double(), 2.0, None, "batchmean")
    assert math.isfinite(got.item())
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()) + 1e-6


# ---- -inf, NaN and +inf against float64, on every backend ----------------------------------------------------


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n,v", [(23, 517), (7, 3)])
def test_minus_inf_logits_match_float64(backend, seed, reduction, masked, n, v):
    """-inf in random places of both arguments (finite losses), plus a teacher row that is all -inf, whose
    student holds a NaN and a +inf: that row is 0 (no distribution to match), loss and gradient."""
    device = backend_device(backend)
    student, teacher = inf_logits(n, v, device)
    teacher[2] = -INF
    student[2, 0], student[2, -1] = float("nan"), INF
    mask = (torch.rand(n, device=device) < 0.7) if masked else None
    for temperature in (0.5, 2.0):
        loss, grad = check_against_float64(backend, student, teacher, temperature, mask, reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert (grad[2] == 0).all() and (reduction != "none" or loss[2] == 0)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_student_minus_inf_under_teacher_mass_is_infinite_with_a_finite_gradient(backend, seed, reduction):
    device = backend_device(backend)
    student, teacher = inf_logits(19, 517, device, student_inf_under_teacher_mass=True)
    student[::2] = student[::2].nan_to_num(neginf=-5.0)  # even rows: only where the teacher is -inf too: finite
    loss, grad = check_against_float64(backend, student, teacher, 1.5, None, reduction)
    assert torch.isfinite(grad).all()
    if reduction == "none":
        assert torch.isfinite(loss[::2]).all() and torch.isposinf(loss[1::2]).all()
    else:
        assert torch.isposinf(loss)


@pytest.mark.parametrize("masked", [False, True])
def test_nan_and_plus_inf_make_their_rows_nan(backend, seed, masked):
    """NaN in a student row, NaN in a teacher row, +inf in either, a student row all -inf: those rows' losses
    and whole gradient rows are NaN, every other row is exact; masked out, they are 0 like any excluded row."""
    device = backend_device(backend)
    n, v = 11, 517
    student, teacher = inf_logits(n, v, device)
    student[1, 5] = float("nan")
    teacher[3, 7] = float("nan")
    student[5, 9] = INF
    teacher[7, 0] = INF
    student[9] = -INF
    bad = torch.zeros(n, dtype=torch.bool, device=device)
    bad[[1, 3, 5, 7, 9]] = True
    mask = ~bad if masked else None
    loss, grad = check_against_float64(backend, student, teacher, 2.0, mask, "none")
    if masked:
        assert (loss[bad] == 0).all() and (grad[bad] == 0).all() and torch.isfinite(loss).all()
    else:
        assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all()
        assert torch.isfinite(loss[~bad]).all() and torch.isfinite(grad[~bad]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_minus_inf_in_low_precision(backend, seed, dtype):
    device = backend_device(backend)
    student, teacher = inf_logits(13, 517, device)
    student, teacher = student.to(dtype), teacher.to(dtype)
    loss, grad, _ = loss_and_grad(
        lambda s: ops.kd_loss(s, teacher, temperature=2.0, reduction="none", backend=backend), student
    )
    want, want_grad, _ = loss_and_grad(
        lambda s: reference.kd_loss(s, teacher.double(), temperature=2.0, reduction="none"), student.double()
    )
    assert grad.dtype == dtype
    assert_same_nonfinite(loss, want, 1e-4 * want.abs().max().item() + 1e-6, "loss")
    assert_same_nonfinite(grad, want_grad, 2 * torch.finfo(dtype).eps * 2.0, "gradient")


def test_minus_inf_in_kd_loss_linear(backend, seed):
    """The usual source of -inf in vocabulary distillation: padded classes with a bias of -inf in both heads.
    Losses and the gradients w.r.t. hidden states, weight and bias stay finite and exact."""
    device = backend_device(backend)
    n, h, vocab = 21, 9, 47
    hidden, weight = torch.randn(n, h, device=device), torch.randn(vocab, h, device=device) / 3
    bias = torch.randn(vocab, device=device)
    padded = torch.zeros(vocab, dtype=torch.bool, device=device)
    padded[-5:] = True
    bias[padded] = -INF
    teacher_hidden, teacher_weight = torch.randn(n, 13, device=device), torch.randn(vocab, 13, device=device) / 3
    teacher_bias = torch.randn(vocab, device=device).masked_fill(padded, -INF)
    teacher_bias[3] = -INF  # a class only the teacher rules out
    mask = torch.rand(n, device=device) < 0.8
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = ops.kd_loss_linear(
        *leaves[:2],
        student_bias=leaves[2],
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        temperature=2.0,
        mask=mask,
        chunk_size=8,
        backend=backend,
    )
    loss.backward()
    leaves64 = [t.double().clone().requires_grad_() for t in (hidden, weight, bias)]
    teacher64 = F.linear(teacher_hidden.double(), teacher_weight.double(), teacher_bias.double())
    want = reference.kd_loss(F.linear(*leaves64), teacher64, temperature=2.0, mask=mask)
    want.backward()
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)
    for got, exact in zip(leaves, leaves64):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad.double(), exact.grad, rtol=1e-4, atol=1e-5)


# ---- independent oracle: F.kl_div ---------------------------------------------------------------------------


@pytest.mark.parametrize("logits", ["finite", "-inf", "+inf loss"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_kd_loss_matches_the_kl_div_oracle(backend, seed, logits, reduction, masked):
    device = backend_device(backend)
    n, v, temperature = 19, 517, 2.0
    if logits == "finite":
        student, teacher = 3 * torch.randn(n, v, device=device), 3 * torch.randn(n, v, device=device)
    else:
        student, teacher = inf_logits(n, v, device, student_inf_under_teacher_mass=logits == "+inf loss")
    mask = (torch.rand(n, device=device) < 0.6) if masked else None
    upstream = torch.rand(n, device=device) + 0.5 if reduction == "none" else None
    loss, grad, upstream = loss_and_grad(
        lambda s: ops.kd_loss(s, teacher, temperature=temperature, mask=mask, reduction=reduction, backend=backend),
        student,
        upstream,
    )
    want, want_grad, _ = loss_and_grad(
        lambda s: kl_div_oracle(s, teacher.double(), temperature, mask, reduction), student.double(), upstream.double()
    )
    if logits == "+inf loss" and not masked:
        assert torch.isposinf(want).all()  # the oracle agrees that the loss is infinite
    loss_tol, grad_tol = tolerances(student, teacher, temperature, upstream)
    assert_same_nonfinite(loss, want, loss_tol, "loss")
    assert_same_nonfinite(grad, want_grad, grad_tol, "gradient")


# ---- independent oracle: ema_update_ by hand ----------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("deterministic", [False, True])
def test_ema_update_matches_a_step_worked_by_hand(backend, index_dtype, deterministic):
    """H=2 heads, K=3 keys, d=2, N=6 rows of small integers, decay 0.5, eps 1 (so the smoothing shows).

    head 0: counts [0, 4, 2]; cluster_size 0.5*[2, 2, 0] + 0.5*[0, 4, 2] = [1, 3, 1], n = 5, smoothed sizes
            (c + 1) / (5 + 3) * 5 = [1.25, 2.5, 1.25]; sums [0,0], [6,4], [-2,4]; embed_sum
            0.5*[[2,2],[4,0],[0,0]] + 0.5*sums = [[1,1],[5,2],[-1,2]]; keys = embed_sum / smoothed.
    head 1: counts [4, 0, 2]; cluster_size 0.5*[0, 4, 2] + 0.5*[4, 0, 2] = [2, 2, 2], n = 6, smoothed
            3 / 9 * 6 = 2 each; sums [4,2], [0,0], [2,6]; embed_sum 0.5*[[0,0],[8,4],[2,2]] + 0.5*sums
            = [[2,1],[4,2],[2,4]]; keys = embed_sum / 2.
    """
    device = backend_device(backend)
    x = torch.tensor(
        [
            [[1, 2], [1, 1]],
            [[3, -1], [1, -1]],
            [[0, 4], [2, 0]],
            [[2, 2], [0, 2]],
            [[-2, 0], [4, 4]],
            [[0, 1], [-2, 2]],
        ],
        dtype=torch.float32,
        device=device,
    )
    index = torch.tensor([[1, 0], [1, 0], [2, 0], [1, 0], [2, 2], [1, 2]], dtype=index_dtype, device=device)
    cluster_size = torch.tensor([[2.0, 2.0, 0.0], [0.0, 4.0, 2.0]], device=device)
    embed_sum = torch.tensor([[[2.0, 2], [4, 0], [0, 0]], [[0, 0], [8, 4], [2, 2]]], device=device)
    keys = torch.full((2, 3, 2), 99.0, device=device)  # overwritten

    ops.ema_update_(
        keys, cluster_size, embed_sum, x, index, decay=0.5, eps=1.0, deterministic=deterministic, backend=backend
    )

    assert torch.equal(cluster_size.cpu(), torch.tensor([[1.0, 3.0, 1.0], [2.0, 2.0, 2.0]]))
    assert torch.equal(embed_sum.cpu(), torch.tensor([[[1.0, 1], [5, 2], [-1, 2]], [[2, 1], [4, 2], [2, 4]]]))
    expected_keys = torch.tensor([[[0.8, 0.8], [2.0, 0.8], [-0.8, 1.6]], [[1.0, 0.5], [2.0, 1.0], [1.0, 2.0]]])
    torch.testing.assert_close(keys.cpu(), expected_keys, rtol=2 * EPS32, atol=0)

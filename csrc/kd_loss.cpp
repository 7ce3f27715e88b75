// keydistill::kd_loss: the reduced distillation loss, with its autograd in C++. Device-agnostic: the maths is
// the per-device kd_loss_fwd kernel (csrc/cpu, csrc/cuda), reached through the dispatcher.
//
// Why a second op next to kd_loss_fwd: for small logits (a classifier's [32, 2]) the loss is all overhead. As
// Python (custom-op autograd + reduction ops + a Python backward node) it cost more than eager F.kl_div; here
// the forward is one op call and the backward one C++ node that scales the gradient the forward kernel
// already produced. kd_loss_fwd keeps its Python-registered autograd for direct use (kd_loss_linear, opcheck).
//
// Memory: forward + backward hold one [N, V] buffer, the fused gradient, which backward scales in place (out
// of place only under tracing: FakeTensor / functionalization). Backward therefore consumes the buffer: a
// second backward through the same graph raises instead of giving wrong gradients.
//
// Passes: batchmean's 1/N (whenever N is known on the host) is folded into the kernel's gradient, so backward
// scales only by the incoming gradient, and not at all on the host when that is 1 (loss.backward()).
#include <ATen/Dispatch.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "checks.h"

namespace keydistill {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class Reduction : int64_t { kNone = 0, kSum = 1, kBatchMean = 2 };

Reduction parse_reduction(c10::string_view r) {
  if (r == "none") return Reduction::kNone;
  if (r == "sum") return Reduction::kSum;
  TORCH_CHECK(r == "batchmean", "kd_loss: reduction must be 'batchmean', 'sum' or 'none', got '", r, "'");
  return Reduction::kBatchMean;
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                               const std::optional<at::Tensor>& mask, bool compute_grad,
                                               double grad_scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("keydistill::kd_loss_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double,
                                                                       const std::optional<at::Tensor>&, bool, double)>();
  return op.call(student, teacher, temperature, mask, compute_grad, grad_scale);
}

// The number of rows batchmean divides by: N, or the included rows (at least 1) as a 0-dim tensor.
struct Denominator {
  double rows = 1.0;
  at::Tensor included;  // defined when a mask is given
};

// Host-side shortcuts: on the CPU the few reductions below are plain loops, not ATen ops. At [32, 2] logits
// every ATen call (dispatch, TensorIterator set-up) costs as much as the whole kernel.
bool on_host(const at::Tensor& t) { return t.device().is_cpu() && !at::isTensorSubclassLike(t); }

Denominator batch_denominator(const at::Tensor& student, const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return {static_cast<double>(std::max<int64_t>(student.size(0), 1)), at::Tensor()};
  if (on_host(*mask)) {
    const at::Tensor m = mask->contiguous();
    const bool* p = m.const_data_ptr<bool>();
    const int64_t included = std::count(p, p + m.numel(), true);
    return {static_cast<double>(std::max<int64_t>(included, 1)), at::Tensor()};
  }
  return {1.0, mask->sum().clamp_min(1).to(at::kFloat)};
}

// rows: float32 [N], already 0 on masked-out rows (the kernels do it).
at::Tensor reduce(at::Tensor rows, Reduction reduction, const Denominator& den) {
  if (reduction == Reduction::kNone) return rows;
  const double divide_by = reduction == Reduction::kSum ? 1.0 : den.rows;
  if (on_host(rows)) {
    const float* p = rows.const_data_ptr<float>();
    double total = 0;  // N terms in double: no need for pairwise summation
    for (int64_t i = 0; i < rows.numel(); ++i) total += p[i];
    at::Tensor out = at::empty({}, rows.options());
    *out.mutable_data_ptr<float>() = static_cast<float>(total / divide_by);
    return out;
  }
  at::Tensor total = rows.sum();
  if (reduction == Reduction::kSum) return total;
  return den.included.defined() ? total.div_(den.included) : total.div_(den.rows);
}

// grad *= factor, in place, on the host: a plain loop for small gradients, ATen's vectorised, parallel mul_
// for large ones (where one dispatch is nothing).
void scale_on_host(at::Tensor& grad, double factor) {
  if (factor == 1.0) return;
  if (grad.numel() > (1 << 14)) {
    grad.mul_(factor);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "kd_loss_backward", [&] {
    scalar_t* p = grad.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < grad.numel(); ++i) p[i] = static_cast<scalar_t>(static_cast<float>(p[i]) * factor);
  });
}

double host_scalar(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? *t.const_data_ptr<float>() : t.item<double>();
}

// The forward of both entry points: losses reduced and, if asked, the fused gradient with what backward needs.
struct Forward {
  at::Tensor loss, grad;
  Reduction reduction;
  Denominator den;
};

Forward run_forward(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                    const std::optional<at::Tensor>& mask, c10::string_view reduction, bool compute_grad) {
  const Reduction r = parse_reduction(reduction);
  // The mask is read here before the kernel checks it: check first (at [32, 2] a second check is not free).
  if (mask.has_value() || student.dim() != 2) checks::kd_loss_fwd_args(student, teacher, temperature, mask);
  const Denominator den = r == Reduction::kBatchMean ? batch_denominator(student, mask) : Denominator{};
  const double grad_scale = r == Reduction::kBatchMean && !den.included.defined() ? 1.0 / den.rows : 1.0;
  auto [rows, grad] = kd_loss_fwd(student, teacher, temperature, mask, compute_grad, grad_scale);
  return {reduce(rows, r, den), grad, r, den};
}

// Without autograd (no_grad, inference, fake tensors): losses only, no gradient buffer.
at::Tensor kd_loss_composite(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                             const std::optional<at::Tensor>& mask, c10::string_view reduction) {
  return run_forward(student, teacher, temperature, mask, reduction, /*compute_grad=*/false).loss;
}

struct KDLossFunction : public torch::autograd::Function<KDLossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            double temperature, const std::optional<at::Tensor>& mask, c10::string_view reduction) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // kd_loss_fwd's own (Python) autograd is not wanted here
    Forward f = run_forward(student, teacher, temperature, mask, reduction, /*compute_grad=*/true);
    ctx->save_for_backward({f.grad, f.den.included});
    ctx->saved_data["reduction"] = static_cast<int64_t>(f.reduction);
    return f.loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The gradient buffer is scaled in place: a second backward through the graph (retain_graph=True) would
    // scale it twice. Refuse it.
    TORCH_CHECK(ctx->saved_data.count("consumed") == 0,
                "kd_loss: backward through the same graph twice is not supported (the first backward consumed the "
                "fused gradient); recompute the loss");
    ctx->saved_data["consumed"] = true;
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad = saved[0];
    const at::Tensor& included = saved[1];
    const auto r = static_cast<Reduction>(ctx->saved_data["reduction"].toInt());
    const at::Tensor& go = grad_outputs[0];
    if (r != Reduction::kNone && on_host(grad) && on_host(go) && !included.defined()) {
      // The usual case (a scalar loss on the CPU): 1/N is in the gradient already; no pass at all when the
      // incoming gradient is 1, else one with a host factor, no ATen ops.
      scale_on_host(grad, host_scalar(go));
      return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    at::Tensor scale = r == Reduction::kNone ? go.unsqueeze(1) : included.defined() ? go.div(included) : go;
    // Tracers (FakeTensor, functionalization) get the out-of-place form, which they can partition.
    at::Tensor grad_student = at::isTensorSubclassLike(grad) ? grad.mul(scale) : grad.mul_(scale);
    return {grad_student, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor kd_loss_autograd(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                            const std::optional<at::Tensor>& mask, c10::string_view reduction) {
  if (!(at::GradMode::is_enabled() && student.requires_grad())) {  // nothing to differentiate: no [N, V] buffer
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return kd_loss_composite(student, teacher, temperature, mask, reduction);
  }
  return KDLossFunction::apply(student, teacher, temperature, mask, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(keydistill, CompositeExplicitAutograd, m) { m.impl("kd_loss", &kd_loss_composite); }
TORCH_LIBRARY_IMPL(keydistill, Autograd, m) { m.impl("kd_loss", &kd_loss_autograd); }

}  // namespace keydistill

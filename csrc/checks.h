// Argument checks of the keydistill ops: the one place both the CPU (csrc/cpu/*.cpp) and the CUDA
// (csrc/cuda/*.cu) entry points take them from, so the two cannot drift. A direct torch.ops.keydistill.*
// call (which bypasses keydistill.ops' Python checks) gets the same error on every device, and no kernel ever
// sees a shape, dtype, device mix, index or size it would read or write out of bounds on.
//
// Size limits are the int32 ones the kernels rely on, imposed on every device alike (keydistill/ops/_checks.py
// applies the same ones to the Python-level backends):
//   nearest_key: K <= 2^31 - 65 (int key indices, plus a 64-key tile of padding), H <= 65535 (CUDA grid.y)
//   ema_update_: H * K < 2^31 (int (head, key) slots), N < 2^31 (int32 per-key counts), H <= 65535 (the Triton
//                kernels' grid.y; nearest_key's limit, so every index it returns can be averaged)
//   kd_loss_fwd: N < 2^31 (CUDA grid.x: one block per row)
//   every op: d (or V) < 2^31
// Index values (ema_update_) are checked where they are read: TORCH_CHECK on the CPU, CUDA_KERNEL_ASSERT on
// the GPU (see KD_CHECK_INDEX), which keeps the GPU path free of a host synchronisation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>

namespace keydistill::checks {

constexpr int64_t kInt32Max = 2147483647;
constexpr int64_t kMaxKeys = kInt32Max - 64;
constexpr int64_t kMaxHeads = 65535;

struct Named {
  const char* name;
  const at::Tensor* tensor;  // nullptr: an optional argument that was not given
};

// Every given tensor on the first one's device: kernels read all of them through one device's pointers.
inline void same_device(const char* op, std::initializer_list<Named> tensors) {
  const Named& first = *tensors.begin();
  for (const Named& t : tensors) {
    if (t.tensor == nullptr) continue;
    TORCH_CHECK(t.tensor->device() == first.tensor->device(), "keydistill::", op, ": ", t.name, " is on ",
                t.tensor->device(), " but ", first.name, " is on ", first.tensor->device(),
                "; all tensors must be on one device");
  }
}

inline bool is_float_input(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

inline void float_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_float_input(t.scalar_type()), "keydistill::", op, ": ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void dims(const char* op, const char* name, const at::Tensor& t, int64_t ndim, const char* layout) {
  TORCH_CHECK(t.dim() == ndim, "keydistill::", op, ": ", name, " must be ", layout, ", got shape ", t.sizes());
}

inline void at_most(const char* op, const char* what, int64_t value, int64_t limit) {
  TORCH_CHECK(value <= limit, "keydistill::", op, ": ", what, " = ", value, " exceeds the kernels' limit of ", limit);
}

// x [N, H, d] (float32/16/bf16), keys [H, K, d] (float32 or x's dtype), K >= 1.
inline void nearest_key_args(const at::Tensor& x, const at::Tensor& keys) {
  constexpr const char* op = "nearest_key";
  dims(op, "x", x, 3, "[N, H, d]");
  dims(op, "keys", keys, 3, "[H, K, d]");
  same_device(op, {{"x", &x}, {"keys", &keys}});
  float_input(op, "x", x);
  TORCH_CHECK(keys.scalar_type() == at::kFloat || keys.scalar_type() == x.scalar_type(), "keydistill::", op,
              ": keys must be float32 or x's dtype (", x.scalar_type(), "), got ", keys.scalar_type());
  TORCH_CHECK(x.size(1) == keys.size(0) && x.size(2) == keys.size(2), "keydistill::", op,
              ": x ", x.sizes(), " and keys ", keys.sizes(), " disagree on H or d");
  TORCH_CHECK(keys.size(1) >= 1, "keydistill::", op, ": keys must hold at least one key per head (K >= 1)");
  at_most(op, "K", keys.size(1), kMaxKeys);
  at_most(op, "H", keys.size(0), kMaxHeads);
  at_most(op, "d", keys.size(2), kInt32Max);
}

// State keys/embed_sum [H, K, d] and cluster_size [H, K], float32 and contiguous (updated in place); x [N, H, d]
// (float32/16/bf16, any strides); index [N, H] (int32/int64, any strides); decay in [0, 1), eps finite > 0.
inline void ema_update_args(const at::Tensor& keys, const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                            const at::Tensor& x, const at::Tensor& index, double decay, double eps) {
  constexpr const char* op = "ema_update_";
  dims(op, "keys", keys, 3, "[H, K, d]");
  dims(op, "cluster_size", cluster_size, 2, "[H, K]");
  dims(op, "embed_sum", embed_sum, 3, "[H, K, d]");
  dims(op, "x", x, 3, "[N, H, d]");
  dims(op, "index", index, 2, "[N, H]");
  same_device(op, {{"keys", &keys}, {"cluster_size", &cluster_size}, {"embed_sum", &embed_sum}, {"x", &x},
                   {"index", &index}});
  const int64_t h = keys.size(0), k = keys.size(1), d = keys.size(2), n = x.size(0);
  TORCH_CHECK(embed_sum.sizes() == keys.sizes() && cluster_size.size(0) == h && cluster_size.size(1) == k &&
                  x.size(1) == h && x.size(2) == d && index.size(0) == n && index.size(1) == h,
              "keydistill::", op, ": shapes of keys ", keys.sizes(), ", cluster_size ", cluster_size.sizes(),
              ", embed_sum ", embed_sum.sizes(), ", x ", x.sizes(), " and index ", index.sizes(), " disagree");
  at_most(op, "H * K", h * k, kInt32Max - 1);
  at_most(op, "H", h, kMaxHeads);
  at_most(op, "N", n, kInt32Max - 1);
  at_most(op, "d", d, kInt32Max);
  for (const Named& state : {Named{"keys", &keys}, Named{"cluster_size", &cluster_size}, Named{"embed_sum", &embed_sum}}) {
    TORCH_CHECK(state.tensor->scalar_type() == at::kFloat, "keydistill::", op, ": ", state.name,
                " must be float32, got ", state.tensor->scalar_type());
    TORCH_CHECK(state.tensor->is_contiguous(), "keydistill::", op, ": ", state.name,
                " is updated in place and must be contiguous");
  }
  float_input(op, "x", x);
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, "keydistill::", op,
              ": index must be int64 or int32, got ", index.scalar_type());
  TORCH_CHECK(decay >= 0.0 && decay < 1.0, "keydistill::", op, ": decay must be in [0, 1), got ", decay);
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0, "keydistill::", op, ": eps must be finite and > 0, got ", eps);
}

// student, teacher [N, V] of one shape (float32/16/bf16 each, any strides); temperature finite > 0; mask bool [N];
// grad_scale finite.
inline void kd_loss_fwd_args(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                             const std::optional<at::Tensor>& mask, double grad_scale = 1.0) {
  constexpr const char* op = "kd_loss_fwd";
  dims(op, "student", student, 2, "[N, V]");
  TORCH_CHECK(teacher.sizes() == student.sizes(), "keydistill::", op, ": student ", student.sizes(), " and teacher ",
              teacher.sizes(), " must have one shape [N, V]");
  same_device(op, {{"student", &student}, {"teacher", &teacher}, {"mask", mask.has_value() ? &*mask : nullptr}});
  float_input(op, "student", student);
  float_input(op, "teacher", teacher);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "keydistill::", op,
              ": temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(std::isfinite(grad_scale), "keydistill::", op, ": grad_scale must be finite, got ", grad_scale);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "keydistill::", op, ": mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == student.size(0), "keydistill::", op, ": mask must be [N=",
                student.size(0), "], got shape ", mask->sizes());
  }
  at_most(op, "N", student.size(0), kInt32Max - 1);
  at_most(op, "V", student.size(1), kInt32Max);
}

// param, exp_avg, exp_avg_sq [R, D] (updated in place: contiguous) and grad [U, D] (contiguous), one floating
// dtype; rows int64 [U] contiguous (its values, strictly increasing in [0, R), are checked by the kernel before
// it writes anything); lr, eps, weight_decay finite >= 0, betas in [0, 1), step finite >= 1.
inline void sparse_adamw_args(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                              const at::Tensor& rows, const at::Tensor& grad, double lr, double beta1, double beta2,
                              double eps, double weight_decay, double step) {
  constexpr const char* op = "sparse_adamw_";
  dims(op, "param", param, 2, "[R, D]");
  dims(op, "grad", grad, 2, "[U, D]");
  dims(op, "rows", rows, 1, "[U]");
  same_device(op, {{"param", &param}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}, {"rows", &rows}, {"grad", &grad}});
  TORCH_CHECK(exp_avg.sizes() == param.sizes() && exp_avg_sq.sizes() == param.sizes(), "keydistill::", op,
              ": exp_avg ", exp_avg.sizes(), " and exp_avg_sq ", exp_avg_sq.sizes(), " must have param's shape ", param.sizes());
  TORCH_CHECK(grad.size(0) == rows.size(0) && grad.size(1) == param.size(1), "keydistill::", op, ": grad ",
              grad.sizes(), " must be [rows (", rows.size(0), "), D (", param.size(1), ")]");
  TORCH_CHECK(at::isFloatingType(param.scalar_type()), "keydistill::", op, ": param must be floating point, got ",
              param.scalar_type());
  for (const Named& t : {Named{"param", &param}, Named{"exp_avg", &exp_avg}, Named{"exp_avg_sq", &exp_avg_sq}, Named{"grad", &grad}}) {
    TORCH_CHECK(t.tensor->scalar_type() == param.scalar_type(), "keydistill::", op, ": ", t.name,
                " must have param's dtype (", param.scalar_type(), "), got ", t.tensor->scalar_type());
    TORCH_CHECK(t.tensor->is_contiguous(), "keydistill::", op, ": ", t.name, " must be contiguous");
  }
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "keydistill::", op,
              ": rows must be contiguous int64, got ", rows.scalar_type());
  for (double value : {lr, eps, weight_decay})
    TORCH_CHECK(std::isfinite(value) && value >= 0.0, "keydistill::", op, ": lr, eps and weight_decay must be finite and >= 0, got ", value);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0, "keydistill::", op,
              ": betas must be in [0, 1), got ", beta1, ", ", beta2);
  TORCH_CHECK(std::isfinite(step) && step >= 1.0, "keydistill::", op, ": step must be finite and >= 1, got ", step);
}

}  // namespace keydistill::checks

// An index value k read by a kernel lies in [0, K): a TORCH_CHECK on the host; on the GPU a device-side
// assertion (as PyTorch's own index kernels make), after which the caller must still skip the value, since
// TORCH_DISABLE_GPU_ASSERTS turns the assertion off.
#if defined(__CUDA_ARCH__)
#define KD_CHECK_INDEX(k, num_keys) CUDA_KERNEL_ASSERT((k) >= 0 && (k) < (num_keys))
#else
#define KD_CHECK_INDEX(k, num_keys)                                                                        \
  TORCH_CHECK((k) >= 0 && (k) < (num_keys), "keydistill::ema_update_: index value ", (k), " is outside [0, K=", \
              (num_keys), ")")
#endif

// kd_loss_fwd on CUDA: per row, T^2 * KL(softmax(t/T) || softmax(s/T)) and its gradient times grad_scale,
// grad_scale * T * (p_s - p_t) (a reduction's 1/N folded in: no separate pass to scale it).
//
// One block per row. The first sweep streams V once, keeping for student and teacher together an online
// max and sum of exponentials, plus the teacher-weighted sum of (b - a); with a = s/T and b = t/T,
//     KL = sum_i p_t,i (b_i - a_i) - lse(b) + lse(a),
// so the loss needs no second look at the row. The gradient, which needs both final log-sum-exps, is a
// second sweep over the same row, written in the student's dtype. Everything is fp32; exponentials are exp2
// of (a - max) * log2(e): the row max is subtracted first, as the CPU and Triton kernels do, because a
// logit scaled by log2(e)/T before the subtraction carries a rounding error of an ulp of |a| (~1e-3 at
// |a| ~ 1e4) into every probability. tests/ops/test_cuda_kd_order.py emulates this order in fp32.
// 1024 threads per block keep few rows in flight (at most two blocks per SM), so the second sweep mostly
// re-reads the row from L2 rather than from device memory.
//
// Non-finite logits (the semantics of every backend, keydistill/ops/__init__.py): the running maxima start at
// -FLT_MAX, not -inf, so a -inf logit adds exp2(-inf) = 0 instead of exp2(-inf - -inf) = NaN; a teacher weight
// of 0 adds no cross term (never 0 * inf against a student -inf), and a cross sum rescaled by 0 stays 0; a
// teacher row that is all -inf (sum 0) gets loss 0 and gradient 0. NaN and +inf reach the sums and so give the
// row a NaN loss and gradient.
#include "checks.h"
#include "cuda/common.cuh"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>
#include <cstdint>
#include <optional>
#include <tuple>

namespace keydistill::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kUnroll = 4;  // loads in flight per thread and tensor
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Running statistics of a (part of a) row, for a = s/T and b = t/T.
// A plain aggregate (no default member initialisers), so an array of it can live in shared memory.
struct RowStats {
  float max_a;
  float sum_a;  // sum e^(a - max_a)
  float max_b;
  float sum_b;  // sum e^(b - max_b)
  float cross;  // sum e^(b - max_b) * (b - a)
};

__device__ __forceinline__ RowStats no_stats() { return {-FLT_MAX, 0.f, -FLT_MAX, 0.f, 0.f}; }

// 2^x by the hardware's approximation (relative error about 2^-22, fp32-accurate): exp2f would add range
// handling around the same instruction, and this kernel computes four of them per element.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// e^(a - max): the difference first (exact near the max), then the change of base.
__device__ __forceinline__ float exp_shifted(float a, float max) { return fast_exp2((a - max) * kLog2e); }

// The factor that moves a sum taken against old_max onto new_max. Maxima start at -FLT_MAX, so the argument
// is never -inf - -inf; it is NaN only for +inf - +inf, which must poison the row.
__device__ __forceinline__ float rescale(float old_max, float new_max) { return exp_shifted(old_max, new_max); }

// The cross sum moved onto a new max: a factor of 0 means its teacher weights underflowed to 0, and weights of
// 0 contribute nothing, even where the cross sum is inf (a student -inf). NaN still reaches sum_b.
__device__ __forceinline__ float rescale_cross(float cross, float factor) { return factor == 0.f ? 0.f : cross * factor; }

__device__ __forceinline__ void add(RowStats& st, float a, float b) {
  if (a > st.max_a) {
    st.sum_a *= rescale(st.max_a, a);
    st.max_a = a;
  }
  st.sum_a += exp_shifted(a, st.max_a);
  if (b > st.max_b) {
    const float f = rescale(st.max_b, b);
    st.sum_b *= f;
    st.cross = rescale_cross(st.cross, f);
    st.max_b = b;
  }
  const float w = exp_shifted(b, st.max_b);
  st.sum_b += w;
  if (w != 0.f) st.cross = fmaf(w, b - a, st.cross);  // a teacher probability of 0 contributes 0, never 0 * inf
}

__device__ __forceinline__ RowStats merge(const RowStats& x, const RowStats& y) {
  RowStats out = no_stats();
  out.max_a = fmaxf(x.max_a, y.max_a);
  out.sum_a = x.sum_a * rescale(x.max_a, out.max_a) + y.sum_a * rescale(y.max_a, out.max_a);
  out.max_b = fmaxf(x.max_b, y.max_b);
  const float fx = rescale(x.max_b, out.max_b), fy = rescale(y.max_b, out.max_b);
  out.sum_b = x.sum_b * fx + y.sum_b * fy;
  out.cross = rescale_cross(x.cross, fx) + rescale_cross(y.cross, fy);
  return out;
}

__device__ __forceinline__ RowStats shfl_xor(const RowStats& st, int offset) {
  RowStats out = no_stats();
  out.max_a = __shfl_xor_sync(0xffffffffu, st.max_a, offset);
  out.sum_a = __shfl_xor_sync(0xffffffffu, st.sum_a, offset);
  out.max_b = __shfl_xor_sync(0xffffffffu, st.max_b, offset);
  out.sum_b = __shfl_xor_sync(0xffffffffu, st.sum_b, offset);
  out.cross = __shfl_xor_sync(0xffffffffu, st.cross, offset);
  return out;
}

__device__ __forceinline__ RowStats warp_merge(RowStats st) {
  for (int offset = 16; offset > 0; offset >>= 1) st = merge(st, shfl_xor(st, offset));
  return st;
}

// The whole block's statistics, in every thread.
__device__ __forceinline__ RowStats block_merge(RowStats st) {
  __shared__ RowStats partial[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  st = warp_merge(st);
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  return warp_merge(lane < kThreads / 32 ? partial[lane] : no_stats());
}

// Loss 0 and gradient 0 for one row (a masked-out row, or a teacher row without a distribution).
template <typename s_t>
__device__ __forceinline__ void zero_row(float* loss, s_t* g, int64_t num_classes) {
  if (threadIdx.x == 0) *loss = 0.f;
  if (g != nullptr) {
    for (int64_t i = threadIdx.x; i < num_classes; i += kThreads) g[i] = from_float<s_t>(0.f);
  }
}

template <typename s_t, typename t_t>
__global__ void __launch_bounds__(kThreads)
    kd_loss_kernel(const s_t* __restrict__ student, const t_t* __restrict__ teacher, const bool* __restrict__ mask,
                   float* __restrict__ loss, s_t* __restrict__ grad, int64_t num_classes, float temperature,
                   float grad_factor) {
  const int64_t row = blockIdx.x;
  const s_t* s = student + row * num_classes;
  const t_t* t = teacher + row * num_classes;
  s_t* g = grad == nullptr ? nullptr : grad + row * num_classes;
  if (mask != nullptr && !mask[row]) {  // an excluded row: 0 loss, 0 gradient
    zero_row(loss + row, g, num_classes);
    return;
  }
  const float inv_t = 1.f / temperature;

  RowStats st = no_stats();
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < num_classes; i += kUnroll * kThreads) {
    float a[kUnroll], b[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first, so they are in flight together
      a[u] = to_float(s[i + u * kThreads]) * inv_t;
      b[u] = to_float(t[i + u * kThreads]) * inv_t;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) add(st, a[u], b[u]);
  }
  for (; i < num_classes; i += kThreads) add(st, to_float(s[i]) * inv_t, to_float(t[i]) * inv_t);
  st = block_merge(st);
  if (st.sum_b == 0.f) {  // the teacher row is all -inf: no distribution to match, as if masked out
    zero_row(loss + row, g, num_classes);
    return;
  }

  // The log-sum-exps are max + ln(sum); max and ln(sum) stay apart so that large logits (where one ulp of
  // max is coarse) lose nothing more in the differences below. log_sum_* are base 2, for exp2.
  const float log_sum_a = log2f(st.sum_a), log_sum_b = log2f(st.sum_b);
  if (threadIdx.x == 0) {
    const float kl = st.cross / st.sum_b + (st.max_a - st.max_b) + kLn2 * (log_sum_a - log_sum_b);
    loss[row] = temperature * temperature * kl;
  }
  if (g == nullptr) return;
#pragma unroll kUnroll
  for (int64_t j = threadIdx.x; j < num_classes; j += kThreads) {
    const float p_s = fast_exp2((to_float(s[j]) * inv_t - st.max_a) * kLog2e - log_sum_a);
    const float p_t = fast_exp2((to_float(t[j]) * inv_t - st.max_b) * kLog2e - log_sum_b);
    g[j] = from_float<s_t>(grad_factor * (p_s - p_t));
  }
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cuda(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                    double temperature, const std::optional<at::Tensor>& mask_in,
                                                    bool compute_grad, double grad_scale) {
  checks::kd_loss_fwd_args(student_in, teacher_in, temperature, mask_in, grad_scale);  // one device: one guard
  check_cuda(student_in, "kd_loss_fwd", "student");
  const c10::cuda::CUDAGuard device_guard(student_in.device());
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const int64_t rows = student.size(0), num_classes = student.size(1);
  at::Tensor loss = at::empty({rows}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty(student.sizes(), student.options()) : at::empty({0}, student.options());
  if (rows == 0) return {loss, grad};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool* mask_ptr = mask.defined() ? data<const bool>(mask) : nullptr;
  dispatch_float(student.scalar_type(), "kd_loss_fwd", [&](auto s_type) {
    using s_t = typename decltype(s_type)::type;
    dispatch_float(teacher.scalar_type(), "kd_loss_fwd", [&](auto t_type) {
      using t_t = typename decltype(t_type)::type;
      kd_loss_kernel<s_t, t_t><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
          data<const s_t>(student), data<const t_t>(teacher), mask_ptr, data<float>(loss),
          compute_grad ? data<s_t>(grad) : nullptr, num_classes, static_cast<float>(temperature),
          static_cast<float>(grad_scale * temperature));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, grad};
}

}  // namespace
}  // namespace keydistill::cuda

TORCH_LIBRARY_IMPL(keydistill, CUDA, m) {
  m.impl("kd_loss_fwd", &keydistill::cuda::kd_loss_fwd_cuda);
}

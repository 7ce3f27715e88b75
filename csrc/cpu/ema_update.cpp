// ema_update_ on the CPU: the VQ-VAE EMA codebook update with Laplace smoothing, in place on float32 state.
//
// Counts and sums are exact and deterministic without atomics or per-thread copies: the work is split into
// (head, slice of d) tasks, and each task alone owns its part of the sums, which it accumulates over n in
// order. So the result is bit-identical for any thread count, and the `deterministic` flag has nothing to
// change here. Splitting d as well as H keeps both cores busy when H is small (H=1 at d=256).
// The EMA of counts and sums, the Laplace-smoothed sizes and the division by them follow in one fused
// pass over the state, after a pass that forms n_h = sum_k cluster_size[h, k].
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace keydistill::cpu {
namespace {

// counts [H,K] (int64) and sums [H,K,d] (float32) of the rows of x assigned to each key.
template <typename scalar_t, typename index_t>
void accumulate(const at::Tensor& x, const at::Tensor& index, int64_t num_keys, int64_t* counts, float* sums) {
  const int64_t n = x.size(0), h = x.size(1), d = x.size(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const index_t* ip = index.const_data_ptr<index_t>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2), is0 = index.stride(0), is1 = index.stride(1);
  // Enough slices of d for every thread to have work, never thinner than 4 floats.
  const int64_t slices = std::clamp<int64_t>((4 * at::get_num_threads() + h - 1) / h, 1, std::max<int64_t>(1, d / 4));
  const int64_t width = (d + slices - 1) / slices;
  at::parallel_for(0, h * slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t head = t / slices, j0 = (t % slices) * width, j1 = std::min(d, j0 + width);
      for (int64_t row = 0; row < n; ++row) {
        const int64_t k = static_cast<int64_t>(ip[row * is0 + head * is1]);
        KD_CHECK_INDEX(k, num_keys);
        const scalar_t* src = xp + row * xs0 + head * xs1;
        float* dst = sums + (head * num_keys + k) * d;
        for (int64_t j = j0; j < j1; ++j) dst[j] += static_cast<float>(src[j * xs2]);
        if (j0 == 0) ++counts[head * num_keys + k];
      }
    }
  });
}

void ema_update_cpu(const at::Tensor& keys, const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                    const at::Tensor& x, const at::Tensor& index, double decay, double eps, bool /*deterministic*/) {
  checks::ema_update_args(keys, cluster_size, embed_sum, x, index, decay, eps);
  const int64_t h = keys.size(0), num_keys = keys.size(1), d = keys.size(2);

  at::Tensor counts = at::zeros({h, num_keys}, keys.options().dtype(at::kLong));
  at::Tensor sums = at::zeros({h, num_keys, d}, keys.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ema_update_", [&] {
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "ema_update_", [&] {
      accumulate<scalar_t, index_t>(x, index, num_keys, counts.data_ptr<int64_t>(), sums.data_ptr<float>());
    });
  });

  const float keep = static_cast<float>(decay), take = static_cast<float>(1.0 - decay), epsf = static_cast<float>(eps);
  const int64_t* cp = counts.const_data_ptr<int64_t>();
  const float* sp = sums.const_data_ptr<float>();
  float* size = cluster_size.data_ptr<float>();
  float* esum = embed_sum.data_ptr<float>();
  float* kp = keys.data_ptr<float>();

  // cluster_size <- decay*cluster_size + (1-decay)*counts, and n_h = its sum per head.
  std::vector<float> total(h);
  at::parallel_for(0, h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      double sum = 0.0;
      for (int64_t k = head * num_keys; k < (head + 1) * num_keys; ++k) {
        size[k] = keep * size[k] + take * static_cast<float>(cp[k]);
        sum += size[k];
      }
      total[head] = static_cast<float>(sum);
    }
  });
  // embed_sum <- decay*embed_sum + (1-decay)*sums; keys <- embed_sum / ((c + eps) / (n_h + K*eps) * n_h).
  at::parallel_for(0, h * num_keys, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float n_h = total[r / num_keys];
      const float smoothed = (size[r] + epsf) / (n_h + num_keys * epsf) * n_h;
      for (int64_t j = r * d; j < (r + 1) * d; ++j) {
        esum[j] = keep * esum[j] + take * sp[j];
        kp[j] = esum[j] / smoothed;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(keydistill, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace keydistill::cpu

// ema_update_ on CUDA: the VQ-VAE EMA codebook update with Laplace smoothing, in place, with no [N,K] one-hot.
//
// 1. counts[h,k] by integer atomics (exact and order-free).
// 2. sums[h,k,:] of the rows assigned to each key, either
//    - by float atomics, one per element of x or per four on sm_90 (fast; the order varies run to run), or
//    - deterministically: rows are stably sorted by (h, k) and each key sums its segment in row order.
// 3. cluster_size <- EMA, and n_h = sum_k cluster_size[h,k] (one block per head, fixed reduction order).
// 4. embed_sum <- EMA and keys <- embed_sum / smoothed size, in one elementwise pass.
// Index values are range-checked where they are read (KD_CHECK_INDEX: a device-side assertion, no host sync);
// a value out of range is skipped, never used as an address.
#include "checks.h"
#include "cuda/common.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>

namespace keydistill::cuda {
namespace {

constexpr int kThreads = 256;

struct Shape {
  int64_t rows;  // N * H: one (row, head) pair each
  int heads;     // H
  int keys;      // K
  int d;
};

// index[r] if it lies in [0, K), else -1 (after a device-side assertion).
template <typename idx_t>
__device__ __forceinline__ int64_t key_of(const idx_t* __restrict__ index, int64_t r, int num_keys) {
  const int64_t k = static_cast<int64_t>(index[r]);
  KD_CHECK_INDEX(k, num_keys);
  return k >= 0 && k < num_keys ? k : -1;
}

// counts[slot] += 1 for each (row, head), slot = h*K + index; also records the slot (-1 for a skipped
// out-of-range index, which sorts first and belongs to no key) when `slots` is given.
template <typename idx_t>
__global__ void count_kernel(const idx_t* __restrict__ index, int* __restrict__ counts, int* __restrict__ slots,
                             Shape shape) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < shape.rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = key_of(index, r, shape.keys);
    const int slot = k < 0 ? -1 : static_cast<int>(r % shape.heads) * shape.keys + static_cast<int>(k);
    if (slot >= 0) atomicAdd(counts + slot, 1);
    if (slots != nullptr) slots[r] = slot;
  }
}

// sums[slot, c:c+kWidth] += x[r, c:c+kWidth], x read once and coalesced. kWidth = 4 needs d % 4 == 0 (a pack
// never straddles two rows, and sums rows stay 16-byte aligned): sm_90 then adds all four in one atomic.
template <int kWidth, typename x_t, typename idx_t>
__global__ void scatter_sums_kernel(const x_t* __restrict__ x, const idx_t* __restrict__ index,
                                    float* __restrict__ sums, Shape shape) {
  const int64_t packs = shape.rows * shape.d / kWidth;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = p * kWidth, r = e / shape.d;
    const int c = static_cast<int>(e - r * shape.d);
    const int64_t k = key_of(index, r, shape.keys);
    if (k < 0) continue;
    const int64_t slot = static_cast<int64_t>(r % shape.heads) * shape.keys + k;
    float* dst = sums + slot * shape.d + c;
    if constexpr (kWidth == 4) {
      const float4 v = make_float4(to_float(x[e]), to_float(x[e + 1]), to_float(x[e + 2]), to_float(x[e + 3]));
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      atomicAdd(reinterpret_cast<float4*>(dst), v);
#else
      atomicAdd(dst, v.x);
      atomicAdd(dst + 1, v.y);
      atomicAdd(dst + 2, v.z);
      atomicAdd(dst + 3, v.w);
#endif
    } else {
      atomicAdd(dst, to_float(x[e]));
    }
  }
}

// First position of `slot` in the ascending array sorted[0, n).
__device__ __forceinline__ int64_t lower_bound(const int* __restrict__ sorted, int64_t n, int slot) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted[mid] < slot) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// sums[slot, c] = sum of x[order[i], c] over the slot's segment of the stably sorted rows: a fixed order.
template <typename x_t>
__global__ void segment_sums_kernel(const x_t* __restrict__ x, const int* __restrict__ sorted_slots,
                                    const int64_t* __restrict__ order, const int* __restrict__ counts,
                                    float* __restrict__ sums, Shape shape) {
  const int64_t total = static_cast<int64_t>(shape.heads) * shape.keys * shape.d;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int slot = static_cast<int>(e / shape.d);
    const int c = static_cast<int>(e - static_cast<int64_t>(slot) * shape.d);
    const int count = counts[slot];
    float sum = 0.f;
    if (count > 0) {
      const int64_t start = lower_bound(sorted_slots, shape.rows, slot);
      for (int64_t i = start; i < start + count; ++i) sum += to_float(x[order[i] * shape.d + c]);
    }
    sums[e] = sum;
  }
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / 32 ? scratch[lane] : 0.f;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // every thread holds the block's total
}

// One block per head: cluster_size <- decay*cluster_size + keep*counts (keep = 1-decay), and head_total[h] = n_h.
__global__ void __launch_bounds__(kThreads)
    cluster_size_kernel(float* __restrict__ cluster_size, const int* __restrict__ counts,
                        float* __restrict__ head_total, int num_keys, float decay, float keep) {
  __shared__ float scratch[kThreads / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * num_keys;
  float local = 0.f;
  for (int k = threadIdx.x; k < num_keys; k += kThreads) {
    const float size = decay * cluster_size[base + k] + keep * static_cast<float>(counts[base + k]);
    cluster_size[base + k] = size;
    local += size;
  }
  const float total = block_sum(local, scratch);
  if (threadIdx.x == 0) head_total[blockIdx.x] = total;
}

// embed_sum <- decay*embed_sum + keep*sums; keys <- embed_sum / ((c + eps) / (n_h + K*eps) * n_h).
__global__ void keys_kernel(float* __restrict__ keys, float* __restrict__ embed_sum, const float* __restrict__ sums,
                            const float* __restrict__ cluster_size, const float* __restrict__ head_total,
                            Shape shape, float decay, float keep, float eps) {
  const int64_t total = static_cast<int64_t>(shape.heads) * shape.keys * shape.d;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t slot = e / shape.d;
    const float n = head_total[slot / shape.keys];
    const float smoothed = (cluster_size[slot] + eps) / (n + shape.keys * eps) * n;
    const float value = decay * embed_sum[e] + keep * sums[e];
    embed_sum[e] = value;
    keys[e] = value / smoothed;
  }
}

// sums [H*K*d] by float atomics (one per element of x, or per four on sm_90): fast, but the summation order
// varies run to run.
template <typename x_t, typename idx_t>
at::Tensor atomic_sums(const at::Tensor& x, const at::Tensor& index, const Shape& shape, cudaStream_t stream) {
  const int64_t state = static_cast<int64_t>(shape.heads) * shape.keys * shape.d;
  at::Tensor sums = at::zeros({state}, x.options().dtype(at::kFloat));
  if (shape.rows > 0 && shape.d % 4 == 0 && shape.d > 0) {
    scatter_sums_kernel<4, x_t, idx_t><<<blocks_for(shape.rows * shape.d / 4, kThreads), kThreads, 0, stream>>>(
        data<const x_t>(x), data<const idx_t>(index), data<float>(sums), shape);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (shape.rows > 0 && shape.d > 0) {
    scatter_sums_kernel<1, x_t, idx_t><<<blocks_for(shape.rows * shape.d, kThreads), kThreads, 0, stream>>>(
        data<const x_t>(x), data<const idx_t>(index), data<float>(sums), shape);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return sums;
}

// sums [H*K*d] in a fixed order: rows stably sorted by slot, each slot summing its segment in row order.
template <typename x_t>
at::Tensor ordered_sums(const at::Tensor& x, const at::Tensor& slots, const at::Tensor& counts, const Shape& shape,
                        cudaStream_t stream) {
  const int64_t state = static_cast<int64_t>(shape.heads) * shape.keys * shape.d;
  at::Tensor sums = at::empty({state}, x.options().dtype(at::kFloat));
  const auto sorted = at::sort(slots, /*stable=*/std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted_slots = std::get<0>(sorted);
  const at::Tensor& order = std::get<1>(sorted);  // int64 row ids; equal slots keep increasing row order
  if (state > 0) {
    segment_sums_kernel<x_t><<<blocks_for(state, kThreads), kThreads, 0, stream>>>(
        data<const x_t>(x), data<const int>(sorted_slots), data<const int64_t>(order), data<const int>(counts),
        data<float>(sums), shape);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return sums;
}

// counts [H*K] (int32, exact) and sums [H*K*d] (float32) of the rows assigned to each key.
template <typename x_t, typename idx_t>
at::Tensor key_stats(const at::Tensor& x, const at::Tensor& index, const at::Tensor& counts, const Shape& shape,
                     bool deterministic, cudaStream_t stream) {
  const at::Tensor slots = deterministic ? at::empty({shape.rows}, x.options().dtype(at::kInt)) : at::Tensor();
  if (shape.rows > 0) {
    count_kernel<idx_t><<<blocks_for(shape.rows, kThreads), kThreads, 0, stream>>>(
        data<const idx_t>(index), data<int>(counts), deterministic ? data<int>(slots) : nullptr, shape);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return deterministic ? ordered_sums<x_t>(x, slots, counts, shape, stream)
                       : atomic_sums<x_t, idx_t>(x, index, shape, stream);
}

// The state tensors are written in place through const references: the dispatcher needs one C++ signature
// for every device, and the CPU kernels take const at::Tensor& throughout.
void ema_update_cuda(const at::Tensor& keys, const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                     const at::Tensor& x_in, const at::Tensor& index_in, double decay, double eps, bool deterministic) {
  // Shapes, dtypes, contiguous state, decay/eps, int32 limits, and one device for all (so one guard).
  checks::ema_update_args(keys, cluster_size, embed_sum, x_in, index_in, decay, eps);
  check_cuda(keys, "ema_update_", "keys");
  const c10::cuda::CUDAGuard device_guard(keys.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const int64_t heads = keys.size(0), num_keys = keys.size(1), d = keys.size(2);
  if (heads == 0 || num_keys == 0) return;
  const Shape shape{x.size(0) * heads, static_cast<int>(heads), static_cast<int>(num_keys), static_cast<int>(d)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor counts = at::zeros({heads * num_keys}, x.options().dtype(at::kInt));
  at::Tensor sums;
  dispatch_float(x.scalar_type(), "ema_update_", [&](auto x_type) {
    using x_t = typename decltype(x_type)::type;
    if (index.scalar_type() == at::kLong) {
      sums = key_stats<x_t, int64_t>(x, index, counts, shape, deterministic, stream);
    } else {  // int32 (checked)
      sums = key_stats<x_t, int32_t>(x, index, counts, shape, deterministic, stream);
    }
  });
  const float keep = static_cast<float>(1.0 - decay);  // the weight of this step's statistics, as 1-decay in double
  at::Tensor head_total = at::empty({heads}, x.options().dtype(at::kFloat));
  cluster_size_kernel<<<static_cast<unsigned int>(heads), kThreads, 0, stream>>>(
      data<float>(cluster_size), data<const int>(counts), data<float>(head_total), shape.keys,
      static_cast<float>(decay), keep);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t state = heads * num_keys * d;
  if (state > 0) {
    keys_kernel<<<blocks_for(state, kThreads), kThreads, 0, stream>>>(
        data<float>(keys), data<float>(embed_sum), data<const float>(sums), data<const float>(cluster_size),
        data<const float>(head_total), shape, static_cast<float>(decay), keep, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace keydistill::cuda

TORCH_LIBRARY_IMPL(keydistill, CUDA, m) {
  m.impl("ema_update_", &keydistill::cuda::ema_update_cuda);
}

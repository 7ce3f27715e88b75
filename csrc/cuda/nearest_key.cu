// nearest_key on CUDA: for x [N,H,d] and keys [H,K,d], the index of the nearest key per (row, head) and
// its squared distance, in one fused pass with no N x K tensor.
//
// A block owns 64 query rows of one head (all heads run in one launch: grid.y = H) and a range of keys
// (grid.z: when N*H alone gives too few blocks to fill the GPU, K is split and a small second kernel
// combines the per-range winners). Keys stream through shared memory in tiles of 64, d in chunks of 32.
// Each warp computes a 16 x 64 tile of scores
//     score(n, k) = ||k||^2 - 2 x_n . k       (||x||^2 is constant per row: same argmin)
// on tensor cores (mma.sync m16n8k8, tf32 in, fp32 accumulate), the accumulators starting at ||k||^2,
// and folds the tile into a running min/argmin held in registers. fp32 operands are split into
// hi + lo tf32 parts ("3xTF32": hi*hi + hi*lo + lo*hi), which is as accurate as fp32 FMA; fp16/bf16
// values are exact in tf32, so their lo part is zero and its products are skipped at compile time.
// The winner's distance is then recomputed directly, sum((x - k)^2) in fp32.
//
// The query tile (-2 x) lives in dynamic shared memory: for d up to kMaxResidentD it is staged once per block,
// all of d (at d = 256, 66.5 KiB), and read at a column offset per chunk; beyond, one chunk at a time beside
// each key tile. Staging loops run over rows and lanes, with no runtime division per element.
#include "checks.h"
#include "cuda/common.cuh"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>

namespace keydistill::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockRows = 16 * kWarps;    // queries per block: one m16 tile per warp
constexpr int kBlockKeys = 64;             // keys per shared-memory tile: eight n8 tiles per warp
constexpr int kKeyTiles = kBlockKeys / 8;
constexpr int kChunk = 32;                 // d per shared-memory chunk: up to four k8 steps
constexpr int kStride = kChunk + 4;        // a row stride of 4 (mod 8) words makes fragment loads bank-conflict free
constexpr int kMaxResidentD = 256;         // query tiles up to this d are staged once per block

// ||k||^2 for every key of every head, once per call.
template <typename key_t>
__global__ void key_norms_kernel(const key_t* __restrict__ keys, float* __restrict__ norms, int64_t num_rows, int d) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= num_rows) return;
  const key_t* key = keys + r * d;
  float sum = 0.f;
  for (int c = 0; c < d; ++c) {
    const float v = to_float(key[c]);
    sum = fmaf(v, v, sum);
  }
  norms[r] = sum;
}

__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(v));
  return bits;
}

// v ~= hi + lo with both parts in tf32; lo is only computed (and only used) for fp32 operands.
template <bool kSplit>
__device__ __forceinline__ void split_tf32(float v, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(v);
  if constexpr (kSplit) lo = to_tf32(v - __uint_as_float(hi));
}

// c += a * b for one m16n8k8 tile. Fragment layout (PTX ISA, with g = lane / 4, t = lane % 4):
// a = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4];  b = B[t][g], B[t+4][g];
// c = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1].
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct Shape {
  int64_t rows;    // N
  int heads;       // H
  int keys;        // K
  int d;
  int split_keys;  // keys per grid.z range, a multiple of kBlockKeys
};

// The running winner of each key range when K is split: [splits, N, H] each.
struct Partial {
  float* score;
  int* key;
};

// The winner's exact squared distance, sum((x - k)^2) in fp32, written with its index.
template <typename x_t, typename key_t>
__device__ __forceinline__ void write_winner(const x_t* __restrict__ x, const key_t* __restrict__ keys, int64_t n,
                                             int h, int k, const Shape& shape, int64_t* __restrict__ index,
                                             float* __restrict__ sqdist) {
  const int64_t pair = n * shape.heads + h;  // (n, h) in [N, H]
  const x_t* xn = x + pair * shape.d;
  const key_t* kk = keys + (static_cast<int64_t>(h) * shape.keys + k) * shape.d;
  float dist = 0.f;
  for (int c = 0; c < shape.d; ++c) {
    const float diff = to_float(xn[c]) - to_float(kk[c]);
    dist = fmaf(diff, diff, dist);
  }
  index[pair] = k;
  sqdist[pair] = dist;
}

// Stage columns [c0, c0 + width) of kRows consecutive vectors into tile (row stride tile_stride), scaled by
// `scale`; vectors past `limit` and columns past d are zero, so padded lanes add nothing to the dot products.
// A warp per row, a lane per column: no division.
template <typename T, int kRows>
__device__ __forceinline__ void stage_tile(float* tile, int tile_stride, const T* __restrict__ base, int64_t first,
                                           int64_t limit, int64_t vector_stride, int c0, int width, int d,
                                           float scale) {
  const int lane = threadIdx.x % 32;
  for (int r = threadIdx.x / 32; r < kRows; r += kThreads / 32) {
    const int64_t v = first + r;
    for (int c = lane; c < width; c += 32) {
      const int col = c0 + c;
      tile[r * tile_stride + c] = (v < limit && col < d) ? scale * to_float(base[v * vector_stride + col]) : 0.f;
    }
  }
}

// The query tile's row stride: all of d (padded) when it is staged once, else one chunk.
__host__ __device__ __forceinline__ int query_stride(int dpad) { return dpad <= kMaxResidentD ? dpad + 4 : kStride; }

template <typename x_t, typename key_t>
__global__ void __launch_bounds__(kThreads)
    nearest_key_kernel(const x_t* __restrict__ x, const key_t* __restrict__ keys, const float* __restrict__ norms,
                       int64_t* __restrict__ index, float* __restrict__ sqdist, Partial partial, Shape shape) {
  constexpr bool kSplitX = std::is_same_v<x_t, float>;  // fp16/bf16 are exact in tf32
  constexpr bool kSplitK = std::is_same_v<key_t, float>;
  extern __shared__ float query_tile[];  // -2 x: [kBlockRows][query_stride(dpad)]
  __shared__ float key_tile[kBlockKeys][kStride];

  const int h = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wrow = warp * 16;  // this warp's first row in the tile
  const int dpad = (shape.d + 7) / 8 * 8;
  const bool queries_resident = dpad <= kMaxResidentD;  // then the query tile is staged once, not per key tile
  const int qstride = query_stride(dpad);
  const x_t* head_x = x + static_cast<int64_t>(h) * shape.d;  // row n of this head at n * H * d
  const int64_t x_stride = static_cast<int64_t>(shape.heads) * shape.d;
  const key_t* head_keys = keys + static_cast<int64_t>(h) * shape.keys * shape.d;
  const float* head_norms = norms + static_cast<int64_t>(h) * shape.keys;
  const int key_begin = blockIdx.z * shape.split_keys;
  const int key_end = static_cast<int>(min(static_cast<int64_t>(shape.keys),  // in int64: K may be near INT_MAX
                                            static_cast<int64_t>(key_begin) + shape.split_keys));

  if (queries_resident) {
    stage_tile<x_t, kBlockRows>(query_tile, qstride, head_x, row0, shape.rows, x_stride, 0, dpad, shape.d, -2.f);
  }
  // Running minimum of rows wrow+g (slot 0) and wrow+g+8 (slot 1) over this thread's columns.
  float best[2] = {INFINITY, INFINITY};
  int best_key[2] = {0, 0};

  for (int key0 = key_begin; key0 < key_end; key0 += kBlockKeys) {
    float acc[kKeyTiles][4];
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int k = key0 + j * 8 + 2 * t + (i & 1);
        acc[j][i] = k < key_end ? head_norms[k] : INFINITY;  // keys past the range never win
      }
    }
    for (int c0 = 0; c0 < dpad; c0 += kChunk) {
      const int width = min(kChunk, dpad - c0);
      __syncthreads();  // every warp is done reading the previous tiles
      if (!queries_resident) {
        stage_tile<x_t, kBlockRows>(query_tile, qstride, head_x, row0, shape.rows, x_stride, c0, width, shape.d,
                                    -2.f);
      }
      stage_tile<key_t, kBlockKeys>(&key_tile[0][0], kStride, head_keys, key0, key_end, shape.d, c0, width, shape.d,
                                    1.f);
      __syncthreads();
      const float* q0 = query_tile + (wrow + g) * qstride + (queries_resident ? c0 : 0);  // row wrow+g
      const float* q8 = q0 + 8 * qstride;                                                // row wrow+g+8
#pragma unroll
      for (int step = 0; step < kChunk / 8; ++step) {
        if (step * 8 >= width) break;
        const int c = step * 8 + t;
        uint32_t a_hi[4], a_lo[4];
        split_tf32<kSplitX>(q0[c], a_hi[0], a_lo[0]);
        split_tf32<kSplitX>(q8[c], a_hi[1], a_lo[1]);
        split_tf32<kSplitX>(q0[c + 4], a_hi[2], a_lo[2]);
        split_tf32<kSplitX>(q8[c + 4], a_hi[3], a_lo[3]);
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j) {
          uint32_t b_hi[2], b_lo[2];
          split_tf32<kSplitK>(key_tile[j * 8 + g][c], b_hi[0], b_lo[0]);
          split_tf32<kSplitK>(key_tile[j * 8 + g][c + 4], b_hi[1], b_lo[1]);
          if constexpr (kSplitX) mma_tf32(acc[j], a_lo, b_hi[0], b_hi[1]);  // small terms first
          if constexpr (kSplitK) mma_tf32(acc[j], a_hi, b_lo[0], b_lo[1]);
          mma_tf32(acc[j], a_hi, b_hi[0], b_hi[1]);
        }
      }
    }
    // A thread meets its keys in increasing k, so a strict < keeps the lowest k of a tie.
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int slot = i / 2;
        if (acc[j][i] < best[slot]) {
          best[slot] = acc[j][i];
          best_key[slot] = key0 + j * 8 + 2 * t + (i & 1);
        }
      }
    }
  }

  // The four threads of a group (lanes 4g..4g+3) share rows: combine them, ties to the lowest k.
#pragma unroll
  for (int offset = 1; offset < 4; offset <<= 1) {
#pragma unroll
    for (int slot = 0; slot < 2; ++slot) {
      const float other = __shfl_xor_sync(0xffffffffu, best[slot], offset);
      const int other_key = __shfl_xor_sync(0xffffffffu, best_key[slot], offset);
      if (other < best[slot] || (other == best[slot] && other_key < best_key[slot])) {
        best[slot] = other;
        best_key[slot] = other_key;
      }
    }
  }
  if (t >= 2) return;
  // Thread t = 0 finishes row wrow+g, t = 1 row wrow+g+8.
  const int64_t n = row0 + wrow + g + 8 * t;
  if (n >= shape.rows) return;
  const int k = t == 0 ? best_key[0] : best_key[1];
  if (partial.score == nullptr) {
    write_winner(x, keys, n, h, k, shape, index, sqdist);
  } else {
    const int64_t slot = (blockIdx.z * shape.rows + n) * shape.heads + h;
    partial.score[slot] = t == 0 ? best[0] : best[1];
    partial.key[slot] = k;
  }
}

// The winner over all key ranges of each (n, h); ranges come in increasing k, so a strict < keeps the lowest k.
template <typename x_t, typename key_t>
__global__ void combine_ranges_kernel(const x_t* __restrict__ x, const key_t* __restrict__ keys, Partial partial,
                                      int splits, int64_t* __restrict__ index, float* __restrict__ sqdist,
                                      Shape shape) {
  const int64_t pairs = shape.rows * shape.heads;
  const int64_t pair = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (pair >= pairs) return;
  float best = partial.score[pair];
  int k = partial.key[pair];
  for (int s = 1; s < splits; ++s) {
    const float score = partial.score[s * pairs + pair];
    if (score < best) {
      best = score;
      k = partial.key[s * pairs + pair];
    }
  }
  write_winner(x, keys, pair / shape.heads, static_cast<int>(pair % shape.heads), k, shape, index, sqdist);
}

// Keys per grid.z range: all K when N*H rows fill the GPU, else K split for about eight blocks per multiprocessor.
int keys_per_range(int64_t row_blocks, int64_t heads, int64_t num_keys, int device) {
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = row_blocks * heads, key_tiles = (num_keys + kBlockKeys - 1) / kBlockKeys;
  const int64_t wanted = (int64_t{8} * multiprocessors + blocks - 1) / blocks;
  const int64_t ranges = std::min(key_tiles, wanted);
  return static_cast<int>((key_tiles + ranges - 1) / ranges * kBlockKeys);
}

template <typename x_t, typename key_t>
void launch(const at::Tensor& x, const at::Tensor& keys, at::Tensor& index, at::Tensor& sqdist, Shape shape,
            cudaStream_t stream) {
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t num_keys = static_cast<int64_t>(shape.heads) * shape.keys;
  at::Tensor norms = at::empty({num_keys}, f32);
  constexpr int kSmallThreads = 256;
  key_norms_kernel<key_t><<<blocks_for(num_keys, kSmallThreads, INT_MAX), kSmallThreads, 0, stream>>>(
      data<const key_t>(keys), data<float>(norms), num_keys, shape.d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t row_blocks = (shape.rows + kBlockRows - 1) / kBlockRows;
  shape.split_keys = keys_per_range(row_blocks, shape.heads, shape.keys, x.get_device());
  // none of them empty; summed in 64 bits: K + split_keys passes INT_MAX for K near the 2^31 limit
  const int ranges = static_cast<int>((int64_t{shape.keys} + shape.split_keys - 1) / shape.split_keys);
  const int64_t pairs = shape.rows * shape.heads;
  at::Tensor part_score, part_key;
  Partial partial{nullptr, nullptr};
  if (ranges > 1) {
    part_score = at::empty({ranges, pairs}, f32);
    part_key = at::empty({ranges, pairs}, x.options().dtype(at::kInt));
    partial = {data<float>(part_score), data<int>(part_key)};
  }
  const dim3 grid(static_cast<unsigned int>(row_blocks), shape.heads, ranges);
  const int dpad = (shape.d + 7) / 8 * 8;
  const int query_bytes = kBlockRows * query_stride(dpad) * static_cast<int>(sizeof(float));
  if (query_bytes > 48 * 1024) {  // past the default limit of dynamic shared memory: opt in (sm_70 and newer)
    C10_CUDA_CHECK(cudaFuncSetAttribute(nearest_key_kernel<x_t, key_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        query_bytes));
  }
  nearest_key_kernel<x_t, key_t><<<grid, kThreads, query_bytes, stream>>>(
      data<const x_t>(x), data<const key_t>(keys), data<const float>(norms), data<int64_t>(index),
      data<float>(sqdist), partial, shape);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (ranges > 1) {
    combine_ranges_kernel<x_t, key_t><<<blocks_for(pairs, kSmallThreads, INT_MAX), kSmallThreads, 0, stream>>>(
        data<const x_t>(x), data<const key_t>(keys), partial, ranges, data<int64_t>(index), data<float>(sqdist), shape);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> nearest_key_cuda(const at::Tensor& x_in, const at::Tensor& keys_in) {
  checks::nearest_key_args(x_in, keys_in);  // shapes, dtypes, int32 limits, and one device for both
  check_cuda(x_in, "nearest_key", "x");
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor keys = keys_in.contiguous();
  const int64_t rows = x.size(0), heads = x.size(1), d = x.size(2), num_keys = keys.size(1);
  at::Tensor index = at::empty({rows, heads}, x.options().dtype(at::kLong));
  at::Tensor sqdist = at::empty({rows, heads}, x.options().dtype(at::kFloat));
  if (rows == 0 || heads == 0) return {index, sqdist};
  static_assert(checks::kMaxKeys <= INT_MAX - kBlockKeys, "a key tile past K must not overflow int");
  static_assert(checks::kMaxHeads <= 65535, "heads run on grid.y");
  TORCH_CHECK((rows + kBlockRows - 1) / kBlockRows <= INT_MAX, "keydistill::nearest_key (CUDA): N too large for grid.x");
  const Shape shape{rows, static_cast<int>(heads), static_cast<int>(num_keys), static_cast<int>(d), 0};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), "nearest_key", [&](auto x_type) {
    using x_t = typename decltype(x_type)::type;
    if (keys.scalar_type() == at::kFloat) {
      launch<x_t, float>(x, keys, index, sqdist, shape, stream);
    } else {  // x's dtype (checked)
      launch<x_t, x_t>(x, keys, index, sqdist, shape, stream);
    }
  });
  return {index, sqdist};
}

}  // namespace
}  // namespace keydistill::cuda

TORCH_LIBRARY_IMPL(keydistill, CUDA, m) {
  m.impl("nearest_key", &keydistill::cuda::nearest_key_cuda);
}

// nearest_key on the CPU: for x [N,H,d] and keys [H,K,d], the index (int64 [N,H]) and squared distance
// (float32 [N,H]) of each row's nearest key, ties to the lowest k.
//
// Keys are ranked by ||k||^2 - 2 x.k (||x||^2 is the same for every key of a row; ||k||^2 is computed once
// per call), then the winner's distance is recomputed exactly as sum((x - k)^2) in fp32, so sqdist carries
// no cancellation error. No N x K tensor is ever formed. Two tilings:
//  * small d (the bottleneck's d=12): a register-blocked AVX2 micro-kernel. x is transposed to [H, d, N]
//    and scaled by -2, so 24 queries sit in three 8-lane vectors; each key coordinate is broadcast, one FMA
//    advances 8 queries, and the running min/argmin of those 24 queries is carried over all K keys.
//  * large d: the dot products are a GEMM (at::mm of a tile of queries against all keys of a head into one
//    reused buffer, which MKL runs near peak), then one vectorised scan per row forms ||k||^2 - 2 x.k and
//    keeps its first minimum.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/simd.h"

namespace keydistill::cpu {
namespace {

constexpr int64_t kQueryBlock = 24;         // queries per micro-kernel block: three 8-lane vectors
constexpr int kKeyStep = 4;                 // keys per micro-kernel step: 3 x 4 accumulators
constexpr int64_t kGemmMinDim = 48;         // from this d on the GEMM tiling wins (see benchmarks/)
constexpr int64_t kGemmTileBytes = 16 << 20;  // scores buffer of the GEMM tiling: >= 512 rows keeps MKL at full speed

// --- shared pieces --------------------------------------------------------------------------------------

// Squared norms of the keys, [H, K], once per call.
at::Tensor key_norms(const at::Tensor& keys) {
  const int64_t rows = keys.size(0) * keys.size(1), d = keys.size(2);
  auto out = at::empty({keys.size(0), keys.size(1)}, keys.options());
  const float* k = keys.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float s = 0.f;
      for (int64_t j = 0; j < d; ++j) s += k[r * d + j] * k[r * d + j];
      o[r] = s;
    }
  });
  return out;
}

float squared_distance(const float* x, int64_t x_stride, float x_scale, const float* key, int64_t d) {
  float s = 0.f;
  for (int64_t j = 0; j < d; ++j) {
    const float diff = x[j * x_stride] * x_scale - key[j];
    s += diff * diff;
  }
  return s;
}

// --- small d: queries in lanes ----------------------------------------------------------------------------

// x as float [H, d, npad], scaled by -2 (exact) and zero-padded, for any input dtype and strides.
at::Tensor transposed_queries(const at::Tensor& x, int64_t npad) {
  const int64_t n = x.size(0), h = x.size(1), d = x.size(2);
  auto xt = at::empty({h, d, npad}, x.options().dtype(at::kFloat));
  float* out = xt.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nearest_key_transpose", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
    at::parallel_for(0, h * d, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* src = in + (r / d) * s1 + (r % d) * s2;
        float* dst = out + r * npad;
        for (int64_t i = 0; i < n; ++i) dst[i] = -2.f * static_cast<float>(src[i * s0]);
        std::fill(dst + n, dst + npad, 0.f);
      }
    });
  });
  return xt;
}

// Best key per query of one block, scalar: xt points at query 0 of the block in [d, npad] layout.
void scan_block_scalar(const float* xt, int64_t npad, const float* keys, const float* knorm, int64_t num_keys,
                       int64_t d, int32_t* best) {
  for (int64_t q = 0; q < kQueryBlock; ++q) {
    float best_score = std::numeric_limits<float>::infinity();
    int32_t arg = 0;
    for (int64_t k = 0; k < num_keys; ++k) {
      float s = knorm[k];
      for (int64_t j = 0; j < d; ++j) s += xt[j * npad + q] * keys[k * d + j];
      if (s < best_score) {  // strict: ties keep the lowest k
        best_score = s;
        arg = static_cast<int32_t>(k);
      }
    }
    best[q] = arg;
  }
}

#ifdef KEYDISTILL_X86
constexpr int kQueryVectors = kQueryBlock / 8;

// Scores of keys k0..k0+NK-1 against the block's queries, folded into the running (best, arg) in key order.
// kQueryVectors x NK = 12 independent FMA chains: enough to hide the FMA latency on two pipes.
template <int NK>
KD_AVX2_INLINE void scan_keys_avx2(const float* xt, int64_t npad, const float* keys, const float* knorm, int64_t d,
                                   int64_t k0, __m256* best, __m256i* arg) {
  __m256 acc[kQueryVectors][NK];
  for (int c = 0; c < NK; ++c)
    for (int q = 0; q < kQueryVectors; ++q) acc[q][c] = _mm256_set1_ps(knorm[k0 + c]);
  const float* key = keys + k0 * d;
  for (int64_t j = 0; j < d; ++j) {
    __m256 x[kQueryVectors];
    for (int q = 0; q < kQueryVectors; ++q) x[q] = _mm256_loadu_ps(xt + j * npad + 8 * q);
    for (int c = 0; c < NK; ++c) {
      const __m256 kc = _mm256_broadcast_ss(key + c * d + j);
      for (int q = 0; q < kQueryVectors; ++q) acc[q][c] = _mm256_fmadd_ps(x[q], kc, acc[q][c]);
    }
  }
  for (int q = 0; q < kQueryVectors; ++q) {
    // A running minimum rarely moves (about ln K times per query), so first ask whether any of the NK keys
    // beats it in any lane: min + compare + movemask, instead of NK compare-and-blends every step.
    // min(acc, m) returns m when acc is NaN, so a NaN score never hides a real improvement.
    __m256 m = best[q];
    for (int c = 0; c < NK; ++c) m = _mm256_min_ps(acc[q][c], m);
    if (_mm256_movemask_ps(_mm256_cmp_ps(m, best[q], _CMP_LT_OQ)) == 0) continue;
    for (int c = 0; c < NK; ++c) {  // strict < in key order: ties keep the lowest k
      const __m256 k = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(k0 + c)));
      const __m256 lt = _mm256_cmp_ps(acc[q][c], best[q], _CMP_LT_OQ);
      best[q] = _mm256_blendv_ps(best[q], acc[q][c], lt);
      arg[q] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(arg[q]), k, lt));
    }
  }
}

KD_AVX2 void scan_block_avx2(const float* xt, int64_t npad, const float* keys, const float* knorm, int64_t num_keys,
                             int64_t d, int32_t* out) {
  __m256 best[kQueryVectors];
  __m256i arg[kQueryVectors];
  for (int q = 0; q < kQueryVectors; ++q) {
    best[q] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    arg[q] = _mm256_setzero_si256();
  }
  int64_t k = 0;
  for (; k + kKeyStep <= num_keys; k += kKeyStep) scan_keys_avx2<kKeyStep>(xt, npad, keys, knorm, d, k, best, arg);
  for (; k < num_keys; ++k) scan_keys_avx2<1>(xt, npad, keys, knorm, d, k, best, arg);
  for (int q = 0; q < kQueryVectors; ++q) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * q), arg[q]);
}
#endif

void nearest_small_d(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& knorm, at::Tensor& index,
                     at::Tensor& sqdist) {
  const int64_t n = x.size(0), h = x.size(1), d = x.size(2), num_keys = keys.size(1);
  const int64_t blocks = (n + kQueryBlock - 1) / kQueryBlock, npad = blocks * kQueryBlock;
  const at::Tensor xt = transposed_queries(x, npad);
  const float* xtp = xt.const_data_ptr<float>();
  const float* kp = keys.const_data_ptr<float>();
  const float* np = knorm.const_data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  float* dp = sqdist.data_ptr<float>();
#ifdef KEYDISTILL_X86
  const auto scan = has_avx2_fma() ? scan_block_avx2 : scan_block_scalar;
#else
  const auto scan = scan_block_scalar;
#endif
  // Tasks in (head, block) order, so each thread's contiguous range reuses one head's keys from cache.
  at::parallel_for(0, h * blocks, 1, [&](int64_t begin, int64_t end) {
    int32_t best[kQueryBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t head = t / blocks, q0 = (t % blocks) * kQueryBlock;
      const float* xblock = xtp + head * d * npad + q0;
      const float* head_keys = kp + head * num_keys * d;
      scan(xblock, npad, head_keys, np + head * num_keys, num_keys, d, best);
      for (int64_t q = 0; q < std::min(kQueryBlock, n - q0); ++q) {
        ip[(q0 + q) * h + head] = best[q];
        dp[(q0 + q) * h + head] = squared_distance(xblock + q, npad, -0.5f, head_keys + best[q] * d, d);
      }
    }
  });
}

// --- large d: GEMM tiles + first-minimum scans --------------------------------------------------------------

// The first k minimising knorm[k] - 2 dot[k], i.e. the nearest key given the row's dot products.
int64_t first_argmin_scalar(const float* dot, const float* knorm, int64_t n) {
  int64_t arg = 0;
  float best = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const float score = std::fma(-2.f, dot[i], knorm[i]);
    if (score < best) {
      best = score;
      arg = i;
    }
  }
  return arg;
}

#ifdef KEYDISTILL_X86
// Lane l tracks the first minimum among indices l, l+8, ...; the answer is the lowest index among the lanes
// that hold the overall minimum, then the tail (whose indices are larger) can only win strictly.
KD_AVX2 int64_t first_argmin_avx2(const float* dot, const float* knorm, int64_t n) {
  if (n < 16) return first_argmin_scalar(dot, knorm, n);
  const __m256 minus2 = _mm256_set1_ps(-2.f);
  __m256 best = _mm256_fmadd_ps(minus2, _mm256_loadu_ps(dot), _mm256_loadu_ps(knorm));
  __m256i arg = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), cur = arg;
  const __m256i step = _mm256_set1_epi32(8);
  int64_t i = 8;
  for (; i + 8 <= n; i += 8) {
    cur = _mm256_add_epi32(cur, step);
    const __m256 v = _mm256_fmadd_ps(minus2, _mm256_loadu_ps(dot + i), _mm256_loadu_ps(knorm + i));
    const __m256 lt = _mm256_cmp_ps(v, best, _CMP_LT_OQ);
    best = _mm256_blendv_ps(best, v, lt);
    arg = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(arg), _mm256_castsi256_ps(cur), lt));
  }
  alignas(32) float lane_best[8];
  alignas(32) int32_t lane_arg[8];
  _mm256_store_ps(lane_best, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_arg), arg);
  int64_t result = lane_arg[0];
  float value = lane_best[0];
  for (int l = 1; l < 8; ++l)
    if (lane_best[l] < value || (lane_best[l] == value && lane_arg[l] < result)) {
      value = lane_best[l];
      result = lane_arg[l];
    }
  for (; i < n; ++i) {
    const float score = std::fma(-2.f, dot[i], knorm[i]);
    if (score < value) {
      value = score;
      result = i;
    }
  }
  return result;
}
#endif

void nearest_large_d(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& knorm, at::Tensor& index,
                     at::Tensor& sqdist) {
  const int64_t n = x.size(0), h = x.size(1), d = x.size(2), num_keys = keys.size(1);
  const at::Tensor xh = x.to(at::kFloat).transpose(0, 1).contiguous();  // [H, N, d]
  const int64_t tile = std::clamp<int64_t>(kGemmTileBytes / (num_keys * 4), std::min<int64_t>(256, n), n);
  at::Tensor scores = at::empty({tile, num_keys}, keys.options());
#ifdef KEYDISTILL_X86
  const auto argmin = has_avx2_fma() ? first_argmin_avx2 : first_argmin_scalar;
#else
  const auto argmin = first_argmin_scalar;
#endif
  int64_t* ip = index.data_ptr<int64_t>();
  float* dp = sqdist.data_ptr<float>();
  for (int64_t head = 0; head < h; ++head) {
    const at::Tensor head_keys = keys[head], head_x = xh[head];
    const float* np = knorm.const_data_ptr<float>() + head * num_keys;
    const float* kp = head_keys.const_data_ptr<float>();
    const float* xp = head_x.const_data_ptr<float>();
    for (int64_t n0 = 0; n0 < n; n0 += tile) {
      const int64_t rows = std::min(tile, n - n0);
      at::Tensor out = scores.narrow(0, 0, rows);
      at::mm_out(out, head_x.narrow(0, n0, rows), head_keys.t());  // dot products x.k
      const float* sp = out.const_data_ptr<float>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t k = argmin(sp + r * num_keys, np, num_keys), row = n0 + r;
          ip[row * h + head] = k;
          dp[row * h + head] = squared_distance(xp + row * d, 1, 1.f, kp + k * d, d);
        }
      });
    }
  }
}

std::tuple<at::Tensor, at::Tensor> nearest_key_cpu(const at::Tensor& x, const at::Tensor& keys) {
  TORCH_CHECK(x.dim() == 3 && keys.dim() == 3, "nearest_key: x must be [N,H,d] and keys [H,K,d]");
  TORCH_CHECK(x.size(1) == keys.size(0) && x.size(2) == keys.size(2), "nearest_key: x and keys disagree on H or d");
  TORCH_CHECK(keys.size(1) > 0, "nearest_key: K must be >= 1");
  TORCH_CHECK(keys.size(1) < (int64_t{1} << 31), "nearest_key: K must be < 2^31");
  const int64_t n = x.size(0), h = x.size(1), d = x.size(2);
  auto index = at::empty({n, h}, x.options().dtype(at::kLong));
  auto sqdist = at::empty({n, h}, x.options().dtype(at::kFloat));
  if (n == 0 || h == 0) return {index, sqdist};
  const at::Tensor keys32 = keys.to(at::kFloat).contiguous();
  const at::Tensor knorm = key_norms(keys32);
  if (d >= kGemmMinDim)
    nearest_large_d(x, keys32, knorm, index, sqdist);
  else
    nearest_small_d(x, keys32, knorm, index, sqdist);
  return {index, sqdist};
}

}  // namespace

TORCH_LIBRARY_IMPL(keydistill, CPU, m) { m.impl("nearest_key", &nearest_key_cpu); }

}  // namespace keydistill::cpu

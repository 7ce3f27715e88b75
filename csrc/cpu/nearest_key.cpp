// nearest_key on the CPU: for x [N,H,d] and keys [H,K,d], the index (int64 [N,H]) and squared distance
// (float32 [N,H]) of each row's nearest key, ties to the lowest k.
//
// Keys are ranked by ||k||^2 - 2 x.k (||x||^2 is the same for every key of a row; ||k||^2 is computed once
// per call), then the winner's distance is recomputed exactly as sum((x - k)^2) in fp32, so sqdist carries
// no cancellation error. No N x K tensor is ever formed. Two tilings:
//  * small d (the bottleneck's d=12): a register-blocked AVX2 micro-kernel. x is transposed to [H, d, N]
//    and scaled by -2, so 24 queries sit in three 8-lane vectors; each key coordinate is broadcast, one FMA
//    advances 8 queries, and the running min/argmin of those 24 queries is carried over all K keys.
//  * large d: keys in lanes. Keys are packed per head into panels of 16 (scaled by -2, one coordinate's 16
//    values side by side); a 6-query x 16-key register tile (12 accumulators) runs over all d, then its
//    scores fold into per-query 8-lane running minima. A GEMM with the argmin fused into its epilogue: no
//    scores matrix, ~90% of the FMA peak at d=256.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"
#include "cpu/simd.h"

namespace keydistill::cpu {
namespace {

constexpr int64_t kQueryBlock = 24;         // queries per micro-kernel block: three 8-lane vectors
constexpr int kKeyStep = 4;                 // keys per micro-kernel step: 3 x 4 accumulators
// From this d on the packed-panel tiling wins (measured at N=4096, H=8, K=1024 on 2 Zen cores: d=64
// queries-in-lanes 72 vs panels 65 GFLOP/s; d=96 57 vs 79).
constexpr int64_t kPanelMinDim = 80;

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
  const auto scan = KD_PICK_SIMD(scan_block_avx2, scan_block_scalar);
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

// --- large d: keys in lanes, packed panels -----------------------------------------------------------------
// A GEMM with the argmin fused into its epilogue (BLIS-style register blocking), so the N x K scores never
// leave registers: MKL's GEMM + a scan over its output moved 2 x 4 bytes per score through DRAM.

constexpr int kPanel = 16;                // keys per panel: two 8-lane vectors
constexpr int kTileQueries = 6;           // queries per micro-kernel call: 6 x 2 accumulators + 2 key vectors + 1
constexpr int64_t kPanelQueryBlock = 96;  // queries per task: their rows (96 x d floats) stay in L2 across panels

// keys [H, K, d] as float [H, panels, d, 16] scaled by -2 (exact): panel p holds keys 16p..16p+15 with one
// coordinate's 16 values side by side. Padding keys are zero; their norms (below) are +inf, so they never win.
at::Tensor packed_keys(const at::Tensor& keys32, int64_t panels) {
  const int64_t h = keys32.size(0), num_keys = keys32.size(1), d = keys32.size(2);
  auto out = at::zeros({h, panels, d, kPanel}, keys32.options());
  const float* k = keys32.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, h * panels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t hp = begin; hp < end; ++hp) {
      const int64_t head = hp / panels, k0 = (hp % panels) * kPanel;
      for (int64_t c = 0; c < std::min<int64_t>(kPanel, num_keys - k0); ++c) {
        const float* key = k + (head * num_keys + k0 + c) * d;
        for (int64_t j = 0; j < d; ++j) o[(hp * d + j) * kPanel + c] = -2.f * key[j];
      }
    }
  });
  return out;
}

// knorm [H, K] padded to [H, panels * 16] with +inf.
at::Tensor padded_norms(const at::Tensor& knorm, int64_t panels) {
  auto out = at::full({knorm.size(0), panels * kPanel}, std::numeric_limits<float>::infinity(), knorm.options());
  out.narrow(1, 0, knorm.size(1)).copy_(knorm);
  return out;
}

// Running best per query: 8 lanes, lane l holding the first minimum among keys l, l+8, l+16, ...
struct LaneBest {
  float value[8];
  int32_t arg[8];
};

void panel_tile_scalar(int nq, const float* x, int64_t x_stride, const float* panel, const float* pnorm, int64_t d,
                       int32_t k0, LaneBest* best) {
  for (int q = 0; q < nq; ++q)
    for (int c = 0; c < kPanel; ++c) {
      float s = pnorm[c];
      for (int64_t j = 0; j < d; ++j) s += x[q * x_stride + j] * panel[j * kPanel + c];
      LaneBest& b = best[q];
      if (s < b.value[c % 8]) {  // strict, keys in increasing order: ties keep the lowest k
        b.value[c % 8] = s;
        b.arg[c % 8] = k0 + c;
      }
    }
}

#ifdef KEYDISTILL_X86
// Fold one query's scores of keys k0..k0+7 (lo) and k0+8..k0+15 (hi) into its running best. Scores come in
// by value: indexing an accumulator array here made GCC keep the whole array in memory, inside the FMA loop.
KD_AVX2_INLINE void fold_panel_scores(__m256 lo, __m256 hi, int32_t k0, LaneBest& best) {
  __m256 b = _mm256_loadu_ps(best.value);
  // The running minimum rarely moves: test first, update only when some lane improves. min() returns b
  // when a score is NaN, so NaN never wins.
  const __m256 m = _mm256_min_ps(_mm256_min_ps(lo, hi), b);
  if (_mm256_movemask_ps(_mm256_cmp_ps(m, b, _CMP_LT_OQ)) == 0) return;
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 a = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(best.arg)));
  __m256 lt = _mm256_cmp_ps(lo, b, _CMP_LT_OQ);  // lower keys first: strict < keeps the first minimum per lane
  b = _mm256_blendv_ps(b, lo, lt);
  a = _mm256_blendv_ps(a, _mm256_castsi256_ps(_mm256_add_epi32(lanes, _mm256_set1_epi32(k0))), lt);
  lt = _mm256_cmp_ps(hi, b, _CMP_LT_OQ);
  b = _mm256_blendv_ps(b, hi, lt);
  a = _mm256_blendv_ps(a, _mm256_castsi256_ps(_mm256_add_epi32(lanes, _mm256_set1_epi32(k0 + 8))), lt);
  _mm256_storeu_ps(best.value, b);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(best.arg), _mm256_castps_si256(a));
}

// NQ queries (rows x + q * x_stride) against one panel: 2 * NQ accumulators over all d coordinates, each
// coordinate costing 2 key-vector loads and NQ broadcasts for 2 * NQ FMAs.
template <int NQ>
KD_AVX2_INLINE void panel_tile_avx2(const float* x, int64_t x_stride, const float* panel, const float* pnorm,
                                    int64_t d, int32_t k0, LaneBest* best) {
  __m256 acc[NQ][2];
  const __m256 norm0 = _mm256_loadu_ps(pnorm), norm1 = _mm256_loadu_ps(pnorm + 8);
#pragma GCC unroll 6
  for (int q = 0; q < NQ; ++q) {
    acc[q][0] = norm0;
    acc[q][1] = norm1;
  }
  for (int64_t j = 0; j < d; ++j) {
    const __m256 k_lo = _mm256_loadu_ps(panel + j * kPanel), k_hi = _mm256_loadu_ps(panel + j * kPanel + 8);
#pragma GCC unroll 6
    for (int q = 0; q < NQ; ++q) {
      const __m256 xq = _mm256_broadcast_ss(x + q * x_stride + j);
      acc[q][0] = _mm256_fmadd_ps(xq, k_lo, acc[q][0]);
      acc[q][1] = _mm256_fmadd_ps(xq, k_hi, acc[q][1]);
    }
  }
#pragma GCC unroll 6
  for (int q = 0; q < NQ; ++q) fold_panel_scores(acc[q][0], acc[q][1], k0, best[q]);
}

KD_AVX2 void panel_tile_avx2_any(int nq, const float* x, int64_t x_stride, const float* panel, const float* pnorm,
                                 int64_t d, int32_t k0, LaneBest* best) {
  switch (nq) {
    case 6: return panel_tile_avx2<6>(x, x_stride, panel, pnorm, d, k0, best);
    case 5: return panel_tile_avx2<5>(x, x_stride, panel, pnorm, d, k0, best);
    case 4: return panel_tile_avx2<4>(x, x_stride, panel, pnorm, d, k0, best);
    case 3: return panel_tile_avx2<3>(x, x_stride, panel, pnorm, d, k0, best);
    case 2: return panel_tile_avx2<2>(x, x_stride, panel, pnorm, d, k0, best);
    default: return panel_tile_avx2<1>(x, x_stride, panel, pnorm, d, k0, best);
  }
}
#endif

// The first minimum over the 8 lanes: the smallest value, ties to the lowest key.
int32_t lane_argmin(const LaneBest& b) {
  int l0 = 0;
  for (int l = 1; l < 8; ++l)
    if (b.value[l] < b.value[l0] || (b.value[l] == b.value[l0] && b.arg[l] < b.arg[l0])) l0 = l;
  return b.arg[l0];
}

void nearest_large_d(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& knorm, at::Tensor& index,
                     at::Tensor& sqdist) {
  const int64_t n = x.size(0), h = x.size(1), d = x.size(2), num_keys = keys.size(1);
  const int64_t panels = (num_keys + kPanel - 1) / kPanel, blocks = (n + kPanelQueryBlock - 1) / kPanelQueryBlock;
  const at::Tensor x32 = x.to(at::kFloat).contiguous();  // [N, H, d]: row (n, h) at (n * H + h) * d
  const at::Tensor packed = packed_keys(keys, panels), norms = padded_norms(knorm, panels);
  const float* xp = x32.const_data_ptr<float>();
  const float* pp = packed.const_data_ptr<float>();
  const float* np = norms.const_data_ptr<float>();
  const float* kp = keys.const_data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  float* dp = sqdist.data_ptr<float>();
  const auto tile = KD_PICK_SIMD(panel_tile_avx2_any, panel_tile_scalar);
  at::parallel_for(0, h * blocks, 1, [&](int64_t begin, int64_t end) {
    LaneBest best[kPanelQueryBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t head = t / blocks, q0 = (t % blocks) * kPanelQueryBlock, nq = std::min(kPanelQueryBlock, n - q0);
      for (int64_t q = 0; q < nq; ++q) {
        std::fill(best[q].value, best[q].value + 8, std::numeric_limits<float>::infinity());
        std::fill(best[q].arg, best[q].arg + 8, 0);
      }
      const float* xblock = xp + (q0 * h + head) * d;
      // Panel outer, queries inner: one panel (16 x d floats) stays in L1 while every query tile passes.
      for (int64_t p = 0; p < panels; ++p) {
        const float* panel = pp + (head * panels + p) * d * kPanel;
        const float* pnorm = np + (head * panels + p) * kPanel;
        for (int64_t q = 0; q < nq; q += kTileQueries)
          tile(static_cast<int>(std::min<int64_t>(kTileQueries, nq - q)), xblock + q * h * d, h * d, panel, pnorm, d,
               static_cast<int32_t>(p * kPanel), best + q);
      }
      for (int64_t q = 0; q < nq; ++q) {
        const int64_t row = q0 + q, k = lane_argmin(best[q]);
        ip[row * h + head] = k;
        dp[row * h + head] = squared_distance(xp + (row * h + head) * d, 1, 1.f, kp + (head * num_keys + k) * d, d);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> nearest_key_cpu(const at::Tensor& x, const at::Tensor& keys) {
  checks::nearest_key_args(x, keys);
  const int64_t n = x.size(0), h = x.size(1), d = x.size(2);
  auto index = at::empty({n, h}, x.options().dtype(at::kLong));
  auto sqdist = at::empty({n, h}, x.options().dtype(at::kFloat));
  if (n == 0 || h == 0) return {index, sqdist};
  const at::Tensor keys32 = keys.to(at::kFloat).contiguous();
  const at::Tensor knorm = key_norms(keys32);
  if (d >= kPanelMinDim)
    nearest_large_d(x, keys32, knorm, index, sqdist);
  else
    nearest_small_d(x, keys32, knorm, index, sqdist);
  return {index, sqdist};
}

}  // namespace

TORCH_LIBRARY_IMPL(keydistill, CPU, m) { m.impl("nearest_key", &nearest_key_cpu); }

}  // namespace keydistill::cpu

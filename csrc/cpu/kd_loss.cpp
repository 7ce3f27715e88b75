// kd_loss_fwd on the CPU: per row n, loss_n = T^2 * KL(softmax(t_n/T) || softmax(s_n/T)) and, if asked,
// its gradient times grad_scale, grad_scale * T * (softmax(s_n/T) - softmax(t_n/T)), in the student's dtype
// (the reduction's 1/N folded in: no separate pass to scale it).
//
// Per row: one streaming pass keeps an online max and sum of exponentials for student and teacher together
// (so log-sum-exp needs no separate max pass), then a second loop over the same row, still in cache, forms
// both log-probabilities as (a - max) - log(sum), as log_softmax does, and emits the loss terms
// p_t * (log p_t - log p_s) and the gradient. The only [N, V] allocation is the gradient; fp16/bf16 or
// strided rows are widened into a per-thread row buffer first. Exponentials of very negative arguments are
// exactly 0, so extreme logits (±1e4) give finite losses, and rows masked out get loss 0 and gradient 0.
//
// Non-finite logits follow the one semantics of every backend (keydistill/ops/__init__.py, kd_loss):
// a teacher -inf is probability 0 and its term is 0 (never 0 * inf), a student -inf under teacher mass gives
// +inf, a teacher row that is all -inf gives loss 0 and gradient 0, and NaN or +inf anywhere in a row, or a
// student row that is all -inf, gives that row a NaN loss and gradient. The online statistics start from the
// lowest finite float (not -inf), so -inf inputs never meet exp(-inf - -inf), and the AVX2 exp lets NaN through.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/simd.h"

namespace keydistill::cpu {
namespace {

constexpr float kLowest = std::numeric_limits<float>::lowest();  // "no element yet": exp(kLowest - m) == 0

// A row's running max and sum of exp(v - max): its log-sum-exp in online form. The sum is a double: the
// portable path adds a whole row sequentially, which in float loses more than torch's pairwise sums.
struct RowStats {
  float max = kLowest;
  double sum = 0.0;
  void add(float v) {
    if (v > max) {
      sum *= std::exp(static_cast<double>(max) - v);
      max = v;
    }
    sum += std::exp(v - max);
  }
  float log_sum() const { return static_cast<float>(std::log(sum)); }
};

// A teacher row that is all -inf (its sum of exponentials is exactly 0; NaN is not) has no distribution to
// match: loss 0 and gradient 0, like a masked-out row.
template <typename Stats>
bool no_target(const Stats& teacher, int64_t v, float* g, float* loss) {
  if (teacher.sum != 0) return false;
  *loss = 0.f;
  if (g) std::fill(g, g + v, 0.f);
  return true;
}

// The row kernels: s, t are the row's logits as float, g (if non-null) receives the gradient.
// grad_factor = grad_scale * T multiplies the gradient; the loss takes T^2.
void row_scalar(const float* s, const float* t, int64_t v, float inv_t, float temperature, float grad_factor, float* g,
                float* loss) {
  RowStats ss, ts;
  for (int64_t i = 0; i < v; ++i) {
    ss.add(s[i] * inv_t);
    ts.add(t[i] * inv_t);
  }
  if (no_target(ts, v, g, loss)) return;
  const float log_zs = ss.log_sum(), log_zt = ts.log_sum();
  double acc = 0.0;  // sequential over the row: in double, for the same reason as RowStats::sum
  for (int64_t i = 0; i < v; ++i) {
    const float log_ps = (s[i] * inv_t - ss.max) - log_zs, log_pt = (t[i] * inv_t - ts.max) - log_zt;
    const float pt = std::exp(log_pt);
    if (pt != 0.f) acc += pt * (log_pt - log_ps);  // p_t == 0: the limit of p log p, also against a student -inf
    if (g) g[i] = grad_factor * (std::exp(log_ps) - pt);
  }
  *loss = static_cast<float>(acc) * temperature * temperature;
}

#ifdef KEYDISTILL_X86
// exp for AVX2 (Cephes' expf polynomial, ~1 ulp); arguments below ~-87.3 (and -inf) give exactly 0, NaN gives
// NaN: the clamp takes x as the second operand of max/min, which is what they return when either is NaN.
KD_AVX2_INLINE __m256 exp_avx2(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), _mm256_max_ps(_mm256_set1_ps(-87.33654f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)));
}

KD_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Eight online (max, sum) lanes; the rescale exp runs only when some lane's max grows, which is rare after
// the first vectors of a row.
struct LaneStats {
  __m256 max, sum;
};

KD_AVX2_INLINE void lane_add(LaneStats& st, __m256 v) {
  if (_mm256_movemask_ps(_mm256_cmp_ps(v, st.max, _CMP_GT_OQ))) {
    const __m256 grown = _mm256_max_ps(st.max, v);
    st.sum = _mm256_mul_ps(st.sum, exp_avx2(_mm256_sub_ps(st.max, grown)));
    st.max = grown;
  }
  st.sum = _mm256_add_ps(st.sum, exp_avx2(_mm256_sub_ps(v, st.max)));
}

KD_AVX2 RowStats merge_lanes(const LaneStats& st) {
  alignas(32) float m[8], z[8];
  _mm256_store_ps(m, st.max);
  _mm256_store_ps(z, st.sum);
  RowStats out;
  out.max = *std::max_element(m, m + 8);
  out.sum = 0.f;
  for (int l = 0; l < 8; ++l) out.sum += z[l] * std::exp(m[l] - out.max);
  return out;
}

KD_AVX2 void row_avx2(const float* s, const float* t, int64_t v, float inv_t, float temperature, float grad_factor,
                      float* g, float* loss) {
  const int64_t vv = v - v % 8;
  const __m256 scale = _mm256_set1_ps(inv_t);
  LaneStats sl{_mm256_set1_ps(kLowest), _mm256_setzero_ps()}, tl = sl;
  for (int64_t i = 0; i < vv; i += 8) {
    lane_add(sl, _mm256_mul_ps(_mm256_loadu_ps(s + i), scale));
    lane_add(tl, _mm256_mul_ps(_mm256_loadu_ps(t + i), scale));
  }
  RowStats ss = merge_lanes(sl), ts = merge_lanes(tl);
  for (int64_t i = vv; i < v; ++i) {
    ss.add(s[i] * inv_t);
    ts.add(t[i] * inv_t);
  }
  if (no_target(ts, v, g, loss)) return;
  const float log_zs = ss.log_sum(), log_zt = ts.log_sum();
  const __m256 max_s = _mm256_set1_ps(ss.max), max_t = _mm256_set1_ps(ts.max);
  const __m256 vlog_zs = _mm256_set1_ps(log_zs), vlog_zt = _mm256_set1_ps(log_zt), vfactor = _mm256_set1_ps(grad_factor);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < vv; i += 8) {
    const __m256 log_ps = _mm256_sub_ps(_mm256_fmsub_ps(_mm256_loadu_ps(s + i), scale, max_s), vlog_zs);
    const __m256 log_pt = _mm256_sub_ps(_mm256_fmsub_ps(_mm256_loadu_ps(t + i), scale, max_t), vlog_zt);
    const __m256 pt = exp_avx2(log_pt);
    // Terms where p_t == 0 are 0 (NEQ_UQ keeps NaN): never 0 * inf, at a teacher -inf or a student -inf.
    const __m256 term = _mm256_mul_ps(pt, _mm256_sub_ps(log_pt, log_ps));
    acc = _mm256_add_ps(acc, _mm256_and_ps(term, _mm256_cmp_ps(pt, _mm256_setzero_ps(), _CMP_NEQ_UQ)));
    if (g) _mm256_storeu_ps(g + i, _mm256_mul_ps(vfactor, _mm256_sub_ps(exp_avx2(log_ps), pt)));
  }
  float total = hsum(acc);
  for (int64_t i = vv; i < v; ++i) {
    const float log_ps = (s[i] * inv_t - ss.max) - log_zs, log_pt = (t[i] * inv_t - ts.max) - log_zt;
    const float pt = std::exp(log_pt);
    if (pt != 0.f) total += pt * (log_pt - log_ps);
    if (g) g[i] = grad_factor * (std::exp(log_ps) - pt);
  }
  *loss = total * temperature * temperature;
}
#endif

// Row i of a [N, V] tensor as contiguous floats: the row itself when it already is one, else widened into buf.
template <typename scalar_t>
const float* float_row(const at::Tensor& m, int64_t i, float* buf) {
  const scalar_t* p = m.const_data_ptr<scalar_t>() + i * m.stride(0);
  const int64_t v = m.size(1), stride = m.stride(1);
  if constexpr (std::is_same_v<scalar_t, float>)
    if (stride == 1) return p;
  for (int64_t j = 0; j < v; ++j) buf[j] = static_cast<float>(p[j * stride]);
  return buf;
}

template <typename student_t, typename teacher_t>
void kd_rows(const at::Tensor& student, const at::Tensor& teacher, double temperature, double grad_scale,
             const bool* mask, float* loss, student_t* grad) {
  const int64_t n = student.size(0), v = student.size(1);
  const float temp = static_cast<float>(temperature), inv_t = static_cast<float>(1.0 / temperature);
  const float grad_factor = static_cast<float>(grad_scale * temperature);
  const auto row = KD_PICK_SIMD(row_avx2, row_scalar);
  constexpr bool grad_is_float = std::is_same_v<student_t, float>;
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / v), [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf, tbuf, gbuf;  // only when rows need widening (or the gradient narrowing)
    if (!std::is_same_v<student_t, float> || student.stride(1) != 1) sbuf.resize(v);
    if (!std::is_same_v<teacher_t, float> || teacher.stride(1) != 1) tbuf.resize(v);
    if (grad && !grad_is_float) gbuf.resize(v);
    for (int64_t i = begin; i < end; ++i) {
      student_t* g = grad ? grad + i * v : nullptr;
      if (mask && !mask[i]) {
        loss[i] = 0.f;
        if (g) std::fill(g, g + v, student_t(0));
        continue;
      }
      float* gf = !g ? nullptr : grad_is_float ? reinterpret_cast<float*>(g) : gbuf.data();
      row(float_row<student_t>(student, i, sbuf.data()), float_row<teacher_t>(teacher, i, tbuf.data()), v, inv_t,
          temp, grad_factor, gf, loss + i);
      if (g && !grad_is_float) std::copy(gbuf.begin(), gbuf.end(), g);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   double temperature, const std::optional<at::Tensor>& mask_in,
                                                   bool compute_grad, double grad_scale) {
  checks::kd_loss_fwd_args(student, teacher, temperature, mask_in, grad_scale);
  const int64_t n = student.size(0), v = student.size(1);
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  at::Tensor loss = at::empty({n}, student.options().dtype(at::kFloat));
  at::Tensor grad = at::empty(compute_grad ? at::IntArrayRef{n, v} : at::IntArrayRef{0}, student.options());
  if (n == 0 || v == 0) return {loss.zero_(), grad.zero_()};
  const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_fwd", [&] {
    using student_t = scalar_t;
    student_t* gp = compute_grad ? grad.data_ptr<student_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "kd_loss_fwd", [&] {
      kd_rows<student_t, scalar_t>(student, teacher, temperature, grad_scale, mp, loss.data_ptr<float>(), gp);
    });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(keydistill, CPU, m) { m.impl("kd_loss_fwd", &kd_loss_fwd_cpu); }

}  // namespace keydistill::cpu

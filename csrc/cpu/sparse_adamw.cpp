// sparse_adamw_ on the CPU: the AdamW update of selected rows of a [R, D] parameter and its two moment
// buffers, in place, from the gradient of those rows only (a row-sparse gradient's values).
//
// One pass per row: read the gradient row, read and write the parameter and moment rows once. The
// equivalent torch code (index_select the three rows, seven elementwise ops, index_copy_ them back) makes
// about five times the memory traffic and allocates; at the DKVB scale (32 x 4096 keys, value_dim 384,
// ~30k rows touched per step) that is the difference the optimizer step costs.
//
// The arithmetic follows torch.optim.AdamW's single-tensor path term by term (decoupled weight decay,
// moment lerp, bias-corrected denominator, addcdiv), in the parameter's opmath type (float for
// float/half/bfloat16, double for double). Rows are distinct (the caller passes them strictly
// increasing), so rows update independently and the result does not depend on the thread count.
// float32 rows run 8 lanes at a time with AVX2/FMA where the CPU has it: the portable loop stays scalar,
// since without -fno-math-errno the compiler cannot vectorise std::sqrt.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "checks.h"
#include "cpu/simd.h"

namespace keydistill::cpu {
namespace {

struct AdamWScalars {
  double lr, beta1, beta2, eps, weight_decay, step;
  bool maximize;
};

// The per-element constants, formed as torch.optim.AdamW forms them (in double), at the compute precision.
template <typename opmath_t>
struct RowConstants {
  opmath_t decay, take1, beta2, take2, step_size, bc2_sqrt, eps, sign;
  explicit RowConstants(const AdamWScalars& s)
      : decay(static_cast<opmath_t>(1.0 - s.lr * s.weight_decay)),
        take1(static_cast<opmath_t>(1.0 - s.beta1)),
        beta2(static_cast<opmath_t>(s.beta2)),
        take2(static_cast<opmath_t>(1.0 - s.beta2)),
        step_size(static_cast<opmath_t>(s.lr / (1.0 - std::pow(s.beta1, s.step)))),
        bc2_sqrt(static_cast<opmath_t>(std::sqrt(1.0 - std::pow(s.beta2, s.step)))),
        eps(static_cast<opmath_t>(s.eps)),
        sign(s.maximize ? opmath_t(-1) : opmath_t(1)) {}
};

// Elements [j0, d) of one row: the portable path, and the tail of the AVX2 one.
template <typename scalar_t, typename opmath_t>
inline void update_elements(scalar_t* p, scalar_t* m, scalar_t* v, const scalar_t* g, int64_t j0, int64_t d,
                            const RowConstants<opmath_t>& c) {
  for (int64_t j = j0; j < d; ++j) {
    const opmath_t gj = c.sign * static_cast<opmath_t>(g[j]);
    const opmath_t mj = static_cast<opmath_t>(m[j]) + c.take1 * (gj - static_cast<opmath_t>(m[j]));  // lerp, weight < 0.5
    const opmath_t vj = static_cast<opmath_t>(v[j]) * c.beta2 + c.take2 * gj * gj;
    const opmath_t denom = std::sqrt(vj) / c.bc2_sqrt + c.eps;
    p[j] = static_cast<scalar_t>(static_cast<opmath_t>(p[j]) * c.decay - c.step_size * (mj / denom));
    m[j] = static_cast<scalar_t>(mj);
    v[j] = static_cast<scalar_t>(vj);
  }
}

template <typename scalar_t>
void update_rows_portable(scalar_t* pp, scalar_t* mp, scalar_t* vp, const scalar_t* gp, const int64_t* rows,
                          int64_t begin, int64_t end, int64_t d, const RowConstants<at::opmath_type<scalar_t>>& c) {
  for (int64_t i = begin; i < end; ++i)
    update_elements(pp + rows[i] * d, mp + rows[i] * d, vp + rows[i] * d, gp + i * d, 0, d, c);
}

#ifdef KEYDISTILL_X86
KD_AVX2 void update_rows_avx2(float* pp, float* mp, float* vp, const float* gp, const int64_t* rows, int64_t begin,
                              int64_t end, int64_t d, const RowConstants<float>& c) {
  const __m256 decay = _mm256_set1_ps(c.decay), take1 = _mm256_set1_ps(c.take1), beta2 = _mm256_set1_ps(c.beta2);
  const __m256 take2 = _mm256_set1_ps(c.take2), step_size = _mm256_set1_ps(c.step_size);
  const __m256 bc2_sqrt = _mm256_set1_ps(c.bc2_sqrt), eps = _mm256_set1_ps(c.eps), sign = _mm256_set1_ps(c.sign);
  for (int64_t i = begin; i < end; ++i) {
    float* p = pp + rows[i] * d;
    float* m = mp + rows[i] * d;
    float* v = vp + rows[i] * d;
    const float* g = gp + i * d;
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) {
      const __m256 gj = _mm256_mul_ps(sign, _mm256_loadu_ps(g + j));
      const __m256 mo = _mm256_loadu_ps(m + j);
      const __m256 mj = _mm256_fmadd_ps(take1, _mm256_sub_ps(gj, mo), mo);
      const __m256 vj = _mm256_fmadd_ps(_mm256_mul_ps(take2, gj), gj, _mm256_mul_ps(_mm256_loadu_ps(v + j), beta2));
      const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vj), bc2_sqrt), eps);
      const __m256 pj = _mm256_fnmadd_ps(step_size, _mm256_div_ps(mj, denom), _mm256_mul_ps(_mm256_loadu_ps(p + j), decay));
      _mm256_storeu_ps(p + j, pj);
      _mm256_storeu_ps(m + j, mj);
      _mm256_storeu_ps(v + j, vj);
    }
    update_elements(p, m, v, g, j, d, c);
  }
}
#endif

template <typename scalar_t>
void update_rows(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                 const int64_t* rows, int64_t num_selected, const at::Tensor& grad, const AdamWScalars& s) {
  const int64_t d = param.size(1);
  scalar_t* pp = param.data_ptr<scalar_t>();
  scalar_t* mp = exp_avg.data_ptr<scalar_t>();
  scalar_t* vp = exp_avg_sq.data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const RowConstants<at::opmath_type<scalar_t>> c(s);
  at::parallel_for(0, num_selected, std::max<int64_t>(1, 8192 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
#ifdef KEYDISTILL_X86
    if constexpr (std::is_same_v<scalar_t, float>) {
      KD_PICK_SIMD(update_rows_avx2, update_rows_portable<float>)(pp, mp, vp, gp, rows, begin, end, d, c);
      return;
    }
#endif
    update_rows_portable<scalar_t>(pp, mp, vp, gp, rows, begin, end, d, c);
  });
}

void sparse_adamw_cpu(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& rows, const at::Tensor& grad, double lr, double beta1, double beta2, double eps,
                      double weight_decay, double step, bool maximize) {
  checks::sparse_adamw_args(param, exp_avg, exp_avg_sq, rows, grad, lr, beta1, beta2, eps, weight_decay, step);
  // Validate every row before touching any: a bad index must not leave a half-applied step behind.
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  const int64_t num_selected = rows.size(0), num_rows = param.size(0);
  for (int64_t i = 0; i < num_selected; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < num_rows && (i == 0 || rp[i] > rp[i - 1]),
                "keydistill::sparse_adamw_: rows must be strictly increasing values in [0, R=", num_rows, "), got ", rp[i],
                " at ", i);
  const AdamWScalars scalars{lr, beta1, beta2, eps, weight_decay, step, maximize};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sparse_adamw_", [&] {
    update_rows<scalar_t>(param, exp_avg, exp_avg_sq, rp, num_selected, grad, scalars);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(keydistill, CPU, m) { m.impl("sparse_adamw_", &sparse_adamw_cpu); }

}  // namespace keydistill::cpu

// Shared pieces of the CUDA kernels: dtype dispatch from ATen to CUDA types, and float conversion.
//
// Includes stay light on purpose (no torch/extension.h, no ATen/cuda/CUDAContext.h): each .cu file then
// compiles in well under a minute and needs no cuBLAS headers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace keydistill::cuda {

// A type carried as a value, so a generic lambda can receive "the CUDA element type" as an argument.
template <typename T>
struct Type {
  using type = T;
};

// Calls f(Type<T>{}) with T the CUDA element type of a floating dtype: float, __half or __nv_bfloat16.
template <typename F>
void dispatch_float(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: f(Type<float>{}); return;
    case at::kHalf: f(Type<__half>{}); return;
    case at::kBFloat16: f(Type<__nv_bfloat16>{}); return;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", dtype);
  }
}

// The tensor's storage as T (c10::Half and c10::BFloat16 share __half's and __nv_bfloat16's bit layout).
template <typename T>
T* data(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "keydistill::", op, " (CUDA kernel): ", name, " must be a CUDA tensor, got ", t.device());
}

// The grid size that covers `total` items with `threads` per block, capped for grid-stride loops.
inline unsigned int blocks_for(int64_t total, int threads, int64_t cap = 65535LL * 32) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < cap ? blocks : cap);
}

// torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__ and friends: convert explicitly.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

}  // namespace keydistill::cuda

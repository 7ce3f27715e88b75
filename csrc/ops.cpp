// The keydistill operator library: one schema per op, declared once here.
// Device kernels register themselves with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu
// (CUDA); fake (meta) kernels and autograd are registered from Python (keydistill/ops/_library.py), except
// kd_loss, whose device-agnostic composite and autograd live in csrc/kd_loss.cpp.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/simd.h"

TORCH_LIBRARY(keydistill, m) {
  // x [N,H,d], keys [H,K,d] -> (index int64 [N,H], sqdist float32 [N,H]); ties to the lowest k.
  m.def("nearest_key(Tensor x, Tensor keys) -> (Tensor, Tensor)");
  // In-place EMA codebook update (VQ-VAE with Laplace smoothing) of float32 state.
  m.def(
      "ema_update_(Tensor(a!) keys, Tensor(b!) cluster_size, Tensor(c!) embed_sum, Tensor x, Tensor index, "
      "float decay, float eps, bool deterministic) -> ()");
  // Per-row T^2*KL(softmax(t/T)||softmax(s/T)) as float32 [N] and, if compute_grad, its gradient w.r.t.
  // student [N,V] times grad_scale (student's dtype; else an empty tensor): a reduction's 1/N folded into the
  // kernel. Rows with mask[n]==false give 0 loss and 0 grad.
  m.def(
      "kd_loss_fwd(Tensor student, Tensor teacher, float temperature, Tensor? mask, bool compute_grad, "
      "float grad_scale=1.0) -> (Tensor, Tensor)");
  // The reduced loss ('batchmean', 'sum' or 'none'), differentiable w.r.t. student; autograd in C++
  // (csrc/kd_loss.cpp) so that small logits cost little more than one op call.
  m.def("kd_loss(Tensor student, Tensor teacher, float temperature, Tensor? mask, str reduction) -> Tensor");
  // In-place AdamW on the rows `rows` (strictly increasing, int64 [U]) of param, exp_avg and exp_avg_sq
  // [R,D], from grad [U,D] (those rows' gradient); every other row is left untouched. CPU only: on CUDA
  // the torch backend's index_select/index_copy_ form is used.
  m.def(
      "sparse_adamw_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, Tensor grad, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, float step, bool maximize) -> ()");
  // Which code path the CPU kernels take on this machine: "avx2" (AVX2 + FMA) or "portable".
  m.def("cpu_simd() -> str", []() -> std::string { return keydistill::cpu::has_avx2_fma() ? "avx2" : "portable"; });
}

// `import keydistill._C` runs the static registrations above; the module itself has no Python methods,
// which keeps pybind11 (and torch/extension.h) out of the build.
PyMODINIT_FUNC PyInit__C(void) {  // PyMODINIT_FUNC: exported despite -fvisibility=hidden
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "keydistill operator library", -1, nullptr};
  return PyModule_Create(&module);
}

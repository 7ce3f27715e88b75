// Run-time choice between the AVX2/FMA fast paths and the portable scalar paths of the CPU kernels.
//
// The fast paths are compiled per function with KD_AVX2 (a target attribute), never per file or with
// -march=native, so one build runs everywhere: AVX2/FMA where the CPU has it (checked once, at run time),
// plain C++ elsewhere (older x86, ARM).
#pragma once

#include <cstdlib>

#if defined(__x86_64__) || defined(__i386__)
#define KEYDISTILL_X86 1
#include <immintrin.h>
#define KD_AVX2 __attribute__((target("avx2,fma")))
#define KD_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline
#endif

namespace keydistill::cpu {

// KEYDISTILL_DISABLE_AVX2=1 (read once, at the first kernel call) forces the portable paths, so the tests
// can check them on an AVX2 machine.
inline bool has_avx2_fma() {
#ifdef KEYDISTILL_X86
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                !(std::getenv("KEYDISTILL_DISABLE_AVX2") && std::getenv("KEYDISTILL_DISABLE_AVX2")[0] == '1');
  return supported;
#else
  return false;
#endif
}

}  // namespace keydistill::cpu

// The AVX2/FMA variant of a kernel where the CPU has it, else the portable one (the only one compiled off x86).
#ifdef KEYDISTILL_X86
#define KD_PICK_SIMD(avx2, portable) (::keydistill::cpu::has_avx2_fma() ? (avx2) : (portable))
#else
#define KD_PICK_SIMD(avx2, portable) (portable)
#endif

// The CPU's features, named as Halide target features (sse41, avx2, fma, avx512_skylake,
// arm_fp16, arm_dot_prod...), so a manifest entry's "features" list can be checked against them
// directly.
#pragma once

#include <set>
#include <string>

namespace ng {

struct CpuInfo {
    std::string arch;                 // "x86-64" or "arm-64"
    std::set<std::string> features;   // what the kernels may use
    std::string isa_cap;              // NORMGEN_ISA if set, else ""
};

// Detects the host CPU (x86: cpuid + xgetbv; AArch64: getauxval(AT_HWCAP)); `isa_cap`
// (NORMGEN_ISA: sse41|avx2|avx512 on x86-64, neon|neon_fp16 on arm-64) removes the features
// above that level. Throws ng::Error for an unknown level.
CpuInfo detect_cpu(const char *isa_cap);

}  // namespace ng

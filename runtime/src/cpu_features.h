// The CPU's features, named as Halide target features (sse41, avx2, fma, avx512_skylake...), so a
// manifest entry's "features" list can be checked against them directly.
#pragma once

#include <set>
#include <string>

namespace ng {

struct CpuInfo {
    std::string arch;                 // "x86-64" or "arm-64"
    std::set<std::string> features;   // what the kernels may use
    std::string isa_cap;              // NORMGEN_ISA if set, else ""
};

// Detects the host CPU; `isa_cap` (NORMGEN_ISA: sse41|avx2|avx512) removes the features above
// that level. Throws ng::Error for an unknown level.
CpuInfo detect_cpu(const char *isa_cap);

}  // namespace ng

#include "cpu_features.h"

#include "errors.h"

#include <map>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#elif defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace ng {

namespace {

#if defined(__x86_64__)
std::set<std::string> detect_x86() {
    unsigned a, b, c, d;
    std::set<std::string> f;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool sse41 = c & bit_SSE4_1, avx = c & bit_AVX, fma = c & bit_FMA, f16c = c & bit_F16C;
    const bool osxsave = c & bit_OSXSAVE;
    // The OS must save the wide registers for AVX (XCR0 bits 1-2) and AVX-512 (bits 5-7).
    unsigned long long xcr0 = 0;
    if (osxsave) {
        unsigned lo, hi;
        __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
    }
    const bool os_avx = (xcr0 & 0x6) == 0x6, os_avx512 = (xcr0 & 0xe6) == 0xe6;
    if (sse41) f.insert("sse41");
    if (avx && os_avx) {
        f.insert("avx");
        if (fma) f.insert("fma");
        if (f16c) f.insert("f16c");
        unsigned a7, b7, c7, d7;
        if (__get_cpuid_count(7, 0, &a7, &b7, &c7, &d7)) {
            if (b7 & bit_AVX2) f.insert("avx2");
            const bool avx512f = b7 & bit_AVX512F, cd = b7 & bit_AVX512CD, bw = b7 & bit_AVX512BW,
                       dq = b7 & bit_AVX512DQ, vl = b7 & bit_AVX512VL;
            if (os_avx512 && avx512f && cd) {
                f.insert("avx512");
                if (bw && dq && vl) f.insert("avx512_skylake");
            }
        }
    }
    return f;
}
#endif

#if defined(__aarch64__)
// Halide's arm-64 baseline is NEON (ASIMD), which every AArch64 Linux CPU has in practice, but
// the kernels must not run where it is missing: such a CPU gets another arch name, so that no
// arm-64 kernel loads and plans fail with NG_NO_KERNEL.
std::string detect_arm(std::set<std::string> *features) {
    const unsigned long hwcap = getauxval(AT_HWCAP);
    if (!(hwcap & HWCAP_ASIMD)) return "arm-64 without ASIMD";
    // Half-precision arithmetic, scalar (FPHP) and vector (ASIMDHP): Halide's arm_fp16.
    if ((hwcap & HWCAP_FPHP) && (hwcap & HWCAP_ASIMDHP)) features->insert("arm_fp16");
    if (hwcap & HWCAP_ASIMDDP) features->insert("arm_dot_prod");
    return "arm-64";
}
#endif

// The features each NORMGEN_ISA level allows, cumulative, per architecture (the level names are
// the manifest's "isa" values).
using IsaLevels = std::vector<std::pair<std::string, std::vector<std::string>>>;
const IsaLevels kX86Levels = {
    {"sse41", {"sse41"}},
    {"avx2", {"avx", "avx2", "fma", "f16c"}},
    {"avx512", {"avx512", "avx512_skylake"}},
};
const IsaLevels kArmLevels = {
    {"neon", {}},
    {"neon_fp16", {"arm_fp16"}},
};

}  // namespace

CpuInfo detect_cpu(const char *isa_cap) {
    CpuInfo info;
#if defined(__x86_64__)
    info.arch = "x86-64";
    info.features = detect_x86();
    const IsaLevels &levels = kX86Levels;
#elif defined(__aarch64__)
    info.arch = detect_arm(&info.features);
    const IsaLevels &levels = kArmLevels;
#else
    info.arch = "unknown";
    const IsaLevels levels;
#endif
    if (isa_cap && *isa_cap) {
        std::set<std::string> allowed;
        bool found = false;
        std::string names;
        for (const auto &[level, features] : levels) {
            names += (names.empty() ? "" : ", ") + level;
            if (found) continue;
            allowed.insert(features.begin(), features.end());
            found = level == isa_cap;
        }
        if (!found)
            fail(NG_INVALID_ARGUMENT, "NORMGEN_ISA='", isa_cap, "' is not an ISA level of ",
                 info.arch, " (expected one of: ", names, ")");
        std::set<std::string> capped;
        for (const auto &f : info.features)
            if (allowed.count(f)) capped.insert(f);
        info.features = capped;
        info.isa_cap = isa_cap;
    }
    return info;
}

}  // namespace ng

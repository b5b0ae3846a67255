// Plain OpenMP loops with ordinary (cached) stores, vectorised by the compiler for this host
// (CMake compiles this file with -O3 -march=native -mprefer-vector-width=512 and
// -fno-tree-loop-distribute-patterns, so GCC keeps the loop instead of calling memcpy).
//
// Why not memcpy: glibc's memcpy switches to non-temporal stores above a threshold derived from
// the cache sizes the CPU reports (under a hypervisor, anything), so what it measures would
// change with the machine rather than with memory bandwidth. Why not non-temporal stores: the
// kernels being measured (Halide's, and libtorch's) write with ordinary stores, which read each
// destination line before writing it; a reference with streaming stores would be a floor no
// ordinary-store kernel can reach. oneDNN's kernels may use streaming stores on large tensors,
// so oneDNN can exceed a fraction of 1.0. Threads split the range in two contiguous halves
// (aligned to 64 bytes), as the kernels' own parallel loops roughly do.
#include "bandwidth_reference.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>

namespace bench {

namespace {
inline void thread_range(int64_t n, int64_t *begin, int64_t *end) {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t chunk = ((n + nt - 1) / nt + 15) / 16 * 16;
    *begin = std::min(n, t * chunk);
    *end = std::min(n, *begin + chunk);
}
}  // namespace

void copy_reference(const float *__restrict x, float *__restrict y, int64_t n) {
#pragma omp parallel
    {
        int64_t b, e;
        thread_range(n, &b, &e);
        for (int64_t i = b; i < e; i++) y[i] = x[i];
    }
}

void read2_write1_reference(const float *__restrict x, const float *__restrict dy,
                            float *__restrict dx, int64_t n) {
#pragma omp parallel
    {
        int64_t b, e;
        thread_range(n, &b, &e);
        for (int64_t i = b; i < e; i++) dx[i] = x[i] + dy[i];
    }
}

void read3_write2_reference(const float *__restrict x, const float *__restrict dy,
                            const float *__restrict z, float *__restrict dx, float *__restrict dz,
                            int64_t n) {
#pragma omp parallel
    {
        int64_t b, e;
        thread_range(n, &b, &e);
        for (int64_t i = b; i < e; i++) {
            dx[i] = x[i] + dy[i];
            dz[i] = dy[i] + z[i];
        }
    }
}

void blocked_forward_loop(const float *__restrict x, float *__restrict y, int64_t n, int64_t c,
                          int64_t s) {
    const float inv_m = 1.0f / float(n * s);
#pragma omp parallel for schedule(static)
    for (int64_t ch = 0; ch < c; ch++) {
        float sum = 0.0f, sq = 0.0f;
        for (int64_t k = 0; k < n; k++) {
            const float *row = x + (k * c + ch) * s;
#pragma omp simd reduction(+ : sum, sq)
            for (int64_t i = 0; i < s; i++) sum += row[i], sq += row[i] * row[i];
        }
        const float mean = sum * inv_m;
        const float invstd = 1.0f / std::sqrt(std::max(0.0f, sq * inv_m - mean * mean) + 1e-5f);
        for (int64_t k = 0; k < n; k++) {
            const float *row = x + (k * c + ch) * s;
            float *out = y + (k * c + ch) * s;
#pragma omp simd
            for (int64_t i = 0; i < s; i++) out[i] = (row[i] - mean) * invstd;
        }
    }
}

void flush_from_cache(const float *p, int64_t n) {
    const char *bytes = reinterpret_cast<const char *>(p);
    const int64_t lines = (n * int64_t(sizeof(float)) + 63) / 64;
#pragma omp parallel
    {
        int64_t b, e;
        thread_range(lines, &b, &e);
        for (int64_t i = b; i < e; i++) {
#ifdef __CLFLUSHOPT__
            _mm_clflushopt(const_cast<char *>(bytes + i * 64));
#else
            _mm_clflush(bytes + i * 64);
#endif
        }
        _mm_mfence();
    }
}

int64_t l2_bytes_per_core() {
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index2/size");
    std::string s;
    if (!(f >> s) || s.empty()) return int64_t(1) << 20;
    const int64_t v = std::atoll(s.c_str());
    const char unit = s.back();
    return unit == 'K' ? v << 10 : unit == 'M' ? v << 20 : v;
}

bool timed_warm(int64_t bytes, int threads) { return bytes <= l2_bytes_per_core() * threads; }

}  // namespace bench

// A kernel package on disk: manifest.json plus the shared objects it names. Opening a package
// validates the manifest, loads every kernel file this process can run and resolves every
// symbol and its Halide argument metadata, so a broken package fails at open, not mid-run.
#pragma once

#include "HalideRuntime.h"

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace ng {

// What a kernel is specialised for: any shape; one exact (N, C, S); or a shape class, the
// half-open buckets C in [c_min, c_end), S in [s_min, s_end) (end 0: unbounded), a generic
// kernel scheduled with knobs tuned for that class.
struct KernelShape {
    enum Kind { Generic, Class, Exact } kind = Generic;
    int64_t n = 0, c = 0, s = 0;
    int64_t c_min = 0, c_end = 0, s_min = 0, s_end = 0;
    bool matches(int64_t n_, int64_t c_, int64_t s_) const {
        if (kind == Exact) return n == n_ && c == c_ && s == s_;
        if (kind == Class)
            return c_ >= c_min && (c_end == 0 || c_ < c_end) && s_ >= s_min &&
                   (s_end == 0 || s_ < s_end);
        return true;
    }
};

struct Kernel {
    // From the manifest.
    std::string name, op, statistics, dtype, layout, activation, device, arch, isa, target, file,
        symbol;
    bool residual = false;
    std::vector<std::string> features;
    KernelShape shape;
    // Resolved at open for CPU kernels of this architecture, by load_device_kernels for device
    // kernels of this architecture; null otherwise.
    int (*entry)(void **args) = nullptr;  // Halide's <symbol>_argv
    const halide_filter_metadata_t *metadata = nullptr;
    // Takes the argument streaming_output: writes its tensor outputs (y; dx and dz) with
    // non-temporal stores that must be 64-byte aligned, so it runs only where the rows (S
    // contiguous, C channels-last) are a multiple of 64 bytes and each output pointer is
    // 64-byte aligned.
    bool streams_output = false;
    // Takes the argument flat_rows: takes contiguous tensors as (C*S, 1, N) (an exact shape's
    // kernel; its rows are then the C*S elements of one n).
    bool flat_rows = false;

    std::string describe_shape() const;
};

class Package {
public:
    // Throws ng::Error(NG_PACKAGE_ERROR) naming the file and the problem.
    static std::unique_ptr<Package> open(const std::string &dir, const std::string &host_arch);
    ~Package();

    const std::string &dir() const { return dir_; }
    const std::vector<Kernel> &kernels() const { return kernels_; }
    // Loads the kernel files of a device ("cuda") for this architecture and resolves their
    // kernels: done once, when the first plan for that device is made (thread-safe).
    void load_device_kernels(const std::string &device);

private:
    void resolve(Kernel &k, std::map<std::string, void *> &opened, const std::string &at);

    std::string dir_, host_arch_;
    std::set<std::string> loaded_devices_;
    std::vector<Kernel> kernels_;
    std::vector<void *> handles_;
};

// The package installed beside libnormgen (<libdir>/normgen-package), or $NORMGEN_PACKAGE.
std::string default_package_dir();

}  // namespace ng

// ng_runtime and ng_plan: what a plan chose and the Halide arguments it binds per call.
#pragma once

#include "cpu_features.h"
#include "normgen/normgen.h"
#include "package.h"

#include <array>
#include <memory>
#include <string>
#include <vector>

// The arguments a kernel may take, by the names the generators give them.
enum class Role {
    x, z, dy, y, dx, dz, weight, bias, running_mean, running_var, eps, save_mean, save_invstd,
    batch_var, dweight, dbias, count
};

struct ng_runtime {
    std::unique_ptr<ng::Package> package;
    ng::CpuInfo cpu;
    std::string description;
    // NORMGEN_KERNELS=generic at open: plans ignore exact-shape and shape-class kernels (to
    // measure what tuning and specialisation bring; bench/ and scripts/bench-tuned use it).
    bool generic_only = false;
};

struct ng_plan {
    ng_op op;
    ng_tensor x;
    ng_batch_norm_params params;
    int64_t n, c, s;             // canonical view
    bool use_batch_stats;        // training, or eval without running stats
    const ng::Kernel *kernel = nullptr;
    std::string description;

    // Halide arguments of the kernel, in its argv order, pointing into `buffers` / `eps`.
    std::vector<halide_buffer_t> buffers;
    std::vector<std::array<halide_dimension_t, 3>> dims;
    std::vector<void *> args;
    std::array<int, static_cast<size_t>(Role::count)> slot;  // role -> index in buffers, or -1
    double eps;

    // Per-channel scratch: weight 1 / bias 0 without affine, statistics and gradients the
    // caller did not ask for.
    std::vector<float> ones, zeros, scratch_a, scratch_b, batch_var;

    void bind(Role role, const void *data);
    // Runs the kernel on the bound buffers; throws ng::Error with Halide's message on failure.
    void run();
};

namespace ng {
// op: the caller's raw ng_op value (validated here).
ng_plan *create_plan(ng_runtime *rt, int op, const ng_tensor *x,
                     const ng_batch_norm_params *params);
}  // namespace ng

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
    batch_var, dweight, dbias,
    // the device-side running-statistics update (bn_running_stats_*)
    running_mean_out, running_var_out, momentum_factor, unbias,
    // a 0 the kernel cannot see is constant (the prefetch_next_channel knob's mask)
    opaque_zero,
    // marks a kernel that writes its output with streaming stores (Kernel::streams_output)
    streaming_output,
    // marks a kernel that takes its tensors flat, as (C*S, 1, N) (generators/norm_pipeline.h)
    flat_rows, count
};

// Per-channel buffers a plan owns: weight 1 / bias 0 without affine, and the statistics and
// gradients the caller did not ask for.
enum class Scratch { ones, zeros, a, b, batch_var, count };

// A float vector's copy in device memory (Halide's device interface), freed with it.
struct DeviceVector {
    halide_buffer_t buffer{};
    halide_dimension_t dim{};
    DeviceVector() = default;
    DeviceVector(const DeviceVector &) = delete;
    DeviceVector &operator=(const DeviceVector &) = delete;
    ~DeviceVector();
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
    ~ng_plan();
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
    double momentum_factor = 0, unbias = 0;  // the running-statistics update's scalars

    // Host scratch, and for CUDA plans its device copies (see Scratch).
    std::array<std::vector<float>, static_cast<size_t>(Scratch::count)> scratch_host;
    std::vector<std::unique_ptr<DeviceVector>> scratch_device;

    // CUDA plans: device pointers by argument (wrapped into the buffers for a run), the stream,
    // and the plan of the running-statistics kernel (forward training with running stats).
    bool on_cuda = false;
    std::vector<uint64_t> device_pointers;
    void *cuda_stream = nullptr;
    std::unique_ptr<ng_plan> running_stats_update;

    // A kernel with streaming stores (Kernel::streams_output) runs only on 64-byte aligned
    // tensor outputs (y; dx and dz): their buffer slots, and the plan of the best kernel without
    // them, which a call with a misaligned output runs instead (bind() binds both).
    std::vector<int> streaming_output_slots;
    std::unique_ptr<ng_plan> unaligned_fallback;

    void bind(Role role, const void *data);
    // The host scratch vector, or its device copy in a CUDA plan.
    float *scratch(Scratch which);
    const std::vector<float> &scratch_values(Scratch which) const {
        return scratch_host[static_cast<size_t>(which)];
    }
    // Runs the kernel on the bound buffers; throws ng::Error with Halide's message on failure.
    void run();
};

namespace ng {

// Whether a kernel argument of this name has a Role (the ABI of NG_ABI_VERSION): package open
// rejects kernels with any other argument.
bool is_kernel_argument_name(const std::string &name);
// op: the caller's raw ng_op value (validated here). allow_streaming false leaves out kernels
// with streaming stores (the plan for misaligned outputs).
ng_plan *create_plan(ng_runtime *rt, int op, const ng_tensor *x,
                     const ng_batch_norm_params *params, bool allow_streaming = true);
}  // namespace ng

#include "plan.h"

#include "cuda_device.h"
#include "errors.h"
#include "halide_glue.h"


#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>

namespace ng {

namespace {

const char *kRoleNames[] = {"x",          "z",           "dy",        "y",       "dx",
                            "dz",         "weight",      "bias",      "running_mean",
                            "running_var", "eps",        "save_mean", "save_invstd",
                            "batch_var",  "dweight",     "dbias",    "running_mean_out",
                            "running_var_out", "momentum_factor", "unbias", "opaque_zero",
                            "streaming_output", "flat_rows"};
static_assert(sizeof(kRoleNames) / sizeof(kRoleNames[0]) == static_cast<size_t>(Role::count));

}  // namespace

bool is_kernel_argument_name(const std::string &name) {
    for (const char *known : kRoleNames)
        if (name == known) return true;
    return false;
}

namespace {

Role role_named(const std::string &name) {
    for (size_t i = 0; i < static_cast<size_t>(Role::count); i++)
        if (name == kRoleNames[i]) return static_cast<Role>(i);
    fail(NG_INTERNAL, "kernel argument '", name, "' has no role");  // filtered at package open
}

std::string shape_string(const ng_tensor &x) {
    std::ostringstream os;
    os << "[";
    for (int i = 0; i < x.ndim; i++) os << (i ? ", " : "") << x.shape[i];
    os << "]";
    return os.str();
}

const char *dtype_name(ng_dtype dtype) {
    return dtype == NG_F16 ? "f16" : dtype == NG_BF16 ? "bf16" : "f32";
}

size_t element_size(ng_dtype dtype) { return dtype == NG_F32 ? 4 : 2; }

std::string fusion_name(const ng_batch_norm_params &p) {
    if (p.residual) return p.activation == NG_ACT_RELU ? "add + ReLU" : "add";
    return p.activation == NG_ACT_RELU ? "ReLU" : "none";
}

void validate_tensor(const ng_tensor *x) {
    if (!x) fail(NG_INVALID_ARGUMENT, "x: the tensor descriptor is NULL");
    if (x->ndim < 2 || x->ndim > 5)
        fail(NG_INVALID_ARGUMENT, "x.ndim = ", x->ndim,
             ": BatchNorm takes 2..5 dimensions (N, C, then up to 3 spatial)");
    int64_t elements = 1;
    for (int i = 0; i < x->ndim; i++) {
        if (x->shape[i] < 1)
            fail(NG_INVALID_ARGUMENT, "x.shape[", i, "] = ", x->shape[i],
                 ": every extent must be >= 1");
        if (__builtin_mul_overflow(elements, x->shape[i], &elements))
            fail(NG_INVALID_ARGUMENT, "x.shape = ", shape_string(*x),
                 ": the element count overflows int64");
    }
    const int format = raw_value(x->format), dtype = raw_value(x->dtype),
              device = raw_value(x->device);
    if (format != NG_CONTIGUOUS && format != NG_CHANNELS_LAST)
        fail(NG_INVALID_ARGUMENT, "x.format = ", format,
             ": expected NG_CONTIGUOUS (0) or NG_CHANNELS_LAST (1)");
    if (dtype != NG_F32 && dtype != NG_F16 && dtype != NG_BF16)
        fail(NG_INVALID_ARGUMENT, "x.dtype = ", dtype, ": expected NG_F32, NG_F16 or NG_BF16");
    if (device != NG_CPU && device != NG_CUDA)
        fail(NG_INVALID_ARGUMENT, "x.device = ", device, ": expected NG_CPU (0) or NG_CUDA (1)");
    // Kernels index with 32-bit offsets (Halide without large_buffers).
    if (elements > INT32_MAX / static_cast<int64_t>(element_size(x->dtype)))
        fail(NG_UNSUPPORTED, "x.shape = ", shape_string(*x), " holds ", elements,
             " elements; kernels address at most 2^31 - 1 bytes per tensor");
}

void validate_params(const ng_batch_norm_params *p) {
    if (!p) fail(NG_INVALID_ARGUMENT, "params: NULL");
    if (!(p->eps > 0) || !std::isfinite(p->eps))
        fail(NG_INVALID_ARGUMENT, "params.eps = ", p->eps, ": must be finite and > 0");
    if (!std::isnan(p->momentum) && !(p->momentum >= 0 && p->momentum <= 1))
        fail(NG_INVALID_ARGUMENT, "params.momentum = ", p->momentum,
             ": must be in [0, 1], or NAN for momentum=None");
    for (auto [name, v] : {std::pair{"affine", p->affine},
                           {"track_running_stats", p->track_running_stats},
                           {"training", p->training},
                           {"residual", p->residual}})
        if (v != 0 && v != 1) fail(NG_INVALID_ARGUMENT, "params.", name, " = ", v, ": must be 0 or 1");
    const int act = raw_value(p->activation);
    if (act != NG_ACT_NONE && act != NG_ACT_RELU)
        fail(NG_INVALID_ARGUMENT, "params.activation = ", act,
             ": expected NG_ACT_NONE (0) or NG_ACT_RELU (1)");
}

// The CUDA capability a kernel was generated for (its cuda_capability_XY feature), 0 if none.
int cuda_capability(const Kernel &k) {
    for (const auto &f : k.features)
        if (f.rfind("cuda_capability_", 0) == 0) return std::atoi(f.c_str() + 16);
    return 0;
}

bool features_supported(const Kernel &k, const CpuInfo &cpu, std::string *missing) {
    for (const auto &f : k.features)
        if (!cpu.features.count(f)) {
            if (missing) *missing = f;
            return false;
        }
    return true;
}

// Binds the kernel's arguments (from its Halide metadata) to plan-owned buffer descriptors.
void bind_arguments(ng_plan &plan, bool channels_last) {
    const halide_filter_metadata_t *md = plan.kernel->metadata;
    const int nargs = md->num_arguments;
    plan.slot.fill(-1);
    plan.buffers.assign(nargs, halide_buffer_t{});
    plan.dims.assign(nargs, {});
    plan.args.assign(nargs, nullptr);
    plan.device_pointers.assign(nargs, 0);
    // Tensor storage, innermost first; channels-last folds N into the row dimension.
    const int32_t n = static_cast<int32_t>(plan.n), c = static_cast<int32_t>(plan.c),
                  s = static_cast<int32_t>(plan.s);
    // A kernel with the flat_rows marker takes contiguous tensors as (C*S, 1, N).
    const bool flat_rows = plan.kernel->flat_rows;
    const std::array<halide_dimension_t, 3> tensor_dims =
        channels_last ? std::array<halide_dimension_t, 3>{{{0, c, 1, 0}, {0, n * s, c, 0},
                                                           {0, 1, n * s * c, 0}}}
        : flat_rows   ? std::array<halide_dimension_t, 3>{{{0, c * s, 1, 0}, {0, 1, c * s, 0},
                                                           {0, n, c * s, 0}}}
                      : std::array<halide_dimension_t, 3>{{{0, s, 1, 0}, {0, c, s, 0},
                                                           {0, n, c * s, 0}}};
    // Halide's argv order is the metadata order (its own RunGen relies on this too).
    for (int i = 0; i < nargs; i++) {
        const halide_filter_argument_t &arg = md->arguments[i];
        const Role role = role_named(arg.name);
        if (arg.kind == halide_argument_kind_input_scalar &&
            (role == Role::streaming_output || role == Role::flat_rows)) {
            // A marker: the kernel does not read its value.
            static const int32_t kAlignment = 64;
            if (arg.type.code != halide_type_int || arg.type.bits != 32)
                fail(NG_PACKAGE_ERROR, "kernel '", plan.kernel->name,
                     "': argument '", arg.name, "' is not an int32");
            plan.args[i] = const_cast<int32_t *>(&kAlignment);
            continue;
        }
        if (arg.kind == halide_argument_kind_input_scalar) {
            static const double kZero = 0.0;
            const double *value = role == Role::eps               ? &plan.eps
                                  : role == Role::momentum_factor ? &plan.momentum_factor
                                  : role == Role::unbias          ? &plan.unbias
                                  : role == Role::opaque_zero     ? &kZero
                                                                  : nullptr;
            if (!value || arg.type.code != halide_type_float || arg.type.bits != 64)
                fail(NG_PACKAGE_ERROR, "kernel '", plan.kernel->name, "': scalar argument '",
                     arg.name, "' is not a float64 eps, momentum_factor, unbias or opaque_zero");
            plan.args[i] = const_cast<double *>(value);
            continue;
        }
        const bool tensor = arg.dimensions == 3, vector = arg.dimensions == 1;
        if (!tensor && !vector)
            fail(NG_PACKAGE_ERROR, "kernel '", plan.kernel->name, "': argument '", arg.name,
                 "' has ", arg.dimensions, " dimensions");
        plan.dims[i] = tensor ? tensor_dims
                              : std::array<halide_dimension_t, 3>{{{0, c, 1, 0}, {}, {}}};
        halide_buffer_t &b = plan.buffers[i];
        b.type = arg.type;
        b.dimensions = arg.dimensions;
        b.dim = plan.dims[i].data();
        plan.args[i] = &b;
        plan.slot[static_cast<size_t>(role)] = i;
    }
}

std::string describe_request(const ng_plan &p) {
    std::ostringstream os;
    os << (p.op == NG_OP_FORWARD ? "forward" : "backward") << " with "
       << (p.use_batch_stats ? "batch" : "running") << " statistics, " << dtype_name(p.x.dtype)
       << ", fusion " << fusion_name(p.params) << ", "
       << (p.x.format == NG_CONTIGUOUS ? "contiguous" : "channels-last") << " x"
       << shape_string(p.x) << " = (N " << p.n << ", C " << p.c << ", S " << p.s << ")";
    return os.str();
}

// A device copy of a per-channel float vector (Halide allocates it in the CUDA context).
std::unique_ptr<DeviceVector> copy_to_device(const std::vector<float> &values) {
    auto d = std::make_unique<DeviceVector>();
    d->dim = halide_dimension_t{0, static_cast<int32_t>(values.size()), 1, 0};
    d->buffer.type = halide_type_t(halide_type_float, 32);
    d->buffer.dimensions = 1;
    d->buffer.dim = &d->dim;
    d->buffer.host = reinterpret_cast<uint8_t *>(const_cast<float *>(values.data()));
    d->buffer.set_host_dirty(true);
    if (int r = halide_copy_to_device(nullptr, &d->buffer, cuda_interface()))
        fail(r == halide_error_code_out_of_memory ? NG_OUT_OF_MEMORY : NG_INTERNAL,
             "cannot copy ", values.size(), " floats of plan scratch to the CUDA device (Halide error ",
             r, "): ", take_halide_error());
    d->buffer.host = nullptr;  // the host vector is the plan's; only the device copy is used
    return d;
}

// The plan of the device-side running-statistics update that follows a CUDA forward training.
std::unique_ptr<ng_plan> running_stats_plan(const ng_runtime &rt, const ng_plan &forward,
                                            const CudaDevice &device) {
    const Kernel *best = nullptr;
    for (const Kernel &k : rt.package->kernels())
        if (k.op == "running_stats" && k.device == "cuda" && k.entry &&
            cuda_capability(k) <= device.capability &&
            (!best || cuda_capability(k) > cuda_capability(*best)))
            best = &k;
    if (!best)
        fail(NG_NO_KERNEL, "no running-statistics kernel (op running_stats) in '",
             rt.package->dir(), "' runs on ", device.name,
             ": training with track_running_stats needs one on CUDA");
    auto update = std::make_unique<ng_plan>();
    update->op = forward.op;
    update->x = forward.x;
    update->params = forward.params;
    update->n = update->s = 1;
    update->c = forward.c;
    update->kernel = best;
    update->on_cuda = true;
    bind_arguments(*update, false);
    return update;
}

}  // namespace

ng_plan *create_plan(ng_runtime *rt, int op_value, const ng_tensor *x,
                     const ng_batch_norm_params *params, bool allow_streaming) {
    if (!rt) fail(NG_INVALID_ARGUMENT, "runtime: NULL");
    if (op_value != NG_OP_FORWARD && op_value != NG_OP_BACKWARD)
        fail(NG_INVALID_ARGUMENT, "op = ", op_value,
             ": expected NG_OP_FORWARD (0) or NG_OP_BACKWARD (1)");
    const ng_op op = static_cast<ng_op>(op_value);
    validate_tensor(x);
    validate_params(params);
    const bool on_cuda = x->device == NG_CUDA;
    const CudaDevice *device = nullptr;
    if (on_cuda) {
        device = &cuda_device();  // NG_NO_DEVICE without a driver or device
        rt->package->load_device_kernels("cuda");
    }

    auto plan = std::make_unique<ng_plan>();
    plan->op = op;
    plan->x = *x;
    plan->params = *params;
    plan->n = x->shape[0];
    plan->c = x->shape[1];
    plan->s = 1;
    for (int i = 2; i < x->ndim; i++) plan->s *= x->shape[i];
    plan->use_batch_stats = params->training || !params->track_running_stats;
    plan->eps = params->eps;
    if (plan->use_batch_stats && plan->n * plan->s == 1)
        fail(NG_INVALID_ARGUMENT, "x.shape = ", shape_string(*x),
             ": Expected more than 1 value per channel when training, got input size ",
             shape_string(*x));

    // With one spatial element both formats are one memory layout: use channels-last kernels.
    const bool channels_last = x->format == NG_CHANNELS_LAST || plan->s == 1;
    const std::string layout = channels_last ? "cl" : "contig";
    const std::string op_name = op == NG_OP_FORWARD ? "forward" : "backward";
    const std::string stats = plan->use_batch_stats ? "batch" : "running";
    const std::string dtype = dtype_name(x->dtype);
    const std::string activation = params->activation == NG_ACT_RELU ? "relu" : "none";
    const bool residual = params->residual != 0;
    // Streaming stores need every output row to start 64-byte aligned (given an aligned pointer).
    auto row_bytes_of = [&](const Kernel &k) {
        return (channels_last ? plan->c : k.flat_rows ? plan->c * plan->s : plan->s) *
               static_cast<int64_t>(element_size(x->dtype));
    };

    // Best ISA (most features) or CUDA capability first, then the most specialised shape:
    // exact, then shape class, then generic. Kernels specialised for other shapes are not
    // candidates at all.
    auto specialisation = [](const Kernel &k) {
        return k.shape.kind == KernelShape::Exact ? 2 : k.shape.kind == KernelShape::Class ? 1 : 0;
    };
    const Kernel *best = nullptr;
    int best_rank = -1;
    std::vector<std::string> passed_over;
    for (const Kernel &k : rt->package->kernels()) {
        if (k.op != op_name || k.statistics != stats || k.dtype != dtype || k.layout != layout ||
            k.activation != activation || k.residual != residual ||
            k.device != (on_cuda ? "cuda" : "cpu") || !k.entry)
            continue;
        if (!k.shape.matches(plan->n, plan->c, plan->s)) continue;
        if (rt->generic_only && k.shape.kind != KernelShape::Generic) {
            passed_over.push_back(k.name + " (NORMGEN_KERNELS=generic)");
            continue;
        }
        if (k.streams_output && !allow_streaming) continue;  // the fallback's search
        if (k.streams_output && row_bytes_of(k) % 64 != 0) {
            passed_over.push_back(k.name + " (streaming stores need rows of a multiple of 64 " +
                                  "bytes; this output's rows are " +
                                  std::to_string(row_bytes_of(k)) +
                                  " bytes)");
            continue;
        }
        int level;
        if (on_cuda) {
            level = cuda_capability(k);
            if (level > device->capability) {
                passed_over.push_back(k.name + " (needs sm_" + std::to_string(level) + ", " +
                                      device->name + " is sm_" +
                                      std::to_string(device->capability) + ")");
                continue;
            }
        } else {
            std::string missing;
            if (!features_supported(k, rt->cpu, &missing)) {
                passed_over.push_back(
                    k.name + " (needs " + missing +
                    (rt->cpu.isa_cap.empty() ? "" : ", NORMGEN_ISA=" + rt->cpu.isa_cap) + ")");
                continue;
            }
            level = static_cast<int>(k.features.size());
        }
        const int rank = level * 3 + specialisation(k);
        if (rank > best_rank) {
            if (best) passed_over.push_back(best->name + " (a better kernel matches)");
            best = &k;
            best_rank = rank;
        } else {
            passed_over.push_back(k.name + " (a better kernel matches)");
        }
    }
    plan->description = describe_request(*plan);
    if (!best)
        fail(NG_NO_KERNEL, "no kernel in '", rt->package->dir(), "' runs ", plan->description,
             on_cuda ? " on " + device->name : std::string(" on this CPU"),
             passed_over.empty() ? "" : "; passed over: ",
             [&] {
                 std::string s;
                 for (const auto &p : passed_over) s += (s.empty() ? "" : ", ") + p;
                 return s;
             }());
    plan->kernel = best;
    std::ostringstream why;
    // Why this specialisation: exact shape, else shape class, else generic.
    const char *because = best->shape.kind == KernelShape::Exact
                              ? "tuned for exactly this shape"
                          : best->shape.kind == KernelShape::Class
                              ? "no exact-shape kernel; this shape is in the tuned class"
                              : "no exact-shape or shape-class kernel for this shape";
    why << best->name << ": " << best->describe_shape() << " kernel (" << because << "), "
        << best->isa << ", chosen for " << plan->description;
    if (best->streams_output) {
        // The same request without streaming kernels: what a misaligned output runs. A package
        // may have none (the tuner's one-kernel packages); such a call then fails (see run).
        try {
            plan->unaligned_fallback.reset(create_plan(rt, op, x, params, false));
        } catch (const Error &e) {
            if (e.status() != NG_NO_KERNEL) throw;
        }
        why << "; writes its output with streaming stores (an output pointer that is not "
               "64-byte aligned runs "
            << (plan->unaligned_fallback ? plan->unaligned_fallback->kernel->name
                                         : std::string("nothing: no other kernel matches"))
            << ")";
    }
    if (!passed_over.empty()) {
        why << "; passed over:";
        for (const auto &p : passed_over) why << " " << p << ";";
    }
    plan->description = why.str();
    if (const char *v = std::getenv("NORMGEN_VERBOSE"); v && *v && *v != '0')
        std::fprintf(stderr, "normgen: plan %s\n", plan->description.c_str());

    plan->on_cuda = on_cuda;
    bind_arguments(*plan, channels_last);
    if (best->streams_output)
        for (Role output : {Role::y, Role::dx, Role::dz})  // every tensor output streams
            if (const int i = plan->slot[static_cast<size_t>(output)]; i >= 0)
                plan->streaming_output_slots.push_back(i);
    const size_t C = static_cast<size_t>(plan->c);
    for (size_t i = 0; i < plan->scratch_host.size(); i++)
        plan->scratch_host[i].assign(C, static_cast<Scratch>(i) == Scratch::ones ? 1.0f : 0.0f);
    if (on_cuda) {
        for (const auto &values : plan->scratch_host)
            plan->scratch_device.push_back(copy_to_device(values));
        if (op == NG_OP_FORWARD && params->training && params->track_running_stats)
            plan->running_stats_update = running_stats_plan(*rt, *plan, *device);
    }
    return plan.release();
}

}  // namespace ng

DeviceVector::~DeviceVector() {
    if (buffer.device) halide_device_free(nullptr, &buffer);
}

ng_plan::~ng_plan() = default;

void ng_plan::bind(Role role, const void *data) {
    if (unaligned_fallback) unaligned_fallback->bind(role, data);
    const int i = slot[static_cast<size_t>(role)];
    if (i < 0) return;
    if (on_cuda)
        device_pointers[i] = reinterpret_cast<uint64_t>(data);
    else
        buffers[i].host = static_cast<uint8_t *>(const_cast<void *>(data));
}

float *ng_plan::scratch(Scratch which) {
    const size_t i = static_cast<size_t>(which);
    if (on_cuda) return reinterpret_cast<float *>(scratch_device[i]->buffer.device);
    return scratch_host[i].data();
}

void ng_plan::run() {
    for (size_t i = 0; i < buffers.size(); i++)
        if (args[i] == &buffers[i] && !(on_cuda ? device_pointers[i] != 0 : buffers[i].host != nullptr))
            ng::fail(NG_INTERNAL, "kernel '", kernel->name, "': argument '",
                     kernel->metadata->arguments[i].name, "' was not bound");
    if (!on_cuda) {
        for (const int i : streaming_output_slots) {
            if (reinterpret_cast<uintptr_t>(buffers[i].host) % 64 == 0) continue;
            if (!unaligned_fallback)
                ng::fail(NG_INVALID_ARGUMENT, kernel->metadata->arguments[i].name, " = ",
                         static_cast<const void *>(buffers[i].host), ": kernel '", kernel->name,
                         "' writes it with streaming stores and needs it 64-byte aligned, and "
                         "the package has no other kernel for this plan");
            return unaligned_fallback->run();
        }
        if (int r = kernel->entry(args.data()))
            ng::fail(NG_INTERNAL, "kernel '", kernel->name, "' failed (Halide error ", r,
                     "): ", ng::take_halide_error());
        return;
    }
    // Device pointers go in as they are: wrapped for the call, detached after it (the caller
    // owns them; nothing is copied to or from the host).
    size_t wrapped = 0;
    int status = 0;
    std::string message;
    for (; wrapped < buffers.size(); wrapped++) {
        if (args[wrapped] != &buffers[wrapped]) continue;
        buffers[wrapped].host = nullptr;
        buffers[wrapped].flags = 0;
        if ((status = ng::cuda_wrap(&buffers[wrapped], device_pointers[wrapped]))) {
            message = "cannot wrap device pointer '" +
                      std::string(kernel->metadata->arguments[wrapped].name) + "'";
            break;
        }
    }
    if (!status) {
        ng::set_cuda_stream(cuda_stream);
        if ((status = kernel->entry(args.data()))) message = "the kernel failed";
        ng::set_cuda_stream(nullptr);
    }
    for (size_t i = 0; i < wrapped; i++) {
        if (args[i] != &buffers[i]) continue;
        ng::cuda_detach(&buffers[i]);
        buffers[i].flags = 0;
    }
    if (status)
        ng::fail(status == halide_error_code_out_of_memory ? NG_OUT_OF_MEMORY : NG_INTERNAL,
                 "kernel '", kernel->name, "' on CUDA: ", message, " (Halide error ", status,
                 "): ", ng::take_halide_error());
}

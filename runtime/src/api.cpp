// The C ABI: argument checks, PyTorch's running-statistics bookkeeping around the kernels, and
// the translation of every failure into a status + message.
#include "errors.h"
#include "halide_glue.h"
#include "plan.h"

#include <cmath>
#include <cstdlib>
#include <sstream>

namespace ng {

namespace {

thread_local std::string g_last_error;

template <typename T>
void require(const T *pointer, const char *name, const char *why) {
    if (!pointer) fail(NG_INVALID_ARGUMENT, name, ": NULL, but ", why);
}

void require_op(const ng_plan *plan, ng_op op, const char *function) {
    if (!plan) fail(NG_INVALID_ARGUMENT, "plan: NULL");
    if (plan->op != op)
        fail(NG_INVALID_ARGUMENT, "plan: created for ",
             plan->op == NG_OP_FORWARD ? "NG_OP_FORWARD" : "NG_OP_BACKWARD", ", but passed to ",
             function);
}

// torch.nn.BatchNorm: running = (1 - f) * running + f * batch, with the unbiased variance and
// f = momentum, or 1 / num_batches_tracked for momentum=None. Done in double, as PyTorch's CPU
// kernels do; on CUDA by the package's running-statistics kernel (the buffers are on the device).
void update_running_stats(ng_plan &plan, float *running_mean, float *running_var,
                          int64_t *num_batches_tracked, const float *batch_mean) {
    if (num_batches_tracked) ++*num_batches_tracked;
    const double factor = std::isnan(plan.params.momentum)
                              ? 1.0 / static_cast<double>(*num_batches_tracked)
                              : plan.params.momentum;
    const double count = static_cast<double>(plan.n * plan.s);
    const double unbias = count / (count - 1);
    if (plan.on_cuda) {
        ng_plan &update = *plan.running_stats_update;
        update.momentum_factor = factor;
        update.unbias = unbias;
        update.cuda_stream = plan.cuda_stream;
        update.bind(Role::running_mean, running_mean);
        update.bind(Role::running_var, running_var);
        update.bind(Role::running_mean_out, running_mean);
        update.bind(Role::running_var_out, running_var);
        update.bind(Role::save_mean, batch_mean);
        update.bind(Role::batch_var, plan.scratch(Scratch::batch_var));
        update.run();
        return;
    }
    const std::vector<float> &batch_var = plan.scratch_values(Scratch::batch_var);
    for (int64_t ch = 0; ch < plan.c; ch++) {
        running_mean[ch] = static_cast<float>(factor * batch_mean[ch] +
                                              (1 - factor) * running_mean[ch]);
        running_var[ch] = static_cast<float>(factor * (batch_var[ch] * unbias) +
                                             (1 - factor) * running_var[ch]);
    }
}

}  // namespace

void set_last_error(const std::string &message) { g_last_error = message; }
void clear_last_error() { g_last_error.clear(); }

}  // namespace ng

using ng::fail;
using ng::guarded;
using ng::require;

extern "C" {

ng_batch_norm_params ng_batch_norm_params_default(void) {
    return ng_batch_norm_params{1e-5, 0.1, 1, 1, 1, NG_ACT_NONE, 0};
}

const char *ng_last_error(void) { return ng::g_last_error.c_str(); }

const char *ng_status_name(ng_status status) {
    switch (status) {
    case NG_OK: return "NG_OK";
    case NG_INVALID_ARGUMENT: return "NG_INVALID_ARGUMENT";
    case NG_UNSUPPORTED: return "NG_UNSUPPORTED";
    case NG_NO_KERNEL: return "NG_NO_KERNEL";
    case NG_NO_DEVICE: return "NG_NO_DEVICE";
    case NG_OUT_OF_MEMORY: return "NG_OUT_OF_MEMORY";
    case NG_INTERNAL: return "NG_INTERNAL";
    case NG_PACKAGE_ERROR: return "NG_PACKAGE_ERROR";
    }
    return "NG_(unknown status)";
}

ng_status ng_runtime_open(const char *package_dir, ng_runtime **out_runtime) {
    return guarded([&] {
        require(out_runtime, "out_runtime", "the runtime is returned through it");
        *out_runtime = nullptr;
        ng::install_halide_hooks();
        auto rt = std::make_unique<ng_runtime>();
        rt->cpu = ng::detect_cpu(std::getenv("NORMGEN_ISA"));
        if (const char *k = std::getenv("NORMGEN_KERNELS"); k && *k) {
            if (std::string(k) != "generic")
                ng::fail(NG_INVALID_ARGUMENT, "NORMGEN_KERNELS=", k,
                         ": expected 'generic' (or unset: the most specialised kernel)");
            rt->generic_only = true;
        }
        const std::string dir = package_dir ? package_dir : ng::default_package_dir();
        rt->package = ng::Package::open(dir, rt->cpu.arch);
        std::ostringstream os;
        os << "package " << dir << " (" << rt->package->kernels().size() << " kernels)\n";
        os << "cpu " << rt->cpu.arch << ":";
        for (const auto &f : rt->cpu.features) os << " " << f;
        if (!rt->cpu.isa_cap.empty()) os << " (capped by NORMGEN_ISA=" << rt->cpu.isa_cap << ")";
        os << "\n";
        for (const auto &k : rt->package->kernels())
            os << k.name << "  " << k.op << " " << k.statistics << " " << k.dtype << " "
               << k.layout << " " << k.device << " " << k.arch << "-" << k.isa << " "
               << k.describe_shape()
               << (k.entry                        ? ""
                   : k.arch != rt->cpu.arch       ? " (not loadable here)"
                   : k.device != "cpu"            ? " (loaded by the first " + k.device + " plan)"
                                                  : "")
               << "\n";
        rt->description = os.str();
        *out_runtime = rt.release();
    });
}

void ng_runtime_close(ng_runtime *runtime) { delete runtime; }

const char *ng_runtime_describe(const ng_runtime *runtime) {
    return runtime ? runtime->description.c_str() : "";
}

ng_status ng_plan_create(ng_runtime *runtime, ng_op op, const ng_tensor *x,
                         const ng_batch_norm_params *params, ng_plan **out_plan) {
    const int op_value = ng::raw_value(op);
    return guarded([&] {
        require(out_plan, "out_plan", "the plan is returned through it");
        *out_plan = nullptr;
        *out_plan = ng::create_plan(runtime, op_value, x, params);
    });
}

ng_status ng_plan_set_cuda_stream(ng_plan *plan, void *stream) {
    return guarded([&] {
        if (!plan) fail(NG_INVALID_ARGUMENT, "plan: NULL");
        if (!plan->on_cuda)
            fail(NG_INVALID_ARGUMENT, "plan: a CPU plan (x.device = NG_CPU) has no CUDA stream");
        plan->cuda_stream = stream;
    });
}

const char *ng_plan_describe(const ng_plan *plan) {
    return plan ? plan->description.c_str() : "";
}

void ng_plan_destroy(ng_plan *plan) { delete plan; }

ng_status ng_batch_norm_forward(ng_plan *plan, const void *x, const void *z, void *y,
                                const float *weight, const float *bias, float *running_mean,
                                float *running_var, int64_t *num_batches_tracked,
                                float *save_mean, float *save_invstd) {
    return guarded([&] {
        ng::require_op(plan, NG_OP_FORWARD, "ng_batch_norm_forward");
        const ng_batch_norm_params &p = plan->params;
        require(x, "x", "the input is required");
        require(y, "y", "the output is required");
        if (z && !p.residual)
            fail(NG_INVALID_ARGUMENT, "z: given, but params.residual is 0 (pass NULL)");
        if (p.residual) require(z, "z", "params.residual is 1 (y = act(bn(x) + z))");
        if (p.affine) {
            require(weight, "weight", "params.affine is 1");
            require(bias, "bias", "params.affine is 1");
        }
        const bool update = p.training && p.track_running_stats;
        if (update || !plan->use_batch_stats) {
            const char *why = update ? "training with track_running_stats updates it"
                                     : "eval with track_running_stats normalises with it";
            require(running_mean, "running_mean", why);
            require(running_var, "running_var", why);
        }
        if (update && std::isnan(p.momentum)) {
            require(num_batches_tracked, "num_batches_tracked",
                    "momentum=None (NAN) averages over it");
            if (*num_batches_tracked < 0)
                fail(NG_INVALID_ARGUMENT, "num_batches_tracked = ", *num_batches_tracked,
                     ": must be >= 0");
        }

        plan->bind(Role::x, x);
        plan->bind(Role::z, z);
        plan->bind(Role::y, y);
        plan->bind(Role::weight, p.affine ? weight : plan->scratch(Scratch::ones));
        plan->bind(Role::bias, p.affine ? bias : plan->scratch(Scratch::zeros));
        float *mean_out = save_mean ? save_mean : plan->scratch(Scratch::a);
        if (plan->use_batch_stats) {
            plan->bind(Role::save_mean, mean_out);
            plan->bind(Role::save_invstd, save_invstd ? save_invstd : plan->scratch(Scratch::b));
            plan->bind(Role::batch_var, plan->scratch(Scratch::batch_var));
        } else {
            plan->bind(Role::running_mean, running_mean);
            plan->bind(Role::running_var, running_var);
        }
        plan->run();
        if (update)
            ng::update_running_stats(*plan, running_mean, running_var, num_batches_tracked,
                                     mean_out);
    });
}

ng_status ng_batch_norm_backward(ng_plan *plan, const void *x, const void *dy, const void *z,
                                 const float *weight, const float *bias,
                                 const float *running_mean, const float *running_var,
                                 const float *save_mean, const float *save_invstd, void *dx,
                                 float *dweight, float *dbias, void *dz) {
    return guarded([&] {
        ng::require_op(plan, NG_OP_BACKWARD, "ng_batch_norm_backward");
        const ng_batch_norm_params &p = plan->params;
        require(x, "x", "the forward input is required");
        require(dy, "dy", "the output gradient is required");
        require(dx, "dx", "the input gradient is returned through it");
        if (z && !p.residual)
            fail(NG_INVALID_ARGUMENT, "z: given, but params.residual is 0 (pass NULL)");
        if (dz && !p.residual)
            fail(NG_INVALID_ARGUMENT, "dz: given, but params.residual is 0 (pass NULL)");
        const bool relu = p.activation == NG_ACT_RELU;
        if (p.residual) {
            require(dz, "dz", "params.residual is 1 (the residual's gradient is returned in it)");
            if (relu) require(z, "z", "the ReLU mask of act(bn(x) + z) is recomputed from it");
        }
        if (p.affine) require(weight, "weight", "params.affine is 1");
        if (p.affine && relu) require(bias, "bias", "the ReLU mask is recomputed from bn(x)");
        if (plan->use_batch_stats) {
            const char *why = "backward with batch statistics uses the forward pass's";
            require(save_mean, "save_mean", why);
            require(save_invstd, "save_invstd", why);
        } else {
            const char *why = "backward in eval with track_running_stats uses it";
            require(running_mean, "running_mean", why);
            require(running_var, "running_var", why);
        }

        plan->bind(Role::x, x);
        plan->bind(Role::dy, dy);
        plan->bind(Role::z, z);
        plan->bind(Role::dx, dx);
        plan->bind(Role::dz, dz);
        plan->bind(Role::weight, p.affine ? weight : plan->scratch(Scratch::ones));
        plan->bind(Role::bias, p.affine ? bias : plan->scratch(Scratch::zeros));
        plan->bind(Role::save_mean, save_mean);
        plan->bind(Role::save_invstd, save_invstd);
        plan->bind(Role::running_mean, running_mean);
        plan->bind(Role::running_var, running_var);
        // Without affine there is no weight/bias to differentiate: the sums go to scratch.
        plan->bind(Role::dweight, p.affine && dweight ? dweight : plan->scratch(Scratch::a));
        plan->bind(Role::dbias, p.affine && dbias ? dbias : plan->scratch(Scratch::b));
        plan->run();
    });
}

}  // extern "C"

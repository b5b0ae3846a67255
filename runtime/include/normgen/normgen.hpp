// A thin C++ layer over the C API: RAII for runtimes and plans, exceptions instead of statuses.
//
//   normgen::Runtime rt;                                   // the installed package
//   normgen::Plan plan(rt, NG_OP_FORWARD, normgen::tensor({32, 64, 56, 56}), params);
//   plan.forward(x, y, weight, bias, running_mean, running_var, &num_batches_tracked);
#pragma once

#include "normgen.h"

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

namespace normgen {

class Error : public std::runtime_error {
public:
    Error(ng_status status, const std::string &message)
        : std::runtime_error(std::string(ng_status_name(status)) + ": " + message),
          status_(status) {}
    ng_status status() const { return status_; }

private:
    ng_status status_;
};

inline void check(ng_status status) {
    if (status != NG_OK) throw Error(status, ng_last_error());
}

inline ng_tensor tensor(std::initializer_list<int64_t> shape,
                        ng_memory_format format = NG_CONTIGUOUS, ng_dtype dtype = NG_F32,
                        ng_device device = NG_CPU) {
    ng_tensor t{static_cast<int32_t>(shape.size()), {0, 0, 0, 0, 0}, format, dtype, device};
    int i = 0;
    for (int64_t e : shape)
        if (i < 5) t.shape[i++] = e;
    return t;
}

class Runtime {
public:
    explicit Runtime(const char *package_dir = nullptr) { check(ng_runtime_open(package_dir, &rt_)); }
    ~Runtime() { ng_runtime_close(rt_); }
    Runtime(const Runtime &) = delete;
    Runtime &operator=(const Runtime &) = delete;
    Runtime(Runtime &&o) noexcept : rt_(std::exchange(o.rt_, nullptr)) {}
    ng_runtime *get() const { return rt_; }
    std::string describe() const { return ng_runtime_describe(rt_); }

private:
    ng_runtime *rt_ = nullptr;
};

class Plan {
public:
    Plan(const Runtime &rt, ng_op op, const ng_tensor &x, const ng_batch_norm_params &params) {
        check(ng_plan_create(rt.get(), op, &x, &params, &plan_));
    }
    ~Plan() { ng_plan_destroy(plan_); }
    Plan(const Plan &) = delete;
    Plan &operator=(const Plan &) = delete;
    Plan(Plan &&o) noexcept : plan_(std::exchange(o.plan_, nullptr)) {}
    ng_plan *get() const { return plan_; }
    std::string describe() const { return ng_plan_describe(plan_); }

    // Tensors are void*: float for NG_F32, 16-bit patterns for NG_F16 / NG_BF16.
    void forward(const void *x, void *y, const float *weight, const float *bias,
                 float *running_mean, float *running_var, int64_t *num_batches_tracked,
                 float *save_mean = nullptr, float *save_invstd = nullptr,
                 const void *z = nullptr) {
        check(ng_batch_norm_forward(plan_, x, z, y, weight, bias, running_mean, running_var,
                                    num_batches_tracked, save_mean, save_invstd));
    }
    void backward(const void *x, const void *dy, const float *weight, const float *running_mean,
                  const float *running_var, const float *save_mean, const float *save_invstd,
                  void *dx, float *dweight, float *dbias, const float *bias = nullptr,
                  const void *z = nullptr, void *dz = nullptr) {
        check(ng_batch_norm_backward(plan_, x, dy, z, weight, bias, running_mean, running_var,
                                     save_mean, save_invstd, dx, dweight, dbias, dz));
    }

private:
    ng_plan *plan_ = nullptr;
};

}  // namespace normgen

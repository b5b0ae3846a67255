// normgen through its C API, as an ML compiler would call it: one plan per op, created once.
// The fused forms are the same calls with params.activation / params.residual set: one kernel
// computes relu(bn(x) [+ z]), and its backward dx, dweight, dbias (and dz) from x, dy (and z),
// recomputing the ReLU mask from the saved statistics.
#include <normgen/normgen.h>

#include <cstring>
#include <stdexcept>

#include "bench_common.h"

namespace bench {
namespace {

class NormgenImpl final : public Impl {
public:
    NormgenImpl(const Problem &p, const Inputs &in) : Impl(p, in), ch_(p.c()) {
        if (ng_runtime_open(nullptr, &rt_) != NG_OK)
            throw std::runtime_error(std::string("ng_runtime_open: ") + ng_last_error());
        ng_tensor t{static_cast<int32_t>(p.dims.size()),
                    {0, 0, 0, 0, 0},
                    p.format == Format::contig ? NG_CONTIGUOUS : NG_CHANNELS_LAST,
                    NG_F32,
                    NG_CPU};
        for (size_t i = 0; i < p.dims.size(); i++) t.shape[i] = p.dims[i];
        for (Op op : {Op::fwd_train, Op::fwd_infer, Op::bwd_train}) {
            ng_batch_norm_params params = ng_batch_norm_params_default();
            params.eps = kEps;
            params.momentum = kMomentum;
            params.training = op != Op::fwd_infer;
            params.activation = p.relu() ? NG_ACT_RELU : NG_ACT_NONE;
            params.residual = p.residual() ? 1 : 0;
            ng_plan *plan = nullptr;
            const ng_op ng = op == Op::bwd_train ? NG_OP_BACKWARD : NG_OP_FORWARD;
            if (ng_plan_create(rt_, ng, &t, &params, &plan) == NG_OK) {
                plans_[int(op)] = plan;
                const std::string d = ng_plan_describe(plan);
                kernel_[int(op)] = d.substr(0, d.find_first_of(" \t\n:,"));
            } else {
                why_[int(op)] = std::string("ng_plan_create: ") + ng_last_error();
            }
        }
    }
    ~NormgenImpl() override {
        for (ng_plan *plan : plans_) ng_plan_destroy(plan);
        ng_runtime_close(rt_);
    }

    std::string unavailable(Op op) const override { return why_[int(op)]; }
    std::string kernel(Op op) const override { return kernel_[int(op)]; }

    void run(Op op) override {
        ng_plan *plan = plans_[int(op)];
        ng_status status = NG_OK;
        switch (op) {
            case Op::fwd_train:
                status = ng_batch_norm_forward(
                    plan, in_.x.data(), in_.z.data(), y_.data(), in_.weight.data(), in_.bias.data(),
                    ch_.running_mean.data(), ch_.running_var.data(), &num_batches_tracked_,
                    ch_.save_mean.data(), ch_.save_invstd.data());
                break;
            case Op::fwd_infer:
                status = ng_batch_norm_forward(
                    plan, in_.x.data(), in_.z.data(), y_.data(), in_.weight.data(), in_.bias.data(),
                    ch_.running_mean.data(), ch_.running_var.data(), nullptr, nullptr, nullptr);
                break;
            case Op::bwd_train:
                // z and dz are nullptr without a residual (Inputs and Impl allocate none).
                status = ng_batch_norm_backward(
                    plan, in_.x.data(), in_.dy.data(), in_.z.data(), in_.weight.data(),
                    in_.bias.data(), ch_.running_mean.data(), ch_.running_var.data(),
                    ch_.save_mean.data(), ch_.save_invstd.data(), dx_.data(), ch_.dweight.data(),
                    ch_.dbias.data(), dz_.data());
                break;
        }
        if (status != NG_OK)
            throw std::runtime_error(std::string(ng_status_name(status)) + ": " + ng_last_error());
    }

    void reset_running_stats() override {
        const size_t bytes = problem_.c() * sizeof(float);
        std::memcpy(ch_.running_mean.data(), in_.running_mean.data(), bytes);
        std::memcpy(ch_.running_var.data(), in_.running_var.data(), bytes);
        num_batches_tracked_ = 0;
    }

protected:
    void collect(Outputs &out) const override { ch_.collect(out, problem_.c()); }

private:
    ng_runtime *rt_ = nullptr;
    ng_plan *plans_[3] = {nullptr, nullptr, nullptr};
    std::string kernel_[3], why_[3];
    ChannelBuffers ch_;
    int64_t num_batches_tracked_ = 0;
};

}  // namespace

std::unique_ptr<Impl> make_normgen(const Problem &p, const Inputs &in) {
    return std::make_unique<NormgenImpl>(p, in);
}

}  // namespace bench

// BatchNorm forward, as torch.nn.functional.batch_norm, over the canonical (N, C, S) view, with
// an optional residual add and ReLU fused in:  y = act(bn(x) [+ z]).
//
//   training:  mean, biased var over (n, s) per channel;  bn(x) = (x - mean) * rsqrt(var + eps) * w + b
//              outputs y, save_mean, save_invstd and the biased batch_var (the runtime turns it
//              into PyTorch's unbiased running_var update).
//   inference: bn(x) = (x - running_mean) * rsqrt(running_var + eps) * w + b
//
// Stability: sums are taken of d = x - k_c, k_c being the channel's first element, in float64.
// k_c lies within the data's spread, so E[d^2] - E[d]^2 does not cancel even when the mean is 1e4
// times the deviation, and bn(x) = (x - k_c) * scale + (b - (mean - k_c) * scale) never rounds the
// mean to float: y is as exact as its float32 arithmetic allows. Kernels tuned with the
// float32_stat_rows knob sum blocks of rows in float32 first (define_channel_sums).
#include "generator_common.h"

namespace normgen {

using namespace Halide;

class BatchNormForward : public BatchNormGenerator<BatchNormForward> {
public:
    GeneratorParam<Mode> mode{"mode", Mode::Training,
                              {{"training", Mode::Training}, {"inference", Mode::Inference}}};

    Input<Buffer<float, 1>> weight{"weight"};
    Input<Buffer<float, 1>> bias{"bias"};
    Input<double> eps{"eps"};
    TensorInput *x = nullptr, *z = nullptr;  // z: the residual, when fused
    TensorOutput *y = nullptr;
    // inference
    Input<Buffer<float, 1>> *running_mean = nullptr, *running_var = nullptr;
    // training
    Output<Buffer<float, 1>> *save_mean = nullptr, *save_invstd = nullptr, *batch_var = nullptr;

    void configure() {
        x = add_tensor_input("x");
        if (residual) z = add_tensor_input("z");
        y = add_tensor_output("y");
        if (mode == Mode::Inference) {
            running_mean = add_input<Buffer<float, 1>>("running_mean");
            running_var = add_input<Buffer<float, 1>>("running_var");
        } else {
            save_mean = add_output<Buffer<float, 1>>("save_mean");
            save_invstd = add_output<Buffer<float, 1>>("save_invstd");
            batch_var = add_output<Buffer<float, 1>>("batch_var");
        }
        if (mode == Mode::Training)
            choose_schedule_for("bn_fwd_train", true);
        else
            choose_schedule_for("bn_fwd_infer", false);
    }

    void generate() {
        NormPipeline p = pipeline();
        p.out = Func("y");
        p.channels = p.view.channel_extent(*x);
        const Var &c = p.view.c, &s = p.view.s, &n = p.view.n;
        auto f64 = [](Expr e) { return cast<double>(e); };
        auto f32 = [](Expr e) { return cast<float>(e); };
        Expr x_at = load(p.view.at(*x, s, c, n));
        Expr z_at = residual ? load(p.view.at(*z, s, c, n)) : Expr(0.0f);

        if (mode == Mode::Training) {
            Func shift("shift");
            shift(c) = load(p.view.at(*x, 0, c, 0));
            auto value = [&](Expr s_, Expr n_) { return load(p.view.at(*x, s_, c, n_)); };
            define_channel_sums(
                p, *x,
                [&](Expr s_, Expr n_, Type type, const BlockFirstRow &first) {
                    Expr about = first.defined() ? value(first.s, first.n) : shift(c);
                    Expr d = cast(type, value(s_, n_)) - cast(type, about);
                    return std::make_pair(d, d * d);
                },
                [&](const BlockFirstRow &first) {
                    return f64(value(first.s, first.n)) - f64(shift(c));
                });
            Expr spatial = p.view.spatial_extent(*x);
            Expr batch = x->dim(CanonicalView::batch_dim).extent();
            Expr count = f64(spatial) * f64(batch);
            Expr mean_minus_shift = p.sums(c)[0] / count;
            // Clamped at 0 against rounding; a NaN must stay NaN (as in PyTorch), but x86's max
            // drops it and Halide assumes no NaNs unless told: strict_float keeps the test.
            Expr raw_var = p.sums(c)[1] / count - mean_minus_shift * mean_minus_shift;
            Expr var = strict_float(select(is_nan(raw_var), raw_var, max(raw_var, f64(0))));
            Expr invstd = f64(1) / sqrt(var + eps);
            Expr scale = invstd * f64(weight(c));
            p.coeffs = Func("coeffs");
            p.coeffs(c) = Tuple(f32(scale), f32(f64(bias(c)) - mean_minus_shift * scale),
                                f32(f64(shift(c)) + mean_minus_shift), f32(invstd), f32(var));
            const std::vector<Expr> t =
                per_element(p, {shift(c), p.coeffs(c)[0], p.coeffs(c)[1]});
            // The next channel's statistics read only x: only x is prefetched.
            Expr y_value = activate((x_at - t[0]) * t[1] + t[2] + z_at);
            p.out(p.view.output_args()) =
                p.view.flat_output(store(with_next_channel_loads(y_value, p.view, {x})));
            (*save_mean)(c) = p.coeffs(c)[2];
            (*save_invstd)(c) = p.coeffs(c)[3];
            (*batch_var)(c) = p.coeffs(c)[4];
            p.channel_pre = {shift};
            p.statistics_inputs = {*x};
            p.channel_outputs = {*save_mean, *save_invstd, *batch_var};
        } else {
            Expr scale = f64(weight(c)) / sqrt(f64((*running_var)(c)) + eps);
            p.coeffs = Func("coeffs");
            p.coeffs(c) = Tuple(f32(scale), (*running_mean)(c));
            const std::vector<Expr> t = per_element(p, {p.coeffs(c)[1], p.coeffs(c)[0], bias(c)});
            p.out(p.view.output_args()) =
                p.view.flat_output(store(activate((x_at - t[0]) * t[1] + t[2] + z_at)));
        }
        *y = p.out;

        std::vector<OutputImageParam> tensors = {*x, *y};
        if (z) tensors.push_back(*z);
        std::vector<OutputImageParam> channel_vectors = {weight, bias};
        for (auto *in : {running_mean, running_var})
            if (in) channel_vectors.push_back(*in);
        for (auto *out : {save_mean, save_invstd, batch_var})
            if (out) channel_vectors.push_back(*out);
        constrain_and_schedule(p, {*y}, tensors, channel_vectors);
    }
};

}  // namespace normgen

HALIDE_REGISTER_GENERATOR(normgen::BatchNormForward, batch_norm_forward)

// BatchNorm backward, as aten::native_batch_norm_backward, over the canonical (N, C, S) view;
// with the forward's fused ReLU / residual add, their gradients are fused in as well.
//
//   g = dy, or with ReLU g = dy where the forward's pre-activation bn(x) [+ z] > 0, else 0 (the
//       mask is recomputed from x, z and the statistics: no y buffer is needed); dz = g
//   sums per channel:  sum_g = sum(g),  sum_g_xmu = sum(g * (x - mean))        (float64;
//                      with float32_stat_rows, of float32 sums over blocks of rows)
//   dweight = sum_g_xmu * invstd,  dbias = sum_g
//   training (batch statistics, mean/invstd saved by the forward pass), M = N*S:
//     dx = (g - sum_g / M - (x - mean) * invstd^2 * sum_g_xmu / M) * invstd * w
//   eval (running statistics, invstd = rsqrt(running_var + eps)):
//     dx = g * invstd * w
#include "generator_common.h"

namespace normgen {

using namespace Halide;

class BatchNormBackward : public BatchNormGenerator<BatchNormBackward> {
public:
    GeneratorParam<Mode> mode{"mode", Mode::Training,
                              {{"training", Mode::Training}, {"eval", Mode::Inference}}};

    Input<Buffer<float, 1>> weight{"weight"};
    Output<Buffer<float, 1>> dweight{"dweight"};
    Output<Buffer<float, 1>> dbias{"dbias"};
    TensorInput *x = nullptr, *dy = nullptr, *z = nullptr;
    TensorOutput *dx = nullptr, *dz = nullptr;
    Input<Buffer<float, 1>> *bias = nullptr;  // with ReLU: to recompute the mask
    // training: the forward pass's batch statistics
    Input<Buffer<float, 1>> *save_mean = nullptr, *save_invstd = nullptr;
    // eval: running statistics
    Input<Buffer<float, 1>> *running_mean = nullptr, *running_var = nullptr;
    Input<double> *eps = nullptr;

    bool relu() const { return activation == Activation::Relu; }

    void configure() {
        x = add_tensor_input("x");
        dy = add_tensor_input("dy");
        if (residual && relu()) z = add_tensor_input("z");
        if (relu()) bias = add_input<Buffer<float, 1>>("bias");
        dx = add_tensor_output("dx");
        if (residual) dz = add_tensor_output("dz");
        if (mode == Mode::Training) {
            save_mean = add_input<Buffer<float, 1>>("save_mean");
            save_invstd = add_input<Buffer<float, 1>>("save_invstd");
        } else {
            running_mean = add_input<Buffer<float, 1>>("running_mean");
            running_var = add_input<Buffer<float, 1>>("running_var");
            eps = add_input<double>("eps");
        }
        if (mode == Mode::Training)
            choose_schedule_for("bn_bwd_train", true, relu());
        else
            choose_schedule_for("bn_bwd_eval", false, relu());
    }

    void generate() {
        NormPipeline p = pipeline();
        p.out = Func("dx");
        p.channels = p.view.channel_extent(*x);
        const Var &c = p.view.c;
        auto f64 = [](Expr e) { return cast<double>(e); };
        auto f32 = [](Expr e) { return cast<float>(e); };

        const bool training = mode == Mode::Training;
        Func mean("mean"), invstd("invstd"), scale("scale");
        mean(c) = training ? (*save_mean)(c) : (*running_mean)(c);
        invstd(c) = training ? f64((*save_invstd)(c))
                             : f64(1) / sqrt(f64((*running_var)(c)) + *eps);
        scale(c) = f32(invstd(c) * f64(weight(c)));
        // The gradient reaching the normalisation at (s_, c, n_): dy, masked by the ReLU, whose
        // input takes the channel's mean, scale and bias (`mask`: undefined without ReLU).
        struct MaskTerms { Expr mean, scale, bias; };
        auto grad_at = [&](Expr s_, Expr n_, const MaskTerms &mask) {
            Expr g = load(p.view.at(*dy, s_, c, n_));
            if (!relu()) return g;
            Expr pre = (load(p.view.at(*x, s_, c, n_)) - mask.mean) * mask.scale + mask.bias;
            if (z) pre += load(p.view.at(*z, s_, c, n_));
            // As threshold_backward(dy, y, 0): zero where y <= 0, so a NaN y passes dy. (Halide
            // lowers `pre <= 0` to an unordered compare, true for NaN: test NaN explicitly.)
            return strict_float(select_loaded_or_zero(pre > 0.0f || is_nan(pre), g));
        };

        const MaskTerms channel_mask =
            relu() ? MaskTerms{mean(c), scale(c), (*bias)(c)} : MaskTerms{};

        Expr spatial = p.view.spatial_extent(*x);
        Expr batch = x->dim(CanonicalView::batch_dim).extent();
        define_channel_sums(p, *x, [&](Expr s_, Expr n_, Type type, const BlockFirstRow &) {
            Expr g_at = cast(type, grad_at(s_, n_, channel_mask));
            Expr xmu = cast(type, load(p.view.at(*x, s_, c, n_))) - cast(type, mean(c));
            return std::make_pair(g_at, g_at * xmu);
        });
        Expr sum_g = p.sums(c)[0], sum_g_xmu = p.sums(c)[1];

        // dx = g * a + (x - mean) * b + k
        Expr count = f64(spatial) * f64(batch);
        Expr a = invstd(c) * f64(weight(c));
        Expr b = training ? -a * invstd(c) * invstd(c) * sum_g_xmu / count : f64(0);
        Expr k = training ? -a * sum_g / count : f64(0);
        p.coeffs = Func("coeffs");
        p.coeffs(c) = Tuple(f32(a), f32(b), f32(k), f32(sum_g_xmu * invstd(c)), f32(sum_g));

        const Var &s = p.view.s, &n = p.view.n;
        // What dx and the mask read of the channel, per element: a; b and k in training; the
        // mean in training or with the mask; the mask's scale and bias.
        std::vector<Expr> terms = {p.coeffs(c)[0]};
        if (training) terms.insert(terms.end(), {p.coeffs(c)[1], p.coeffs(c)[2]});
        const size_t mean_term = terms.size();
        if (training || relu()) terms.push_back(mean(c));
        if (relu()) terms.insert(terms.end(), {channel_mask.scale, channel_mask.bias});
        const std::vector<Expr> t = per_element(p, terms);
        const MaskTerms element_mask =
            relu() ? MaskTerms{t[mean_term], t[mean_term + 1], t[mean_term + 2]} : MaskTerms{};
        Expr g = grad_at(s, n, element_mask);
        Expr dx_value = g * t[0];
        if (training) dx_value += (load(p.view.at(*x, s, c, n)) - t[mean_term]) * t[1] + t[2];
        // Prefetched: what the next channel's statistics read (x, dy and, for the mask, z).
        std::vector<TensorInput *> stats_inputs = {x, dy};
        if (z) stats_inputs.push_back(z);
        p.out(p.view.output_args()) =
            p.view.flat_output(store(with_next_channel_loads(dx_value, p.view, stats_inputs)));
        *dx = p.out;
        for (TensorInput *t : stats_inputs) p.statistics_inputs.push_back(*t);
        if (dz) {
            Func dz_func("dz");
            dz_func(p.view.output_args()) = p.view.flat_output(store(g));
            *dz = dz_func;
            p.tensor_outputs = {dz_func};
        }
        dweight(c) = p.coeffs(c)[3];
        dbias(c) = p.coeffs(c)[4];
        p.channel_pre = {mean, invstd, scale};
        p.channel_outputs = {dweight, dbias};

        std::vector<OutputImageParam> tensors = {*x, *dy, *dx};
        for (auto *t : {z}) if (t) tensors.push_back(*t);
        if (dz) tensors.push_back(*dz);
        std::vector<OutputImageParam> channel_vectors = {weight, dweight, dbias};
        for (auto *in : {bias, save_mean, save_invstd, running_mean, running_var})
            if (in) channel_vectors.push_back(*in);
        std::vector<OutputImageParam> outputs = {*dx};
        if (dz) outputs.push_back(*dz);
        constrain_and_schedule(p, outputs, tensors, channel_vectors);
    }
};

}  // namespace normgen

HALIDE_REGISTER_GENERATOR(normgen::BatchNormBackward, batch_norm_backward)

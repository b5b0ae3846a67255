// BatchNorm backward, as aten::native_batch_norm_backward, over the canonical (N, C, S) view.
//
//   sums per channel:  sum_dy = sum(dy),  sum_dy_xmu = sum(dy * (x - mean))        (float64)
//   dweight = sum_dy_xmu * invstd,  dbias = sum_dy
//   training (batch statistics, mean/invstd saved by the forward pass), M = N*S:
//     dx = (dy - sum_dy / M - (x - mean) * invstd^2 * sum_dy_xmu / M) * invstd * w
//   eval (running statistics, invstd = rsqrt(running_var + eps)):
//     dx = dy * invstd * w
#include "generator_common.h"

namespace normgen {

using namespace Halide;

class BatchNormBackward : public BatchNormGenerator<BatchNormBackward> {
public:
    GeneratorParam<Mode> mode{"mode", Mode::Training,
                              {{"training", Mode::Training}, {"eval", Mode::Inference}}};

    Input<Buffer<float, 3>> x{"x"};
    Input<Buffer<float, 3>> dy{"dy"};
    Input<Buffer<float, 1>> weight{"weight"};
    Output<Buffer<float, 3>> dx{"dx"};
    Output<Buffer<float, 1>> dweight{"dweight"};
    Output<Buffer<float, 1>> dbias{"dbias"};
    // training: the forward pass's batch statistics
    Input<Buffer<float, 1>> *save_mean = nullptr, *save_invstd = nullptr;
    // eval: running statistics
    Input<Buffer<float, 1>> *running_mean = nullptr, *running_var = nullptr;
    Input<double> *eps = nullptr;

    void configure() {
        if (mode == Mode::Training) {
            save_mean = add_input<Buffer<float, 1>>("save_mean");
            save_invstd = add_input<Buffer<float, 1>>("save_invstd");
        } else {
            running_mean = add_input<Buffer<float, 1>>("running_mean");
            running_var = add_input<Buffer<float, 1>>("running_var");
            eps = add_input<double>("eps");
        }
    }

    void generate() {
        NormPipeline p(layout);
        p.out = Func("dx");
        p.channels = x.dim(p.view.channel_dim()).extent();
        const Var &c = p.view.c;
        auto f64 = [](Expr e) { return cast<double>(e); };
        auto f32 = [](Expr e) { return cast<float>(e); };

        const bool training = mode == Mode::Training;
        Func mean("mean"), invstd("invstd");
        mean(c) = training ? (*save_mean)(c) : (*running_mean)(c);
        invstd(c) = training ? f64((*save_invstd)(c))
                             : f64(1) / sqrt(f64((*running_var)(c)) + *eps);

        Expr spatial = x.dim(p.view.spatial_dim()).extent();
        Expr batch = x.dim(CanonicalView::batch_dim).extent();
        p.r = RDom(0, spatial, 0, batch, "r");
        Expr dy_r = f64(p.view.at(dy, p.r.x, c, p.r.y));
        Expr xmu_r = f64(p.view.at(x, p.r.x, c, p.r.y)) - f64(mean(c));
        p.sums = Func("sums");
        p.sums(c) = Tuple(f64(0), f64(0));
        p.sums(c) = Tuple(p.sums(c)[0] + dy_r, p.sums(c)[1] + dy_r * xmu_r);
        Expr sum_dy = p.sums(c)[0], sum_dy_xmu = p.sums(c)[1];

        // dx = dy * a + (x - mean) * b + k
        Expr count = f64(spatial) * f64(batch);
        Expr a = invstd(c) * f64(weight(c));
        Expr b = training ? -a * invstd(c) * invstd(c) * sum_dy_xmu / count : f64(0);
        Expr k = training ? -a * sum_dy / count : f64(0);
        p.coeffs = Func("coeffs");
        p.coeffs(c) = Tuple(f32(a), f32(b), f32(k), mean(c), f32(sum_dy_xmu * invstd(c)),
                            f32(sum_dy));

        Expr dy_at = p.view.at(dy, p.view.s, c, p.view.n);
        Expr x_at = p.view.at(x, p.view.s, c, p.view.n);
        if (training) {
            p.out(p.view.storage_args()) = dy_at * p.coeffs(c)[0] +
                                           (x_at - p.coeffs(c)[3]) * p.coeffs(c)[1] +
                                           p.coeffs(c)[2];
        } else {
            p.out(p.view.storage_args()) = dy_at * p.coeffs(c)[0];
        }
        dx = p.out;
        dweight(c) = p.coeffs(c)[4];
        dbias(c) = p.coeffs(c)[5];
        p.channel_pre = {mean, invstd};
        p.channel_outputs = {dweight, dbias};

        std::vector<OutputImageParam> channel_vectors = {weight, dweight, dbias};
        for (auto *in : {save_mean, save_invstd, running_mean, running_var})
            if (in) channel_vectors.push_back(*in);
        constrain_and_schedule(p, training ? "bn_bwd_train" : "bn_bwd_eval", {x, dy, dx},
                               channel_vectors);
    }
};

}  // namespace normgen

HALIDE_REGISTER_GENERATOR(normgen::BatchNormBackward, batch_norm_backward)

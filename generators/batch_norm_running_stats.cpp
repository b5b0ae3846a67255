// torch.nn.BatchNorm's running-statistics update, for devices where the runtime cannot do it on
// the host (CUDA: the statistics live in device memory):
//   running_mean = (1 - f) * running_mean + f * batch_mean
//   running_var  = (1 - f) * running_var  + f * batch_var * unbias
// f = momentum (or 1 / num_batches_tracked), unbias = M / (M - 1), in float64 as on the CPU.
// The runtime passes the same buffers as running_mean and running_mean_out (and var): each
// element is read and written by the same iteration only, so the update is in place.
#include "generator_common.h"

namespace normgen {

using namespace Halide;

class BatchNormRunningStats : public Generator<BatchNormRunningStats> {
public:
    Input<Buffer<float, 1>> running_mean{"running_mean"};
    Input<Buffer<float, 1>> running_var{"running_var"};
    Input<Buffer<float, 1>> save_mean{"save_mean"};
    Input<Buffer<float, 1>> batch_var{"batch_var"};
    Input<double> momentum_factor{"momentum_factor"};
    Input<double> unbias{"unbias"};
    Output<Buffer<float, 1>> running_mean_out{"running_mean_out"};
    Output<Buffer<float, 1>> running_var_out{"running_var_out"};

    void generate() {
        Var c("c");
        auto f64 = [](Expr e) { return cast<double>(e); };
        Expr f = momentum_factor;
        running_mean_out(c) = cast<float>(f * f64(save_mean(c)) + (1 - f) * f64(running_mean(c)));
        running_var_out(c) =
            cast<float>(f * (f64(batch_var(c)) * unbias) + (1 - f) * f64(running_var(c)));
        for (OutputImageParam b : {OutputImageParam(running_mean), OutputImageParam(running_var),
                                   OutputImageParam(save_mean), OutputImageParam(batch_var),
                                   OutputImageParam(running_mean_out),
                                   OutputImageParam(running_var_out)})
            constrain_channel_vector(b, FixedShape{});
        schedule_channel_update({running_mean_out, running_var_out}, get_target());
    }
};

}  // namespace normgen

HALIDE_REGISTER_GENERATOR(normgen::BatchNormRunningStats, batch_norm_running_stats)

#include "reference.h"

#include <cmath>
#include <stdexcept>

namespace normgen::ref {

ForwardResult forward(const View &v, const Params &p, const float *x, const float *weight,
                      const float *bias, RunningStats *running) {
    const int64_t C = v.c;
    const double M = double(v.n) * double(v.s);  // values per channel
    ForwardResult r;
    r.batch_statistics = p.training || !p.track_running_stats;
    if (p.track_running_stats && !running)
        throw std::invalid_argument("ref::forward: running statistics are tracked but not given");
    r.mean.assign(C, 0.0);
    r.biased_var.assign(C, 0.0);
    r.invstd.assign(C, 0.0);

    if (r.batch_statistics) {
        if (M <= 1)
            throw std::invalid_argument("Expected more than 1 value per channel when training");
        // Two passes: the mean, then the mean squared deviation from it.
        v.for_each([&](int64_t c, int64_t i) { r.mean[c] += x[i]; });
        for (int64_t c = 0; c < C; c++) r.mean[c] /= M;
        v.for_each([&](int64_t c, int64_t i) {
            const double d = x[i] - r.mean[c];
            r.biased_var[c] += d * d;
        });
        for (int64_t c = 0; c < C; c++) r.biased_var[c] /= M;

        if (p.training && p.track_running_stats) {
            running->num_batches_tracked += 1;
            const double m = std::isnan(p.momentum)
                                 ? 1.0 / double(running->num_batches_tracked)
                                 : p.momentum;
            for (int64_t c = 0; c < C; c++) {
                const double unbiased_var = r.biased_var[c] * M / (M - 1);
                running->mean[c] = (1 - m) * running->mean[c] + m * r.mean[c];
                running->var[c] = (1 - m) * running->var[c] + m * unbiased_var;
            }
        }
    } else {
        r.mean = running->mean;
        r.biased_var = running->var;
    }
    for (int64_t c = 0; c < C; c++) r.invstd[c] = 1.0 / std::sqrt(r.biased_var[c] + p.eps);

    r.y.resize(v.size());
    v.for_each([&](int64_t c, int64_t i) {
        const double w = p.affine ? weight[c] : 1.0;
        const double b = p.affine ? bias[c] : 0.0;
        r.y[i] = (x[i] - r.mean[c]) * r.invstd[c] * w + b;
    });
    return r;
}

BackwardResult backward(const View &v, const float *x, const float *dy, const float *weight,
                        const float *running_mean, const float *running_var,
                        const float *save_mean, const float *save_invstd, bool train,
                        double eps) {
    const int64_t C = v.c;
    const double M = double(v.n) * double(v.s);
    std::vector<double> mean(C), invstd(C);
    for (int64_t c = 0; c < C; c++) {
        mean[c] = train ? save_mean[c] : running_mean[c];
        invstd[c] = train ? double(save_invstd[c]) : 1.0 / std::sqrt(double(running_var[c]) + eps);
    }

    std::vector<double> sum_dy(C, 0.0), dot_dy_xmu(C, 0.0);
    v.for_each([&](int64_t c, int64_t i) {
        sum_dy[c] += dy[i];
        dot_dy_xmu[c] += double(dy[i]) * (x[i] - mean[c]);
    });

    BackwardResult r;
    r.invstd = invstd;
    r.dweight.resize(C);
    r.dbias.resize(C);
    for (int64_t c = 0; c < C; c++) {
        r.dweight[c] = dot_dy_xmu[c] * invstd[c];
        r.dbias[c] = sum_dy[c];
    }
    r.dx.resize(v.size());
    v.for_each([&](int64_t c, int64_t i) {
        const double w = weight ? weight[c] : 1.0;
        if (train) {
            // dx = (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))) * invstd * w
            const double projection = dot_dy_xmu[c] * invstd[c] * invstd[c] / M;
            r.dx[i] = (dy[i] - sum_dy[c] / M - (x[i] - mean[c]) * projection) * invstd[c] * w;
        } else {
            r.dx[i] = dy[i] * invstd[c] * w;
        }
    });
    return r;
}

}  // namespace normgen::ref

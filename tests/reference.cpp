#include "reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace normgen::ref {

ForwardResult forward(const View &v, const Params &p, const float *x, const float *weight,
                      const float *bias, RunningStats *running, const float *z) {
    const int64_t C = v.c;
    const double M = double(v.n) * double(v.s);  // values per channel
    ForwardResult r;
    r.batch_statistics = p.training || !p.track_running_stats;
    if (p.track_running_stats && !running)
        throw std::invalid_argument("ref::forward: running statistics are tracked but not given");
    if (p.residual != (z != nullptr))
        throw std::invalid_argument("ref::forward: z must be given iff params.residual");
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
    r.pre.resize(v.size());
    v.for_each([&](int64_t c, int64_t i) {
        const double w = p.affine ? weight[c] : 1.0;
        const double b = p.affine ? bias[c] : 0.0;
        r.pre[i] = (x[i] - r.mean[c]) * r.invstd[c] * w + b + (z ? double(z[i]) : 0.0);
        r.y[i] = p.relu ? std::max(r.pre[i], 0.0) : r.pre[i];
    });
    return r;
}

BackwardResult backward(const View &v, const float *x, const float *dy, const float *weight,
                        const float *running_mean, const float *running_var,
                        const float *save_mean, const float *save_invstd, bool train,
                        double eps, const Fusion &fusion) {
    const int64_t C = v.c;
    const double M = double(v.n) * double(v.s);
    std::vector<double> mean(C), invstd(C);
    for (int64_t c = 0; c < C; c++) {
        mean[c] = train ? save_mean[c] : running_mean[c];
        invstd[c] = train ? double(save_invstd[c]) : 1.0 / std::sqrt(double(running_var[c]) + eps);
    }

    BackwardResult r;
    // g: the gradient reaching bn(x), dy masked by the ReLU (the gradient of max(pre, 0) is
    // taken as 0 at pre == 0, as torch.relu's backward does).
    r.dz.assign(dy, dy + v.size());
    if (fusion.relu) {
        r.pre.resize(v.size());
        v.for_each([&](int64_t c, int64_t i) {
            const double w = weight ? weight[c] : 1.0, b = fusion.bias ? fusion.bias[c] : 0.0;
            const double zi = fusion.z ? double(fusion.z[i]) : 0.0;
            r.pre[i] = (x[i] - mean[c]) * invstd[c] * w + b + zi;
            if (!(r.pre[i] > 0)) r.dz[i] = 0.0;
        });
    }
    const std::vector<double> &g = r.dz;

    std::vector<double> sum_dy(C, 0.0), dot_dy_xmu(C, 0.0);
    v.for_each([&](int64_t c, int64_t i) {
        sum_dy[c] += g[i];
        dot_dy_xmu[c] += g[i] * (x[i] - mean[c]);
    });

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
            r.dx[i] = (g[i] - sum_dy[c] / M - (x[i] - mean[c]) * projection) * invstd[c] * w;
        } else {
            r.dx[i] = g[i] * invstd[c] * w;
        }
    });
    return r;
}

// ---- Storage types ------------------------------------------------------------------------

namespace {

struct Format {
    int precision;     // significant bits, the implicit one included
    int min_exponent;  // of the smallest normal value
    int max_exponent;  // of the largest finite value
};

Format format_of(Storage s) {
    switch (s) {
    case Storage::F16: return {11, -14, 15};
    case Storage::BF16: return {8, -126, 127};
    case Storage::F32: break;
    }
    return {24, -126, 127};
}

// 2^e for |e| < 1023, built directly (std::ldexp is slow enough to dominate the tests).
double pow2(int e) {
    const uint64_t bits = uint64_t(e + 1023) << 52;
    double d;
    std::memcpy(&d, &bits, 8);
    return d;
}

// The exponent e with 2^e <= |v| < 2^(e+1), floored at the format's smallest normal exponent:
// the binade whose spacing applies.
int binade(double v, const Format &f) {
    if (v == 0) return f.min_exponent;
    uint64_t bits;
    std::memcpy(&bits, &v, 8);
    const int biased = int((bits >> 52) & 0x7FF);
    const int e = biased == 0 ? std::ilogb(v) : biased - 1023;  // double subnormals: rare
    return std::max(e, f.min_exponent);
}

}  // namespace

double storage_ulp(double v, Storage s) {
    const Format f = format_of(s);
    return pow2(binade(v, f) - (f.precision - 1));
}

double round_to_storage(double v, Storage s) {
    if (!std::isfinite(v) || v == 0) return v;
    const Format f = format_of(s);
    const int q = binade(v, f) - (f.precision - 1);  // exponent of the spacing
    // Scaling by a power of two is exact; nearbyint rounds half to even in the default mode.
    const double r = std::nearbyint(v * pow2(-q)) * pow2(q);
    const double max_finite = (2.0 - pow2(1 - f.precision)) * pow2(f.max_exponent);
    // Rounded with an unbounded exponent: anything beyond the largest finite value would need
    // the next binade, which does not exist (IEEE: the result is inf).
    if (std::fabs(r) > max_finite) return std::copysign(INFINITY, v);
    return r;
}

uint16_t encode16(double v, Storage s) {
    if (s != Storage::F16 && s != Storage::BF16)
        throw std::invalid_argument("encode16: not a 16-bit storage type");
    const float f = float(v);
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    uint16_t out;
    if (s == Storage::BF16) {
        out = uint16_t(bits >> 16);
    } else {
        const auto sign = uint16_t((bits >> 16) & 0x8000);
        const int exponent = int((bits >> 23) & 0xFF) - 127;
        const double a = std::fabs(v);
        if (std::isnan(v))
            out = sign | 0x7E00;
        else if (exponent > 15)  // inf (a finite value this large is not representable)
            out = sign | 0x7C00;
        else if (exponent < -14)  // subnormal or 0: a multiple of 2^-24 below 2^-14
            out = sign | uint16_t(a * 0x1p24);
        else
            out = sign | uint16_t((exponent + 15) << 10) | uint16_t((bits >> 13) & 0x3FF);
    }
    // Exact or refused: the value must survive the round trip (same sign of zero too).
    const float back = decode16(out, s);
    const bool same = back == f && std::signbit(back) == std::signbit(f);
    if (!same && !(std::isnan(back) && std::isnan(f)))
        throw std::invalid_argument("encode16: value not representable; round it first");
    return out;
}

namespace {

float decode_f16(uint16_t bits) {
    const int exponent = (bits >> 10) & 0x1F, mantissa = bits & 0x3FF;
    double a;
    if (exponent == 0x1F)
        a = mantissa ? NAN : INFINITY;
    else if (exponent == 0)
        a = std::ldexp(double(mantissa), -24);
    else
        a = std::ldexp(double(mantissa + 1024), exponent - 25);
    return float((bits & 0x8000) ? -a : a);
}

}  // namespace

float decode16(uint16_t bits, Storage s) {
    if (s == Storage::BF16) {
        const uint32_t wide = uint32_t(bits) << 16;
        float f;
        std::memcpy(&f, &wide, 4);
        return f;
    }
    if (s != Storage::F16) throw std::invalid_argument("decode16: not a 16-bit storage type");
    static const std::vector<float> table = [] {  // every f16 value, decoded once
        std::vector<float> t(65536);
        for (uint32_t b = 0; b < 65536; b++) t[b] = decode_f16(uint16_t(b));
        return t;
    }();
    return table[bits];
}

namespace {

// terms(c, i, i0, &t1, &k1, &t2, &k2): the exact terms at element i of a block whose first row
// holds i0 in the same column, and the relative error (in units of u) of the kernel's float32
// evaluation of each. recentre(c, i0): the block's offset (see forward_block_sum_error), or null.
using BlockTerms = std::function<void(int64_t c, int64_t i, int64_t i0, double *t1, double *k1,
                                      double *t2, double *k2)>;
BlockSumError block_sum_error(const View &v, int rows, const BlockTerms &terms,
                              const std::function<double(int64_t c, int64_t i0)> &recentre) {
    constexpr double u = 0x1p-24, margin = 2;
    BlockSumError err{std::vector<double>(size_t(v.c), 0.0), std::vector<double>(size_t(v.c), 0.0)};
    // The kernel's rows: contiguous, the n of each (c, s) column; channels-last, the (n, s) of
    // channel c in storage order (one column per channel).
    const int64_t columns = v.channels_last ? 1 : v.s, column_rows = v.channels_last ? v.n * v.s : v.n;
    auto element = [&](int64_t c, int64_t column, int64_t row) {
        return v.channels_last ? v.at(row / v.s, c, row % v.s) : v.at(row, c, column);
    };
    for (int64_t c = 0; c < v.c; c++)
        for (int64_t column = 0; column < columns; column++)
            for (int64_t r0 = 0; r0 < column_rows; r0 += rows) {
                const int64_t i0 = element(c, column, r0);
                double p1 = 0, p2 = 0, e1 = 0, e2 = 0;
                for (int64_t r = r0; r < std::min(column_rows, r0 + rows); r++) {
                    double t1, k1, t2, k2;
                    terms(c, element(c, column, r), i0, &t1, &k1, &t2, &k2);
                    p1 += t1;
                    p2 += t2;
                    e1 += u * (k1 * std::fabs(t1) + (r > r0 ? std::fabs(p1) : 0.0));
                    e2 += u * (k2 * std::fabs(t2) + (r > r0 ? std::fabs(p2) : 0.0));
                }
                err.first[c] += margin * e1;
                err.second[c] += margin * (e2 + (recentre ? 2 * std::fabs(recentre(c, i0)) * e1 : 0.0));
            }
    return err;
}

}  // namespace

BlockSumError forward_block_sum_error(const View &v, int rows, const float *x) {
    return block_sum_error(
        v, rows,
        [&](int64_t, int64_t i, int64_t i0, double *t1, double *k1, double *t2, double *k2) {
            const double e = double(x[i]) - double(x[i0]);  // float32: 1 rounding
            *t1 = e, *k1 = 1, *t2 = e * e, *k2 = 3;         // e*e: e's 2 and its own 1
        },
        [&](int64_t c, int64_t i0) { return double(x[i0]) - double(x[v.at(0, c, 0)]); });
}

BlockSumError backward_block_sum_error(const View &v, int rows, const float *x,
                                       const std::function<double(int64_t i)> &g,
                                       const float *mean) {
    return block_sum_error(
        v, rows,
        [&](int64_t c, int64_t i, int64_t, double *t1, double *k1, double *t2, double *k2) {
            *t1 = g(i), *k1 = 0;                             // a stored value: exact
            *t2 = g(i) * (double(x[i]) - mean[c]), *k2 = 2;  // x - mean, the product
        },
        nullptr);
}

}  // namespace normgen::ref

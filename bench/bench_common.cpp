#include "bench_common.h"

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <sstream>

namespace bench {

const char *name(Op op) {
    switch (op) {
        case Op::fwd_train:
            return "fwd_train";
        case Op::fwd_infer:
            return "fwd_infer";
        case Op::bwd_train:
            return "bwd_train";
    }
    return "?";
}
const char *name(Format format) { return format == Format::contig ? "contig" : "cl"; }
const char *name(Fusion fusion) {
    switch (fusion) {
        case Fusion::none:
            return "none";
        case Fusion::relu:
            return "relu";
        case Fusion::addrelu:
            return "addrelu";
    }
    return "?";
}
const char *name(ImplKind impl) {
    switch (impl) {
        case ImplKind::normgen:
            return "normgen";
        case ImplKind::onednn:
            return "onednn";
        case ImplKind::torch:
            return "torch";
    }
    return "?";
}

int64_t Problem::s() const {
    int64_t s = 1;
    for (size_t i = 2; i < dims.size(); i++) s *= dims[i];
    return s;
}

std::string Problem::shape() const {
    std::string out;
    for (size_t i = 0; i < dims.size(); i++) out += (i ? "x" : "") + std::to_string(dims[i]);
    return out;
}

// ---- buffers ------------------------------------------------------------------------------

Buffer::Buffer(size_t count) : count_(count) {
    if (count == 0) return;  // an absent tensor: data() is nullptr
    constexpr size_t kHuge = size_t(2) << 20;
    const size_t bytes =
        std::max<size_t>((count * sizeof(float) + kHuge - 1) / kHuge * kHuge, kHuge);
    data_ = static_cast<float *>(std::aligned_alloc(kHuge, bytes));
    if (!data_) throw std::bad_alloc();
    madvise(data_, bytes, MADV_HUGEPAGE);
    const int64_t n = static_cast<int64_t>(bytes / sizeof(float));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) data_[i] = 0.0f;
}

Buffer::~Buffer() { std::free(data_); }

Buffer &Buffer::operator=(Buffer &&o) noexcept {
    if (this != &o) {
        std::free(data_);
        data_ = o.data_;
        count_ = o.count_;
        o.data_ = nullptr;
        o.count_ = 0;
    }
    return *this;
}

// Deterministic uniform [-1, 1) from a logical index (splitmix64): cheap enough to fill 100 MB
// tensors in parallel, and identical for both memory formats.
static float uniform(uint64_t seed, uint64_t index) {
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + index + 0x632BE59BD9B4E019ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

Inputs::Inputs(const Problem &p)
    : x(p.numel()),
      dy(p.numel()),
      z(p.residual() ? p.numel() : 0),
      weight(p.c()),
      bias(p.c()),
      running_mean(p.c()),
      running_var(p.c()) {
    const int64_t N = p.n(), C = p.c(), S = p.s();
    std::vector<float> mu(C), sigma(C);
    for (int64_t c = 0; c < C; c++) {
        mu[c] = 2.0f * uniform(1, c);              // channel means in [-2, 2)
        sigma[c] = 1.25f + 0.75f * uniform(2, c);  // channel stds in [0.5, 2)
        weight[c] = 1.0f + 0.5f * uniform(3, c);
        bias[c] = 0.5f * uniform(4, c);
        running_mean[c] = mu[c] + 0.1f * uniform(5, c);
        running_var[c] = sigma[c] * sigma[c] * (1.0f + 0.2f * uniform(6, c));
    }
    // uniform[-1,1) has variance 1/3: scale by sqrt(3) for unit variance.
    const float k = std::sqrt(3.0f);
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t s = 0; s < S; s++) {
                const uint64_t logical = static_cast<uint64_t>((n * C + c) * S + s);
                const int64_t o = p.offset(n, c, s);
                x[o] = mu[c] + sigma[c] * k * uniform(7, logical);
                dy[o] = uniform(8, logical);
                if (p.residual()) z[o] = uniform(9, logical);
            }
    if (p.relu()) keep_pre_activations_off_zero(p);
}

// A pre-activation t = bn(x) (+ z) within rounding of 0 has a ReLU mask that correct
// implementations may disagree on (t is computed in different orders), and one disagreeing
// element changes dx there by ~weight*invstd*dy, far over the check's tolerance. So before any
// implementation sees them, the inputs are moved so that |t| >= kOff with the training forward's
// batch statistics (computed here in double): z where there is one (it takes no part in the
// statistics), else x, by 2*kOff in the direction of t. About 1e-4 of the elements move; moving
// x shifts the statistics by ~1e-8 of a standard deviation, far below kOff.
void Inputs::keep_pre_activations_off_zero(const Problem &p) {
    constexpr double kOff = 1e-4;
    const int64_t N = p.n(), C = p.c(), S = p.s(), CS = C * S;
    const bool contig = p.format == Format::contig;
    // Per-channel sums in memory order (a thread's partial sums per channel, then added up).
    auto channel_sums = [&](const auto &term) {
        std::vector<double> part(size_t(omp_get_max_threads()) * C, 0.0), out(C, 0.0);
#pragma omp parallel
        {
            double *acc = &part[size_t(omp_get_thread_num()) * C];
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++)
                for (int64_t i = 0; i < CS; i++) {
                    const int64_t c = contig ? i / S : i % C;
                    acc[c] += term(n * CS + i, c);
                }
        }
        for (size_t t = 0; t < part.size() / C; t++)
            for (int64_t c = 0; c < C; c++) out[c] += part[t * C + c];
        return out;
    };
    const double M = double(N * S);
    std::vector<double> mean = channel_sums([&](int64_t o, int64_t) { return double(x[o]); });
    for (double &m : mean) m /= M;
    const std::vector<double> sq = channel_sums([&](int64_t o, int64_t c) {
        const double d = x[o] - mean[c];
        return d * d;
    });
    std::vector<double> scale(C);
    for (int64_t c = 0; c < C; c++) scale[c] = weight[c] / std::sqrt(sq[c] / M + kEps);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t i = 0; i < CS; i++) {
            const int64_t o = n * CS + i, c = contig ? i / S : i % C;
            const double t = (x[o] - mean[c]) * scale[c] + bias[c] + (p.residual() ? z[o] : 0.0);
            if (std::fabs(t) >= kOff) continue;
            const double step = t >= 0 ? 2 * kOff : -2 * kOff;
            if (p.residual())
                z[o] = float(z[o] + step);
            else
                x[o] = float(x[o] + step / scale[c]);
        }
}

// ---- implementations: shared part ---------------------------------------------------------

void ChannelBuffers::collect(Outputs &out, int64_t c) const {
    auto vec = [&](const Buffer &b) { return std::vector<float>(b.data(), b.data() + c); };
    if (out.y_train) {
        out.save_mean = vec(save_mean);
        out.save_invstd = vec(save_invstd);
        out.running_mean = vec(running_mean);
        out.running_var = vec(running_var);
    }
    if (out.dx) {
        out.dweight = vec(dweight);
        out.dbias = vec(dbias);
    }
}

Impl::Impl(const Problem &p, const Inputs &in)
    : problem_(p), in_(in), y_(p.numel()), dx_(p.numel()), dz_(p.residual() ? p.numel() : 0) {}

Outputs Impl::run_for_check() {
    Outputs out;
    auto attempt = [&](Op op) {
        if (!unavailable(op).empty()) return false;
        try {
            run(op);
            return true;
        } catch (const std::exception &e) {
            out.error[int(op)] = e.what();
            return false;
        }
    };
    reset_running_stats();
    if (attempt(Op::fwd_infer)) {
        y_infer_copy_ = Buffer(problem_.numel());
        std::memcpy(y_infer_copy_.data(), y_.data(), problem_.numel() * sizeof(float));
        out.y_infer = y_infer_copy_.data();
    }
    if (attempt(Op::fwd_train)) {
        out.y_train = y_.data();
        forward_train_done();
    }
    if (out.y_train && attempt(Op::bwd_train)) {
        out.dx = dx_.data();
        if (problem_.residual()) out.dz = dz_.data();
    }
    collect(out);
    return out;
}

// ---- sanity check -------------------------------------------------------------------------

// max |a - b| / max(1, max |ref|): an absolute error for O(1) values, relative for large ones.
static double normalised_error(const float *ref, const float *got, int64_t n) {
    double diff = 0.0, mag = 1.0;
#pragma omp parallel for reduction(max : diff, mag) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        if (std::isnan(ref[i]) && std::isnan(got[i])) continue;  // both undefined (e.g. M = 1)
        const double d = std::fabs(double(ref[i]) - double(got[i]));
        diff = std::max(diff, std::isnan(d) ? INFINITY : d);
        mag = std::max(mag, std::fabs(double(ref[i])));
    }
    return diff / mag;
}

std::string check(Op op, const Problem &p, const Outputs &oracle, const Outputs &out,
                  double *max_err, std::string *worst) {
    std::ostringstream why;
    *max_err = 0.0;
    worst->clear();
    auto compare = [&](const char *what, const float *ref, const float *got, int64_t n,
                       double tol) {
        if (!ref || !got)
            return;  // not produced by this implementation (e.g. oneDNN's running stats)
        const double e = normalised_error(ref, got, n);
        if (e > *max_err || worst->empty()) *max_err = e, *worst = what;
        if (!(e <= tol))
            why << (why.tellp() > 0 ? "; " : "") << what << " error " << e << " > " << tol;
    };
    auto compare_vec = [&](const char *what, const std::vector<float> &ref,
                           const std::vector<float> &got, double tol) {
        if (ref.empty() || got.empty()) return;
        compare(what, ref.data(), got.data(), static_cast<int64_t>(ref.size()), tol);
    };
    // Elementwise outputs agree to ~1e-6 between correct fp32 kernels; reductions over up to
    // 400k values differ by summation order. The tolerances catch wrong results, not ulps.
    constexpr double kElementwise = 1e-4, kReduction = 1e-3;
    switch (op) {
        case Op::fwd_infer:
            if (!out.y_infer) return "no output";
            compare("y", oracle.y_infer, out.y_infer, p.numel(), kElementwise);
            break;
        case Op::fwd_train:
            if (!out.y_train) return "no output";
            compare("y", oracle.y_train, out.y_train, p.numel(), kElementwise);
            compare_vec("save_mean", oracle.save_mean, out.save_mean, kElementwise);
            compare_vec("save_invstd", oracle.save_invstd, out.save_invstd, kElementwise);
            compare_vec("running_mean", oracle.running_mean, out.running_mean, kElementwise);
            compare_vec("running_var", oracle.running_var, out.running_var, kElementwise);
            break;
        case Op::bwd_train:
            if (!out.dx) return "no output";
            compare("dx", oracle.dx, out.dx, p.numel(), kElementwise);
            if (p.residual()) {
                if (!out.dz) return "no dz";
                compare("dz", oracle.dz, out.dz, p.numel(), kElementwise);
            }
            compare_vec("dweight", oracle.dweight, out.dweight, kReduction);
            compare_vec("dbias", oracle.dbias, out.dbias, kReduction);
            break;
    }
    return why.str();
}

}  // namespace bench

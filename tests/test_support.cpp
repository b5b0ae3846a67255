#include "test_support.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <string_view>

#if defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#ifndef NORMGEN_TEST_PACKAGE_DIR
#error "NORMGEN_TEST_PACKAGE_DIR must name the package folder the build writes"
#endif

namespace normgen::test {

std::string package_dir() {
    // Another package of the same kernels (the CUDA schedule emulated on the CPU) can be tested
    // with the same suite.
    if (const char *dir = std::getenv("NORMGEN_TEST_PACKAGE"); dir && *dir) return dir;
    return NORMGEN_TEST_PACKAGE_DIR;
}

const nlohmann::json &manifest() {
    static const nlohmann::json m = [] {
        std::ifstream in(package_dir() + "/manifest.json");
        if (!in) throw std::runtime_error("cannot read " + package_dir() + "/manifest.json");
        return nlohmann::json::parse(in);
    }();
    return m;
}

std::string host_arch() {
#if defined(__x86_64__)
    return "x86-64";
#elif defined(__aarch64__)
    return "arm-64";
#else
#error "normgen's tests know the ISA levels of x86-64 and arm-64 only"
#endif
}

const std::vector<std::string> &isa_levels() {
#if defined(__x86_64__)
    static const std::vector<std::string> all = {"sse41", "avx2", "avx512"};
#else
    static const std::vector<std::string> all = {"neon", "neon_fp16"};
#endif
    // The levels the package has CPU kernels for on this architecture.
    static const std::vector<std::string> levels = [] {
        std::vector<std::string> present;
        for (const auto &isa : all)
            for (const auto &k : manifest()["kernels"])
                if (k["device"] == "cpu" && k["arch"] == host_arch() && k["isa"] == isa) {
                    present.push_back(isa);
                    break;
                }
        return present;
    }();
    return levels;
}

bool isa_has_dtype(const std::string &isa, ng_dtype dtype) {
    return isa != "neon_fp16" || dtype == NG_F16;
}

bool cpu_supports(const std::string &isa) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (isa == "sse41") return __builtin_cpu_supports("sse4.1");
    if (isa == "avx2")
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("avx");
    if (isa == "avx512")  // Halide's avx512_skylake: F, CD, BW, DQ, VL
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl") && cpu_supports("avx2");
#else
    const unsigned long hwcap = getauxval(AT_HWCAP);
    if (isa == "neon") return hwcap & HWCAP_ASIMD;
    if (isa == "neon_fp16")  // Halide's arm_fp16: half precision in scalar and vector units
        return cpu_supports("neon") && (hwcap & HWCAP_FPHP) && (hwcap & HWCAP_ASIMDHP);
#endif
    return false;
}

std::string best_isa() {
    std::string best;
    for (const auto &isa : isa_levels())
        if (cpu_supports(isa)) best = isa;
    return best;
}

ScopedEnv::ScopedEnv(const char *name, const char *value) : name_(name) {
    if (const char *old = std::getenv(name)) old_ = old;
    if (value)
        setenv(name, value, 1);
    else
        unsetenv(name);
}

ScopedEnv::~ScopedEnv() {
    if (old_)
        setenv(name_.c_str(), old_->c_str(), 1);
    else
        unsetenv(name_.c_str());
}

ng_runtime *runtime_for_isa(const std::string &isa) {
    static std::map<std::string, RuntimePtr> runtimes;
    static std::mutex mutex;
    std::lock_guard<std::mutex> lock(mutex);
    auto it = runtimes.find(isa);
    if (it != runtimes.end()) return it->second.get();
    ScopedEnv cap("NORMGEN_ISA", isa.c_str());
    ScopedEnv package("NORMGEN_PACKAGE", nullptr);  // the package beside libnormgen
    ng_runtime *rt = nullptr;
    const ng_status st = ng_runtime_open(nullptr, &rt);
    if (st != NG_OK || !rt) {
        ADD_FAILURE() << "ng_runtime_open(NULL) with NORMGEN_ISA=" << isa << ": "
                      << ng_status_name(st) << ": " << ng_last_error();
        return nullptr;
    }
    runtimes[isa].reset(rt);
    return rt;
}

std::string chosen_kernel(const ng_plan *plan) {
    const char *d = ng_plan_describe(plan);
    if (!d) return "<ng_plan_describe returned NULL>";
    std::string s(d);
    return s.substr(0, s.find_first_of(" \t\n:,;("));
}

ng_tensor make_tensor(const std::vector<int64_t> &shape, ng_memory_format format,
                      ng_dtype dtype) {
    ng_tensor t{};
    t.ndim = int32_t(shape.size());
    for (size_t i = 0; i < shape.size() && i < 5; i++) t.shape[i] = shape[i];
    t.format = format;
    t.dtype = dtype;
    t.device = NG_CPU;
    return t;
}

ref::View view_of(const ng_tensor &t) {
    ref::View v;
    v.n = t.shape[0];
    v.c = t.shape[1];
    v.s = 1;
    for (int d = 2; d < t.ndim; d++) v.s *= t.shape[d];
    v.channels_last = t.format == NG_CHANNELS_LAST;
    return v;
}

std::string shape_string(const ng_tensor &t) {
    std::string s;
    for (int d = 0; d < t.ndim; d++) s += (d ? "x" : "") + std::to_string(t.shape[d]);
    s += t.format == NG_CHANNELS_LAST ? " cl" : " contig";
    return t.dtype == NG_F32 ? s : s + " " + dtype_name(t.dtype);
}

const char *dtype_name(ng_dtype dtype) {
    switch (dtype) {
    case NG_F32: return "f32";
    case NG_F16: return "f16";
    case NG_BF16: return "bf16";
    }
    return "?";
}

ref::Storage storage_of(ng_dtype dtype) {
    switch (dtype) {
    case NG_F16: return ref::Storage::F16;
    case NG_BF16: return ref::Storage::BF16;
    case NG_F32: break;
    }
    return ref::Storage::F32;
}

size_t element_size(ng_dtype dtype) { return dtype == NG_F32 ? 4 : 2; }

const std::vector<ng_dtype> &all_dtypes() {
    static const std::vector<ng_dtype> d = {NG_F32, NG_F16, NG_BF16};
    return d;
}

std::string fusion_name(const FusedOps &f) {
    if (f.residual) return f.relu ? "addrelu" : "add";
    return f.relu ? "relu" : "";
}

const std::vector<FusedOps> &all_fusions() {
    static const std::vector<FusedOps> f = {{false, false}, {true, false}, {false, true},
                                            {true, true}};
    return f;
}

void set_fusion(ng_batch_norm_params &p, const FusedOps &f) {
    p.activation = f.relu ? NG_ACT_RELU : NG_ACT_NONE;
    p.residual = f.residual ? 1 : 0;
}

const char *family_name(Family f) {
    switch (f) {
    case Family::FwdTrain: return "bn_fwd_train";
    case Family::FwdInfer: return "bn_fwd_infer";
    case Family::BwdTrain: return "bn_bwd_train";
    case Family::BwdEval: return "bn_bwd_eval";
    }
    return "?";
}

ng_op family_op(Family f) {
    return f == Family::FwdTrain || f == Family::FwdInfer ? NG_OP_FORWARD : NG_OP_BACKWARD;
}

bool family_training(Family f) { return f == Family::FwdTrain || f == Family::BwdTrain; }

std::string kernel_layout(const ng_tensor &t) {
    const ref::View v = view_of(t);
    return t.format == NG_CHANNELS_LAST || v.s == 1 ? "cl" : "contig";
}

std::string expected_kernel(Family f, const ng_tensor &t, const std::string &isa,
                            const FusedOps &fused) {
    const ref::View v = view_of(t);
    const std::string fusion = fusion_name(fused);
    // The best level up to `isa` that has kernels of this dtype (neon_fp16 has only f16 ones).
    const auto &levels = isa_levels();
    auto it = std::find(levels.begin(), levels.end(), isa);
    while (it != levels.begin() && it != levels.end() && !isa_has_dtype(*it, t.dtype)) --it;
    const std::string level = it == levels.end() ? isa : *it;
    const std::string generic = std::string(family_name(f)) + "_" + dtype_name(t.dtype) + "_" +
                                kernel_layout(t) + (fusion.empty() ? "" : "_" + fusion) + "_" +
                                level;
    const std::string exact = generic + "_n" + std::to_string(v.n) + "_c" + std::to_string(v.c) +
                              "_s" + std::to_string(v.s);
    // Exact shape, else a shape class holding (C, S), else generic (the runtime's order).
    std::string in_class;
    for (const auto &k : manifest().at("kernels")) {
        const std::string name = k.at("name");
        if (name == exact) return exact;
        const auto &shape = k.at("shape");
        if (shape.at("kind") != "class" || name.rfind(generic + "_class_", 0) != 0) continue;
        auto below = [](const nlohmann::json &end, int64_t x) {
            return end.is_null() || x < end.get<int64_t>();
        };
        if (v.c >= shape.at("c_min").get<int64_t>() && below(shape.at("c_end"), v.c) &&
            v.s >= shape.at("s_min").get<int64_t>() && below(shape.at("s_end"), v.s))
            in_class = name;
    }
    return in_class.empty() ? generic : in_class;
}

uint64_t Rng::next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double Rng::uniform(double lo, double hi) {
    return lo + (hi - lo) * double(next() >> 11) * 0x1.0p-53;
}

double Rng::normal() {
    const double u1 = (double(next() >> 11) + 0.5) * 0x1.0p-53;
    const double u2 = double(next() >> 11) * 0x1.0p-53;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

namespace {
constexpr uint32_t kCanaryBits = 0x7FA0C0DEu;  // a signalling NaN nobody computes
}

Guarded::Guarded(int64_t n) : n_(n), buf_(size_t(n + 2 * kCanary)) {
    for (int64_t i = 0; i < kCanary; i++) {
        std::memcpy(&buf_[size_t(i)], &kCanaryBits, 4);
        std::memcpy(&buf_[size_t(n + kCanary + i)], &kCanaryBits, 4);
    }
}

void Guarded::fill(float v) { std::fill(data(), data() + n_, v); }

void Guarded::copy_from(const std::vector<float> &v) {
    if (int64_t(v.size()) != n_) throw std::logic_error("Guarded::copy_from: size mismatch");
    std::copy(v.begin(), v.end(), data());
}

::testing::AssertionResult Guarded::check_canaries(const std::string &what) const {
    for (int64_t i = 0; i < kCanary; i++) {
        uint32_t before, after;
        std::memcpy(&before, &buf_[size_t(i)], 4);
        std::memcpy(&after, &buf_[size_t(n_ + kCanary + i)], 4);
        if (before != kCanaryBits)
            return ::testing::AssertionFailure()
                   << what << ": written " << (kCanary - i) << " floats before its start";
        if (after != kCanaryBits)
            return ::testing::AssertionFailure()
                   << what << ": written " << i << " floats after its end (" << n_
                   << " elements)";
    }
    return ::testing::AssertionSuccess();
}

GuardedTensor::GuardedTensor(ng_dtype dtype, int64_t n)
    : dtype_(dtype), n_(n), buf_(size_t(n) * element_size(dtype) + 2 * kCanaryBytes) {
    const size_t end = size_t(kCanaryBytes) + size_t(n) * element_size(dtype);
    for (int64_t i = 0; i < kCanaryBytes; i++) {
        buf_[size_t(i)] = reinterpret_cast<const uint8_t *>(&kCanaryBits)[i % 4];
        buf_[end + size_t(i)] = reinterpret_cast<const uint8_t *>(&kCanaryBits)[i % 4];
    }
}

float GuardedTensor::get(int64_t i) const {
    if (dtype_ == NG_F32) return static_cast<const float *>(data())[i];
    return ref::decode16(bits(i), storage_of(dtype_));
}

uint16_t GuardedTensor::bits(int64_t i) const {
    if (dtype_ == NG_F32) throw std::logic_error("GuardedTensor::bits: not a 16-bit tensor");
    uint16_t b;
    std::memcpy(&b, static_cast<const uint8_t *>(data()) + 2 * i, 2);
    return b;
}

void GuardedTensor::set(int64_t i, float v) {
    if (dtype_ == NG_F32) {
        static_cast<float *>(data())[i] = v;
        return;
    }
    const uint16_t b = ref::encode16(v, storage_of(dtype_));  // throws unless representable
    std::memcpy(static_cast<uint8_t *>(data()) + 2 * i, &b, 2);
}

std::vector<float> GuardedTensor::values() const {
    std::vector<float> out(static_cast<size_t>(n_));
    for (int64_t i = 0; i < n_; i++) out[static_cast<size_t>(i)] = get(i);
    return out;
}

void GuardedTensor::assign(const std::vector<float> &v) {
    if (int64_t(v.size()) != n_) throw std::logic_error("GuardedTensor::assign: size mismatch");
    if (dtype_ == NG_F32) {
        std::copy(v.begin(), v.end(), static_cast<float *>(data()));
        return;
    }
    for (int64_t i = 0; i < n_; i++) set(i, v[size_t(i)]);
}

void GuardedTensor::fill(float v) {
    for (int64_t i = 0; i < n_; i++) set(i, v);
}

size_t GuardedTensor::hash() const {
    return std::hash<std::string_view>{}(std::string_view(
        reinterpret_cast<const char *>(data()), size_t(n_) * element_size(dtype_)));
}

::testing::AssertionResult GuardedTensor::check_canaries(const std::string &what) const {
    const size_t end = size_t(kCanaryBytes) + size_t(n_) * element_size(dtype_);
    const size_t esize = element_size(dtype_);
    for (int64_t i = 0; i < kCanaryBytes; i++) {
        const uint8_t want = reinterpret_cast<const uint8_t *>(&kCanaryBits)[i % 4];
        if (buf_[size_t(i)] != want)
            return ::testing::AssertionFailure()
                   << what << " (" << dtype_name(dtype_) << "): written "
                   << (kCanaryBytes - i) << " bytes before its start";
        if (buf_[end + size_t(i)] != want)
            return ::testing::AssertionFailure()
                   << what << " (" << dtype_name(dtype_) << "): written at byte " << i
                   << " after its end (" << n_ << " elements of " << esize << " bytes)";
    }
    return ::testing::AssertionSuccess();
}

std::vector<float> round_to(const std::vector<float> &v, ng_dtype dtype) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); i++)
        out[i] = float(ref::round_to_storage(v[i], storage_of(dtype)));
    return out;
}

void fill_tensor(const ref::View &v, float *x, Rng &rng, const std::vector<double> &mean,
                 const std::vector<double> &scale) {
    v.for_each([&](int64_t c, int64_t i) { x[i] = float(mean[c] + scale[c] * rng.uniform(-1, 1)); });
}

std::vector<float> uniform_vector(int64_t n, Rng &rng, double lo, double hi) {
    std::vector<float> out(static_cast<size_t>(n));
    for (auto &e : out) e = float(rng.uniform(lo, hi));
    return out;
}

namespace {
std::mutex report_mutex;
std::map<std::string, double> &worst_errors() {
    static std::map<std::string, double> m;
    return m;
}
}  // namespace

void record_error(const std::string &what, double e) {
    std::lock_guard<std::mutex> lock(report_mutex);
    double &w = worst_errors()[what];
    if (!(e <= w)) w = e;  // NaN sticks
}

void print_error_report() {
    const char *env = std::getenv("NORMGEN_TEST_REPORT");
    if (!env || std::string(env) != "1") return;
    std::lock_guard<std::mutex> lock(report_mutex);
    std::printf("worst errors seen (normalised as each comparison states):\n");
    for (const auto &[what, e] : worst_errors()) std::printf("  %-40s %.3g\n", what.c_str(), e);
}

::testing::AssertionResult tensor_near(const std::string &what, const float *got,
                                       const std::vector<double> &want, const ref::View &v,
                                       double tol, const std::vector<double> &min_scale) {
    std::vector<double> scale = min_scale;
    scale.resize(size_t(v.c), 0.0);
    v.for_each([&](int64_t c, int64_t i) { scale[c] = std::max(scale[c], std::fabs(want[i])); });
    for (auto &s : scale)
        if (s == 0) s = 1;
    double worst = 0;
    int64_t bad = 0, first_bad = -1;
    int64_t first_c = -1;
    v.for_each([&](int64_t c, int64_t i) {
        const double e = std::fabs(double(got[i]) - want[i]) / scale[c];
        if (!(e <= tol)) {  // NaN fails
            if (bad++ == 0) first_bad = i, first_c = c;
        }
        if (!(e <= worst)) worst = e;
    });
    // Report the category (y, dx, ...) without the shape so the report stays short.
    record_error(what.substr(0, what.find(' ')), worst);
    if (bad == 0) return ::testing::AssertionSuccess();
    // Recover (n, s) of the first bad element for the message.
    const int64_t i = first_bad, c = first_c;
    const int64_t n = i / (v.c * v.s);
    const int64_t s = v.channels_last ? (i % (v.c * v.s)) / v.c : i % v.s;
    return ::testing::AssertionFailure()
           << what << ": " << bad << " of " << v.size() << " elements off by more than " << tol
           << " x channel magnitude; worst " << worst << "; first at (n=" << n << ", c=" << c
           << ", s=" << s << "): got " << got[i] << ", want " << want[i] << " (channel scale "
           << scale[c] << ")";
}

::testing::AssertionResult stored_near(const std::string &what, ng_dtype dtype, const float *got,
                                       const std::vector<double> &want, const ref::View &v,
                                       double tol, const std::vector<double> &min_scale) {
    if (dtype == NG_F32) return tensor_near(what, got, want, v, tol, min_scale);
    const ref::Storage st = storage_of(dtype);
    std::vector<double> scale = min_scale;
    scale.resize(size_t(v.c), 0.0);
    v.for_each([&](int64_t c, int64_t i) { scale[c] = std::max(scale[c], std::fabs(want[i])); });
    for (auto &s : scale)
        if (s == 0) s = 1;
    double worst = 0, worst_ulps = 0;
    int64_t bad = 0, first_bad = -1, first_c = -1;
    double first_bound = 0;
    v.for_each([&](int64_t c, int64_t i) {
        const double e = tol * scale[c];
        const double bound = e + 0.5 * ref::storage_ulp(std::fabs(want[i]) + e, st);
        const double err = std::fabs(double(got[i]) - want[i]);
        if (!(err <= bound) && bad++ == 0) first_bad = i, first_c = c, first_bound = bound;
        if (!(err / bound <= worst)) worst = err / bound;
        const double ulps = err / ref::storage_ulp(want[i], st);
        if (!(ulps <= worst_ulps)) worst_ulps = ulps;
    });
    const std::string category = what.substr(0, what.find(' '));
    record_error(category + " [of bound]", worst);
    record_error(category + " [storage ulps]", worst_ulps);
    if (bad == 0) return ::testing::AssertionSuccess();
    const int64_t i = first_bad, c = first_c;
    const int64_t n = i / (v.c * v.s);
    const int64_t s = v.channels_last ? (i % (v.c * v.s)) / v.c : i % v.s;
    return ::testing::AssertionFailure()
           << what << ": " << bad << " of " << v.size() << " elements off by more than "
           << dtype_name(dtype) << " rounding + " << tol << " x channel magnitude; worst "
           << worst << " x the bound; first at (n=" << n << ", c=" << c << ", s=" << s
           << "): got " << got[i] << ", want " << want[i] << " (bound " << first_bound
           << ", channel scale " << scale[c] << ")";
}

std::vector<double> output_scale(const ref::View &v, const float *x, const ref::ForwardResult &r,
                                 const float *weight, const float *bias, const float *z) {
    std::vector<double> scale(size_t(v.c), 0.0);
    v.for_each([&](int64_t c, int64_t i) {
        const double w = weight ? std::fabs(weight[c]) : 1.0, b = bias ? std::fabs(bias[c]) : 0.0;
        const double zi = z ? std::fabs(z[i]) : 0.0;
        scale[c] = std::max(scale[c], std::fabs(x[i] - r.mean[c]) * r.invstd[c] * w + b + zi);
    });
    return scale;
}

std::vector<double> gradient_scale(const ref::View &v, const float *dy, const float *weight,
                                   const std::vector<double> &invstd) {
    std::vector<double> scale(size_t(v.c), 0.0);
    v.for_each([&](int64_t c, int64_t i) { scale[c] = std::max(scale[c], double(std::fabs(dy[i]))); });
    for (int64_t c = 0; c < v.c; c++) scale[c] *= invstd[c] * (weight ? std::fabs(weight[c]) : 1.0);
    return scale;
}

::testing::AssertionResult channels_within_ulps(const std::string &what, const float *got,
                                                const std::vector<double> &want,
                                                double max_ulps) {
    double worst = 0;
    std::ostringstream failures;
    int bad = 0;
    for (size_t c = 0; c < want.size(); c++) {
        const float w = float(want[c]);
        const double ulp = double(std::nextafter(std::fabs(w), INFINITY)) - std::fabs(w);
        const double e = std::fabs(double(got[c]) - want[c]) / ulp;
        if (!(e <= worst)) worst = e;
        if (!(e <= max_ulps) && bad++ < 5)
            failures << "\n  c=" << c << ": got " << got[c] << ", want " << want[c] << " (" << e
                     << " ulps)";
    }
    record_error(what.substr(0, what.find(' ')) + " [ulps]", worst);
    if (bad == 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << what << ": " << bad << " of " << want.size()
                                         << " channels beyond " << max_ulps << " ulps"
                                         << failures.str();
}

::testing::AssertionResult channels_near(const std::string &what, const float *got,
                                         const std::vector<double> &want, double rtol,
                                         const std::vector<double> &scale) {
    double worst = 0;
    std::ostringstream failures;
    int bad = 0;
    for (size_t c = 0; c < want.size(); c++) {
        double s = scale.empty() ? std::fabs(want[c]) : scale[c];
        if (s == 0) s = 1e-30;
        const double e = std::fabs(double(got[c]) - want[c]) / s;
        if (!(e <= worst)) worst = e;
        if (!(e <= rtol) && bad++ < 5)
            failures << "\n  c=" << c << ": got " << got[c] << ", want " << want[c]
                     << " (relative error " << e << ")";
    }
    record_error(what.substr(0, what.find(' ')), worst);
    if (bad == 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << what << ": " << bad << " of " << want.size()
                                         << " channels beyond relative " << rtol
                                         << failures.str();
}

bool names(const std::string &message, const std::string &word) {
    auto lower = [](std::string s) {
        for (auto &ch : s) ch = char(std::tolower(static_cast<unsigned char>(ch)));
        return s;
    };
    const std::string m = lower(message), w = lower(word);
    auto is_word = [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_'; };
    for (size_t pos = m.find(w); pos != std::string::npos; pos = m.find(w, pos + 1)) {
        const bool left = pos == 0 || !is_word(m[pos - 1]) || !is_word(w.front());
        const size_t end = pos + w.size();
        const bool right = end == m.size() || !is_word(m[end]) || !is_word(w.back());
        if (left && right) return true;
    }
    return false;
}

}  // namespace normgen::test

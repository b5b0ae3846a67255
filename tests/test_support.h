// What the test executables share: the package the build made, runtimes capped at each ISA
// level, deterministic data, buffers with canaries, and comparisons against the reference.
#pragma once

#include "reference.h"

#include <normgen/normgen.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace normgen::test {

// ---- The package and the runtime ----------------------------------------------------------

// The package folder the build wrote (lib/normgen-package beside libnormgen).
std::string package_dir();
// Its manifest.json, parsed (throws if unreadable: every test needs it).
const nlohmann::json &manifest();

// The architecture the tests run on, as the manifest names it ("x86-64", "arm-64"), its ISA
// levels in the package (the manifest's "isa", NORMGEN_ISA's values), baseline first, and
// whether this CPU can run each (detected here independently of the runtime).
std::string host_arch();
const std::vector<std::string> &isa_levels();
bool cpu_supports(const std::string &isa);
std::string best_isa();
// Whether the package has kernels of this level for dtype: every level has every dtype, except
// neon_fp16, which has only f16 kernels (arm_fp16 changes no other kernel's code).
bool isa_has_dtype(const std::string &isa, ng_dtype dtype);

// Sets an environment variable for the scope (unsets it for a null value), restoring it after.
class ScopedEnv {
public:
    ScopedEnv(const char *name, const char *value);
    ~ScopedEnv();
    ScopedEnv(const ScopedEnv &) = delete;
    ScopedEnv &operator=(const ScopedEnv &) = delete;

private:
    std::string name_;
    std::optional<std::string> old_;
};

// The default package opened with NORMGEN_ISA=isa, once per process (closed at exit).
// Returns null and records a test failure if it cannot be opened.
ng_runtime *runtime_for_isa(const std::string &isa);

struct PlanDeleter {
    void operator()(ng_plan *p) const { ng_plan_destroy(p); }
};
using PlanPtr = std::unique_ptr<ng_plan, PlanDeleter>;
struct RuntimeDeleter {
    void operator()(ng_runtime *r) const { ng_runtime_close(r); }
};
using RuntimePtr = std::unique_ptr<ng_runtime, RuntimeDeleter>;

// First word of ng_plan_describe: the chosen kernel's name.
std::string chosen_kernel(const ng_plan *plan);

// ---- Tensors and kernels --------------------------------------------------------------------

ng_tensor make_tensor(const std::vector<int64_t> &shape, ng_memory_format format,
                      ng_dtype dtype = NG_F32);
ref::View view_of(const ng_tensor &t);
std::string shape_string(const ng_tensor &t);  // e.g. "2x3x5x7 cl", "2x3x5x7 cl bf16"

const char *dtype_name(ng_dtype dtype);  // f32, f16, bf16 (as in kernel names)
ref::Storage storage_of(ng_dtype dtype);
size_t element_size(ng_dtype dtype);
const std::vector<ng_dtype> &all_dtypes();  // f32, f16, bf16

// The ops fused around the normalisation (issue 3): y = act(bn(x) [+ z]).
struct FusedOps {
    bool relu = false;
    bool residual = false;
    bool plain() const { return !relu && !residual; }
};
// As in kernel names: "" (none), "relu", "add", "addrelu".
std::string fusion_name(const FusedOps &f);
const std::vector<FusedOps> &all_fusions();  // none, relu, add, addrelu
// Sets params.activation / params.residual.
void set_fusion(ng_batch_norm_params &p, const FusedOps &f);

enum class Family { FwdTrain, FwdInfer, BwdTrain, BwdEval };
const char *family_name(Family f);  // bn_fwd_train, bn_fwd_infer, bn_bwd_train, bn_bwd_eval
ng_op family_op(Family f);
bool family_training(Family f);
// The kernel layout the runtime must use: "cl" for channels-last, and for contiguous tensors
// with S == 1 (their memory is channels-last); "contig" otherwise.
std::string kernel_layout(const ng_tensor &t);
// The kernel a plan must choose: the exact-shape kernel for (family, dtype, layout, fusion, isa,
// N, C, S) if the manifest has one, else the shape-class kernel whose class holds (C, S)
// (<name>_class_c<lo>to<hi>_s<lo>to<hi>), else the generic kernel of that ISA (or, where that
// level has no kernels of the dtype, of the best level below it). Names are
// <family>_<dtype>_<layout>[_<fusion>]_<isa>[_n<N>_c<C>_s<S>]; the dtype is t.dtype.
std::string expected_kernel(Family f, const ng_tensor &t, const std::string &isa,
                            const FusedOps &fused = {});

// ---- Data -------------------------------------------------------------------------------

// SplitMix64: fast, deterministic, good enough for test data.
class Rng {
public:
    explicit Rng(uint64_t seed) : state_(seed) {}
    uint64_t next();
    double uniform(double lo, double hi);  // [lo, hi)
    double normal();                       // Box-Muller

private:
    uint64_t state_;
};

// A float buffer with canaries (signalling-NaN bit patterns) before and after its n elements:
// check_canaries() fails if anything wrote outside [data(), data() + n).
class Guarded {
public:
    static constexpr int64_t kCanary = 64;
    explicit Guarded(int64_t n = 0);
    float *data() { return buf_.data() + kCanary; }
    const float *data() const { return buf_.data() + kCanary; }
    int64_t size() const { return n_; }
    float &operator[](int64_t i) { return data()[i]; }
    float operator[](int64_t i) const { return data()[i]; }
    std::vector<float> vec() const { return {data(), data() + n_}; }
    void fill(float v);
    void copy_from(const std::vector<float> &v);
    ::testing::AssertionResult check_canaries(const std::string &what) const;

private:
    int64_t n_;
    std::vector<float> buf_;
};

// A tensor of any storage type with canaries (the Guarded pattern, bytewise) before and after
// its n elements. Values are read and written as float (f16/bf16 decoded and encoded exactly:
// set() refuses a value the type cannot hold, so round with ref::round_to_storage first).
class GuardedTensor {
public:
    static constexpr int64_t kCanaryBytes = 256;
    explicit GuardedTensor(ng_dtype dtype = NG_F32, int64_t n = 0);
    void *data() { return buf_.data() + kCanaryBytes; }
    const void *data() const { return buf_.data() + kCanaryBytes; }
    int64_t size() const { return n_; }
    ng_dtype dtype() const { return dtype_; }
    float get(int64_t i) const;
    void set(int64_t i, float v);
    uint16_t bits(int64_t i) const;  // 16-bit types only
    std::vector<float> values() const;
    void assign(const std::vector<float> &v);
    void fill(float v);
    size_t hash() const;  // of the element bytes
    ::testing::AssertionResult check_canaries(const std::string &what) const;

private:
    ng_dtype dtype_;
    int64_t n_;
    std::vector<uint8_t> buf_;
};

// v, rounded to the storage type (ties to even): the values a tensor of that type can hold.
std::vector<float> round_to(const std::vector<float> &v, ng_dtype dtype);

// Fills x with per-channel data: channel c has mean mean[c] and spread scale[c] (uniform).
void fill_tensor(const ref::View &v, float *x, Rng &rng, const std::vector<double> &mean,
                 const std::vector<double> &scale);
std::vector<float> uniform_vector(int64_t n, Rng &rng, double lo, double hi);

// ---- Comparisons ------------------------------------------------------------------------

// |got - want| <= tol * scale_c, scale_c = max |want| over channel c, or min_scale[c] if that
// is larger (1 if both are 0): errors are measured against the channel's own magnitude, so a
// wrong channel is always caught. Records the worst normalised error under `what` for
// print_error_report().
::testing::AssertionResult tensor_near(const std::string &what, const float *got,
                                       const std::vector<double> &want, const ref::View &v,
                                       double tol, const std::vector<double> &min_scale = {});
// The magnitude of the terms of dx in channel c: invstd_c * |weight_c| * max |dy| (weight null:
// 1). dx = (dy - mean(dy) - xhat * mean(dy * xhat)) * invstd * w cancels to nearly 0 when a
// channel has few values (with 2, xhat = +-1 and dx is O(eps)), so dx's error is measured
// against its terms, not against its own size.
// The magnitude of the terms of y in channel c: max |(x - mean) * invstd * weight| + |bias|
// (weight/bias null: 1/0). y cancels to ~0 where the bias offsets the normalised value; with
// few values per channel (say N = 3, S = 1) every y of a channel can be small while its terms
// are not, so y's error is measured against its terms.
// With a residual z, |z| is one more term.
std::vector<double> output_scale(const ref::View &v, const float *x, const ref::ForwardResult &r,
                                 const float *weight, const float *bias,
                                 const float *z = nullptr);
std::vector<double> gradient_scale(const ref::View &v, const float *dy, const float *weight,
                                   const std::vector<double> &invstd);
// A tensor stored as dtype against the float64 reference. f32: tensor_near. f16/bf16: the
// kernel computes in float32 (error e_c = tol * channel scale, as tensor_near) and rounds once
// to the storage type, to nearest, so |got - want| <= e_c + 0.5 ulp_storage(|want| + e_c) (the
// spacing taken at the larger magnitude covers a result rounded up into the next binade).
// This bound is also what catches a conversion that truncates instead of rounding: truncation
// errs by up to a whole ulp. Records the worst error as a fraction of the bound and in storage
// ulps.
::testing::AssertionResult stored_near(const std::string &what, ng_dtype dtype, const float *got,
                                       const std::vector<double> &want, const ref::View &v,
                                       double tol, const std::vector<double> &min_scale = {});

// Per-channel values: |got - want| <= max_ulps * ulp(float(want)).
::testing::AssertionResult channels_within_ulps(const std::string &what, const float *got,
                                                const std::vector<double> &want, double max_ulps);
// Per-channel values: |got - want| <= rtol * scale[c] (scale[c] = |want[c]| if scale is empty).
::testing::AssertionResult channels_near(const std::string &what, const float *got,
                                         const std::vector<double> &want, double rtol,
                                         const std::vector<double> &scale = {});

// With NORMGEN_TEST_REPORT=1 the test executables print the worst error seen per quantity at
// exit (how the tolerances in the tests were chosen).
void record_error(const std::string &what, double normalised_error);
void print_error_report();

// Does `message` contain `word` as a whole word (letters, digits, '_' and '.' delimit)?
// Case-insensitive.
bool names(const std::string &message, const std::string &word);

}  // namespace normgen::test

// API and registry tests: every bad input of issues 2 and 3 gets the right status and a message
// naming the argument and the value; broken packages fail cleanly; kernels (plain, fused, f16
// and bf16) never touch memory outside the caller's buffers; plans choose the kernel they should
// and say why.
#include "test_support.h"

#include <normgen/normgen.hpp>

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <set>
#include <sstream>
#include <thread>

namespace fs = std::filesystem;

// c_callers.c: the C API called from C, with enum arguments that hold any int.
extern "C" ng_status c_plan_create_with_op(ng_runtime *runtime, int op, const ng_tensor *x,
                                           const ng_batch_norm_params *params, ng_plan **out_plan);
extern "C" const char *c_status_name(int status);
extern "C" ng_status c_plan_create_with_fields(ng_runtime *runtime, int op, const ng_tensor *x,
                                               int dtype, const ng_batch_norm_params *params,
                                               int activation, int residual, ng_plan **out_plan);

namespace normgen::test {
namespace {

// ---- Helpers ----------------------------------------------------------------------------

// Did the last call fail with `status`, and does ng_last_error() name every one of `words`?
::testing::AssertionResult failed_with(ng_status got, ng_status want,
                                       const std::vector<std::string> &words) {
    const std::string msg = ng_last_error();
    if (got != want)
        return ::testing::AssertionFailure() << "status " << ng_status_name(got) << ", expected "
                                             << ng_status_name(want) << " (message: \"" << msg
                                             << "\")";
    for (const auto &w : words)
        if (!names(msg, w))
            return ::testing::AssertionFailure() << "message \"" << msg << "\" does not name '"
                                                 << w << "'";
    return ::testing::AssertionSuccess() << msg;
}

bool contains(const std::string &haystack, const std::string &needle) {
    return haystack.find(needle) != std::string::npos;
}

ng_runtime *best_runtime() { return runtime_for_isa(best_isa()); }

// Stores an int into an enum-typed field as a C caller may (in C any int value is fine; in C++
// converting an out-of-range value to the enum type would be undefined behaviour in the test).
template <typename Enum>
void set_raw(Enum &field, int value) {
    static_assert(sizeof(Enum) == sizeof(int));
    std::memcpy(&field, &value, sizeof value);
}


// ng_plan_create for a descriptor/parameter error: must fail at plan creation (a plan is bound
// to its shape and parameters, so nothing about them is left for the call) without a plan.
// The runtime of a package folder; null (with a recorded failure) if it does not open.
RuntimePtr open_runtime(const std::string &dir) {
    ng_runtime *raw = nullptr;
    const ng_status st = ng_runtime_open(dir.c_str(), &raw);
    EXPECT_EQ(st, NG_OK) << ng_last_error();
    return RuntimePtr(st == NG_OK ? raw : nullptr);
}

::testing::AssertionResult plan_rejected(ng_op op, const ng_tensor &t,
                                         const ng_batch_norm_params &p, ng_status want,
                                         const std::vector<std::string> &words) {
    ng_plan *plan = reinterpret_cast<ng_plan *>(uintptr_t(0x1));  // must be overwritten
    const ng_status st = ng_plan_create(best_runtime(), op, &t, &p, &plan);
    auto r = failed_with(st, want, words);
    if (st == NG_OK) {
        ng_plan_destroy(plan);
        return r;
    }
    if (plan != nullptr)
        return ::testing::AssertionFailure() << "failed ng_plan_create left *out_plan non-NULL";
    return r;
}

ng_tensor small_tensor() { return make_tensor({4, 3, 5}, NG_CONTIGUOUS); }

// Valid buffers for one forward and one backward call on a small tensor, all with canaries.
struct Call {
    ng_tensor t;
    ref::View v;
    Guarded x, dy, y, dx, weight, bias, rm, rv, save_mean, save_invstd, dweight, dbias, z, dz;
    int64_t nbt = 3;

    explicit Call(const ng_tensor &tensor)
        : t(tensor), v(view_of(tensor)), x(v.size()), dy(v.size()), y(v.size()), dx(v.size()),
          weight(v.c), bias(v.c), rm(v.c), rv(v.c), save_mean(v.c), save_invstd(v.c),
          dweight(v.c), dbias(v.c), z(v.size()), dz(v.size()) {
        Rng rng(5);
        for (int64_t i = 0; i < v.size(); i++) {
            x[i] = float(rng.uniform(-2, 2));
            dy[i] = float(rng.uniform(-1, 1));
        }
        for (int64_t c = 0; c < v.c; c++) {
            weight[c] = 1.5f;
            bias[c] = 0.5f;
            rm[c] = 0.25f;
            rv[c] = 2.0f;
            save_mean[c] = 0.0f;
            save_invstd[c] = 1.0f;
        }
        for (Guarded *g : {&y, &dx, &dweight, &dbias, &dz}) g->fill(-123.0f);
    }

    ng_status forward(ng_plan *plan) {
        return ng_batch_norm_forward(plan, x.data(), nullptr, y.data(), weight.data(),
                                     bias.data(), rm.data(), rv.data(), &nbt, save_mean.data(),
                                     save_invstd.data());
    }
    ng_status backward(ng_plan *plan) {
        return ng_batch_norm_backward(plan, x.data(), dy.data(), nullptr, weight.data(), nullptr,
                                      rm.data(), rv.data(), save_mean.data(), save_invstd.data(),
                                      dx.data(), dweight.data(), dbias.data(), nullptr);
    }

    // After a rejected call: no output written, running statistics and counter untouched, and
    // nothing written outside any buffer.
    ::testing::AssertionResult untouched() const {
        for (const Guarded *g : {&x, &dy, &y, &dx, &weight, &bias, &rm, &rv, &save_mean,
                                 &save_invstd, &dweight, &dbias, &z, &dz})
            if (auto r = g->check_canaries("buffer"); !r) return r;
        for (int64_t i = 0; i < v.size(); i++)
            if (y[i] != -123.0f || dx[i] != -123.0f || dz[i] != -123.0f)
                return ::testing::AssertionFailure() << "a rejected call wrote y, dx or dz";
        for (int64_t c = 0; c < v.c; c++)
            if (rm[c] != 0.25f || rv[c] != 2.0f || dweight[c] != -123.0f)
                return ::testing::AssertionFailure()
                       << "a rejected call changed running stats or dweight";
        if (nbt != 3) return ::testing::AssertionFailure() << "a rejected call changed nbt";
        return ::testing::AssertionSuccess();
    }
};

PlanPtr make_plan(ng_op op, const ng_tensor &t, const ng_batch_norm_params &p,
                  ng_runtime *rt = nullptr) {
    ng_plan *raw = nullptr;
    const ng_status st = ng_plan_create(rt ? rt : best_runtime(), op, &t, &p, &raw);
    EXPECT_EQ(st, NG_OK) << ng_last_error();
    return PlanPtr(st == NG_OK ? raw : nullptr);
}

// ---- Defaults and small things ------------------------------------------------------------

TEST(Api, ParamsDefaultIsPyTorchDefault) {
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    EXPECT_EQ(p.eps, 1e-5);
    EXPECT_EQ(p.momentum, 0.1);
    EXPECT_EQ(p.affine, 1);
    EXPECT_EQ(p.track_running_stats, 1);
    EXPECT_EQ(p.training, 1);
    EXPECT_EQ(p.activation, NG_ACT_NONE);
    EXPECT_EQ(p.residual, 0);
}

TEST(Api, StatusNamesAreDistinct) {
    std::set<std::string> seen;
    for (ng_status s : {NG_OK, NG_INVALID_ARGUMENT, NG_UNSUPPORTED, NG_NO_KERNEL, NG_NO_DEVICE,
                        NG_OUT_OF_MEMORY, NG_INTERNAL, NG_PACKAGE_ERROR}) {
        ASSERT_NE(ng_status_name(s), nullptr);
        EXPECT_TRUE(seen.insert(ng_status_name(s)).second) << ng_status_name(s);
    }
    EXPECT_TRUE(contains(ng_status_name(NG_OK), "OK"));
    EXPECT_NE(c_status_name(99), nullptr);
}

TEST(Api, DestroyAndCloseAcceptNull) {
    ng_plan_destroy(nullptr);
    ng_runtime_close(nullptr);
}

// ng_last_error is per thread, and "" on a thread that never failed.
TEST(Api, LastErrorIsThreadLocal) {
    ASSERT_EQ(ng_plan_create(best_runtime(), NG_OP_FORWARD, nullptr, nullptr, nullptr),
              NG_INVALID_ARGUMENT);
    const std::string mine = ng_last_error();
    EXPECT_FALSE(mine.empty());
    std::string other_before, other_after;
    std::thread([&] {
        other_before = ng_last_error();
        ng_tensor t = small_tensor();
        t.ndim = 9;
        ng_batch_norm_params p = ng_batch_norm_params_default();
        ng_plan *plan = nullptr;
        ng_plan_create(best_runtime(), NG_OP_FORWARD, &t, &p, &plan);
        other_after = ng_last_error();
    }).join();
    EXPECT_EQ(other_before, "");
    EXPECT_TRUE(names(other_after, "ndim")) << other_after;
    EXPECT_EQ(std::string(ng_last_error()), mine);
}

// ---- Null pointers ----------------------------------------------------------------------

TEST(BadInput, NullPointersAtOpenAndPlan) {
    EXPECT_TRUE(failed_with(ng_runtime_open(package_dir().c_str(), nullptr), NG_INVALID_ARGUMENT,
                            {"out_runtime"}));
    const ng_tensor t = small_tensor();
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    ng_plan *plan = nullptr;
    EXPECT_TRUE(failed_with(ng_plan_create(nullptr, NG_OP_FORWARD, &t, &p, &plan),
                            NG_INVALID_ARGUMENT, {"runtime"}));
    EXPECT_EQ(plan, nullptr);
    EXPECT_TRUE(failed_with(ng_plan_create(best_runtime(), NG_OP_FORWARD, nullptr, &p, &plan),
                            NG_INVALID_ARGUMENT, {"x"}));
    EXPECT_TRUE(failed_with(ng_plan_create(best_runtime(), NG_OP_FORWARD, &t, nullptr, &plan),
                            NG_INVALID_ARGUMENT, {"params"}));
    EXPECT_TRUE(failed_with(ng_plan_create(best_runtime(), NG_OP_FORWARD, &t, &p, nullptr),
                            NG_INVALID_ARGUMENT, {"out_plan"}));
}

TEST(BadInput, NullPointersInForward) {
    ng_batch_norm_params p = ng_batch_norm_params_default();
    Call k(small_tensor());
    PlanPtr train = make_plan(NG_OP_FORWARD, k.t, p);
    ASSERT_TRUE(train);
    auto fwd = [&](ng_plan *plan, const void *x, void *y, const float *w, const float *b,
                   float *rm, float *rv, int64_t *nbt) {
        return ng_batch_norm_forward(plan, x, nullptr, y, w, b, rm, rv, nbt, k.save_mean.data(),
                                     k.save_invstd.data());
    };
    float *rm = k.rm.data(), *rv = k.rv.data();
    const float *x = k.x.data(), *w = k.weight.data(), *b = k.bias.data();
    float *y = k.y.data();
    EXPECT_TRUE(failed_with(fwd(nullptr, x, y, w, b, rm, rv, &k.nbt), NG_INVALID_ARGUMENT, {"plan"}));
    EXPECT_TRUE(failed_with(fwd(train.get(), nullptr, y, w, b, rm, rv, &k.nbt),
                            NG_INVALID_ARGUMENT, {"x"}));
    EXPECT_TRUE(failed_with(fwd(train.get(), x, nullptr, w, b, rm, rv, &k.nbt),
                            NG_INVALID_ARGUMENT, {"y"}));
    // affine: weight and bias are required
    EXPECT_TRUE(failed_with(fwd(train.get(), x, y, nullptr, b, rm, rv, &k.nbt),
                            NG_INVALID_ARGUMENT, {"weight", "affine"}));
    EXPECT_TRUE(failed_with(fwd(train.get(), x, y, w, nullptr, rm, rv, &k.nbt),
                            NG_INVALID_ARGUMENT, {"bias", "affine"}));
    // training with track_running_stats updates the running statistics: they are required
    EXPECT_TRUE(failed_with(fwd(train.get(), x, y, w, b, nullptr, rv, &k.nbt),
                            NG_INVALID_ARGUMENT, {"running_mean"}));
    EXPECT_TRUE(failed_with(fwd(train.get(), x, y, w, b, rm, nullptr, &k.nbt),
                            NG_INVALID_ARGUMENT, {"running_var"}));
    EXPECT_TRUE(k.untouched());

    // eval normalises with the running statistics
    p.training = 0;
    PlanPtr eval = make_plan(NG_OP_FORWARD, k.t, p);
    EXPECT_TRUE(failed_with(fwd(eval.get(), x, y, w, b, nullptr, rv, &k.nbt),
                            NG_INVALID_ARGUMENT, {"running_mean"}));
    EXPECT_TRUE(failed_with(fwd(eval.get(), x, y, w, b, rm, nullptr, &k.nbt),
                            NG_INVALID_ARGUMENT, {"running_var"}));
    // momentum None needs the counter
    p.training = 1;
    p.momentum = NAN;
    PlanPtr none = make_plan(NG_OP_FORWARD, k.t, p);
    EXPECT_TRUE(failed_with(fwd(none.get(), x, y, w, b, rm, rv, nullptr), NG_INVALID_ARGUMENT,
                            {"num_batches_tracked"}));
    EXPECT_TRUE(k.untouched());
}

TEST(BadInput, NullPointersInBackward) {
    ng_batch_norm_params p = ng_batch_norm_params_default();
    Call k(small_tensor());
    PlanPtr train = make_plan(NG_OP_BACKWARD, k.t, p);
    ASSERT_TRUE(train);
    struct Args {
        ng_plan *plan;
        const void *x, *dy;
        const float *w, *rm, *rv, *sm, *si;
        void *dx;
    };
    auto bwd = [&](const Args &a) {
        return ng_batch_norm_backward(a.plan, a.x, a.dy, nullptr, a.w, nullptr, a.rm, a.rv, a.sm,
                                      a.si, a.dx, k.dweight.data(), k.dbias.data(), nullptr);
    };
    const Args ok{train.get(), k.x.data(), k.dy.data(),          k.weight.data(), k.rm.data(),
                  k.rv.data(), k.save_mean.data(), k.save_invstd.data(), k.dx.data()};
    Args a = ok;
    a.plan = nullptr;
    EXPECT_TRUE(failed_with(bwd(a), NG_INVALID_ARGUMENT, {"plan"}));
    a = ok, a.x = nullptr;
    EXPECT_TRUE(failed_with(bwd(a), NG_INVALID_ARGUMENT, {"x"}));
    a = ok, a.dy = nullptr;
    EXPECT_TRUE(failed_with(bwd(a), NG_INVALID_ARGUMENT, {"dy"}));
    a = ok, a.dx = nullptr;
    EXPECT_TRUE(failed_with(bwd(a), NG_INVALID_ARGUMENT, {"dx"}));
    a = ok, a.w = nullptr;
    EXPECT_TRUE(failed_with(bwd(a), NG_INVALID_ARGUMENT, {"weight"}));
    a = ok, a.sm = nullptr;
    EXPECT_TRUE(failed_with(bwd(a), NG_INVALID_ARGUMENT, {"save_mean"}));
    a = ok, a.si = nullptr;
    EXPECT_TRUE(failed_with(bwd(a), NG_INVALID_ARGUMENT, {"save_invstd"}));
    EXPECT_TRUE(k.untouched());

    p.training = 0;
    PlanPtr eval = make_plan(NG_OP_BACKWARD, k.t, p);
    const Args eval_ok{eval.get(), k.x.data(), k.dy.data(), k.weight.data(), k.rm.data(),
                       k.rv.data(), nullptr, nullptr, k.dx.data()};
    a = eval_ok, a.rm = nullptr;
    EXPECT_TRUE(failed_with(bwd(a), NG_INVALID_ARGUMENT, {"running_mean"}));
    a = eval_ok, a.rv = nullptr;
    EXPECT_TRUE(failed_with(bwd(a), NG_INVALID_ARGUMENT, {"running_var"}));
    EXPECT_TRUE(k.untouched());
    // The valid calls succeed (so the failures above were about the one bad argument).
    EXPECT_EQ(bwd(ok), NG_OK) << ng_last_error();
    EXPECT_EQ(bwd(eval_ok), NG_OK) << ng_last_error();
}

// ---- Tensor descriptors -----------------------------------------------------------------

TEST(BadInput, NdimOutside2To5) {
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    for (int ndim : {-1, 0, 1, 6, 100}) {
        ng_tensor t = make_tensor({2, 3, 4, 5, 6}, NG_CONTIGUOUS);
        t.ndim = ndim;
        EXPECT_TRUE(plan_rejected(NG_OP_FORWARD, t, p, NG_INVALID_ARGUMENT,
                                  {"ndim", std::to_string(ndim)}))
            << "ndim " << ndim;
    }
}

// Extents past ndim are not part of the tensor: whatever they hold is ignored.
TEST(BadInput, ExtentsPastNdimAreIgnored) {
    Call k(small_tensor());
    ng_tensor t = k.t;
    t.shape[3] = -7;
    t.shape[4] = std::numeric_limits<int64_t>::max();
    PlanPtr plan = make_plan(NG_OP_FORWARD, t, ng_batch_norm_params_default());
    ASSERT_TRUE(plan);
    EXPECT_EQ(k.forward(plan.get()), NG_OK) << ng_last_error();
}

TEST(BadInput, ZeroOrNegativeExtents) {
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    for (int dim = 0; dim < 4; dim++)
        for (int64_t bad : {int64_t(0), int64_t(-3), std::numeric_limits<int64_t>::min()}) {
            std::vector<int64_t> shape = {2, 3, 4, 5};
            shape[dim] = bad;
            EXPECT_TRUE(plan_rejected(NG_OP_BACKWARD, make_tensor(shape, NG_CHANNELS_LAST), p,
                                      NG_INVALID_ARGUMENT, {"shape", std::to_string(bad)}))
                << "shape[" << dim << "] = " << bad;
        }
}

TEST(BadInput, OverflowingElementCount) {
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    // 2^40 * 2^40: the product does not fit int64.
    const int64_t big = int64_t(1) << 40;
    EXPECT_TRUE(plan_rejected(NG_OP_FORWARD, make_tensor({big, big, 4}, NG_CONTIGUOUS), p,
                              NG_INVALID_ARGUMENT, {"shape", "overflows"}));
    // Overflow only at the last factor of a 5-D shape, and products that wrap to small values.
    EXPECT_TRUE(plan_rejected(NG_OP_FORWARD,
                              make_tensor({1 << 16, 1 << 16, 1 << 16, 1 << 16, 2}, NG_CONTIGUOUS),
                              p, NG_INVALID_ARGUMENT, {"shape", "overflows"}));
    EXPECT_TRUE(plan_rejected(NG_OP_FORWARD,
                              make_tensor({int64_t(1) << 32, int64_t(1) << 32, 3}, NG_CONTIGUOUS),
                              p, NG_INVALID_ARGUMENT, {"shape", "overflows"}));
}

// Valid in PyTorch but beyond the kernels' 32-bit addressing: NG_UNSUPPORTED, not a crash.
TEST(BadInput, TooLargeTensorIsUnsupported) {
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    for (auto shape : std::vector<std::vector<int64_t>>{
             {2, 4, int64_t(1) << 28}, {int64_t(1) << 30, 2}, {1 << 20, 64, 64, 64}})
        EXPECT_TRUE(plan_rejected(NG_OP_FORWARD, make_tensor(shape, NG_CHANNELS_LAST), p,
                                  NG_UNSUPPORTED, {"shape"}))
            << shape_string(make_tensor(shape, NG_CHANNELS_LAST));
}

TEST(BadInput, UnknownEnumValues) {
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    ng_tensor t = small_tensor();
    set_raw(t.format, 7);
    EXPECT_TRUE(plan_rejected(NG_OP_FORWARD, t, p, NG_INVALID_ARGUMENT, {"format", "7"}));
    t = small_tensor();
    set_raw(t.dtype, 9);
    EXPECT_TRUE(plan_rejected(NG_OP_FORWARD, t, p, NG_INVALID_ARGUMENT, {"dtype", "9"}));
    t = small_tensor();
    set_raw(t.device, -2);
    EXPECT_TRUE(plan_rejected(NG_OP_FORWARD, t, p, NG_INVALID_ARGUMENT, {"device", "-2"}));
    ng_batch_norm_params q = p;
    set_raw(q.activation, 4);
    EXPECT_TRUE(plan_rejected(NG_OP_FORWARD, small_tensor(), q, NG_INVALID_ARGUMENT,
                              {"activation", "4"}));
    t = small_tensor();
    ng_plan *plan = nullptr;
    EXPECT_TRUE(failed_with(c_plan_create_with_op(best_runtime(), 2, &t, &p, &plan),
                            NG_INVALID_ARGUMENT, {"op", "2"}));
    EXPECT_EQ(plan, nullptr);
    // Flags are 0 or 1.
    q = p;
    q.training = 5;
    EXPECT_TRUE(plan_rejected(NG_OP_FORWARD, t, q, NG_INVALID_ARGUMENT, {"training", "5"}));
}

// ---- Parameters -------------------------------------------------------------------------

TEST(BadInput, EpsMustBePositive) {
    for (double eps : {0.0, -1.0, double(NAN), -double(INFINITY), double(INFINITY)}) {
        ng_batch_norm_params p = ng_batch_norm_params_default();
        p.eps = eps;
        std::ostringstream value;
        value << eps;  // as C++ streams print it: 0, -1, nan, -inf, inf
        EXPECT_TRUE(plan_rejected(NG_OP_FORWARD, small_tensor(), p, NG_INVALID_ARGUMENT,
                                  {"eps", value.str()}))
            << "eps " << eps;
    }
}

TEST(BadInput, MomentumOutside0To1) {
    for (double m : {-0.5, 1.5, double(INFINITY), -double(INFINITY)}) {
        ng_batch_norm_params p = ng_batch_norm_params_default();
        p.momentum = m;
        std::ostringstream value;
        value << m;
        EXPECT_TRUE(plan_rejected(NG_OP_FORWARD, small_tensor(), p, NG_INVALID_ARGUMENT,
                                  {"momentum", value.str()}))
            << "momentum " << m;
    }
    // The edges and NAN (momentum=None) are valid.
    for (double m : {0.0, 1.0, double(NAN)}) {
        ng_batch_norm_params p = ng_batch_norm_params_default();
        p.momentum = m;
        PlanPtr plan = make_plan(NG_OP_FORWARD, small_tensor(), p);
        EXPECT_TRUE(plan) << "momentum " << m;
    }
}

// PyTorch: "Expected more than 1 value per channel when training", whenever batch statistics
// are used: training, and eval without running statistics. Eval with running stats is fine.
TEST(BadInput, OneValuePerChannelWithBatchStatistics) {
    const std::string torch_msg = "Expected more than 1 value per channel when training";
    for (auto shape : std::vector<std::vector<int64_t>>{{1, 4}, {1, 4, 1}, {1, 4, 1, 1},
                                                        {1, 1, 1, 1, 1}}) {
        for (ng_memory_format fmt : {NG_CONTIGUOUS, NG_CHANNELS_LAST}) {
            const ng_tensor t = make_tensor(shape, fmt);
            for (ng_op op : {NG_OP_FORWARD, NG_OP_BACKWARD}) {
                SCOPED_TRACE(shape_string(t) + (op == NG_OP_FORWARD ? " forward" : " backward"));
                ng_batch_norm_params p = ng_batch_norm_params_default();
                ng_plan *plan = nullptr;
                ng_status st = ng_plan_create(best_runtime(), op, &t, &p, &plan);
                EXPECT_EQ(st, NG_INVALID_ARGUMENT);
                EXPECT_TRUE(contains(ng_last_error(), torch_msg)) << ng_last_error();
                p.training = 0;
                p.track_running_stats = 0;
                st = ng_plan_create(best_runtime(), op, &t, &p, &plan);
                EXPECT_EQ(st, NG_INVALID_ARGUMENT);
                EXPECT_TRUE(contains(ng_last_error(), torch_msg)) << ng_last_error();
                p.track_running_stats = 1;
                EXPECT_TRUE(make_plan(op, t, p)) << "eval with running stats accepts M = 1";
            }
        }
    }
    // And it runs: eval on a single value per channel.
    ng_batch_norm_params p = ng_batch_norm_params_default();
    p.training = 0;
    Call k(make_tensor({1, 3}, NG_CONTIGUOUS));
    PlanPtr plan = make_plan(NG_OP_FORWARD, k.t, p);
    ASSERT_EQ(k.forward(plan.get()), NG_OK) << ng_last_error();
    for (int c = 0; c < 3; c++)
        EXPECT_NEAR(k.y[c], (k.x[c] - 0.25) / std::sqrt(2.0 + 1e-5) * 1.5 + 0.5, 1e-6);
}

// A CUDA tensor on a machine without a CUDA driver or device: NG_NO_DEVICE with a message that
// says so, for every op and dtype (the package does hold CUDA kernels: tests/validate_ptx.py).
// With a device present the plan is made (tests/gpu_parity.cpp runs the kernels).
TEST(BadInput, CudaWithoutDevice) {
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    void *driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (driver) dlclose(driver);
    for (ng_dtype dt : all_dtypes()) {
        ng_tensor t = make_tensor({4, 3, 5}, NG_CONTIGUOUS, dt);
        t.device = NG_CUDA;
        for (ng_op op : {NG_OP_FORWARD, NG_OP_BACKWARD}) {
            if (!driver) {
                // The message names the reason: no libcuda here, no CUDA in an AArch64 build.
                EXPECT_TRUE(plan_rejected(op, t, p, NG_NO_DEVICE, {"no CUDA device"}));
            } else {
                ng_plan *plan = nullptr;
                const ng_status s = ng_plan_create(best_runtime(), op, &t, &p, &plan);
                EXPECT_TRUE(s == NG_OK || s == NG_NO_DEVICE) << ng_status_name(s) << ": "
                                                             << ng_last_error();
                ng_plan_destroy(plan);
            }
        }
    }
}

// A CUDA stream belongs to CUDA plans only.
TEST(BadInput, CudaStreamOnCpuPlan) {
    ng_tensor t = make_tensor({4, 3, 5}, NG_CONTIGUOUS);
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    ng_plan *plan = nullptr;
    ASSERT_EQ(ng_plan_create(best_runtime(), NG_OP_FORWARD, &t, &p, &plan), NG_OK)
        << ng_last_error();
    int fake_stream = 0;
    EXPECT_EQ(ng_plan_set_cuda_stream(plan, &fake_stream), NG_INVALID_ARGUMENT);
    EXPECT_NE(std::string(ng_last_error()).find("CPU plan"), std::string::npos) << ng_last_error();
    EXPECT_EQ(ng_plan_set_cuda_stream(nullptr, nullptr), NG_INVALID_ARGUMENT);
    ng_plan_destroy(plan);
}

// Every dtype x fusion x op x statistics has a plan, with the kernel of its name (batch
// statistics in training and in eval without running stats), and the plan's description says
// which dtype and fusion it is for.
TEST(Api, EveryDtypeAndFusionPlans) {
    const std::string isa = best_isa();
    for (ng_dtype dt : all_dtypes())
        for (const FusedOps &fused : all_fusions())
            for (auto [training, track] : {std::pair{1, 1}, {0, 1}, {0, 0}})
                for (ng_op op : {NG_OP_FORWARD, NG_OP_BACKWARD}) {
                    const ng_tensor t = make_tensor({4, 3, 5}, NG_CHANNELS_LAST, dt);
                    ng_batch_norm_params p = ng_batch_norm_params_default();
                    p.training = training;
                    p.track_running_stats = track;
                    set_fusion(p, fused);
                    const bool batch = training || !track;
                    const Family f = op == NG_OP_FORWARD
                                         ? (batch ? Family::FwdTrain : Family::FwdInfer)
                                         : (batch ? Family::BwdTrain : Family::BwdEval);
                    SCOPED_TRACE(std::string(family_name(f)) + " " + dtype_name(dt) + " " +
                                 fusion_name(fused) + (track ? "" : " untracked"));
                    PlanPtr plan = make_plan(op, t, p);
                    ASSERT_TRUE(plan);
                    EXPECT_EQ(chosen_kernel(plan.get()), expected_kernel(f, t, isa, fused));
                    const std::string d = ng_plan_describe(plan.get());
                    EXPECT_TRUE(names(d, dtype_name(dt))) << d;
                    if (fused.residual) {
                        EXPECT_TRUE(names(d, "add")) << d;
                    }
                    if (fused.relu) {
                        EXPECT_TRUE(names(d, "relu")) << d;
                    }
                }
}

// Enum and flag values a C caller can store that name nothing: activation, dtype and residual,
// set from C (c_callers.c), for both ops. The status is NG_INVALID_ARGUMENT and the message
// names the field and the value.
TEST(BadInput, FusionAndDtypeValuesOutOfRange) {
    const ng_tensor t = small_tensor();
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    auto create = [&](ng_op op, int dtype, int activation, int residual) {
        ng_plan *plan = reinterpret_cast<ng_plan *>(uintptr_t(0x1));
        const ng_status st = c_plan_create_with_fields(best_runtime(), op, &t, dtype, &p,
                                                       activation, residual, &plan);
        EXPECT_EQ(plan, nullptr) << "a failed ng_plan_create must leave *out_plan NULL";
        if (st == NG_OK) ng_plan_destroy(plan);
        return st;
    };
    for (ng_op op : {NG_OP_FORWARD, NG_OP_BACKWARD}) {
        SCOPED_TRACE(op == NG_OP_FORWARD ? "forward" : "backward");
        for (int activation : {2, 7, -1, std::numeric_limits<int>::min()})
            EXPECT_TRUE(failed_with(create(op, NG_F32, activation, 0), NG_INVALID_ARGUMENT,
                                    {"activation", std::to_string(activation)}));
        for (int dtype : {3, 7, -1, std::numeric_limits<int>::max()})
            EXPECT_TRUE(failed_with(create(op, dtype, NG_ACT_RELU, 1), NG_INVALID_ARGUMENT,
                                    {"dtype", std::to_string(dtype)}));
        for (int residual : {2, -1})
            EXPECT_TRUE(failed_with(create(op, NG_BF16, NG_ACT_NONE, residual),
                                    NG_INVALID_ARGUMENT, {"residual", std::to_string(residual)}));
    }
    // The same path accepts every valid combination.
    for (ng_dtype dt : all_dtypes())
        for (int activation : {NG_ACT_NONE, NG_ACT_RELU})
            for (int residual : {0, 1}) {
                ng_plan *plan = nullptr;
                EXPECT_EQ(c_plan_create_with_fields(best_runtime(), NG_OP_BACKWARD, &t, dt, &p,
                                                    activation, residual, &plan),
                          NG_OK)
                    << ng_last_error();
                ng_plan_destroy(plan);
            }
}

// There is one tensor descriptor per plan: x, z, y, dy, dx and dz all take its shape, format and
// dtype, and the data pointers are untyped (void *). A dtype or format mismatch between x and z
// (or dy, dz) therefore cannot be expressed in this API, and there is nothing to check for it;
// what can be checked is what the plan's dtype changes: the element size in every extent
// (BufferSafety.*FusedAndReducedPrecision) and in the size limit below.
//
// Kernels address at most 2^31 - 1 bytes per tensor: 2^29 - 1 elements of f32 but 2^30 - 1 of
// f16 / bf16. The limit is in bytes, so it moves with the dtype.
TEST(BadInput, SizeLimitCountsBytesOfTheDtype) {
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    const int64_t max16 = std::numeric_limits<int32_t>::max() / 2;  // 2^30 - 1 elements
    const int64_t max32 = std::numeric_limits<int32_t>::max() / 4;  // 2^29 - 1 elements
    for (ng_dtype dt : {NG_F16, NG_BF16}) {
        SCOPED_TRACE(dtype_name(dt));
        EXPECT_TRUE(make_plan(NG_OP_FORWARD, make_tensor({1, 1, max16}, NG_CONTIGUOUS, dt), p));
        EXPECT_TRUE(plan_rejected(NG_OP_FORWARD,
                                  make_tensor({1, 1, max16 + 1}, NG_CONTIGUOUS, dt), p,
                                  NG_UNSUPPORTED, {"shape"}));
        EXPECT_TRUE(plan_rejected(NG_OP_BACKWARD,
                                  make_tensor({2, max16 / 2 + 1}, NG_CONTIGUOUS, dt), p,
                                  NG_UNSUPPORTED, {"shape"}));
    }
    EXPECT_TRUE(make_plan(NG_OP_FORWARD, make_tensor({1, 1, max32}, NG_CONTIGUOUS), p));
    EXPECT_TRUE(plan_rejected(NG_OP_FORWARD, make_tensor({1, 1, max32 + 1}, NG_CONTIGUOUS), p,
                              NG_UNSUPPORTED, {"shape"}));
}

// The residual's and the ReLU's buffers, per the header: forward needs z iff residual; backward
// needs dz iff residual, z with residual + ReLU, bias with ReLU + affine. Each missing one is
// NG_INVALID_ARGUMENT naming it (and why), for every dtype, and changes nothing.
TEST(BadInput, FusedBuffersMissing) {
    for (ng_dtype dt : all_dtypes()) {
        SCOPED_TRACE(dtype_name(dt));
        Call k(make_tensor({4, 3, 5}, NG_CONTIGUOUS, dt));  // float buffers: big enough for any
        ng_batch_norm_params p = ng_batch_norm_params_default();
        auto fwd = [&](ng_plan *plan, const void *z) {
            return ng_batch_norm_forward(plan, k.x.data(), z, k.y.data(), k.weight.data(),
                                         k.bias.data(), k.rm.data(), k.rv.data(), &k.nbt,
                                         nullptr, nullptr);
        };
        auto bwd = [&](ng_plan *plan, const void *z, const float *bias, void *dz) {
            return ng_batch_norm_backward(plan, k.x.data(), k.dy.data(), z, k.weight.data(), bias,
                                          k.rm.data(), k.rv.data(), k.save_mean.data(),
                                          k.save_invstd.data(), k.dx.data(), k.dweight.data(),
                                          k.dbias.data(), dz);
        };
        for (const FusedOps &fused : all_fusions()) {
            SCOPED_TRACE(fusion_name(fused));
            set_fusion(p, fused);
            PlanPtr f = make_plan(NG_OP_FORWARD, k.t, p), b = make_plan(NG_OP_BACKWARD, k.t, p);
            ASSERT_TRUE(f && b);
            if (fused.residual) {
                EXPECT_TRUE(failed_with(fwd(f.get(), nullptr), NG_INVALID_ARGUMENT,
                                        {"z", "residual"}));
                EXPECT_TRUE(failed_with(bwd(b.get(), k.z.data(), k.bias.data(), nullptr),
                                        NG_INVALID_ARGUMENT, {"dz", "residual"}));
            }
            if (fused.residual && fused.relu) {
                EXPECT_TRUE(failed_with(bwd(b.get(), nullptr, k.bias.data(), k.dz.data()),
                                        NG_INVALID_ARGUMENT, {"z", "mask"}));
            }
            if (fused.relu) {
                EXPECT_TRUE(failed_with(bwd(b.get(), fused.residual ? k.z.data() : nullptr,
                                            nullptr, fused.residual ? k.dz.data() : nullptr),
                                        NG_INVALID_ARGUMENT, {"bias", "mask"}));
            }
            EXPECT_TRUE(k.untouched());
        }
    }
}

// What the header says may be NULL, or is unused, is accepted: bias without ReLU, z in backward
// without ReLU (residual add: unused), bias with ReLU but without affine (the mask uses bias 0).
// Unused buffers do not change the results.
TEST(Api, FusedOptionalBuffers) {
    for (ng_dtype dt : {NG_F32, NG_BF16}) {
        SCOPED_TRACE(dtype_name(dt));
        const ng_tensor t = make_tensor({4, 3, 5}, NG_CHANNELS_LAST, dt);
        const ref::View v = view_of(t);
        Rng rng(11);
        GuardedTensor x(dt, v.size()), dy(dt, v.size()), z(dt, v.size()), dx1(dt, v.size()),
            dx2(dt, v.size()), dz1(dt, v.size()), dz2(dt, v.size());
        x.assign(round_to(uniform_vector(v.size(), rng, -2, 2), dt));
        dy.assign(round_to(uniform_vector(v.size(), rng, -1, 1), dt));
        z.assign(round_to(uniform_vector(v.size(), rng, -1, 1), dt));
        const std::vector<float> w = {1.5f, -0.5f, 1.0f}, b = {0.25f, 0.5f, -0.75f},
                                 sm = {0.1f, -0.2f, 0.3f}, si = {1.0f, 2.0f, 0.5f};
        const std::vector<float> garbage(3, 1e30f);
        ng_batch_norm_params p = ng_batch_norm_params_default();
        auto bwd = [&](ng_plan *plan, const void *zz, const float *weight, const float *bias,
                       GuardedTensor &dx, void *dz) {
            return ng_batch_norm_backward(plan, x.data(), dy.data(), zz, weight, bias, nullptr,
                                          nullptr, sm.data(), si.data(), dx.data(), nullptr,
                                          nullptr, dz);
        };
        // Residual add without ReLU: z is not read.
        set_fusion(p, {false, true});
        PlanPtr add = make_plan(NG_OP_BACKWARD, t, p);
        ASSERT_EQ(bwd(add.get(), nullptr, w.data(), nullptr, dx1, dz1.data()), NG_OK)
            << ng_last_error();
        ASSERT_EQ(bwd(add.get(), z.data(), w.data(), garbage.data(), dx2, dz2.data()), NG_OK)
            << ng_last_error();
        EXPECT_EQ(dx1.values(), dx2.values());
        EXPECT_EQ(dz1.values(), dy.values()) << "without ReLU, dz = dy";
        // ReLU without affine: weight and bias are 1 and 0 whatever is passed (or NULL).
        p.affine = 0;
        set_fusion(p, {true, true});
        PlanPtr relu = make_plan(NG_OP_BACKWARD, t, p);
        ASSERT_EQ(bwd(relu.get(), z.data(), nullptr, nullptr, dx1, dz1.data()), NG_OK)
            << ng_last_error();
        ASSERT_EQ(bwd(relu.get(), z.data(), garbage.data(), garbage.data(), dx2, dz2.data()),
                  NG_OK)
            << ng_last_error();
        EXPECT_EQ(dx1.values(), dx2.values());
        EXPECT_EQ(dz1.values(), dz2.values());
        // ... and the mask is that of bias 0: dz = dy where (x - mean) * invstd + z > 0.
        const std::vector<float> xs = x.values(), dys = dy.values(), zs = z.values(),
                                 got = dz1.values();
        int64_t wrong = 0;
        v.for_each([&](int64_t c, int64_t i) {
            const double pre = (double(xs[i]) - sm[c]) * si[c] + zs[i];
            if (std::fabs(pre) < 1e-5) return;  // the mask is fp32 there: either is right
            wrong += got[i] != (pre > 0 ? dys[i] : 0.0f);
        });
        EXPECT_EQ(wrong, 0);
        for (auto *g : {&x, &dy, &z, &dx1, &dx2, &dz1, &dz2})
            EXPECT_TRUE(g->check_canaries("buffer"));
    }
}

// z (the residual input) without params.residual; dz likewise in backward; for every dtype and
// with or without ReLU.
TEST(BadInput, ResidualBuffersWithoutResidual) {
    for (ng_dtype dt : all_dtypes())
        for (bool relu : {false, true}) {
            SCOPED_TRACE(std::string(dtype_name(dt)) + (relu ? " relu" : ""));
            ng_batch_norm_params p = ng_batch_norm_params_default();
            set_fusion(p, {relu, false});
            Call k(make_tensor({4, 3, 5}, NG_CONTIGUOUS, dt));
            PlanPtr fwd = make_plan(NG_OP_FORWARD, k.t, p);
            PlanPtr bwd = make_plan(NG_OP_BACKWARD, k.t, p);
            EXPECT_TRUE(failed_with(ng_batch_norm_forward(fwd.get(), k.x.data(), k.z.data(),
                                                          k.y.data(), k.weight.data(),
                                                          k.bias.data(), k.rm.data(), k.rv.data(),
                                                          &k.nbt, nullptr, nullptr),
                                    NG_INVALID_ARGUMENT, {"z", "residual"}));
            EXPECT_TRUE(failed_with(
                ng_batch_norm_backward(bwd.get(), k.x.data(), k.dy.data(), k.z.data(),
                                       k.weight.data(), k.bias.data(), nullptr, nullptr,
                                       k.save_mean.data(), k.save_invstd.data(), k.dx.data(),
                                       nullptr, nullptr, nullptr),
                NG_INVALID_ARGUMENT, {"z", "residual"}));
            EXPECT_TRUE(failed_with(
                ng_batch_norm_backward(bwd.get(), k.x.data(), k.dy.data(), nullptr,
                                       k.weight.data(), k.bias.data(), nullptr, nullptr,
                                       k.save_mean.data(), k.save_invstd.data(), k.dx.data(),
                                       nullptr, nullptr, k.dz.data()),
                NG_INVALID_ARGUMENT, {"dz", "residual"}));
            EXPECT_TRUE(k.untouched());
        }
}

TEST(BadInput, PlanUsedWithTheWrongOp) {
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    Call k(small_tensor());
    PlanPtr fwd = make_plan(NG_OP_FORWARD, k.t, p);
    PlanPtr bwd = make_plan(NG_OP_BACKWARD, k.t, p);
    EXPECT_TRUE(failed_with(k.backward(fwd.get()), NG_INVALID_ARGUMENT,
                            {"plan", "NG_OP_FORWARD"}));
    EXPECT_TRUE(failed_with(k.forward(bwd.get()), NG_INVALID_ARGUMENT,
                            {"plan", "NG_OP_BACKWARD"}));
    EXPECT_TRUE(k.untouched());
    EXPECT_EQ(k.forward(fwd.get()), NG_OK) << ng_last_error();
    EXPECT_EQ(k.backward(bwd.get()), NG_OK) << ng_last_error();
}

TEST(BadInput, NegativeNumBatchesTracked) {
    ng_batch_norm_params p = ng_batch_norm_params_default();
    p.momentum = NAN;
    Call k(small_tensor());
    PlanPtr plan = make_plan(NG_OP_FORWARD, k.t, p);
    k.nbt = -1;
    EXPECT_TRUE(failed_with(k.forward(plan.get()), NG_INVALID_ARGUMENT,
                            {"num_batches_tracked", "-1"}));
    k.nbt = 3;
    EXPECT_TRUE(k.untouched());
}

// ---- Packages -----------------------------------------------------------------------------

// A scratch copy of the real package: manifest copied (to be edited), kernel files symlinked.
class PackageCopy {
public:
    PackageCopy() {
        char tmpl[] = "/tmp/normgen-test-pkg-XXXXXX";
        if (!mkdtemp(tmpl)) throw std::runtime_error("mkdtemp failed");
        dir_ = tmpl;
        for (const auto &e : fs::directory_iterator(package_dir())) {
            const fs::path to = dir_ / e.path().filename();
            if (e.path().filename() == "manifest.json")
                fs::copy_file(e.path(), to);
            else
                fs::create_symlink(fs::absolute(e.path()), to);
        }
    }
    ~PackageCopy() {
        std::error_code ec;
        fs::remove_all(dir_, ec);
    }
    std::string dir() const { return dir_.string(); }
    std::string manifest_path() const { return (dir_ / "manifest.json").string(); }
    nlohmann::json manifest() const {
        std::ifstream in(manifest_path());
        return nlohmann::json::parse(in);
    }
    void write(const std::string &file, const std::string &text) const {
        fs::remove(dir_ / file);
        std::ofstream(dir_ / file) << text;
    }
    void write_manifest(const nlohmann::json &m) const { write("manifest.json", m.dump(2)); }
    void remove(const std::string &file) const { fs::remove(dir_ / file); }

private:
    fs::path dir_;
};

// Opens dir; a package error must surface at open (Package::open validates everything it can
// load) with the given words named.
::testing::AssertionResult open_fails(const std::string &dir, ng_status want,
                                      const std::vector<std::string> &words) {
    ng_runtime *rt = reinterpret_cast<ng_runtime *>(uintptr_t(0x1));
    const ng_status st = ng_runtime_open(dir.c_str(), &rt);
    if (st == NG_OK) {
        ng_runtime_close(rt);
        return ::testing::AssertionFailure() << "ng_runtime_open succeeded";
    }
    if (rt != nullptr)
        return ::testing::AssertionFailure() << "failed open left *out_runtime non-NULL";
    return failed_with(st, want, words);
}

bool has_kernel(const std::string &name) {
    for (const auto &k : manifest().at("kernels"))
        if (k.at("name") == name) return true;
    return false;
}

std::string kernel_file_of(const std::string &isa) {
    return "libkernels_" + host_arch() + "-" + isa + ".so";
}

// The index in the manifest of the n-th kernel this CPU's architecture loads.
size_t host_kernel_index(const nlohmann::json &m, size_t n) {
    for (size_t i = 0; i < m["kernels"].size(); i++)
        if (m["kernels"][i]["arch"] == host_arch() && n-- == 0) return i;
    ADD_FAILURE() << "the manifest has too few " << host_arch() << " kernels";
    return 0;
}

TEST(Package, CopyOpensAndRuns) {
    PackageCopy pkg;
    RuntimePtr rt = open_runtime(pkg.dir());
    ASSERT_TRUE(rt);
    EXPECT_TRUE(contains(ng_runtime_describe(rt.get()), pkg.dir()));
    Call k(small_tensor());
    PlanPtr plan = make_plan(NG_OP_FORWARD, k.t, ng_batch_norm_params_default(), rt.get());
    EXPECT_EQ(k.forward(plan.get()), NG_OK) << ng_last_error();
}

TEST(Package, MissingFolder) {
    const std::string dir = "/nonexistent/normgen-package-xyz";
    EXPECT_TRUE(open_fails(dir, NG_PACKAGE_ERROR, {dir}));
    PackageCopy pkg;
    pkg.remove("manifest.json");
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {pkg.manifest_path()}));
    // A file where a folder should be.
    EXPECT_TRUE(open_fails(pkg.dir() + "/" + kernel_file_of(isa_levels().front()),
                           NG_PACKAGE_ERROR, {kernel_file_of(isa_levels().front())}));
}

TEST(Package, CorruptManifest) {
    PackageCopy pkg;
    pkg.write("manifest.json", "this is not JSON {");
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {pkg.manifest_path(), "JSON"}));
    pkg.write("manifest.json", "");
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {pkg.manifest_path()}));
    pkg.write("manifest.json", "[1, 2, 3]");
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {pkg.manifest_path()}));
    nlohmann::json m = manifest();
    m["format"] = "something-else";
    pkg.write_manifest(m);
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {pkg.manifest_path()}));
    m = manifest();
    m.erase("kernels");
    pkg.write_manifest(m);
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {"kernels"}));
    m = manifest();
    m["kernels"].push_back(m["kernels"][0]);  // the same name twice
    pkg.write_manifest(m);
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {m["kernels"][0]["name"]}));
}

TEST(Package, TruncatedManifest) {
    PackageCopy pkg;
    std::ifstream in(package_dir() + "/manifest.json");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (size_t cut : {text.size() / 2, text.size() - 3, size_t(10)}) {
        pkg.write("manifest.json", text.substr(0, cut));
        EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {pkg.manifest_path()}))
            << "cut at " << cut;
    }
}

TEST(Package, WrongAbiVersion) {
    PackageCopy pkg;
    nlohmann::json m = pkg.manifest();
    m["abi_version"] = NG_ABI_VERSION + 1;
    pkg.write_manifest(m);
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR,
                           {"abi_version", std::to_string(NG_ABI_VERSION + 1)}));
    m["abi_version"] = "1";
    pkg.write_manifest(m);
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {"abi_version"}));
    m.erase("abi_version");
    pkg.write_manifest(m);
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {"abi_version"}));
}

TEST(Package, KernelEntryMissingAField) {
    PackageCopy pkg;
    for (const char *field : {"symbol", "file", "op", "shape", "features"}) {
        nlohmann::json m = manifest();  // the real one, each time
        const std::string name = m["kernels"][0]["name"];
        m["kernels"][0].erase(field);
        pkg.write_manifest(m);
        EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {name, field})) << field;
    }
    nlohmann::json m = manifest();
    m["kernels"][0]["shape"] = {{"kind", "exact"}, {"n", 2}, {"c", -1}, {"s", 3}};
    pkg.write_manifest(m);
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {"shape"}));
}

TEST(Package, MissingKernelFile) {
    PackageCopy pkg;
    const std::string file = kernel_file_of(best_isa());
    pkg.remove(file);
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {file}));
    // A kernel file that is not a shared object.
    pkg.write(file, "not an ELF file");
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {file}));
    // A file name that escapes the package folder.
    nlohmann::json m = pkg.manifest();
    m["kernels"][0]["file"] = "../" + file;
    pkg.write_manifest(m);
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {"../" + file}));
}

TEST(Package, MissingSymbol) {
    PackageCopy pkg;
    nlohmann::json m = pkg.manifest();
    m["kernels"][host_kernel_index(m, 3)]["symbol"] = "bn_no_such_symbol";
    pkg.write_manifest(m);
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {"bn_no_such_symbol"}));
}

// A package without a kernel for the request: the plan says NG_NO_KERNEL.
TEST(Package, NoKernelForTheRequest) {
    PackageCopy pkg;
    nlohmann::json m = pkg.manifest();
    nlohmann::json kept = nlohmann::json::array();
    for (const auto &k : m["kernels"])
        if (k["op"] != "backward") kept.push_back(k);
    m["kernels"] = kept;
    pkg.write_manifest(m);
    RuntimePtr rt = open_runtime(pkg.dir());
    ASSERT_TRUE(rt);
    const ng_tensor t = small_tensor();
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    ng_plan *plan = nullptr;
    EXPECT_TRUE(failed_with(ng_plan_create(rt.get(), NG_OP_BACKWARD, &t, &p, &plan), NG_NO_KERNEL,
                            {"backward"}));
    EXPECT_EQ(plan, nullptr);
}

// A kernel that fails inside Halide (here: an exact kernel the manifest mislabels with another
// shape, so Halide's own buffer checks reject the call) gives NG_INTERNAL with Halide's message,
// not an abort, and the call changes nothing.
TEST(Package, KernelFailureBecomesAStatus) {
    if (!cpu_supports("avx512")) GTEST_SKIP() << "exact kernels are built for avx512";
    const std::string name = "bn_fwd_train_f32_contig_avx512_n8_c32_s64";
    if (!has_kernel(name)) GTEST_FAIL() << "the package lacks " << name;
    PackageCopy pkg;
    nlohmann::json m = manifest();
    for (auto &k : m["kernels"])
        if (k["name"] == name) k["shape"]["n"] = 7;  // rows stay 64-byte multiples: it may stream
    pkg.write_manifest(m);
    ScopedEnv cap("NORMGEN_ISA", "avx512");
    RuntimePtr rt = open_runtime(pkg.dir());
    ASSERT_TRUE(rt);
    // A 64-byte aligned output, so that a streaming kernel runs rather than its fallback.
    Call k(make_tensor({7, 32, 64}, NG_CONTIGUOUS));
    std::unique_ptr<float, decltype(&std::free)> y(
        static_cast<float *>(std::aligned_alloc(64, size_t(k.v.size()) * sizeof(float))), std::free);
    std::fill(y.get(), y.get() + k.v.size(), -123.0f);
    PlanPtr plan = make_plan(NG_OP_FORWARD, k.t, ng_batch_norm_params_default(), rt.get());
    ASSERT_TRUE(plan);
    ASSERT_EQ(chosen_kernel(plan.get()), name);
    const ng_status st = ng_batch_norm_forward(plan.get(), k.x.data(), nullptr, y.get(),
                                               k.weight.data(), k.bias.data(), k.rm.data(),
                                               k.rv.data(), &k.nbt, k.save_mean.data(),
                                               k.save_invstd.data());
    EXPECT_TRUE(std::all_of(y.get(), y.get() + k.v.size(), [](float v) { return v == -123.0f; }));
    EXPECT_TRUE(failed_with(st, NG_INTERNAL, {name}));
    const std::string msg = ng_last_error();
    EXPECT_GT(msg.size(), msg.find("Halide error") + 20) << "Halide's message is missing: " << msg;
    EXPECT_TRUE(k.untouched());
}

TEST(Package, NormgenPackageEnvironment) {
    PackageCopy pkg;
    {
        ScopedEnv env("NORMGEN_PACKAGE", pkg.dir().c_str());
        ng_runtime *raw = nullptr;
        ASSERT_EQ(ng_runtime_open(nullptr, &raw), NG_OK) << ng_last_error();
        RuntimePtr rt(raw);
        EXPECT_TRUE(contains(ng_runtime_describe(rt.get()), pkg.dir()))
            << ng_runtime_describe(rt.get());
        // An explicit folder wins over the environment.
        pkg.write("manifest.json", "broken");
        ASSERT_EQ(ng_runtime_open(package_dir().c_str(), &raw), NG_OK) << ng_last_error();
        RuntimePtr explicit_rt(raw);
    }
    {
        ScopedEnv env("NORMGEN_PACKAGE", pkg.dir().c_str());  // manifest now broken
        ng_runtime *rt = nullptr;
        EXPECT_TRUE(failed_with(ng_runtime_open(nullptr, &rt), NG_PACKAGE_ERROR,
                                {pkg.manifest_path()}));
    }
    {
        ScopedEnv env("NORMGEN_PACKAGE", "/nonexistent/env-package");
        ng_runtime *rt = nullptr;
        EXPECT_TRUE(failed_with(ng_runtime_open(nullptr, &rt), NG_PACKAGE_ERROR,
                                {"/nonexistent/env-package"}));
    }
}

TEST(Package, UnknownNormgenIsa) {
    // The other architecture's levels are unknown here too; the message lists this one's.
    const char *other_arch_level = host_arch() == "x86-64" ? "neon" : "avx2";
    for (const char *bad : {"avx9000", "AVX2", "sse2", other_arch_level}) {
        ScopedEnv env("NORMGEN_ISA", bad);
        ng_runtime *rt = nullptr;
        EXPECT_TRUE(failed_with(ng_runtime_open(package_dir().c_str(), &rt), NG_INVALID_ARGUMENT,
                                {"NORMGEN_ISA", bad, host_arch(), isa_levels().back()}));
        EXPECT_EQ(rt, nullptr);
    }
}

// ---- Registry: what plans choose, and why --------------------------------------------------

TEST(Registry, RuntimeDescribeListsEveryKernel) {
    const std::string d = ng_runtime_describe(best_runtime());
    EXPECT_TRUE(contains(d, package_dir())) << d.substr(0, 300);
    size_t n = 0;
    for (const auto &k : manifest().at("kernels")) {
        n++;
        const std::string name = k.at("name");
        EXPECT_TRUE(names(d, name)) << name;
        // Kernels of another architecture (arm-64 ones on x86 and the reverse) are listed, not
        // loaded.
        const size_t line = d.find("\n" + name + " ");
        ASSERT_NE(line, std::string::npos) << name;
        const std::string text = d.substr(line + 1, d.find('\n', line + 1) - line - 1);
        EXPECT_EQ(contains(text, "(not loadable here)"), k.at("arch") != host_arch()) << text;
    }
    EXPECT_GT(n, 0u);
}

// A ResNet-50 shape gets its exact kernel (at the ISA it was specialised for); the same
// (N, C, S) given as a 3-D tensor too; a shape not in the list gets the generic kernel.
TEST(Registry, ExactShapeBeforeGeneric) {
    const std::string isa = "avx512";
    if (!cpu_supports(isa)) GTEST_SKIP() << "exact kernels are built for avx512";
    ng_runtime *rt = runtime_for_isa(isa);
    ng_batch_norm_params p = ng_batch_norm_params_default();
    struct Want {
        std::vector<int64_t> shape;
        ng_memory_format fmt;
        ng_op op;
        int training;
        std::string kernel;
    };
    const std::vector<Want> wants = {
        {{32, 64, 56, 56}, NG_CONTIGUOUS, NG_OP_FORWARD, 1, "bn_fwd_train_f32_contig_avx512_n32_c64_s3136"},
        {{32, 64, 3136}, NG_CONTIGUOUS, NG_OP_FORWARD, 1, "bn_fwd_train_f32_contig_avx512_n32_c64_s3136"},
        {{32, 256, 14, 14}, NG_CHANNELS_LAST, NG_OP_BACKWARD, 1, "bn_bwd_train_f32_cl_avx512_n32_c256_s196"},
        {{32, 2048, 7, 7}, NG_CONTIGUOUS, NG_OP_FORWARD, 0, "bn_fwd_infer_f32_contig_avx512_n32_c2048_s49"},
        {{32, 512, 7, 7}, NG_CHANNELS_LAST, NG_OP_BACKWARD, 0, "bn_bwd_eval_f32_cl_avx512_n32_c512_s49"},
        // BatchNorm1d (N, C): contiguous, served by the channels-last kernel.
        {{4096, 1024}, NG_CONTIGUOUS, NG_OP_FORWARD, 1, "bn_fwd_train_f32_cl_avx512_n4096_c1024_s1"},
        // Near misses: not exact (a tuned shape class's kernel, or generic: expected_kernel).
        {{32, 64, 56, 55}, NG_CONTIGUOUS, NG_OP_FORWARD, 1, ""},
        {{31, 64, 56, 56}, NG_CHANNELS_LAST, NG_OP_FORWARD, 1, ""},
        {{32, 63, 56, 56}, NG_CONTIGUOUS, NG_OP_BACKWARD, 1, ""},
    };
    for (Want w : wants) {
        const ng_tensor t = make_tensor(w.shape, w.fmt);
        SCOPED_TRACE(shape_string(t));
        if (w.kernel.empty()) {
            w.kernel = expected_kernel(w.op == NG_OP_FORWARD ? Family::FwdTrain : Family::BwdTrain,
                                       t, isa);
            ASSERT_FALSE(contains(w.kernel, "_n")) << w.kernel;
        }
        if (contains(w.kernel, "_n") && !has_kernel(w.kernel))
            GTEST_FAIL() << "the package lacks " << w.kernel << " (shapes/resnet50_b32.txt)";
        p.training = w.training;
        PlanPtr plan = make_plan(w.op, t, p, rt);
        ASSERT_TRUE(plan);
        EXPECT_EQ(chosen_kernel(plan.get()), w.kernel) << ng_plan_describe(plan.get());
        const std::string d = ng_plan_describe(plan.get());
        EXPECT_TRUE(names(d, contains(w.kernel, "_n")           ? "exact"
                             : contains(w.kernel, "_class_") ? "class"
                                                             : "generic"))
            << d;
    }
}

// The selection order on a package made for it: one variant with an exact-shape kernel for
// 2x8x30, a shape-class kernel for C in [1, 64), S in [2, 64), and its generic kernel (all
// three the same code: the generic symbol); every other specialised kernel removed. A plan
// takes exact, then class, then generic, and its description says which and why.
TEST(Registry, ExactThenClassThenGeneric) {
    // The best level with f32 kernels (arm-64's best, neon_fp16, holds f16 only).
    std::string isa;
    for (const auto &level : isa_levels())
        if (cpu_supports(level) && isa_has_dtype(level, NG_F32)) isa = level;
    const std::string generic = "bn_fwd_train_f32_contig_" + isa;
    if (!has_kernel(generic)) GTEST_FAIL() << "the package lacks " << generic;
    PackageCopy pkg;
    nlohmann::json m = pkg.manifest();
    nlohmann::json kept = nlohmann::json::array(), generic_entry;
    for (const auto &k : m["kernels"]) {
        if (k["shape"]["kind"] != "generic") continue;
        kept.push_back(k);
        if (k["name"] == generic) generic_entry = k;
    }
    nlohmann::json exact = generic_entry, in_class = generic_entry;
    exact["name"] = generic + "_n2_c8_s30";
    exact["shape"] = {{"kind", "exact"}, {"n", 2}, {"c", 8}, {"s", 30}};
    in_class["name"] = generic + "_class_c1to64_s2to64";
    in_class["shape"] = {{"kind", "class"}, {"c_min", 1}, {"c_end", 64}, {"s_min", 2}, {"s_end", 64}};
    kept.push_back(exact);
    kept.push_back(in_class);
    m["kernels"] = kept;
    pkg.write_manifest(m);
    ScopedEnv cap("NORMGEN_ISA", isa.c_str());
    RuntimePtr rt = open_runtime(pkg.dir());
    ASSERT_TRUE(rt);
    struct Want {
        std::vector<int64_t> shape;
        std::string kernel, word, why;
    };
    const std::vector<Want> wants = {
        {{2, 8, 30}, exact["name"], "exact", "tuned for exactly this shape"},
        {{2, 8, 5, 6}, exact["name"], "exact", "tuned for exactly this shape"},  // S = 30 too
        {{3, 8, 30}, in_class["name"], "class", "no exact-shape kernel"},   // N differs
        {{2, 63, 2}, in_class["name"], "class", "no exact-shape kernel"},   // the class's corner
        {{2, 64, 30}, generic, "generic", "no exact-shape or shape-class kernel"},  // C = c_end
        {{2, 8, 64}, generic, "generic", "no exact-shape or shape-class kernel"},   // S = s_end
    };
    for (const Want &w : wants) {
        Call k(make_tensor(w.shape, NG_CONTIGUOUS));
        SCOPED_TRACE(shape_string(k.t));
        PlanPtr plan = make_plan(NG_OP_FORWARD, k.t, ng_batch_norm_params_default(), rt.get());
        ASSERT_TRUE(plan);
        const std::string d = ng_plan_describe(plan.get());
        EXPECT_EQ(chosen_kernel(plan.get()), w.kernel) << d;
        EXPECT_TRUE(names(d, w.word)) << d;
        EXPECT_TRUE(contains(d, w.why)) << d;
        EXPECT_EQ(k.forward(plan.get()), NG_OK) << ng_last_error();
    }
    // NORMGEN_KERNELS=generic (read at open): the generic kernel even for the exact shape.
    ScopedEnv generic_only("NORMGEN_KERNELS", "generic");
    RuntimePtr rt_generic = open_runtime(pkg.dir());
    ASSERT_TRUE(rt_generic);
    Call k(make_tensor({2, 8, 30}, NG_CONTIGUOUS));
    PlanPtr plan = make_plan(NG_OP_FORWARD, k.t, ng_batch_norm_params_default(), rt_generic.get());
    ASSERT_TRUE(plan);
    EXPECT_EQ(chosen_kernel(plan.get()), generic) << ng_plan_describe(plan.get());
    EXPECT_TRUE(contains(ng_plan_describe(plan.get()), "NORMGEN_KERNELS=generic"));
}

// A class shape with an empty or malformed range is a package error at open.
TEST(Package, MalformedClassShape) {
    PackageCopy pkg;
    nlohmann::json m = pkg.manifest();
    m["kernels"][0]["shape"] = {{"kind", "class"}, {"c_min", 64}, {"c_end", 64}, {"s_min", 1},
                                {"s_end", nullptr}};
    pkg.write_manifest(m);
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {"class"}));
    m["kernels"][0]["shape"] = {{"kind", "class"}, {"c_min", 1}, {"c_end", 64}};
    pkg.write_manifest(m);
    EXPECT_TRUE(open_fails(pkg.dir(), NG_PACKAGE_ERROR, {"s_min"}));
}

// NORMGEN_ISA caps the level: a ResNet shape then runs the capped ISA's generic kernel, and the
// description says why the better kernels were passed over.
TEST(Registry, IsaCapIsRespected) {
    const ng_tensor t = make_tensor({32, 64, 56, 56}, NG_CONTIGUOUS);
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    for (const auto &isa : isa_levels()) {
        if (!cpu_supports(isa)) continue;
        SCOPED_TRACE(isa);
        PlanPtr plan = make_plan(NG_OP_FORWARD, t, p, runtime_for_isa(isa));
        ASSERT_TRUE(plan);
        EXPECT_EQ(chosen_kernel(plan.get()), expected_kernel(Family::FwdTrain, t, isa));
        const std::string d = ng_plan_describe(plan.get());
        if (isa != "avx512" && cpu_supports("avx512")) {
            EXPECT_TRUE(contains(d, "NORMGEN_ISA=" + isa)) << d;
            EXPECT_TRUE(contains(d, "bn_fwd_train_f32_contig_avx512_n32_c64_s3136")) << d;
        }
    }
    // Without a cap: the best level this CPU has.
    ScopedEnv no_cap("NORMGEN_ISA", nullptr);
    ng_runtime *raw = nullptr;
    ASSERT_EQ(ng_runtime_open(nullptr, &raw), NG_OK) << ng_last_error();
    RuntimePtr rt(raw);
    PlanPtr plan = make_plan(NG_OP_FORWARD, t, p, rt.get());
    EXPECT_EQ(chosen_kernel(plan.get()), expected_kernel(Family::FwdTrain, t, best_isa()));
}

// The statistics a plan uses follow PyTorch: batch statistics in training and in eval without
// running stats, running statistics in eval with them.
TEST(Registry, StatisticsFollowMode) {
    const ng_tensor t = make_tensor({2, 3, 5}, NG_CONTIGUOUS);
    const std::string isa = best_isa();
    for (int training : {1, 0})
        for (int track : {1, 0})
            for (ng_op op : {NG_OP_FORWARD, NG_OP_BACKWARD}) {
                ng_batch_norm_params p = ng_batch_norm_params_default();
                p.training = training;
                p.track_running_stats = track;
                const bool batch = training || !track;
                const Family f = op == NG_OP_FORWARD
                                     ? (batch ? Family::FwdTrain : Family::FwdInfer)
                                     : (batch ? Family::BwdTrain : Family::BwdEval);
                PlanPtr plan = make_plan(op, t, p);
                EXPECT_EQ(chosen_kernel(plan.get()), expected_kernel(f, t, isa))
                    << "training " << training << " track " << track;
            }
}

// ---- Buffer safety ------------------------------------------------------------------------

// n elements (floats unless told otherwise) placed against an inaccessible page: right after it
// (guard_before) or ending right at it. Any access outside the buffer on that side faults and
// kills the test.
class GuardPage {
public:
    GuardPage(int64_t n, bool guard_before, size_t element_size = sizeof(float)) : n_(n) {
        page_ = size_t(sysconf(_SC_PAGESIZE));
        const size_t bytes = size_t(n) * element_size;
        const size_t data_pages = (bytes + page_ - 1) / page_ + 1;
        size_ = (data_pages + 2) * page_;
        void *m = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) throw std::runtime_error("mmap failed");
        base_ = static_cast<char *>(m);
        mprotect(base_, page_, PROT_NONE);
        mprotect(base_ + size_ - page_, page_, PROT_NONE);
        data_ = guard_before ? base_ + page_ : base_ + size_ - page_ - bytes;
    }
    ~GuardPage() { munmap(base_, size_); }
    GuardPage(const GuardPage &) = delete;
    GuardPage &operator=(const GuardPage &) = delete;
    float *data() { return reinterpret_cast<float *>(data_); }
    void *bytes() { return data_; }

private:
    int64_t n_;
    size_t page_ = 0, size_ = 0;
    char *base_ = nullptr;
    char *data_ = nullptr;
};

// Every family at every ISA, with every tensor and per-channel buffer against a guard page on
// one side, then the other. Odd extents make vector tails; a kernel reading or writing a full
// vector past an end would fault.
TEST(BufferSafety, GuardPagesAroundEveryBuffer) {
    const std::vector<std::vector<int64_t>> shapes = {{3, 5, 7}, {2, 19, 3, 3}, {5, 17}, {1, 3, 17},
                                                      {2, 33, 1, 1}};
    int runs = 0;
    for (const auto &isa : isa_levels()) {
        if (!cpu_supports(isa)) continue;
        ng_runtime *rt = runtime_for_isa(isa);
        for (const auto &shape : shapes)
            for (ng_memory_format fmt : {NG_CONTIGUOUS, NG_CHANNELS_LAST})
                for (bool before : {false, true})
                    for (int training : {1, 0}) {
                        const ng_tensor t = make_tensor(shape, fmt);
                        SCOPED_TRACE(isa + " " + shape_string(t) + (training ? " train" : " eval"));
                        const ref::View v = view_of(t);
                        GuardPage x(v.size(), before), y(v.size(), before),
                            dy(v.size(), before), dx(v.size(), before);
                        GuardPage w(v.c, before), b(v.c, before), rm(v.c, before),
                            rv(v.c, before), sm(v.c, before), si(v.c, before), dw(v.c, before),
                            db(v.c, before);
                        for (int64_t i = 0; i < v.size(); i++) {
                            x.data()[i] = float(i % 7) - 3.0f;
                            dy.data()[i] = float(i % 5) - 2.0f;
                        }
                        for (int64_t c = 0; c < v.c; c++) {
                            w.data()[c] = 1.0f, b.data()[c] = 0.0f;
                            rm.data()[c] = 0.0f, rv.data()[c] = 1.0f;
                        }
                        ng_batch_norm_params p = ng_batch_norm_params_default();
                        p.training = training;
                        int64_t nbt = 0;
                        PlanPtr fwd = make_plan(NG_OP_FORWARD, t, p, rt);
                        PlanPtr bwd = make_plan(NG_OP_BACKWARD, t, p, rt);
                        ASSERT_TRUE(fwd && bwd);
                        ASSERT_EQ(ng_batch_norm_forward(fwd.get(), x.data(), nullptr, y.data(),
                                                        w.data(), b.data(), rm.data(), rv.data(),
                                                        &nbt, sm.data(), si.data()),
                                  NG_OK)
                            << ng_last_error();
                        ASSERT_EQ(ng_batch_norm_backward(bwd.get(), x.data(), dy.data(), nullptr,
                                                         w.data(), nullptr, rm.data(), rv.data(),
                                                         sm.data(), si.data(), dx.data(),
                                                         dw.data(), db.data(), nullptr),
                                  NG_OK)
                            << ng_last_error();
                        runs++;
                    }
    }
    EXPECT_GT(runs, 0);
}

// The same for every fused variant and the 16-bit dtypes, whose 2-byte elements change every
// extent the kernels compute: x, z, dy, y, dx, dz against guard pages on either side (an odd
// element count of 2 bytes also leaves the buffer only 2-byte aligned at the page's end).
TEST(BufferSafety, GuardPagesFusedAndReducedPrecision) {
    const std::vector<std::vector<int64_t>> shapes = {{3, 5, 7}, {2, 19, 3, 3}, {5, 17}};
    int runs = 0;
    for (const auto &isa : isa_levels()) {
        if (!cpu_supports(isa)) continue;
        ng_runtime *rt = runtime_for_isa(isa);
        for (ng_dtype dt : all_dtypes())
            for (const FusedOps &fused : all_fusions()) {
                if (dt == NG_F32 && fused.plain()) continue;  // GuardPagesAroundEveryBuffer
                for (const auto &shape : shapes)
                    for (ng_memory_format fmt : {NG_CONTIGUOUS, NG_CHANNELS_LAST})
                        for (bool before : {false, true})
                            for (int training : {1, 0}) {
                                const ng_tensor t = make_tensor(shape, fmt, dt);
                                SCOPED_TRACE(isa + " " + shape_string(t) + " " +
                                             fusion_name(fused) + (training ? " train" : " eval") +
                                             (before ? " guard before" : " guard after"));
                                const ref::View v = view_of(t);
                                const size_t es = element_size(dt);
                                GuardPage x(v.size(), before, es), z(v.size(), before, es),
                                    y(v.size(), before, es), dy(v.size(), before, es),
                                    dx(v.size(), before, es), dz(v.size(), before, es);
                                GuardPage w(v.c, before), b(v.c, before), rm(v.c, before),
                                    rv(v.c, before), sm(v.c, before), si(v.c, before),
                                    dw(v.c, before), db(v.c, before);
                                // Small integers: exact in every dtype (f16 1.0 = 0x3C00, ...).
                                for (int64_t i = 0; i < v.size(); i++)
                                    for (auto [g, value] : {std::pair{&x, double(i % 7) - 3},
                                                            {&z, double(i % 3) - 1},
                                                            {&dy, double(i % 5) - 2}}) {
                                        if (dt == NG_F32) {
                                            g->data()[i] = float(value);
                                        } else {
                                            const uint16_t bits =
                                                ref::encode16(value, storage_of(dt));
                                            std::memcpy(static_cast<char *>(g->bytes()) + 2 * i,
                                                        &bits, 2);
                                        }
                                    }
                                for (int64_t c = 0; c < v.c; c++) {
                                    w.data()[c] = 1.0f, b.data()[c] = 0.5f;
                                    rm.data()[c] = 0.0f, rv.data()[c] = 1.0f;
                                }
                                ng_batch_norm_params p = ng_batch_norm_params_default();
                                p.training = training;
                                set_fusion(p, fused);
                                int64_t nbt = 0;
                                PlanPtr fwd = make_plan(NG_OP_FORWARD, t, p, rt);
                                PlanPtr bwd = make_plan(NG_OP_BACKWARD, t, p, rt);
                                ASSERT_TRUE(fwd && bwd);
                                ASSERT_EQ(chosen_kernel(fwd.get()),
                                          expected_kernel(training ? Family::FwdTrain
                                                                   : Family::FwdInfer,
                                                          t, isa, fused));
                                ASSERT_EQ(ng_batch_norm_forward(
                                              fwd.get(), x.bytes(),
                                              fused.residual ? z.bytes() : nullptr, y.bytes(),
                                              w.data(), b.data(), rm.data(), rv.data(), &nbt,
                                              sm.data(), si.data()),
                                          NG_OK)
                                    << ng_last_error();
                                ASSERT_EQ(ng_batch_norm_backward(
                                              bwd.get(), x.bytes(), dy.bytes(),
                                              fused.residual ? z.bytes() : nullptr, w.data(),
                                              b.data(), rm.data(), rv.data(), sm.data(),
                                              si.data(), dx.bytes(), dw.data(), db.data(),
                                              fused.residual ? dz.bytes() : nullptr),
                                          NG_OK)
                                    << ng_last_error();
                                runs++;
                            }
            }
    }
    EXPECT_GT(runs, 0);
}

// Canaries around every buffer of the fused and 16-bit variants, the optional outputs left NULL
// too (save_mean/save_invstd, dweight/dbias), and inputs left as they were.
TEST(BufferSafety, CanariesFusedAndReducedPrecision) {
    for (ng_dtype dt : all_dtypes())
        for (const FusedOps &fused : all_fusions())
            for (ng_memory_format fmt : {NG_CONTIGUOUS, NG_CHANNELS_LAST})
                for (int training : {1, 0}) {
                    const ng_tensor t = make_tensor({3, 21, 5, 3}, fmt, dt);
                    SCOPED_TRACE(shape_string(t) + " " + fusion_name(fused) +
                                 (training ? " train" : " eval"));
                    const ref::View v = view_of(t);
                    Rng rng(3);
                    GuardedTensor x(dt, v.size()), z(dt, v.size()), dy(dt, v.size()),
                        y(dt, v.size()), dx(dt, v.size()), dz(dt, v.size());
                    x.assign(round_to(uniform_vector(v.size(), rng, -2, 2), dt));
                    z.assign(round_to(uniform_vector(v.size(), rng, -1, 1), dt));
                    dy.assign(round_to(uniform_vector(v.size(), rng, -1, 1), dt));
                    Guarded w(v.c), b(v.c), rm(v.c), rv(v.c), sm(v.c), si(v.c);
                    w.fill(1.5f), b.fill(0.25f), rm.fill(0.0f), rv.fill(1.0f);
                    const size_t hx = x.hash(), hz = z.hash(), hdy = dy.hash();
                    ng_batch_norm_params p = ng_batch_norm_params_default();
                    p.training = training;
                    set_fusion(p, fused);
                    int64_t nbt = 0;
                    PlanPtr fwd = make_plan(NG_OP_FORWARD, t, p);
                    PlanPtr bwd = make_plan(NG_OP_BACKWARD, t, p);
                    ASSERT_TRUE(fwd && bwd);
                    const void *zin = fused.residual ? z.data() : nullptr;
                    ASSERT_EQ(ng_batch_norm_forward(fwd.get(), x.data(), zin, y.data(), w.data(),
                                                    b.data(), rm.data(), rv.data(), &nbt,
                                                    sm.data(), si.data()),
                              NG_OK)
                        << ng_last_error();
                    ASSERT_EQ(ng_batch_norm_forward(fwd.get(), x.data(), zin, y.data(), w.data(),
                                                    b.data(), rm.data(), rv.data(), &nbt, nullptr,
                                                    nullptr),
                              NG_OK)
                        << ng_last_error();
                    ASSERT_EQ(ng_batch_norm_backward(
                                  bwd.get(), x.data(), dy.data(),
                                  fused.residual && fused.relu ? z.data() : nullptr, w.data(),
                                  b.data(), rm.data(), rv.data(), sm.data(), si.data(),
                                  dx.data(), nullptr, nullptr,
                                  fused.residual ? dz.data() : nullptr),
                              NG_OK)
                        << ng_last_error();
                    for (const GuardedTensor *g : {&x, &z, &dy, &y, &dx, &dz})
                        EXPECT_TRUE(g->check_canaries("tensor"));
                    for (const Guarded *g : {&w, &b, &rm, &rv, &sm, &si})
                        EXPECT_TRUE(g->check_canaries("per-channel buffer"));
                    EXPECT_EQ(x.hash(), hx) << "x was modified";
                    EXPECT_EQ(z.hash(), hz) << "z was modified";
                    EXPECT_EQ(dy.hash(), hdy) << "dy was modified";
                }
}

// Canaries around every output of every op, and inputs left as they were; including the
// optional outputs left NULL (their scratch must not spill into the caller's buffers).
TEST(BufferSafety, CanariesAfterEveryOp) {
    for (ng_memory_format fmt : {NG_CONTIGUOUS, NG_CHANNELS_LAST})
        for (int training : {1, 0})
            for (int affine : {1, 0}) {
                Call k(make_tensor({3, 21, 5, 3}, fmt));
                SCOPED_TRACE(shape_string(k.t) + (training ? " train" : " eval") +
                             (affine ? " affine" : " no affine"));
                ng_batch_norm_params p = ng_batch_norm_params_default();
                p.training = training;
                p.affine = affine;
                const std::vector<float> x0 = k.x.vec(), dy0 = k.dy.vec(), w0 = k.weight.vec();
                PlanPtr fwd = make_plan(NG_OP_FORWARD, k.t, p);
                PlanPtr bwd = make_plan(NG_OP_BACKWARD, k.t, p);
                ASSERT_EQ(k.forward(fwd.get()), NG_OK) << ng_last_error();
                ASSERT_EQ(k.backward(bwd.get()), NG_OK) << ng_last_error();
                ASSERT_EQ(ng_batch_norm_forward(fwd.get(), k.x.data(), nullptr, k.y.data(),
                                                k.weight.data(), k.bias.data(), k.rm.data(),
                                                k.rv.data(), &k.nbt, nullptr, nullptr),
                          NG_OK)
                    << ng_last_error();
                for (const Guarded *g : {&k.x, &k.dy, &k.y, &k.dx, &k.weight, &k.bias, &k.rm,
                                         &k.rv, &k.save_mean, &k.save_invstd, &k.dweight,
                                         &k.dbias, &k.z, &k.dz})
                    EXPECT_TRUE(g->check_canaries("buffer"));
                EXPECT_EQ(k.x.vec(), x0);
                EXPECT_EQ(k.dy.vec(), dy0);
                EXPECT_EQ(k.weight.vec(), w0);
                if (!affine) {
                    // No parameter gradients without affine: the caller's buffers stay as given.
                    for (int64_t c = 0; c < k.v.c; c++) {
                        EXPECT_EQ(k.dweight[c], -123.0f);
                        EXPECT_EQ(k.dbias[c], -123.0f);
                    }
                }
            }
}

// ---- Threads ------------------------------------------------------------------------------

// Separate plans run concurrently on separate threads and give the single-threaded results.
TEST(Threads, SeparatePlansRunConcurrently) {
    const ng_tensor t = make_tensor({4, 24, 9, 9}, NG_CHANNELS_LAST);
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    Call serial(t);
    PlanPtr plan = make_plan(NG_OP_FORWARD, t, p);
    ASSERT_EQ(serial.forward(plan.get()), NG_OK);
    std::vector<std::unique_ptr<Call>> calls;
    for (int i = 0; i < 4; i++) calls.push_back(std::make_unique<Call>(t));
    std::vector<std::thread> threads;
    std::atomic<int> failures{0};
    for (auto &c : calls)
        threads.emplace_back([&, call = c.get()] {
            ng_plan *raw = nullptr;
            if (ng_plan_create(best_runtime(), NG_OP_FORWARD, &t, &p, &raw) != NG_OK) {
                failures++;
                return;
            }
            PlanPtr mine(raw);
            for (int r = 0; r < 20; r++) {
                if (call->forward(mine.get()) != NG_OK) failures++;
            }
        });
    for (auto &th : threads) th.join();
    EXPECT_EQ(failures.load(), 0);
    for (auto &c : calls) EXPECT_EQ(c->y.vec(), serial.y.vec());
}

// A host's own parallel-for replaces OpenMP; NULL restores the default.
TEST(Threads, HostParallelFor) {
    struct Host {
        std::atomic<int> calls{0}, tasks{0};
    } host;
    auto serial_for = [](void *ctx, int count, ng_task_fn task, void *task_ctx) -> int {
        auto *h = static_cast<Host *>(ctx);
        h->calls++;
        int failed = 0;
        for (int i = 0; i < count; i++) {
            h->tasks++;
            if (task(task_ctx, i)) failed = 1;
        }
        return failed;
    };
    const ng_tensor t = make_tensor({8, 40, 23, 23}, NG_CONTIGUOUS);
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    Call a(t), b(t);
    PlanPtr plan = make_plan(NG_OP_FORWARD, t, p);
    ng_set_parallel_for(serial_for, &host);
    const ng_status st = a.forward(plan.get());
    ng_set_parallel_for(nullptr, nullptr);
    ASSERT_EQ(st, NG_OK) << ng_last_error();
    EXPECT_GT(host.calls.load(), 0);
    EXPECT_GT(host.tasks.load(), 1);
    const int calls = host.calls.load();
    ASSERT_EQ(b.forward(plan.get()), NG_OK);
    EXPECT_EQ(host.calls.load(), calls) << "NULL did not restore the default";
    EXPECT_EQ(a.y.vec(), b.y.vec());
}

// ---- The C++ wrapper ----------------------------------------------------------------------

TEST(CppWrapper, ThrowsWithStatusAndRuns) {
    try {
        normgen::Runtime rt("/nonexistent/pkg");
        FAIL() << "no exception";
    } catch (const normgen::Error &e) {
        EXPECT_EQ(e.status(), NG_PACKAGE_ERROR);
        EXPECT_TRUE(contains(e.what(), "/nonexistent/pkg")) << e.what();
    }
    normgen::Runtime rt(package_dir().c_str());
    Call k(small_tensor());
    normgen::Plan plan(rt, NG_OP_FORWARD, normgen::tensor({4, 3, 5}),
                       ng_batch_norm_params_default());
    plan.forward(k.x.data(), k.y.data(), k.weight.data(), k.bias.data(), k.rm.data(), k.rv.data(),
                 &k.nbt);
    EXPECT_EQ(k.nbt, 4);
    EXPECT_THROW(normgen::Plan(rt, NG_OP_FORWARD, normgen::tensor({1, 3}),
                               ng_batch_norm_params_default()),
                 normgen::Error);
}

// The wrapper passes z, bias and dz through (bf16, add + ReLU), and a missing z throws with the
// status and the argument's name.
TEST(CppWrapper, FusedBf16) {
    normgen::Runtime rt(package_dir().c_str());
    ng_batch_norm_params p = ng_batch_norm_params_default();
    p.activation = NG_ACT_RELU;
    p.residual = 1;
    const ng_tensor t = normgen::tensor({4, 3, 5}, NG_CONTIGUOUS, NG_BF16);
    const int64_t n = 60;
    GuardedTensor x(NG_BF16, n), z(NG_BF16, n), y(NG_BF16, n), dy(NG_BF16, n), dx(NG_BF16, n),
        dz(NG_BF16, n);
    Rng rng(8);
    x.assign(round_to(uniform_vector(n, rng, -2, 2), NG_BF16));
    z.assign(round_to(uniform_vector(n, rng, -1, 1), NG_BF16));
    dy.assign(round_to(uniform_vector(n, rng, -1, 1), NG_BF16));
    std::vector<float> w(3, 1.0f), b(3, 0.0f), rm(3, 0.0f), rv(3, 1.0f), sm(3), si(3), dw(3),
        db(3);
    int64_t nbt = 0;
    normgen::Plan fwd(rt, NG_OP_FORWARD, t, p), bwd(rt, NG_OP_BACKWARD, t, p);
    fwd.forward(x.data(), y.data(), w.data(), b.data(), rm.data(), rv.data(), &nbt, sm.data(),
                si.data(), z.data());
    bwd.backward(x.data(), dy.data(), w.data(), nullptr, nullptr, sm.data(), si.data(), dx.data(),
                 dw.data(), db.data(), b.data(), z.data(), dz.data());
    EXPECT_EQ(nbt, 1);
    int64_t positive = 0;
    for (int64_t i = 0; i < n; i++) {
        EXPECT_GE(y.get(i), 0.0f);
        positive += y.get(i) > 0;
        EXPECT_TRUE(dz.get(i) == 0.0f || dz.get(i) == dy.get(i)) << i;
    }
    EXPECT_GT(positive, 0);
    try {
        fwd.forward(x.data(), y.data(), w.data(), b.data(), rm.data(), rv.data(), &nbt);
        FAIL() << "no exception without z";
    } catch (const normgen::Error &e) {
        EXPECT_EQ(e.status(), NG_INVALID_ARGUMENT);
        EXPECT_TRUE(names(e.what(), "z")) << e.what();
    }
}

}  // namespace
}  // namespace normgen::test

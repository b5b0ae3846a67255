// Numeric tests: every kernel of the package, run through the runtime, against the float64
// reference (reference.h).
//
//  KernelTest      every generic family (op x statistics x layout) x every ISA level this CPU
//                  runs (capped with NORMGEN_ISA) x a table of shapes that break assumptions.
//  ExactShapeTest  every exact-shape kernel of the manifest, once, on its own shape.
//  Stability       fp32 data with mean 1e4 and std 1.
//  SeedExample, RunningStats*  PyTorch's running-statistics bookkeeping in every mode.
//
// Tolerances. Kernels store fp32 and accumulate in float64, so their results carry a few fp32
// roundings of the terms they combine (worst errors measured with NORMGEN_TEST_REPORT=1 over
// this whole file, in brackets):
//  - y and dx (elementwise, ~3 fp32 operations): 2e-6 of the channel's magnitude, ~17 ulps
//    [y 2.7e-7, dx 2.3e-7]. The magnitude is that of the terms combined (output_scale,
//    gradient_scale), not of the result, which can cancel to ~0 in a channel with few values
//    (with 2 values dx is O(eps); with N = 3, S = 1 every y of a channel may be near 0).
//  - per-channel statistics (one float64 reduction, one rounding to fp32): within 2 ulps, the
//    issue's bound for save_mean [0.5 ulp: correctly rounded].
//  - dweight, dbias (float64 sums, one rounding) and running statistics (an update in double
//    of fp32 values): 1e-6 relative to the magnitude of the terms, ~8 ulps [6e-8].
#include "test_support.h"

#include <cmath>
#include <functional>
#include <map>
#include <set>
#include <string_view>
#include <tuple>

namespace normgen::test {
namespace {

constexpr double kTensorTol = 2e-6;       // y, dx vs channel magnitude
constexpr double kStatUlps = 2;           // save_mean, save_invstd
constexpr double kReductionRtol = 1e-6;   // dweight, dbias, running_mean, running_var

// ---- One kernel family on one tensor -------------------------------------------------------

struct CaseData {
    ng_tensor t{};
    ref::View v;
    std::vector<float> x, dy, weight, bias, running_mean, running_var;
};

// Channels get distinct means and spreads so that a channel mix-up cannot pass; weights take
// both signs.
CaseData make_data(const ng_tensor &t, uint64_t seed) {
    CaseData d;
    d.t = t;
    d.v = view_of(t);
    Rng rng(seed);
    const int64_t C = d.v.c;
    std::vector<double> mean(C), scale(C);
    for (int64_t c = 0; c < C; c++) {
        mean[c] = rng.uniform(-3, 3);
        scale[c] = rng.uniform(0.3, 3);
    }
    d.x.resize(d.v.size());
    fill_tensor(d.v, d.x.data(), rng, mean, scale);
    d.dy.resize(d.v.size());
    fill_tensor(d.v, d.dy.data(), rng, std::vector<double>(C, 0.0), std::vector<double>(C, 1.0));
    d.weight = uniform_vector(C, rng, 0.5, 1.5);
    for (auto &w : d.weight)
        if (rng.next() & 1) w = -w;
    d.bias = uniform_vector(C, rng, -1, 1);
    d.running_mean = uniform_vector(C, rng, -1, 1);
    d.running_var = uniform_vector(C, rng, 0.5, 2);
    return d;
}

size_t hash_of(const std::vector<float> &v) {
    return std::hash<std::string_view>{}(
        std::string_view(reinterpret_cast<const char *>(v.data()), v.size() * sizeof(float)));
}

std::vector<double> to_double(const std::vector<float> &v) { return {v.begin(), v.end()}; }

// Scale of a running-statistics update (1-m)*old + m*batch: the magnitude of its terms.
std::vector<double> update_scale(const std::vector<float> &old, const std::vector<double> &batch,
                                 const std::vector<double> &want, double m) {
    std::vector<double> s(old.size());
    for (size_t c = 0; c < old.size(); c++)
        s[c] = (1 - m) * std::fabs(old[c]) + m * std::fabs(batch[c]) + std::fabs(want[c]);
    return s;
}

// Runs family f on d through rt and checks every output against the reference, every output
// buffer's canaries, and that inputs are unchanged. eps is deliberately not the default so a
// kernel that ignores it fails.
void check_family(ng_runtime *rt, const std::string &isa, Family f, const CaseData &d,
                  double eps = 1e-3) {
    const std::string where = std::string(family_name(f)) + " " + shape_string(d.t) + " " + isa;
    SCOPED_TRACE(where);
    ng_batch_norm_params p = ng_batch_norm_params_default();
    p.eps = eps;
    p.momentum = 0.1;
    p.training = family_training(f);
    ng_plan *raw = nullptr;
    ASSERT_EQ(ng_plan_create(rt, family_op(f), &d.t, &p, &raw), NG_OK) << ng_last_error();
    PlanPtr plan(raw);
    // The plan must have chosen the kernel under test, or the test would test another one.
    ASSERT_EQ(chosen_kernel(plan.get()), expected_kernel(f, d.t, isa))
        << ng_plan_describe(plan.get());

    const ref::View &v = d.v;
    const int64_t C = v.c;
    const size_t x_hash = hash_of(d.x), dy_hash = hash_of(d.dy);
    ref::Params rp;
    rp.eps = eps;
    rp.momentum = 0.1;
    rp.training = p.training;

    if (family_op(f) == NG_OP_FORWARD) {
        Guarded y(v.size()), save_mean(C), save_invstd(C), rm(C), rv(C);
        rm.copy_from(d.running_mean);
        rv.copy_from(d.running_var);
        int64_t nbt = 5;
        ASSERT_EQ(ng_batch_norm_forward(plan.get(), d.x.data(), nullptr, y.data(),
                                        d.weight.data(), d.bias.data(), rm.data(), rv.data(),
                                        &nbt, save_mean.data(), save_invstd.data()),
                  NG_OK)
            << ng_last_error();
        ref::RunningStats rs{to_double(d.running_mean), to_double(d.running_var), 5};
        const ref::ForwardResult r =
            ref::forward(v, rp, d.x.data(), d.weight.data(), d.bias.data(), &rs);
        EXPECT_TRUE(tensor_near("y " + where, y.data(), r.y, v, kTensorTol,
                                output_scale(v, d.x.data(), r, d.weight.data(), d.bias.data())));
        if (p.training) {
            EXPECT_TRUE(channels_within_ulps("save_mean " + where, save_mean.data(), r.mean,
                                             kStatUlps));
            EXPECT_TRUE(channels_within_ulps("save_invstd " + where, save_invstd.data(),
                                             r.invstd, kStatUlps));
            EXPECT_TRUE(channels_near("running_mean " + where, rm.data(), rs.mean, kReductionRtol,
                                      update_scale(d.running_mean, r.mean, rs.mean, 0.1)));
            EXPECT_TRUE(channels_near("running_var " + where, rv.data(), rs.var, kReductionRtol,
                                      update_scale(d.running_var, r.biased_var, rs.var, 0.1)));
            EXPECT_EQ(nbt, 6);
        } else {
            EXPECT_EQ(rm.vec(), d.running_mean) << "eval must not change running_mean";
            EXPECT_EQ(rv.vec(), d.running_var) << "eval must not change running_var";
            EXPECT_EQ(nbt, 5) << "eval must not change num_batches_tracked";
        }
        for (auto *g : {&y, &save_mean, &save_invstd, &rm, &rv})
            EXPECT_TRUE(g->check_canaries(where));
    } else {
        // Batch statistics for training come from the reference forward, rounded to fp32 as a
        // forward pass would save them, so this tests the backward kernel alone.
        std::vector<float> save_mean, save_invstd;
        if (p.training) {
            ref::Params stats = rp;
            stats.track_running_stats = false;  // only the batch statistics are wanted
            const ref::ForwardResult fwd =
                ref::forward(v, stats, d.x.data(), d.weight.data(), d.bias.data(), nullptr);
            save_mean.assign(fwd.mean.begin(), fwd.mean.end());
            save_invstd.assign(fwd.invstd.begin(), fwd.invstd.end());
        }
        const float *sm = p.training ? save_mean.data() : nullptr;
        const float *si = p.training ? save_invstd.data() : nullptr;
        Guarded dx(v.size()), dweight(C), dbias(C);
        ASSERT_EQ(ng_batch_norm_backward(plan.get(), d.x.data(), d.dy.data(), nullptr,
                                         d.weight.data(), nullptr, d.running_mean.data(),
                                         d.running_var.data(), sm, si, dx.data(), dweight.data(),
                                         dbias.data(), nullptr),
                  NG_OK)
            << ng_last_error();
        const ref::BackwardResult r =
            ref::backward(v, d.x.data(), d.dy.data(), d.weight.data(), d.running_mean.data(),
                          d.running_var.data(), sm, si, p.training, eps);
        EXPECT_TRUE(tensor_near("dx " + where, dx.data(), r.dx, v, kTensorTol,
                                    gradient_scale(v, d.dy.data(), d.weight.data(), r.invstd)));
        EXPECT_TRUE(channels_near("dweight " + where, dweight.data(), r.dweight, kReductionRtol));
        EXPECT_TRUE(channels_near("dbias " + where, dbias.data(), r.dbias, kReductionRtol));
        for (auto *g : {&dx, &dweight, &dbias}) EXPECT_TRUE(g->check_canaries(where));
    }
    EXPECT_EQ(hash_of(d.x), x_hash) << "x was modified";
    EXPECT_EQ(hash_of(d.dy), dy_hash) << "dy was modified";
}

// ---- Generic kernels: ISA x family x shape table x format ---------------------------------

// Shapes that break assumptions: C = 1, S = 1 (BatchNorm1d on (N, C), and (N, C, 1, 1)),
// N = 1 with S > 1, extents that are not multiples of any vector width (4, 8, 16 lanes),
// BatchNorm1d 2-D and 3-D, 2d and 3d, and some large enough for several parallel tasks with a
// partial last one (channels-last tasks take ~65536 elements by default; contiguous ones a
// channel each), including one channel with a long reduction and more channels than a task
// holds elements. None is in shapes/resnet50_b32.txt, so the generic kernels run.
const std::vector<std::vector<int64_t>> kShapes = {
    {2, 1, 7},        {1, 1, 2},        {4, 3},          {3, 4},        {64, 19},
    {2, 130},         {4099, 9},        {2053, 67},      {5, 33, 1},    {3, 70001, 1},
    {1, 3, 17},       {1, 5, 2},        {3, 5, 7},       {4, 16, 33},   {3, 2, 4099},
    {2, 1, 70001},    {2, 3, 5, 7},     {1, 19, 6, 6},   {3, 2, 1, 1},  {2, 64, 7, 7},
    {5, 17, 4, 4},    {9, 40, 23, 23},  {2, 3, 3, 4, 5}, {1, 5, 2, 3, 7}, {2, 17, 4, 4, 4}};

const std::vector<Family> kFamilies = {Family::FwdTrain, Family::FwdInfer, Family::BwdTrain,
                                       Family::BwdEval};

struct KernelCase {
    std::string isa;
    Family family;
    std::vector<int64_t> shape;
    ng_memory_format format;
};

std::vector<KernelCase> kernel_cases() {
    std::vector<KernelCase> cases;
    for (const auto &isa : isa_levels())
        for (Family f : kFamilies)
            for (const auto &shape : kShapes)
                for (ng_memory_format fmt : {NG_CONTIGUOUS, NG_CHANNELS_LAST})
                    cases.push_back({isa, f, shape, fmt});
    return cases;
}

std::string case_name(const ::testing::TestParamInfo<KernelCase> &info) {
    const KernelCase &k = info.param;
    std::string s = k.isa + "_" + family_name(k.family) + "_";
    for (size_t i = 0; i < k.shape.size(); i++) s += (i ? "x" : "") + std::to_string(k.shape[i]);
    return s + (k.format == NG_CHANNELS_LAST ? "_cl" : "_contig");
}

class KernelTest : public ::testing::TestWithParam<KernelCase> {};

TEST_P(KernelTest, MatchesReference) {
    const KernelCase &k = GetParam();
    if (!cpu_supports(k.isa)) GTEST_SKIP() << "this CPU cannot run " << k.isa;
    ng_runtime *rt = runtime_for_isa(k.isa);
    ASSERT_NE(rt, nullptr);
    const ng_tensor t = make_tensor(k.shape, k.format);
    uint64_t seed = 1;
    for (int64_t e : k.shape) seed = seed * 131 + uint64_t(e);
    check_family(rt, k.isa, k.family, make_data(t, seed));
}

INSTANTIATE_TEST_SUITE_P(Generic, KernelTest, ::testing::ValuesIn(kernel_cases()), case_name);

// Every generic kernel the test table claims to cover is in the manifest, and every generic
// kernel of the manifest is covered by the table (so a new family or ISA cannot go untested).
TEST(KernelCoverage, TableCoversEveryGenericKernel) {
    std::set<std::string> covered;
    for (const auto &k : kernel_cases())
        covered.insert(expected_kernel(k.family, make_tensor(k.shape, k.format), k.isa));
    std::set<std::string> in_manifest;
    for (const auto &e : manifest().at("kernels"))
        if (e.at("shape").at("kind") == "generic") in_manifest.insert(e.at("name"));
    EXPECT_EQ(covered, in_manifest);
    EXPECT_EQ(in_manifest.size(), 4u * 2u * isa_levels().size());
}

// ---- Exact-shape kernels: each once, on its own shape -------------------------------------

struct ExactCase {
    std::string isa, layout;
    int64_t n, c, s;
    std::vector<Family> families;
};

std::vector<ExactCase> exact_cases() {
    std::map<std::string, ExactCase> by_key;
    try {
        for (const auto &e : manifest().at("kernels")) {
            const auto &shape = e.at("shape");
            if (shape.at("kind") != "exact") continue;
            ExactCase k{e.at("isa"), e.at("layout"), shape.at("n"), shape.at("c"),
                        shape.at("s"), {}};
            const std::string key = k.isa + "_" + k.layout + "_n" + std::to_string(k.n) + "_c" +
                                    std::to_string(k.c) + "_s" + std::to_string(k.s);
            ExactCase &entry = by_key.emplace(key, k).first->second;
            const std::string name = e.at("name");
            for (Family f : kFamilies)
                if (name.rfind(std::string(family_name(f)) + "_", 0) == 0)
                    entry.families.push_back(f);
        }
    } catch (const std::exception &) {
        // An unreadable manifest fails ExactShapeCoverage below; no cases here.
    }
    std::vector<ExactCase> cases;
    for (auto &[key, k] : by_key) cases.push_back(k);
    return cases;
}

// The tensor an exact kernel is for: 2-D for S = 1 (BatchNorm1d; contiguous, which the runtime
// must serve with the channels-last kernel), 4-D with square H = W where S is a square (all of
// ResNet-50's), 3-D otherwise.
ng_tensor exact_tensor(const ExactCase &k) {
    if (k.s == 1) return make_tensor({k.n, k.c}, NG_CONTIGUOUS);
    const ng_memory_format fmt = k.layout == "cl" ? NG_CHANNELS_LAST : NG_CONTIGUOUS;
    const auto h = int64_t(std::llround(std::sqrt(double(k.s))));
    if (h * h == k.s) return make_tensor({k.n, k.c, h, h}, fmt);
    return make_tensor({k.n, k.c, k.s}, fmt);
}

class ExactShapeTest : public ::testing::TestWithParam<ExactCase> {};

TEST_P(ExactShapeTest, MatchesReference) {
    const ExactCase &k = GetParam();
    if (!cpu_supports(k.isa)) GTEST_SKIP() << "this CPU cannot run " << k.isa;
    ng_runtime *rt = runtime_for_isa(k.isa);
    ASSERT_NE(rt, nullptr);
    const ng_tensor t = exact_tensor(k);
    ASSERT_EQ(kernel_layout(t), k.layout);
    const CaseData d = make_data(t, uint64_t(k.n * 1000003 + k.c * 1009 + k.s));
    for (Family f : k.families) {
        // expected_kernel() names the exact kernel, which exists: the plan must choose it.
        ASSERT_NE(expected_kernel(f, t, k.isa).find("_n"), std::string::npos);
        check_family(rt, k.isa, f, d, 1e-5);
    }
}

INSTANTIATE_TEST_SUITE_P(Manifest, ExactShapeTest, ::testing::ValuesIn(exact_cases()),
                         [](const ::testing::TestParamInfo<ExactCase> &info) {
                             const ExactCase &k = info.param;
                             return k.isa + "_" + k.layout + "_n" + std::to_string(k.n) + "_c" +
                                    std::to_string(k.c) + "_s" + std::to_string(k.s);
                         });

TEST(ExactShapeCoverage, EveryExactKernelIsTested) {
    size_t kernels = 0, covered = 0;
    for (const auto &e : manifest().at("kernels"))
        if (e.at("shape").at("kind") == "exact") kernels++;
    for (const auto &k : exact_cases()) covered += k.families.size();
    EXPECT_GT(kernels, 0u) << "the package has no exact-shape kernels";
    EXPECT_EQ(covered, kernels);
}

// ---- Stability: mean 1e4, std 1 ------------------------------------------------------------

// E[x^2] - E[x]^2 in fp32 loses everything here. Requirements (issue 2): save_mean within 2 ulps
// of the float64 mean, variance within 1e-5 relative, y at least as close to float64 as
// PyTorch's own fp32 result (~1e-3, from rounding the mean to fp32; measured in
// test_torch_parity). The kernels never round the mean before subtracting it, so y is much
// better than that: y's own fp32 rounding at |y| up to ~10 (weight 2) is ~5e-7, and kStableYAbs
// allows a few of those [measured worst 1.0e-6], ~250x better than PyTorch.
constexpr double kStableYAbs = 4e-6;

class StabilityTest
    : public ::testing::TestWithParam<std::tuple<std::string, ng_memory_format>> {};

TEST_P(StabilityTest, MeanOneE4StdOne) {
    const auto &[isa, fmt] = GetParam();
    if (!cpu_supports(isa)) GTEST_SKIP() << "this CPU cannot run " << isa;
    ng_runtime *rt = runtime_for_isa(isa);
    ASSERT_NE(rt, nullptr);
    const ng_tensor t = make_tensor({8, 3, 64, 64}, fmt);
    const ref::View v = view_of(t);
    Rng rng(42);
    std::vector<float> x(v.size());
    for (auto &e : x) e = float(1e4 + rng.normal());
    const std::vector<float> w = {1.0f, 0.5f, 2.0f}, b = {0.0f, 0.25f, -1.0f};

    ng_batch_norm_params p = ng_batch_norm_params_default();
    p.momentum = 1.0;  // running_var becomes the batch's unbiased variance
    ng_plan *raw = nullptr;
    ASSERT_EQ(ng_plan_create(rt, NG_OP_FORWARD, &t, &p, &raw), NG_OK) << ng_last_error();
    PlanPtr plan(raw);
    ASSERT_EQ(chosen_kernel(plan.get()), expected_kernel(Family::FwdTrain, t, isa));
    std::vector<float> y(v.size()), save_mean(3), save_invstd(3), rm(3, 0.0f), rv(3, 1.0f);
    int64_t nbt = 0;
    ASSERT_EQ(ng_batch_norm_forward(plan.get(), x.data(), nullptr, y.data(), w.data(), b.data(),
                                    rm.data(), rv.data(), &nbt, save_mean.data(),
                                    save_invstd.data()),
              NG_OK)
        << ng_last_error();

    ref::Params rp;
    rp.momentum = 1.0;
    ref::RunningStats rs{{0, 0, 0}, {1, 1, 1}, 0};
    const ref::ForwardResult r = ref::forward(v, rp, x.data(), w.data(), b.data(), &rs);
    EXPECT_TRUE(channels_within_ulps("stable_save_mean", save_mean.data(), r.mean, 2));
    std::vector<double> var_from_invstd(3);
    for (int c = 0; c < 3; c++)
        var_from_invstd[c] = 1.0 / (double(save_invstd[c]) * save_invstd[c]) - p.eps;
    // 1/invstd^2 - eps: save_invstd's rounding (2^-24 relative) doubles; far inside 1e-5.
    EXPECT_TRUE(channels_near("stable_var_from_invstd", std::vector<float>(
                                  var_from_invstd.begin(), var_from_invstd.end()).data(),
                              r.biased_var, 1e-5));
    EXPECT_TRUE(channels_near("stable_running_var", rv.data(), rs.var, 1e-5));
    EXPECT_TRUE(channels_within_ulps("stable_running_mean", rm.data(), rs.mean, 2));
    double worst = 0;
    for (int64_t i = 0; i < v.size(); i++) worst = std::max(worst, std::fabs(y[i] - r.y[i]));
    record_error("stable_y_abs", worst);
    EXPECT_LE(worst, kStableYAbs) << "worst |y - y_float64|";

    // Backward on the same data (training, saved statistics from the kernel itself).
    raw = nullptr;
    ASSERT_EQ(ng_plan_create(rt, NG_OP_BACKWARD, &t, &p, &raw), NG_OK) << ng_last_error();
    PlanPtr bplan(raw);
    std::vector<float> dy(v.size()), dx(v.size()), dw(3), db(3);
    for (auto &e : dy) e = float(rng.uniform(-1, 1));
    ASSERT_EQ(ng_batch_norm_backward(bplan.get(), x.data(), dy.data(), nullptr, w.data(), nullptr,
                                     rm.data(), rv.data(), save_mean.data(), save_invstd.data(),
                                     dx.data(), dw.data(), db.data(), nullptr),
              NG_OK)
        << ng_last_error();
    const ref::BackwardResult br = ref::backward(v, x.data(), dy.data(), w.data(), nullptr,
                                                 nullptr, save_mean.data(), save_invstd.data(),
                                                 true, p.eps);
    EXPECT_TRUE(tensor_near("stable_dx", dx.data(), br.dx, v, kTensorTol,
                            gradient_scale(v, dy.data(), w.data(), br.invstd)));
    EXPECT_TRUE(channels_near("stable_dweight", dw.data(), br.dweight, kReductionRtol));
    EXPECT_TRUE(channels_near("stable_dbias", db.data(), br.dbias, kReductionRtol));
}

INSTANTIATE_TEST_SUITE_P(
    AllIsas, StabilityTest,
    ::testing::Combine(::testing::ValuesIn(isa_levels()),
                       ::testing::Values(NG_CONTIGUOUS, NG_CHANNELS_LAST)),
    [](const auto &info) {
        return std::get<0>(info.param) +
               (std::get<1>(info.param) == NG_CHANNELS_LAST ? "_cl" : "_contig");
    });

// ---- Running statistics, in every mode ----------------------------------------------------

// A forward call through the best ISA's runtime, collecting everything it writes.
struct Forward {
    ng_status status = NG_INTERNAL;
    std::string kernel;
    Guarded y, save_mean, save_invstd;
};

Forward run_forward(const ng_tensor &t, const ng_batch_norm_params &p, const float *x,
                    const float *w, const float *b, float *rm, float *rv, int64_t *nbt) {
    const ref::View v = view_of(t);
    Forward out{NG_INTERNAL, "", Guarded(v.size()), Guarded(v.c), Guarded(v.c)};
    out.save_mean.fill(-777.0f);
    out.save_invstd.fill(-777.0f);
    ng_plan *raw = nullptr;
    out.status = ng_plan_create(runtime_for_isa(best_isa()), NG_OP_FORWARD, &t, &p, &raw);
    if (out.status != NG_OK) {
        ADD_FAILURE() << "ng_plan_create: " << ng_last_error();
        return out;
    }
    PlanPtr plan(raw);
    out.kernel = chosen_kernel(plan.get());
    out.status = ng_batch_norm_forward(plan.get(), x, nullptr, out.y.data(), w, b, rm, rv, nbt,
                                       out.save_mean.data(), out.save_invstd.data());
    EXPECT_EQ(out.status, NG_OK) << ng_last_error();
    for (auto *g : {&out.y, &out.save_mean, &out.save_invstd})
        EXPECT_TRUE(g->check_canaries("forward outputs"));
    return out;
}

// The seed example: BatchNorm1d(4) on [[1,2,3,4],[2,3,4,5],[3,4,5,6]], training.
TEST(SeedExample, BatchNorm1dFour) {
    const ng_tensor t = make_tensor({3, 4}, NG_CONTIGUOUS);
    const std::vector<float> x = {1, 2, 3, 4, 2, 3, 4, 5, 3, 4, 5, 6};
    const std::vector<float> w(4, 1.0f), b(4, 0.0f);
    std::vector<float> rm(4, 0.0f), rv(4, 1.0f);
    int64_t nbt = 0;
    Forward f = run_forward(t, ng_batch_norm_params_default(), x.data(), w.data(), b.data(),
                            rm.data(), rv.data(), &nbt);
    ASSERT_EQ(f.status, NG_OK);
    EXPECT_EQ(f.kernel, expected_kernel(Family::FwdTrain, t, best_isa()));
    // Per column the values are m-1, m, m+1: biased var 2/3, y = ±1/sqrt(2/3 + 1e-5).
    const double e = 1.0 / std::sqrt(2.0 / 3.0 + 1e-5);  // 1.22473...
    const double rows[3] = {-e, 0.0, e};
    for (int n = 0; n < 3; n++)
        for (int c = 0; c < 4; c++)
            EXPECT_NEAR(f.y[n * 4 + c], rows[n], 1e-6) << "y[" << n << "][" << c << "]";
    EXPECT_NEAR(f.y[0], -1.2247, 1e-4);
    const std::vector<float> want_rm = {0.2f, 0.3f, 0.4f, 0.5f};
    for (int c = 0; c < 4; c++) {
        EXPECT_NEAR(rm[c], want_rm[c], 1e-6) << "running_mean[" << c << "]";
        // 0.9 * 1 + 0.1 * unbiased var (= 1)
        EXPECT_NEAR(rv[c], 1.0f, 1e-6) << "running_var[" << c << "]";
        EXPECT_NEAR(f.save_mean[c], 2.0f + c, 1e-6);
    }
    EXPECT_EQ(nbt, 1);
}

class RunningStatsTest : public ::testing::TestWithParam<ng_memory_format> {
protected:
    void SetUp() override {
        t_ = make_tensor({6, 5, 3, 4}, GetParam());
        v_ = view_of(t_);
        d_ = make_data(t_, 7);
    }
    std::vector<float> batch(uint64_t seed) const {
        std::vector<float> x(v_.size());
        Rng rng(seed);
        std::vector<double> mean(v_.c), scale(v_.c);
        for (int64_t c = 0; c < v_.c; c++) {
            mean[c] = rng.uniform(-2, 2);
            scale[c] = rng.uniform(0.5, 2);
        }
        fill_tensor(v_, x.data(), rng, mean, scale);
        return x;
    }
    ng_tensor t_{};
    ref::View v_;
    CaseData d_;
};

// momentum None: after k batches the running statistics are the plain averages of the k batch
// statistics; num_batches_tracked counts the batches.
TEST_P(RunningStatsTest, MomentumNoneIsCumulativeAverage) {
    ng_batch_norm_params p = ng_batch_norm_params_default();
    p.momentum = NAN;
    ref::Params rp;
    rp.momentum = NAN;
    std::vector<float> rm(v_.c, 0.0f), rv(v_.c, 1.0f);
    ref::RunningStats rs{std::vector<double>(v_.c, 0.0), std::vector<double>(v_.c, 1.0), 0};
    int64_t nbt = 0;
    std::vector<double> mean_sum(v_.c, 0.0), var_sum(v_.c, 0.0);
    for (int k = 1; k <= 4; k++) {
        SCOPED_TRACE("batch " + std::to_string(k));
        const std::vector<float> x = batch(100 + k);
        Forward f = run_forward(t_, p, x.data(), d_.weight.data(), d_.bias.data(), rm.data(),
                                rv.data(), &nbt);
        ASSERT_EQ(f.status, NG_OK);
        const ref::ForwardResult r =
            ref::forward(v_, rp, x.data(), d_.weight.data(), d_.bias.data(), &rs);
        EXPECT_EQ(nbt, k);
        EXPECT_TRUE(tensor_near("y", f.y.data(), r.y, v_, kTensorTol,
                                output_scale(v_, x.data(), r, d_.weight.data(), d_.bias.data())));
        const double M = double(v_.n * v_.s);
        std::vector<double> avg_mean(v_.c), avg_var(v_.c);
        for (int64_t c = 0; c < v_.c; c++) {
            mean_sum[c] += r.mean[c];
            var_sum[c] += r.biased_var[c] * M / (M - 1);
            avg_mean[c] = mean_sum[c] / k;
            avg_var[c] = var_sum[c] / k;
        }
        // The reference's recurrence and the closed form agree; both bound the runtime.
        std::vector<double> scale_m(v_.c), scale_v(v_.c);
        for (int64_t c = 0; c < v_.c; c++) {
            EXPECT_NEAR(rs.mean[c], avg_mean[c], 1e-12);
            EXPECT_NEAR(rs.var[c], avg_var[c], 1e-12);
            scale_m[c] = std::max(std::fabs(avg_mean[c]), 1.0);
            scale_v[c] = avg_var[c];
        }
        // Float state carried across calls: each update adds ~1 ulp.
        EXPECT_TRUE(channels_near("running_mean_none", rm.data(), avg_mean, 4 * kReductionRtol,
                                  scale_m));
        EXPECT_TRUE(channels_near("running_var_none", rv.data(), avg_var, 4 * kReductionRtol,
                                  scale_v));
    }
}

// momentum 0.1 also counts batches; momentum 0 keeps, momentum 1 replaces running stats; a null
// num_batches_tracked is allowed when momentum is a number.
TEST_P(RunningStatsTest, MomentumValues) {
    for (double m : {0.1, 0.0, 1.0}) {
        SCOPED_TRACE("momentum " + std::to_string(m));
        ng_batch_norm_params p = ng_batch_norm_params_default();
        p.momentum = m;
        ref::Params rp;
        rp.momentum = m;
        std::vector<float> rm = d_.running_mean, rv = d_.running_var;
        ref::RunningStats rs{to_double(rm), to_double(rv), 3};
        int64_t nbt = 3;
        Forward f = run_forward(t_, p, d_.x.data(), d_.weight.data(), d_.bias.data(), rm.data(),
                                rv.data(), &nbt);
        ASSERT_EQ(f.status, NG_OK);
        const ref::ForwardResult r =
            ref::forward(v_, rp, d_.x.data(), d_.weight.data(), d_.bias.data(), &rs);
        EXPECT_EQ(nbt, 4);
        EXPECT_TRUE(tensor_near("y", f.y.data(), r.y, v_, kTensorTol,
                                output_scale(v_, d_.x.data(), r, d_.weight.data(), d_.bias.data())));
        EXPECT_TRUE(channels_near("running_mean", rm.data(), rs.mean, kReductionRtol,
                                  update_scale(d_.running_mean, r.mean, rs.mean, m)));
        EXPECT_TRUE(channels_near("running_var", rv.data(), rs.var, kReductionRtol,
                                  update_scale(d_.running_var, r.biased_var, rs.var, m)));
        if (m == 0.0) {
            EXPECT_EQ(rm, d_.running_mean);
            EXPECT_EQ(rv, d_.running_var);
        }
        // Without a counter.
        std::vector<float> rm2 = d_.running_mean, rv2 = d_.running_var;
        Forward g = run_forward(t_, p, d_.x.data(), d_.weight.data(), d_.bias.data(),
                                rm2.data(), rv2.data(), nullptr);
        ASSERT_EQ(g.status, NG_OK);
        EXPECT_EQ(rm2, rm);
        EXPECT_EQ(rv2, rv);
    }
}

// affine off: weight 1, bias 0 (null pointers accepted), no gradients for them.
TEST_P(RunningStatsTest, AffineOff) {
    ng_batch_norm_params p = ng_batch_norm_params_default();
    p.affine = 0;
    ref::Params rp;
    rp.affine = false;
    std::vector<float> rm = d_.running_mean, rv = d_.running_var;
    ref::RunningStats rs{to_double(rm), to_double(rv), 0};
    int64_t nbt = 0;
    Forward f = run_forward(t_, p, d_.x.data(), nullptr, nullptr, rm.data(), rv.data(), &nbt);
    ASSERT_EQ(f.status, NG_OK);
    const ref::ForwardResult r = ref::forward(v_, rp, d_.x.data(), nullptr, nullptr, &rs);
    EXPECT_TRUE(tensor_near("y_affine_off", f.y.data(), r.y, v_, kTensorTol,
                            output_scale(v_, d_.x.data(), r, nullptr, nullptr)));
    EXPECT_TRUE(channels_near("running_mean", rm.data(), rs.mean, kReductionRtol,
                              update_scale(d_.running_mean, r.mean, rs.mean, 0.1)));
    EXPECT_EQ(nbt, 1);

    for (int training : {1, 0}) {
        SCOPED_TRACE(training ? "backward training" : "backward eval");
        p.training = training;
        ng_plan *raw = nullptr;
        ASSERT_EQ(ng_plan_create(runtime_for_isa(best_isa()), NG_OP_BACKWARD, &t_, &p, &raw),
                  NG_OK)
            << ng_last_error();
        PlanPtr plan(raw);
        Guarded dx(v_.size());
        const float *sm = training ? f.save_mean.data() : nullptr;
        const float *si = training ? f.save_invstd.data() : nullptr;
        ASSERT_EQ(ng_batch_norm_backward(plan.get(), d_.x.data(), d_.dy.data(), nullptr, nullptr,
                                         nullptr, rm.data(), rv.data(), sm, si, dx.data(),
                                         nullptr, nullptr, nullptr),
                  NG_OK)
            << ng_last_error();
        const ref::BackwardResult br = ref::backward(v_, d_.x.data(), d_.dy.data(), nullptr,
                                                     rm.data(), rv.data(), sm, si, training,
                                                     p.eps);
        EXPECT_TRUE(tensor_near("dx_affine_off", dx.data(), br.dx, v_, kTensorTol,
                                gradient_scale(v_, d_.dy.data(), nullptr, br.invstd)));
        EXPECT_TRUE(dx.check_canaries("dx"));
    }
}

// track_running_stats off: training and eval both normalise with batch statistics, and the
// running buffers (if given) and the counter are left alone. Backward in eval then also uses
// the batch statistics (the training-statistics kernel).
TEST_P(RunningStatsTest, TrackRunningStatsOff) {
    ref::Params rp;
    rp.track_running_stats = false;
    const ref::ForwardResult r =
        ref::forward(v_, rp, d_.x.data(), d_.weight.data(), d_.bias.data(), nullptr);
    for (int training : {1, 0}) {
        SCOPED_TRACE(training ? "training" : "eval");
        ng_batch_norm_params p = ng_batch_norm_params_default();
        p.track_running_stats = 0;
        p.training = training;
        std::vector<float> rm = d_.running_mean, rv = d_.running_var;
        int64_t nbt = 9;
        Forward f = run_forward(t_, p, d_.x.data(), d_.weight.data(), d_.bias.data(), rm.data(),
                                rv.data(), &nbt);
        ASSERT_EQ(f.status, NG_OK);
        EXPECT_EQ(f.kernel, expected_kernel(Family::FwdTrain, t_, best_isa()));
        EXPECT_TRUE(tensor_near("y_untracked", f.y.data(), r.y, v_, kTensorTol,
                                output_scale(v_, d_.x.data(), r, d_.weight.data(), d_.bias.data())));
        EXPECT_TRUE(channels_within_ulps("save_mean", f.save_mean.data(), r.mean, kStatUlps));
        EXPECT_TRUE(channels_within_ulps("save_invstd", f.save_invstd.data(), r.invstd,
                                         kStatUlps));
        EXPECT_EQ(rm, d_.running_mean);
        EXPECT_EQ(rv, d_.running_var);
        EXPECT_EQ(nbt, 9);
        // Without running buffers at all.
        Forward g = run_forward(t_, p, d_.x.data(), d_.weight.data(), d_.bias.data(), nullptr,
                                nullptr, nullptr);
        ASSERT_EQ(g.status, NG_OK);
        EXPECT_EQ(g.y.vec(), f.y.vec());

        ng_plan *raw = nullptr;
        ASSERT_EQ(ng_plan_create(runtime_for_isa(best_isa()), NG_OP_BACKWARD, &t_, &p, &raw),
                  NG_OK)
            << ng_last_error();
        PlanPtr plan(raw);
        EXPECT_EQ(chosen_kernel(plan.get()), expected_kernel(Family::BwdTrain, t_, best_isa()));
        Guarded dx(v_.size()), dw(v_.c), db(v_.c);
        ASSERT_EQ(ng_batch_norm_backward(plan.get(), d_.x.data(), d_.dy.data(), nullptr,
                                         d_.weight.data(), nullptr, nullptr, nullptr,
                                         f.save_mean.data(), f.save_invstd.data(), dx.data(),
                                         dw.data(), db.data(), nullptr),
                  NG_OK)
            << ng_last_error();
        const ref::BackwardResult br =
            ref::backward(v_, d_.x.data(), d_.dy.data(), d_.weight.data(), nullptr, nullptr,
                          f.save_mean.data(), f.save_invstd.data(), true, p.eps);
        EXPECT_TRUE(tensor_near("dx_untracked", dx.data(), br.dx, v_, kTensorTol,
                                gradient_scale(v_, d_.dy.data(), d_.weight.data(), br.invstd)));
        EXPECT_TRUE(channels_near("dweight", dw.data(), br.dweight, kReductionRtol));
        EXPECT_TRUE(channels_near("dbias", db.data(), br.dbias, kReductionRtol));
    }
}

// eval with running statistics: y from running_mean/var; nothing is updated.
TEST_P(RunningStatsTest, EvalUsesRunningStats) {
    ng_batch_norm_params p = ng_batch_norm_params_default();
    p.training = 0;
    ref::Params rp;
    rp.training = false;
    std::vector<float> rm = d_.running_mean, rv = d_.running_var;
    int64_t nbt = 2;
    Forward f = run_forward(t_, p, d_.x.data(), d_.weight.data(), d_.bias.data(), rm.data(),
                            rv.data(), &nbt);
    ASSERT_EQ(f.status, NG_OK);
    EXPECT_EQ(f.kernel, expected_kernel(Family::FwdInfer, t_, best_isa()));
    ref::RunningStats rs{to_double(rm), to_double(rv), 2};
    const ref::ForwardResult r =
        ref::forward(v_, rp, d_.x.data(), d_.weight.data(), d_.bias.data(), &rs);
    EXPECT_TRUE(tensor_near("y_eval", f.y.data(), r.y, v_, kTensorTol,
                            output_scale(v_, d_.x.data(), r, d_.weight.data(), d_.bias.data())));
    EXPECT_EQ(rm, d_.running_mean);
    EXPECT_EQ(rv, d_.running_var);
    EXPECT_EQ(nbt, 2);
}

// dweight and dbias may be null: dx is still computed.
TEST_P(RunningStatsTest, BackwardWithoutParameterGradients) {
    ng_batch_norm_params p = ng_batch_norm_params_default();
    ref::Params rp;
    rp.track_running_stats = false;  // only the batch statistics are wanted
    const ref::ForwardResult fwd =
        ref::forward(v_, rp, d_.x.data(), d_.weight.data(), d_.bias.data(), nullptr);
    const std::vector<float> sm(fwd.mean.begin(), fwd.mean.end()),
        si(fwd.invstd.begin(), fwd.invstd.end());
    ng_plan *raw = nullptr;
    ASSERT_EQ(ng_plan_create(runtime_for_isa(best_isa()), NG_OP_BACKWARD, &t_, &p, &raw), NG_OK)
        << ng_last_error();
    PlanPtr plan(raw);
    Guarded dx(v_.size());
    ASSERT_EQ(ng_batch_norm_backward(plan.get(), d_.x.data(), d_.dy.data(), nullptr,
                                     d_.weight.data(), nullptr, nullptr, nullptr, sm.data(),
                                     si.data(), dx.data(), nullptr, nullptr, nullptr),
              NG_OK)
        << ng_last_error();
    const ref::BackwardResult br = ref::backward(v_, d_.x.data(), d_.dy.data(), d_.weight.data(),
                                                 nullptr, nullptr, sm.data(), si.data(), true,
                                                 p.eps);
    EXPECT_TRUE(tensor_near("dx", dx.data(), br.dx, v_, kTensorTol,
                            gradient_scale(v_, d_.dy.data(), d_.weight.data(), br.invstd)));
    EXPECT_TRUE(dx.check_canaries("dx"));
}

// Non-finite input propagates as in PyTorch: a NaN makes its channel's outputs NaN and leaves
// the other channels exact.
TEST_P(RunningStatsTest, NanStaysInItsChannel) {
    std::vector<float> x = d_.x;
    const int64_t bad_c = 2;
    x[size_t(v_.at(1, bad_c, 3))] = NAN;
    std::vector<float> rm = d_.running_mean, rv = d_.running_var;
    int64_t nbt = 0;
    Forward f = run_forward(t_, ng_batch_norm_params_default(), x.data(), d_.weight.data(),
                            d_.bias.data(), rm.data(), rv.data(), &nbt);
    ASSERT_EQ(f.status, NG_OK);
    std::vector<float> rm2 = d_.running_mean, rv2 = d_.running_var;
    Forward clean = run_forward(t_, ng_batch_norm_params_default(), d_.x.data(),
                                d_.weight.data(), d_.bias.data(), rm2.data(), rv2.data(), nullptr);
    ASSERT_EQ(clean.status, NG_OK);
    int64_t nan_in_bad = 0, wrong_elsewhere = 0;
    v_.for_each([&](int64_t c, int64_t i) {
        if (c == bad_c)
            nan_in_bad += std::isnan(f.y[i]);
        else
            wrong_elsewhere += f.y[i] != clean.y[i];
    });
    EXPECT_EQ(nan_in_bad, v_.n * v_.s) << "channel " << bad_c << " must be all NaN";
    EXPECT_EQ(wrong_elsewhere, 0) << "a NaN leaked into other channels";
    EXPECT_TRUE(std::isnan(f.save_mean[bad_c])) << f.save_mean[bad_c];
    EXPECT_TRUE(std::isnan(f.save_invstd[bad_c])) << f.save_invstd[bad_c];
    EXPECT_TRUE(std::isnan(rm[bad_c])) << rm[bad_c];
    EXPECT_TRUE(std::isnan(rv[bad_c])) << rv[bad_c] << " (was " << d_.running_var[bad_c] << ")";
    EXPECT_FALSE(std::isnan(rm[bad_c + 1]));
}

INSTANTIATE_TEST_SUITE_P(Formats, RunningStatsTest,
                         ::testing::Values(NG_CONTIGUOUS, NG_CHANNELS_LAST),
                         [](const auto &info) {
                             return std::string(info.param == NG_CHANNELS_LAST ? "cl" : "contig");
                         });

class ReportEnvironment : public ::testing::Environment {
    void TearDown() override { print_error_report(); }
};
const auto *const kReport = ::testing::AddGlobalTestEnvironment(new ReportEnvironment);

}  // namespace
}  // namespace normgen::test

// Parity with libtorch: normgen, through its runtime, against torch::nn::functional::batch_norm
// + autograd (and the BatchNorm1d/2d/3d modules for their running-statistics bookkeeping), for
// BatchNorm1d (2-D and 3-D input), 2d and 3d, contiguous and channels-last.
//
// Tolerance: allclose with rtol 1e-5 (issue 2) and an atol, per quantity, set by the size of
// the values compared: both libraries round each output to fp32 from terms of magnitude up to
// a few times the output's, so near-zero outputs carry absolute errors of a few ulps of those
// terms, which rtol alone cannot allow for:
//   y, dx:          atol 1e-5  (terms are O(1..10): data mean/std O(1), weights O(1))
//   dweight, dbias: atol 1e-5 * sqrt(M) (sums of M terms of O(1) with random signs, whose
//                   size is ~sqrt(M); libtorch accumulates partial sums in fp32)
//   running stats:  atol 1e-6  (values O(1), updated in double by both)
#include "test_support.h"

#include <torch/torch.h>

#include <omp.h>

#include <cmath>

namespace normgen::test {
namespace {

namespace F = torch::nn::functional;

constexpr double kRtol = 1e-5;
constexpr double kAtol = 1e-5;

// ---- Tensors in normgen's storage order ----------------------------------------------------

// Storage order of the layout: contiguous is (N, C, spatial...), channels-last is
// (N, spatial..., C). A torch tensor of the logical shape is a permuted view of it.
std::vector<int64_t> storage_permutation(int ndim, bool channels_last) {
    std::vector<int64_t> perm;
    perm.push_back(0);
    if (channels_last) {
        for (int d = 2; d < ndim; d++) perm.push_back(d);
        perm.push_back(1);
    } else {
        for (int d = 1; d < ndim; d++) perm.push_back(d);
    }
    return perm;
}

// The torch tensor (logical shape, normgen's strides) over a copy of data in storage order.
torch::Tensor from_storage(const std::vector<float> &data, const std::vector<int64_t> &shape,
                           bool channels_last) {
    const auto perm = storage_permutation(int(shape.size()), channels_last);
    std::vector<int64_t> stored;
    for (int64_t p : perm) stored.push_back(shape[size_t(p)]);
    torch::Tensor s = torch::from_blob(const_cast<float *>(data.data()), stored).clone();
    std::vector<int64_t> inverse(perm.size());
    for (size_t i = 0; i < perm.size(); i++) inverse[size_t(perm[i])] = int64_t(i);
    return s.permute(inverse);
}

// A torch tensor's values in normgen's storage order.
std::vector<float> to_storage(const torch::Tensor &t, bool channels_last) {
    const torch::Tensor s =
        t.detach().permute(storage_permutation(int(t.dim()), channels_last)).contiguous();
    return {s.data_ptr<float>(), s.data_ptr<float>() + s.numel()};
}

std::vector<float> to_vector(const torch::Tensor &t) {
    const torch::Tensor c = t.detach().contiguous();
    return {c.data_ptr<float>(), c.data_ptr<float>() + c.numel()};
}

// allclose(got, want, rtol, atol), naming the worst element on failure.
::testing::AssertionResult allclose(const std::string &what, const std::vector<float> &got,
                                    const std::vector<float> &want, double atol,
                                    double rtol = kRtol) {
    if (got.size() != want.size())
        return ::testing::AssertionFailure() << what << ": sizes " << got.size() << " vs "
                                             << want.size();
    size_t bad = 0, worst_i = 0;
    double worst = 0;
    for (size_t i = 0; i < got.size(); i++) {
        const double err = std::fabs(double(got[i]) - want[i]);
        const double excess = err / (atol + rtol * std::fabs(want[i]));
        if (!(excess <= 1)) bad++;
        if (!(excess <= worst)) worst = excess, worst_i = i;
    }
    record_error(what.substr(0, what.find(' ')) + " [of tolerance]", worst);
    if (bad == 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << what << ": " << bad << " of " << got.size() << " elements not close (atol " << atol
           << ", rtol " << rtol << "); worst at " << worst_i << ": normgen " << got[worst_i]
           << ", torch " << want[worst_i];
}

// ---- Cases -------------------------------------------------------------------------------

struct ParityCase {
    std::vector<int64_t> shape;
    bool channels_last;
};

// BatchNorm1d on (N, C) (one layout) and (N, C, L) (also channels-last: (N, L, C) transposed,
// as transformer/audio models produce), 2d and 3d in both memory formats; odd extents.
const std::vector<ParityCase> kCases = {
    {{16, 7}, false},         {{5, 33}, false},           {{4, 6, 17}, false},
    {{4, 6, 17}, true},       {{3, 20, 50}, false},       {{4, 5, 7, 9}, false},
    {{4, 5, 7, 9}, true},     {{8, 16, 14, 14}, false},   {{8, 16, 14, 14}, true},
    {{1, 19, 6, 6}, false},   {{1, 19, 6, 6}, true},      {{2, 3, 4, 5, 6}, false},
    {{2, 3, 4, 5, 6}, true},  {{2, 17, 3, 4, 4}, false},  {{2, 17, 3, 4, 4}, true}};

std::string case_name(const ::testing::TestParamInfo<ParityCase> &info) {
    std::string s;
    for (size_t i = 0; i < info.param.shape.size(); i++)
        s += (i ? "x" : "") + std::to_string(info.param.shape[i]);
    return s + (info.param.channels_last ? "_cl" : "_contig");
}

struct Data {
    ng_tensor t{};
    ref::View v;
    std::vector<float> x, dy, weight, bias, running_mean, running_var;
};

Data make_data(const ParityCase &pc, uint64_t seed) {
    Data d;
    d.t = make_tensor(pc.shape, pc.channels_last ? NG_CHANNELS_LAST : NG_CONTIGUOUS);
    d.v = view_of(d.t);
    Rng rng(seed);
    std::vector<double> mean(d.v.c), scale(d.v.c);
    for (int64_t c = 0; c < d.v.c; c++) mean[c] = rng.uniform(-2, 2), scale[c] = rng.uniform(0.5, 2);
    d.x.resize(d.v.size());
    fill_tensor(d.v, d.x.data(), rng, mean, scale);
    d.dy = uniform_vector(d.v.size(), rng, -1, 1);
    d.weight = uniform_vector(d.v.c, rng, 0.5, 1.5);
    d.bias = uniform_vector(d.v.c, rng, -1, 1);
    d.running_mean = uniform_vector(d.v.c, rng, -1, 1);
    d.running_var = uniform_vector(d.v.c, rng, 0.5, 2);
    return d;
}

torch::Tensor vec_tensor(const std::vector<float> &v) {
    return torch::tensor(at::ArrayRef<float>(v.data(), v.size()));
}

ng_runtime *runtime() { return runtime_for_isa(best_isa()); }

PlanPtr plan_for(ng_op op, const ng_tensor &t, const ng_batch_norm_params &p) {
    ng_plan *raw = nullptr;
    EXPECT_EQ(ng_plan_create(runtime(), op, &t, &p, &raw), NG_OK) << ng_last_error();
    return PlanPtr(raw);
}

class TorchParity : public ::testing::TestWithParam<ParityCase> {};

// Training forward (momentum 0.1) and its backward, and eval forward and backward, against
// F::batch_norm + autograd; save_mean/save_invstd against aten::native_batch_norm.
TEST_P(TorchParity, FunctionalForwardBackward) {
    const ParityCase &pc = GetParam();
    const Data d = make_data(pc, 1234 + pc.shape.size() * 7 + uint64_t(pc.shape[1]));
    const ref::View &v = d.v;
    const bool cl = pc.channels_last;
    const double grad_atol = kAtol * std::sqrt(double(v.n * v.s));
    for (bool training : {true, false}) {
        SCOPED_TRACE(training ? "training" : "eval");
        // libtorch
        torch::Tensor x = from_storage(d.x, pc.shape, cl).requires_grad_(true);
        ASSERT_EQ(to_storage(x, cl), d.x);
        torch::Tensor w = vec_tensor(d.weight).requires_grad_(true);
        torch::Tensor b = vec_tensor(d.bias).requires_grad_(true);
        torch::Tensor rm = vec_tensor(d.running_mean), rv = vec_tensor(d.running_var);
        torch::Tensor y = F::batch_norm(
            x, rm, rv,
            F::BatchNormFuncOptions().weight(w).bias(b).training(training).momentum(0.1).eps(1e-5));
        y.backward(from_storage(d.dy, pc.shape, cl));
        auto [y2, torch_save_mean, torch_save_invstd] = at::native_batch_norm(
            x.detach(), w.detach(), b.detach(), vec_tensor(d.running_mean),
            vec_tensor(d.running_var), training, 0.1, 1e-5);

        // normgen
        ng_batch_norm_params p = ng_batch_norm_params_default();
        p.training = training;
        PlanPtr fwd = plan_for(NG_OP_FORWARD, d.t, p), bwd = plan_for(NG_OP_BACKWARD, d.t, p);
        ASSERT_TRUE(fwd && bwd);
        std::vector<float> ny(v.size()), sm(v.c), si(v.c), nrm = d.running_mean,
                                                            nrv = d.running_var;
        std::vector<float> ndx(v.size()), ndw(v.c), ndb(v.c);
        int64_t nbt = 0;
        ASSERT_EQ(ng_batch_norm_forward(fwd.get(), d.x.data(), nullptr, ny.data(),
                                        d.weight.data(), d.bias.data(), nrm.data(), nrv.data(),
                                        &nbt, sm.data(), si.data()),
                  NG_OK)
            << ng_last_error();
        ASSERT_EQ(ng_batch_norm_backward(bwd.get(), d.x.data(), d.dy.data(), nullptr,
                                         d.weight.data(), nullptr, nrm.data(), nrv.data(),
                                         training ? sm.data() : nullptr,
                                         training ? si.data() : nullptr, ndx.data(), ndw.data(),
                                         ndb.data(), nullptr),
                  NG_OK)
            << ng_last_error();

        EXPECT_TRUE(allclose("y", ny, to_storage(y, cl), kAtol));
        EXPECT_TRUE(allclose("running_mean", nrm, to_vector(rm), 1e-6));
        EXPECT_TRUE(allclose("running_var", nrv, to_vector(rv), 1e-6));
        if (training) {
            EXPECT_TRUE(allclose("save_mean", sm, to_vector(torch_save_mean), 1e-6));
            EXPECT_TRUE(allclose("save_invstd", si, to_vector(torch_save_invstd), 1e-6));
        }
        EXPECT_TRUE(allclose("dx", ndx, to_storage(x.grad(), cl), kAtol));
        EXPECT_TRUE(allclose("dweight", ndw, to_vector(w.grad()), grad_atol));
        EXPECT_TRUE(allclose("dbias", ndb, to_vector(b.grad()), grad_atol));
    }
}

// The module's bookkeeping, over several batches: momentum None (cumulative average and
// num_batches_tracked), affine off (no parameters, no parameter gradients) and
// track_running_stats off (batch statistics in eval too), in train and eval.
template <typename Module, typename Options>
void check_module(const ParityCase &pc, Options opts, const ng_batch_norm_params &base) {
    Module m(opts);
    const bool cl = pc.channels_last;
    int64_t nbt = 0;
    std::vector<float> nrm, nrv;
    for (int step = 0; step < 4; step++) {
        const bool training = step != 2;  // train, train, eval, train
        SCOPED_TRACE("step " + std::to_string(step) + (training ? " train" : " eval"));
        const Data d = make_data(pc, 99 + uint64_t(step));
        const ref::View &v = d.v;
        if (step == 0) {
            nrm.assign(size_t(v.c), 0.0f);
            nrv.assign(size_t(v.c), 1.0f);
        }
        training ? m->train() : m->eval();
        m->zero_grad();
        torch::Tensor x = from_storage(d.x, pc.shape, cl).requires_grad_(true);
        torch::Tensor y = m->forward(x);
        y.backward(from_storage(d.dy, pc.shape, cl));

        ng_batch_norm_params p = base;
        p.training = training;
        PlanPtr fwd = plan_for(NG_OP_FORWARD, d.t, p), bwd = plan_for(NG_OP_BACKWARD, d.t, p);
        ASSERT_TRUE(fwd && bwd);
        const bool affine = p.affine, track = p.track_running_stats;
        const std::vector<float> w(size_t(v.c), 1.0f), b(size_t(v.c), 0.0f);
        std::vector<float> ny(v.size()), sm(v.c), si(v.c), ndx(v.size()), ndw(v.c), ndb(v.c);
        ASSERT_EQ(ng_batch_norm_forward(fwd.get(), d.x.data(), nullptr, ny.data(),
                                        affine ? w.data() : nullptr, affine ? b.data() : nullptr,
                                        track ? nrm.data() : nullptr,
                                        track ? nrv.data() : nullptr, track ? &nbt : nullptr,
                                        sm.data(), si.data()),
                  NG_OK)
            << ng_last_error();
        const bool batch_stats = training || !track;
        ASSERT_EQ(ng_batch_norm_backward(bwd.get(), d.x.data(), d.dy.data(), nullptr,
                                         affine ? w.data() : nullptr, nullptr,
                                         track ? nrm.data() : nullptr,
                                         track ? nrv.data() : nullptr,
                                         batch_stats ? sm.data() : nullptr,
                                         batch_stats ? si.data() : nullptr, ndx.data(),
                                         affine ? ndw.data() : nullptr,
                                         affine ? ndb.data() : nullptr, nullptr),
                  NG_OK)
            << ng_last_error();

        EXPECT_TRUE(allclose("module_y", ny, to_storage(y, cl), kAtol));
        EXPECT_TRUE(allclose("module_dx", ndx, to_storage(x.grad(), cl), kAtol));
        if (affine) {
            const double grad_atol = kAtol * std::sqrt(double(v.n * v.s));
            EXPECT_TRUE(allclose("module_dweight", ndw, to_vector(m->weight.grad()), grad_atol));
            EXPECT_TRUE(allclose("module_dbias", ndb, to_vector(m->bias.grad()), grad_atol));
        } else {
            EXPECT_FALSE(m->weight.defined());
        }
        if (track) {
            EXPECT_TRUE(allclose("module_running_mean", nrm, to_vector(m->running_mean), 1e-6));
            EXPECT_TRUE(allclose("module_running_var", nrv, to_vector(m->running_var), 1e-6));
            EXPECT_EQ(nbt, m->num_batches_tracked.template item<int64_t>());
        }
    }
}

template <typename Module, typename Options>
void check_module_modes(const ParityCase &pc) {
    const int64_t C = pc.shape[1];
    ng_batch_norm_params p = ng_batch_norm_params_default();
    {
        SCOPED_TRACE("momentum None");
        ng_batch_norm_params q = p;
        q.momentum = NAN;
        check_module<Module>(pc, Options(C).momentum(c10::nullopt), q);
    }
    {
        SCOPED_TRACE("affine off");
        ng_batch_norm_params q = p;
        q.affine = 0;
        check_module<Module>(pc, Options(C).affine(false), q);
    }
    {
        SCOPED_TRACE("track_running_stats off");
        ng_batch_norm_params q = p;
        q.track_running_stats = 0;
        check_module<Module>(pc, Options(C).track_running_stats(false), q);
    }
    {
        SCOPED_TRACE("eps 1e-3, momentum 0.3");
        ng_batch_norm_params q = p;
        q.eps = 1e-3;
        q.momentum = 0.3;
        check_module<Module>(pc, Options(C).eps(1e-3).momentum(0.3), q);
    }
}

TEST_P(TorchParity, ModuleBookkeeping) {
    const ParityCase &pc = GetParam();
    switch (pc.shape.size()) {
    case 2:
    case 3:
        check_module_modes<torch::nn::BatchNorm1d, torch::nn::BatchNorm1dOptions>(pc);
        break;
    case 4:
        check_module_modes<torch::nn::BatchNorm2d, torch::nn::BatchNorm2dOptions>(pc);
        break;
    case 5:
        check_module_modes<torch::nn::BatchNorm3d, torch::nn::BatchNorm3dOptions>(pc);
        break;
    default:
        FAIL() << "no module for ndim " << pc.shape.size();
    }
}

INSTANTIATE_TEST_SUITE_P(Shapes, TorchParity, ::testing::ValuesIn(kCases), case_name);

// The same message for one value per channel in training.
TEST(TorchParityErrors, OneValuePerChannel) {
    const std::vector<float> x = {1, 2, 3, 4};
    torch::Tensor tx = from_storage(x, {1, 4}, false);
    std::string torch_msg;
    try {
        F::batch_norm(tx, torch::zeros({4}), torch::ones({4}),
                      F::BatchNormFuncOptions().training(true));
    } catch (const c10::Error &e) {
        torch_msg = e.what_without_backtrace();
    }
    ASSERT_FALSE(torch_msg.empty()) << "libtorch accepted one value per channel";
    const ng_tensor t = make_tensor({1, 4}, NG_CONTIGUOUS);
    const ng_batch_norm_params p = ng_batch_norm_params_default();
    ng_plan *plan = nullptr;
    EXPECT_EQ(ng_plan_create(runtime(), NG_OP_FORWARD, &t, &p, &plan), NG_INVALID_ARGUMENT);
    const std::string prefix = "Expected more than 1 value per channel when training";
    EXPECT_NE(torch_msg.find(prefix), std::string::npos) << torch_msg;
    EXPECT_NE(std::string(ng_last_error()).find(prefix), std::string::npos) << ng_last_error();
}

// Stability (issue 2): mean 1e4, std 1. normgen's y must be at least as close to float64 as
// libtorch's own fp32 result; both errors are printed.
TEST(TorchParityStability, AtLeastAsCloseToFloat64AsTorch) {
    for (bool cl : {false, true}) {
        SCOPED_TRACE(cl ? "channels-last" : "contiguous");
        const std::vector<int64_t> shape = {8, 3, 64, 64};
        const ng_tensor t = make_tensor(shape, cl ? NG_CHANNELS_LAST : NG_CONTIGUOUS);
        const ref::View v = view_of(t);
        Rng rng(42);
        std::vector<float> x(v.size());
        for (auto &e : x) e = float(1e4 + rng.normal());
        const std::vector<float> w = {1.0f, 0.5f, 2.0f}, b = {0.0f, 0.25f, -1.0f};

        ref::Params rp;
        rp.track_running_stats = false;
        const ref::ForwardResult r = ref::forward(v, rp, x.data(), w.data(), b.data(), nullptr);

        torch::Tensor ty = F::batch_norm(from_storage(x, shape, cl), torch::Tensor(),
                                         torch::Tensor(),
                                         F::BatchNormFuncOptions()
                                             .weight(vec_tensor(w))
                                             .bias(vec_tensor(b))
                                             .training(true)
                                             .eps(1e-5));
        const std::vector<float> torch_y = to_storage(ty, cl);

        ng_batch_norm_params p = ng_batch_norm_params_default();
        p.track_running_stats = 0;
        PlanPtr plan = plan_for(NG_OP_FORWARD, t, p);
        std::vector<float> y(v.size());
        ASSERT_EQ(ng_batch_norm_forward(plan.get(), x.data(), nullptr, y.data(), w.data(),
                                        b.data(), nullptr, nullptr, nullptr, nullptr, nullptr),
                  NG_OK)
            << ng_last_error();
        double ours = 0, theirs = 0;
        for (int64_t i = 0; i < v.size(); i++) {
            ours = std::max(ours, std::fabs(y[i] - r.y[i]));
            theirs = std::max(theirs, std::fabs(torch_y[i] - r.y[i]));
        }
        std::printf("stability (%s): max |y - float64|: normgen %.3g, libtorch %.3g\n",
                    cl ? "channels-last" : "contiguous", ours, theirs);
        record_error("stable_y_normgen", ours);
        record_error("stable_y_libtorch", theirs);
        EXPECT_LE(ours, theirs);
        EXPECT_LE(ours, 1e-4);
    }
}

class Environment : public ::testing::Environment {
    void SetUp() override {
        // libtorch and normgen share the process's OpenMP pool: give both the same team size.
        at::set_num_threads(omp_get_max_threads());
    }
    void TearDown() override { print_error_report(); }
};
const auto *const kEnvironment = ::testing::AddGlobalTestEnvironment(new Environment);

}  // namespace
}  // namespace normgen::test

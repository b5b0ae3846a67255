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
//
// The fused forms (issue 3), y = relu(batch_norm(x) + z) and its ReLU-only and add-only
// variants, against the same ops composed in libtorch with autograd (dx, dz, dweight, dbias),
// in fp32 and bf16: see FusedParity below for their tolerances.
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

// ---- Fused forms: bn -> add -> relu, with autograd --------------------------------------------

// libtorch composes y = relu(batch_norm(x) + z) from three ops; normgen runs one kernel each way.
// Two checks per output: normgen against libtorch directly, and both against the float64
// reference (reference.h), where normgen must be at least as close as libtorch or within its
// own bound (test_kernels.cpp), as FlashAttention checks its low-precision error against the
// framework's own. Magnitudes: T = |x - mean| * invstd * |w| + |b| + |z| for y (the terms of
// pre), G = invstd * |w| * max|dy| per channel for dx (gradient_scale), and the sums of the
// absolute terms for dweight / dbias.
//  fp32: the issue-2 tolerances against libtorch (rtol 1e-5, atol 1e-5 for y and dx;
//        atol 1e-5 * sqrt(M) for dweight/dbias); dz exact.
//  bf16: libtorch rounds twice in the forward (batch_norm's output to bf16, then the sum)
//        where normgen rounds once: |y_normgen - y_torch| <= 2^-8 |bn| + 2 * 2^-8 |pre| <=
//        3 * 2^-8 * T (half-ulp steps of bf16), + kAtol. Backward: both start from the same
//        bf16 dy, x, z, but libtorch 1.13's channels-last path for 3-D and 5-D bf16 inputs
//        accumulates dbias (and the sums dx uses) at bf16 precision: its dbias is off by up to
//        0.7% (0.9 bf16 ulp) and its dx by up to 0.0083 G where normgen's is 0.0038 G
//        (measured; normgen's dbias is exact). So: dx within 2^-6 G (4 half ulps of bf16 at the
//        gradient's terms), dweight / dbias within rtol 2^-6 (2 bf16 ulps); dz exact.
// The ReLU masks: libtorch's is y > 0 with its own rounded y, normgen's recomputes pre in fp32;
// where |pre| (float64) is within the forward tolerance band (3 * 2^-8 * T in bf16, 1e-5 * T in
// fp32) the two may legitimately disagree, so dy is set to 0 there (either mask then gives the
// same gradient) and every output is still compared everywhere. The count is reported
// ("fused_mask_band [elements]").
constexpr double kBf16FusedY = 3 * 0x1p-8;  // of T
constexpr double kBf16FusedDx = 0x1p-6;     // of G
constexpr double kBf16FusedSums = 0x1p-6;   // relative, dweight and dbias
// normgen's own bounds against float64 (test_kernels.cpp): fp32 2e-6 of the terms; bf16 half
// an ulp of the terms more; dweight/dbias 1e-6 relative (fp32 outputs in both dtypes).
constexpr double kOwnTensorBound = 2e-6, kOwnBf16Rounding = 0x1p-8, kOwnSumBound = 1e-6;

struct FusedCase {
    std::vector<int64_t> shape;
    bool channels_last;
    ng_dtype dtype;
};

const std::vector<FusedCase> kFusedCases = [] {
    std::vector<FusedCase> cases;
    for (ng_dtype dt : {NG_F32, NG_BF16})
        for (const ParityCase &pc : std::vector<ParityCase>{{{16, 7}, false},
                                                            {{4, 6, 17}, true},
                                                            {{4, 5, 7, 9}, false},
                                                            {{4, 5, 7, 9}, true},
                                                            {{8, 16, 14, 14}, true},
                                                            {{2, 3, 4, 5, 6}, false},
                                                            {{2, 17, 3, 4, 4}, true}})
            cases.push_back({pc.shape, pc.channels_last, dt});
    return cases;
}();

torch::Tensor torch_tensor(const std::vector<float> &data, const std::vector<int64_t> &shape,
                           bool channels_last, ng_dtype dtype) {
    torch::Tensor t = from_storage(data, shape, channels_last);  // values exact in dtype
    return dtype == NG_BF16 ? t.to(torch::kBFloat16) : t;
}

std::vector<float> torch_storage(const torch::Tensor &t, bool channels_last) {
    return to_storage(t.detach().to(torch::kFloat), channels_last);
}

// |got - want| <= tol[i] for every element.
::testing::AssertionResult within(const std::string &what, const std::vector<float> &got,
                                  const std::vector<float> &want, const std::vector<double> &tol) {
    size_t bad = 0, worst_i = 0;
    double worst = 0;
    for (size_t i = 0; i < got.size(); i++) {
        const double excess = std::fabs(double(got[i]) - want[i]) / tol[i];
        if (!(excess <= 1)) bad++;
        if (!(excess <= worst)) worst = excess, worst_i = i;
    }
    record_error(what.substr(0, what.find(' ')) + " [of tolerance]", worst);
    if (bad == 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << what << ": " << bad << " of " << got.size() << " elements beyond tolerance; worst at "
           << worst_i << ": normgen " << got[worst_i] << ", torch " << want[worst_i]
           << " (tolerance " << tol[worst_i] << ")";
}

class FusedParity : public ::testing::TestWithParam<FusedCase> {};

TEST_P(FusedParity, ForwardBackwardWithAutograd) {
    const FusedCase &fc = GetParam();
    const bool cl = fc.channels_last, bf16 = fc.dtype == NG_BF16;
    const ParityCase pc{fc.shape, cl};
    Data d = make_data(pc, 4321 + fc.shape.size() * 7 + uint64_t(fc.shape[1]));
    d.t.dtype = fc.dtype;
    const ref::View &v = d.v;
    Rng rng(99);
    std::vector<float> z = uniform_vector(v.size(), rng, -2, 2);
    d.x = round_to(d.x, fc.dtype);
    d.dy = round_to(d.dy, fc.dtype);
    z = round_to(z, fc.dtype);
    const double grad_atol = kAtol * std::sqrt(double(v.n * v.s));
    const auto torch_type = bf16 ? torch::kBFloat16 : torch::kFloat;
    const FusedOps kFusions[] = {{true, false}, {false, true}, {true, true}};  // relu, add, both
    for (const FusedOps &fused : kFusions)
        for (bool training : {true, false}) {
            SCOPED_TRACE(fusion_name(fused) + (training ? " training" : " eval"));
            // The reference bn(x) (no fusion), for the terms T and the mask band.
            ref::Params rp;
            rp.training = training;
            rp.track_running_stats = !training;  // training: batch statistics only
            ref::RunningStats rs{{d.running_mean.begin(), d.running_mean.end()},
                                 {d.running_var.begin(), d.running_var.end()}, 0};
            const ref::ForwardResult bn = ref::forward(v, rp, d.x.data(), d.weight.data(),
                                                       d.bias.data(), training ? nullptr : &rs);
            std::vector<double> terms(size_t(v.size()));
            std::vector<float> dy = d.dy;
            int64_t band = 0;
            const double band_rel = bf16 ? kBf16FusedY : 1e-5;
            v.for_each([&](int64_t c, int64_t i) {
                const double zi = fused.residual ? std::fabs(z[i]) : 0.0;
                terms[i] = std::fabs(d.x[i] - bn.mean[c]) * bn.invstd[c] * std::fabs(d.weight[c]) +
                           std::fabs(d.bias[c]) + zi;
                const double pre = bn.y[i] + (fused.residual ? double(z[i]) : 0.0);
                if (fused.relu && std::fabs(pre) <= band_rel * terms[i]) {
                    dy[i] = 0.0f;
                    band++;
                }
            });
            record_error("fused_mask_band [elements]", double(band));

            // libtorch: batch_norm -> (+ z) -> (relu), autograd for the gradients.
            torch::Tensor x = torch_tensor(d.x, pc.shape, cl, fc.dtype).requires_grad_(true);
            torch::Tensor tz = torch_tensor(z, pc.shape, cl, fc.dtype).requires_grad_(true);
            ASSERT_EQ(x.scalar_type(), torch_type);
            torch::Tensor w = vec_tensor(d.weight).requires_grad_(true);
            torch::Tensor b = vec_tensor(d.bias).requires_grad_(true);
            torch::Tensor rm = vec_tensor(d.running_mean), rv = vec_tensor(d.running_var);
            torch::Tensor y = F::batch_norm(
                x, rm, rv,
                F::BatchNormFuncOptions().weight(w).bias(b).training(training).momentum(0.1).eps(
                    1e-5));
            if (fused.residual) y = y + tz;
            if (fused.relu) y = torch::relu(y);
            ASSERT_EQ(y.scalar_type(), torch_type);
            y.backward(torch_tensor(dy, pc.shape, cl, fc.dtype));

            // normgen
            ng_batch_norm_params p = ng_batch_norm_params_default();
            p.training = training;
            set_fusion(p, fused);
            PlanPtr fwd = plan_for(NG_OP_FORWARD, d.t, p), bwd = plan_for(NG_OP_BACKWARD, d.t, p);
            ASSERT_TRUE(fwd && bwd);
            GuardedTensor nx(fc.dtype, v.size()), nz(fc.dtype, v.size()), ndy(fc.dtype, v.size()),
                ny(fc.dtype, v.size()), ndx(fc.dtype, v.size()), ndz(fc.dtype, v.size());
            nx.assign(d.x);
            nz.assign(z);
            ndy.assign(dy);
            std::vector<float> sm(v.c), si(v.c), nrm = d.running_mean, nrv = d.running_var,
                                                 ndw(v.c), ndb(v.c);
            int64_t nbt = 0;
            ASSERT_EQ(ng_batch_norm_forward(fwd.get(), nx.data(),
                                            fused.residual ? nz.data() : nullptr, ny.data(),
                                            d.weight.data(), d.bias.data(), nrm.data(),
                                            nrv.data(), &nbt, sm.data(), si.data()),
                      NG_OK)
                << ng_last_error();
            ASSERT_EQ(ng_batch_norm_backward(
                          bwd.get(), nx.data(), ndy.data(),
                          fused.residual && fused.relu ? nz.data() : nullptr, d.weight.data(),
                          d.bias.data(), nrm.data(), nrv.data(), training ? sm.data() : nullptr,
                          training ? si.data() : nullptr, ndx.data(), ndw.data(), ndb.data(),
                          fused.residual ? ndz.data() : nullptr),
                      NG_OK)
                << ng_last_error();

            const std::string sfx = bf16 ? "_bf16" : "";
            const std::vector<float> ty = torch_storage(y, cl), tdx = torch_storage(x.grad(), cl);
            const std::vector<float> ny_v = ny.values(), ndx_v = ndx.values();
            const std::vector<float> tdw = to_vector(w.grad()), tdb = to_vector(b.grad());

            // Against each other.
            const std::vector<double> gscale =
                gradient_scale(v, dy.data(), d.weight.data(), bn.invstd);
            if (bf16) {
                std::vector<double> ytol(terms.size()), dxtol(terms.size());
                v.for_each([&](int64_t c, int64_t i) {
                    ytol[i] = kBf16FusedY * terms[i] + kAtol;
                    dxtol[i] = kBf16FusedDx * gscale[c] + kAtol;
                });
                EXPECT_TRUE(within("fused_y_bf16", ny_v, ty, ytol));
                EXPECT_TRUE(within("fused_dx_bf16", ndx_v, tdx, dxtol));
                EXPECT_TRUE(allclose("fused_dweight_bf16", ndw, tdw, grad_atol, kBf16FusedSums));
                EXPECT_TRUE(allclose("fused_dbias_bf16", ndb, tdb, grad_atol, kBf16FusedSums));
            } else {
                EXPECT_TRUE(allclose("fused_y", ny_v, ty, kAtol));
                EXPECT_TRUE(allclose("fused_dx", ndx_v, tdx, kAtol));
                EXPECT_TRUE(allclose("fused_dweight", ndw, tdw, grad_atol));
                EXPECT_TRUE(allclose("fused_dbias", ndb, tdb, grad_atol));
            }
            if (fused.residual) {
                // z's gradient: dy through relu's mask (or dy): the same values in both.
                EXPECT_EQ(ndz.values(), torch_storage(tz.grad(), cl)) << "dz";
            }
            EXPECT_TRUE(allclose("fused_running_mean" + sfx, nrm, to_vector(rm), 1e-6));
            EXPECT_TRUE(allclose("fused_running_var" + sfx, nrv, to_vector(rv), 1e-6));

            // Both against float64: normgen at least as close as libtorch, or within its own
            // bound.
            ref::Params fp = rp;
            fp.relu = fused.relu;
            fp.residual = fused.residual;
            ref::RunningStats rs2{{d.running_mean.begin(), d.running_mean.end()},
                                  {d.running_var.begin(), d.running_var.end()}, 0};
            const ref::ForwardResult want_y =
                ref::forward(v, fp, d.x.data(), d.weight.data(), d.bias.data(),
                             training ? nullptr : &rs2, fused.residual ? z.data() : nullptr);
            const std::vector<float> ref_mean(bn.mean.begin(), bn.mean.end()),
                ref_invstd(bn.invstd.begin(), bn.invstd.end());
            ref::Fusion rf;
            rf.relu = fused.relu;
            rf.bias = d.bias.data();
            rf.z = fused.residual ? z.data() : nullptr;
            const ref::BackwardResult want_g = ref::backward(
                v, d.x.data(), dy.data(), d.weight.data(), d.running_mean.data(),
                d.running_var.data(), ref_mean.data(), ref_invstd.data(), training, 1e-5, rf);
            std::vector<double> dw_scale(size_t(v.c), 0.0), db_scale(size_t(v.c), 0.0);
            v.for_each([&](int64_t c, int64_t i) {
                const double xhat = (d.x[i] - bn.mean[c]) * bn.invstd[c];
                db_scale[c] += std::fabs(want_g.dz[i]);
                dw_scale[c] += std::fabs(want_g.dz[i] * xhat);
            });
            double ours[4] = {0, 0, 0, 0}, theirs[4] = {0, 0, 0, 0};  // y, dx, dweight, dbias
            auto worse = [](double &e, double v_) { e = std::max(e, v_); };
            v.for_each([&](int64_t c, int64_t i) {
                worse(ours[0], std::fabs(ny_v[i] - want_y.y[i]) / terms[i]);
                worse(theirs[0], std::fabs(ty[i] - want_y.y[i]) / terms[i]);
                worse(ours[1], std::fabs(ndx_v[i] - want_g.dx[i]) / gscale[c]);
                worse(theirs[1], std::fabs(tdx[i] - want_g.dx[i]) / gscale[c]);
            });
            for (int64_t c = 0; c < v.c; c++) {
                const double sw = std::max(dw_scale[c], 1e-30), sb = std::max(db_scale[c], 1e-30);
                worse(ours[2], std::fabs(ndw[c] - want_g.dweight[c]) / sw);
                worse(theirs[2], std::fabs(tdw[c] - want_g.dweight[c]) / sw);
                worse(ours[3], std::fabs(ndb[c] - want_g.dbias[c]) / sb);
                worse(theirs[3], std::fabs(tdb[c] - want_g.dbias[c]) / sb);
            }
            const double rounding = bf16 ? kOwnBf16Rounding : 0.0;
            const double own[4] = {kOwnTensorBound + rounding, kOwnTensorBound + rounding,
                                   kOwnSumBound, kOwnSumBound};
            const char *what[4] = {"y", "dx", "dweight", "dbias"};
            for (int q = 0; q < 4; q++) {
                record_error(std::string("fused_") + what[q] + sfx + " vs float64: normgen",
                             ours[q]);
                record_error(std::string("fused_") + what[q] + sfx + " vs float64: libtorch",
                             theirs[q]);
                EXPECT_LE(ours[q], std::max(theirs[q], own[q]))
                    << what[q] << ": normgen further from float64 than libtorch (libtorch "
                    << theirs[q] << ") and than its own bound " << own[q];
            }
        }
}

INSTANTIATE_TEST_SUITE_P(Shapes, FusedParity, ::testing::ValuesIn(kFusedCases),
                         [](const ::testing::TestParamInfo<FusedCase> &info) {
                             std::string s;
                             for (size_t i = 0; i < info.param.shape.size(); i++)
                                 s += (i ? "x" : "") + std::to_string(info.param.shape[i]);
                             return s + (info.param.channels_last ? "_cl_" : "_contig_") +
                                    dtype_name(info.param.dtype);
                         });

// A NaN through the fused forms, as libtorch's composed ops treat it: torch.relu(NaN) is NaN
// (relu is clamp_min, which propagates NaN), so in training the NaN's whole channel of y is NaN
// and in eval the element itself; a NaN in z makes its own element NaN. Backward in eval:
// relu's gradient is threshold_backward(dy, y, 0), which passes dy where y is NaN (NaN <= 0 is
// false), so dz = dy and dx = dy * invstd * w there. Outputs must have NaN where libtorch does
// and libtorch's values (fp32 tolerances) elsewhere.
TEST(FusedParityNaN, ReluAndResidualPropagateNaNLikeTorch) {
    const std::vector<int64_t> shape = {3, 4, 5};
    for (bool training : {true, false})
        for (const FusedOps &fused : {FusedOps{true, false}, FusedOps{true, true}}) {
            SCOPED_TRACE(fusion_name(fused) + (training ? " training" : " eval"));
            const ParityCase pc{shape, false};
            Data d = make_data(pc, 17);
            const ref::View &v = d.v;
            Rng rng(5);
            std::vector<float> z = uniform_vector(v.size(), rng, -2, 2);
            d.x[size_t(v.at(1, 2, 3))] = NAN;  // channel 2
            if (fused.residual) z[size_t(v.at(2, 0, 1))] = NAN;  // channel 0, one element

            torch::Tensor x = from_storage(d.x, shape, false).requires_grad_(true);
            torch::Tensor tz = from_storage(z, shape, false).requires_grad_(true);
            torch::Tensor w = vec_tensor(d.weight).requires_grad_(true);
            torch::Tensor b = vec_tensor(d.bias).requires_grad_(true);
            torch::Tensor y = F::batch_norm(x, vec_tensor(d.running_mean),
                                            vec_tensor(d.running_var),
                                            F::BatchNormFuncOptions().weight(w).bias(b).training(
                                                training));
            if (fused.residual) y = y + tz;
            y = torch::relu(y);
            y.backward(from_storage(d.dy, shape, false));

            ng_batch_norm_params p = ng_batch_norm_params_default();
            p.training = training;
            set_fusion(p, fused);
            PlanPtr fwd = plan_for(NG_OP_FORWARD, d.t, p), bwd = plan_for(NG_OP_BACKWARD, d.t, p);
            ASSERT_TRUE(fwd && bwd);
            std::vector<float> ny(v.size()), ndx(v.size()), ndz(v.size()), sm(v.c), si(v.c),
                rm = d.running_mean, rv = d.running_var, ndw(v.c), ndb(v.c);
            int64_t nbt = 0;
            const float *zp = fused.residual ? z.data() : nullptr;
            ASSERT_EQ(ng_batch_norm_forward(fwd.get(), d.x.data(), zp, ny.data(), d.weight.data(),
                                            d.bias.data(), rm.data(), rv.data(), &nbt, sm.data(),
                                            si.data()),
                      NG_OK)
                << ng_last_error();
            ASSERT_EQ(ng_batch_norm_backward(bwd.get(), d.x.data(), d.dy.data(), zp,
                                             d.weight.data(), d.bias.data(), rm.data(), rv.data(),
                                             training ? sm.data() : nullptr,
                                             training ? si.data() : nullptr, ndx.data(),
                                             ndw.data(), ndb.data(),
                                             fused.residual ? ndz.data() : nullptr),
                      NG_OK)
                << ng_last_error();
            auto same = [&](const char *what, const std::vector<float> &got,
                            const std::vector<float> &want) {
                int64_t nan_mismatch = 0, value_mismatch = 0, first = -1;
                for (size_t i = 0; i < got.size(); i++) {
                    const bool bad_nan = std::isnan(got[i]) != std::isnan(want[i]);
                    const bool bad_value =
                        !std::isnan(want[i]) &&
                        !(std::fabs(got[i] - want[i]) <= kAtol + kRtol * std::fabs(want[i]));
                    nan_mismatch += bad_nan;
                    value_mismatch += bad_value && !bad_nan;
                    if ((bad_nan || bad_value) && first < 0) first = int64_t(i);
                }
                EXPECT_EQ(nan_mismatch + value_mismatch, 0)
                    << what << ": " << nan_mismatch << " elements NaN in one and not the other, "
                    << value_mismatch << " other values differ; first at " << first
                    << ": normgen " << got[size_t(first)] << ", torch " << want[size_t(first)];
            };
            same("y", ny, to_storage(y, false));
            same("dx", ndx, to_storage(x.grad(), false));
            if (fused.residual) same("dz", ndz, to_storage(tz.grad(), false));
        }
}

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

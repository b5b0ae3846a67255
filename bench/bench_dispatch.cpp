// Dispatch overhead: what normgen's runtime adds over calling the kernel itself, on a tiny
// tensor (2x8x4, forward training: the kernel's own work is a few hundred nanoseconds).
//
//   BareKernel         the package's generic kernel called through Halide's argv entry point
//                      with pre-built buffer descriptors (the floor: no runtime at all)
//   PlanCall           ng_batch_norm_forward on an existing plan (validation, binding the host
//                      pointers, PyTorch's running-statistics bookkeeping, the kernel)
//   PlanCreateAndCall  ng_plan_create (kernel lookup in the package) + call + ng_plan_destroy
//
// Run: build/bin/bench_dispatch (-DNORMGEN_BUILD_BENCH=ON); NORMGEN_NUM_THREADS=1 keeps the
// kernel's parallel loop on the calling thread, so the figures are dispatch, not thread wake-ups.
#include <HalideRuntime.h>
#include <benchmark/benchmark.h>
#include <dlfcn.h>
#include <normgen/normgen.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr int32_t kN = 2, kC = 8, kS = 4;

struct Fixture {
    ng_runtime *rt = nullptr;
    ng_plan *plan = nullptr;
    ng_tensor t{3, {kN, kC, kS, 0, 0}, NG_CONTIGUOUS, NG_F32, NG_CPU};
    ng_batch_norm_params params = ng_batch_norm_params_default();
    std::vector<float> x = std::vector<float>(kN * kC * kS), y = x,
                       weight = std::vector<float>(kC, 1), bias = std::vector<float>(kC, 0),
                       rm = bias, rv = weight, mean = bias, invstd = bias, var = bias;
    int64_t batches = 0;
    double eps = 1e-5;
    // The bare kernel: entry point and argv built once from its Halide metadata.
    int (*entry)(void **) = nullptr;
    std::vector<halide_buffer_t> buffers;
    std::vector<std::vector<halide_dimension_t>> dims;
    std::vector<void *> args;

    Fixture() {
        for (size_t i = 0; i < x.size(); i++) x[i] = float(i % 7) - 3.0f;
        if (ng_runtime_open(nullptr, &rt) != NG_OK) throw std::runtime_error(ng_last_error());
        if (ng_plan_create(rt, NG_OP_FORWARD, &t, &params, &plan) != NG_OK)
            throw std::runtime_error(ng_last_error());
        // The kernel the plan chose (first word of its description), from the same file.
        const std::string chosen = std::string(ng_plan_describe(plan))
                                       .substr(0, std::string(ng_plan_describe(plan)).find(':'));
        std::string isa = chosen.substr(chosen.rfind('_') + 1);
        const std::string file =
            std::string(NORMGEN_BENCH_PACKAGE_DIR) + "/libkernels_x86-64-" + isa + ".so";
        void *lib = dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!lib) throw std::runtime_error(dlerror());
        entry = reinterpret_cast<int (*)(void **)>(dlsym(lib, (chosen + "_argv").c_str()));
        auto md_fn = reinterpret_cast<const halide_filter_metadata_t *(*)()>(
            dlsym(lib, (chosen + "_metadata").c_str()));
        if (!entry || !md_fn) throw std::runtime_error("no symbol " + chosen);
        const halide_filter_metadata_t *md = md_fn();
        buffers.resize(md->num_arguments);
        dims.resize(md->num_arguments);
        args.resize(md->num_arguments);
        for (int i = 0; i < md->num_arguments; i++) {
            const auto &a = md->arguments[i];
            const std::string name = a.name;
            if (a.kind == halide_argument_kind_input_scalar) {
                args[i] = &eps;
                continue;
            }
            halide_buffer_t &b = buffers[i];
            b.type = a.type;
            b.dimensions = a.dimensions;
            if (a.dimensions == 3)
                dims[i] = {{0, kS, 1, 0}, {0, kC, kS, 0}, {0, kN, kC * kS, 0}};
            else
                dims[i] = {{0, kC, 1, 0}};
            b.dim = dims[i].data();
            float *host = name == "x"             ? x.data()
                          : name == "y"           ? y.data()
                          : name == "weight"      ? weight.data()
                          : name == "bias"        ? bias.data()
                          : name == "save_mean"   ? mean.data()
                          : name == "save_invstd" ? invstd.data()
                                                  : var.data();  // batch_var
            b.host = reinterpret_cast<uint8_t *>(host);
            args[i] = &b;
        }
    }
    ~Fixture() {
        ng_plan_destroy(plan);
        ng_runtime_close(rt);
    }
    void call(ng_plan *p) {
        if (ng_batch_norm_forward(p, x.data(), nullptr, y.data(), weight.data(), bias.data(),
                                  rm.data(), rv.data(), &batches, mean.data(),
                                  invstd.data()) != NG_OK)
            throw std::runtime_error(ng_last_error());
    }
};

Fixture &fixture() {
    static Fixture f;
    return f;
}

void BareKernel(benchmark::State &state) {
    Fixture &f = fixture();
    for (auto _ : state) {
        if (f.entry(f.args.data()) != 0) state.SkipWithError("kernel failed");
        benchmark::DoNotOptimize(f.y.data());
    }
}

void PlanCall(benchmark::State &state) {
    Fixture &f = fixture();
    for (auto _ : state) {
        f.call(f.plan);
        benchmark::DoNotOptimize(f.y.data());
    }
}

void PlanCreateAndCall(benchmark::State &state) {
    Fixture &f = fixture();
    for (auto _ : state) {
        ng_plan *p = nullptr;
        if (ng_plan_create(f.rt, NG_OP_FORWARD, &f.t, &f.params, &p) != NG_OK)
            state.SkipWithError(ng_last_error());
        f.call(p);
        ng_plan_destroy(p);
        benchmark::DoNotOptimize(f.y.data());
    }
}

BENCHMARK(BareKernel)->Repetitions(9)->ReportAggregatesOnly(true);
BENCHMARK(PlanCall)->Repetitions(9)->ReportAggregatesOnly(true);
BENCHMARK(PlanCreateAndCall)->Repetitions(9)->ReportAggregatesOnly(true);

}  // namespace

BENCHMARK_MAIN();

// normgen — the command line.
//   normgen info [package_dir]               what a package holds and what this CPU can run
//   normgen tune [options] | tune merge ...  autotuning (runs normgen-tune, beside this binary)
//   normgen run  [options]                   run one op through the runtime on random data,
//                                            check it against the float64 reference, time it
//     --op forward|backward  --shape 32x64x56x56  --format contig|cl  --dtype f32|f16|bf16
//     --relu  --residual  --eval  --no-affine  --reps N  --package DIR  --seed N
#include "normgen/normgen.hpp"
#include "../tests/reference.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cerrno>
#include <cstring>
#include <unistd.h>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace ref = normgen::ref;

struct RunOptions {
    ng_op op = NG_OP_FORWARD;
    std::vector<int64_t> shape{32, 64, 56, 56};
    ng_memory_format format = NG_CONTIGUOUS;
    ng_dtype dtype = NG_F32;
    bool training = true, affine = true, relu = false, residual = false;
    int reps = 20;
    unsigned seed = 1;
    const char *package = nullptr;
};

int usage() {
    std::fprintf(stderr,
                 "usage: normgen info [package_dir]\n"
                 "       normgen tune [--isa ISA] [--shapes FILE] [--budget-minutes M] ... "
                 "(normgen tune --help)\n"
                 "       normgen run [--op forward|backward] [--shape 32x64x56x56] "
                 "[--format contig|cl] [--dtype f32|f16|bf16] [--relu] [--residual] [--eval] "
                 "[--no-affine] [--reps N] [--package DIR] [--seed N]\n");
    return 2;
}

std::vector<int64_t> parse_shape(const std::string &text) {
    std::vector<int64_t> shape;
    std::stringstream ss(text);
    std::string part;
    while (std::getline(ss, part, 'x')) shape.push_back(std::stoll(part));
    return shape;
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

void parallel_copy(const void *from, void *to, size_t bytes) {
    const auto *src = static_cast<const float *>(from);
    auto *dst = static_cast<float *>(to);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < bytes / sizeof(float); i++) dst[i] = src[i];
}

// A tensor in the plan's storage type, with the float value of every element.
struct Tensor {
    ref::Storage storage;
    std::vector<float> values;    // what the reference sees (exactly the stored values)
    std::vector<uint16_t> bits;   // the storage of f16 / bf16

    Tensor(ng_dtype dtype, size_t count)
        : storage(dtype == NG_F16 ? ref::Storage::F16
                  : dtype == NG_BF16 ? ref::Storage::BF16 : ref::Storage::F32),
          values(count), bits(storage == ref::Storage::F32 ? 0 : count) {}
    void *data() { return bits.empty() ? static_cast<void *>(values.data()) : bits.data(); }
    size_t bytes() const { return bits.empty() ? values.size() * 4 : bits.size() * 2; }
    // Fills with rounded random values (the stored and reference values agree exactly).
    template <typename Rng>
    void fill(Rng &&draw) {
        for (size_t i = 0; i < values.size(); i++) {
            const double v = ref::round_to_storage(draw(), storage);
            values[i] = static_cast<float>(v);
            if (!bits.empty()) bits[i] = ref::encode16(v, storage);
        }
    }
    // Decodes what a kernel wrote.
    void sync_from_storage() {
        for (size_t i = 0; i < bits.size(); i++) values[i] = ref::decode16(bits[i], storage);
    }
};

// Largest |got - want| / (1 + |want|): absolute near zero, relative for large values.
// skip[i]: elements not compared.
double max_error(const std::vector<float> &got, const std::vector<double> &want,
                 const std::vector<bool> &skip = {}) {
    double e = 0;
    for (size_t i = 0; i < want.size(); i++)
        if (skip.empty() || !skip[i])
            e = std::max(e, std::abs(got[i] - want[i]) / (1 + std::abs(want[i])));
    return e;
}

template <typename Call>
double time_median(int reps, Call &&call) {
    std::vector<double> ms;
    for (int r = 0; r < reps; r++) {
        auto t0 = std::chrono::steady_clock::now();
        call();
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() -
                                                               t0).count());
    }
    return median(ms);
}

int run(const RunOptions &o) {
    normgen::Runtime rt(o.package);
    ng_tensor desc{static_cast<int32_t>(o.shape.size()), {0, 0, 0, 0, 0}, o.format, o.dtype,
                   NG_CPU};
    for (size_t i = 0; i < o.shape.size() && i < 5; i++) desc.shape[i] = o.shape[i];
    ng_batch_norm_params params = ng_batch_norm_params_default();
    params.training = o.training;
    params.affine = o.affine;
    params.activation = o.relu ? NG_ACT_RELU : NG_ACT_NONE;
    params.residual = o.residual;
    normgen::Plan forward(rt, NG_OP_FORWARD, desc, params);

    ref::View view;
    view.n = o.shape.at(0);
    view.c = o.shape.at(1);
    for (size_t i = 2; i < o.shape.size(); i++) view.s *= o.shape[i];
    view.channels_last = o.format == NG_CHANNELS_LAST;
    const size_t count = static_cast<size_t>(view.size()), C = static_cast<size_t>(view.c);

    std::mt19937 rng(o.seed);
    std::normal_distribution<double> normal(0.5, 2.0);
    auto draw = [&] { return normal(rng); };
    Tensor x(o.dtype, count), z(o.dtype, count), y(o.dtype, count), dy(o.dtype, count),
        dx(o.dtype, count), dz(o.dtype, count);
    x.fill(draw);
    z.fill(draw);
    dy.fill(draw);
    std::vector<float> weight(C), bias(C), running_mean(C), running_var(C);
    std::vector<float> save_mean(C), save_invstd(C), dweight(C), dbias(C);
    for (size_t c = 0; c < C; c++) {
        weight[c] = static_cast<float>(1.0 + 0.1 * draw());
        bias[c] = static_cast<float>(0.1 * draw());
        running_mean[c] = static_cast<float>(0.1 * draw());
        running_var[c] = static_cast<float>(1.0 + 0.05 * std::abs(draw()));
    }
    ref::Params ref_params;
    ref_params.training = o.training;
    ref_params.affine = o.affine;
    ref_params.relu = o.relu;
    ref_params.residual = o.residual;
    ref::RunningStats ref_running;
    ref_running.mean.assign(running_mean.begin(), running_mean.end());
    ref_running.var.assign(running_var.begin(), running_var.end());
    const auto want = ref::forward(view, ref_params, x.values.data(), weight.data(), bias.data(),
                                   &ref_running, o.residual ? z.values.data() : nullptr);
    const std::vector<float> eval_mean = running_mean, eval_var = running_var;

    // One checked call, then timed repetitions (running stats keep moving; harmless here).
    int64_t batches = 0;
    auto call_forward = [&] {
        forward.forward(x.data(), y.data(), weight.data(), bias.data(), running_mean.data(),
                        running_var.data(), &batches, save_mean.data(), save_invstd.data(),
                        o.residual ? z.data() : nullptr);
    };
    call_forward();
    y.sync_from_storage();
    std::printf("forward  kernel %s\n", forward.describe().c_str());
    std::printf("forward  max error vs float64 reference: y %.2e", max_error(y.values, want.y));
    if (o.training)
        std::printf(", running_mean %.2e, running_var %.2e",
                    max_error(running_mean, ref_running.mean),
                    max_error(running_var, ref_running.var));
    std::printf("%s\n", o.dtype == NG_F32 ? "" : " (includes the storage type's rounding)");

    // This machine's bandwidth drifts: time a copy of the same tensor (the floor of any forward
    // kernel) right beside the kernel and report the kernel as a fraction of it.
    const double bytes = static_cast<double>(x.bytes());
    const double copy_ms = time_median(o.reps, [&] { parallel_copy(x.data(), y.data(), x.bytes()); });
    std::printf("copy     median %.3f ms, %.1f GB/s (the bandwidth reference)\n", copy_ms,
                2 * bytes / copy_ms / 1e6);
    if (o.op == NG_OP_FORWARD) {
        const double passes = o.residual ? 3 : 2;
        const double ms = time_median(o.reps, call_forward);
        std::printf("forward  median %.3f ms over %d runs, %.1f GB/s (%s), %.0f%% of copy speed\n",
                    ms, o.reps, passes * bytes / ms / 1e6,
                    o.residual ? "read x, z + write y" : "read x + write y",
                    100 * (passes * bytes / ms) / (2 * bytes / copy_ms));
        return 0;
    }

    normgen::Plan backward(rt, NG_OP_BACKWARD, desc, params);
    const bool batch_stats = o.training;
    ref::Fusion fusion;
    fusion.relu = o.relu;
    fusion.bias = o.affine ? bias.data() : nullptr;
    fusion.z = o.residual ? z.values.data() : nullptr;
    const auto grads = ref::backward(
        view, x.values.data(), dy.values.data(), o.affine ? weight.data() : nullptr,
        batch_stats ? nullptr : eval_mean.data(), batch_stats ? nullptr : eval_var.data(),
        batch_stats ? save_mean.data() : nullptr, batch_stats ? save_invstd.data() : nullptr,
        batch_stats, params.eps, fusion);
    auto call_backward = [&] {
        backward.backward(x.data(), dy.data(), weight.data(), eval_mean.data(), eval_var.data(),
                          save_mean.data(), save_invstd.data(), dx.data(), dweight.data(),
                          dbias.data(), bias.data(), o.residual ? z.data() : nullptr,
                          o.residual ? dz.data() : nullptr);
    };
    call_backward();
    dx.sync_from_storage();
    dz.sync_from_storage();
    std::printf("backward kernel %s\n", backward.describe().c_str());
    // The kernel recomputes the ReLU mask in float32: where the pre-activation is within float32
    // rounding of 0 either mask is right, so those elements are not compared (dx, dz).
    std::vector<bool> on_mask_edge;
    size_t edge_count = 0;
    if (o.relu) {
        on_mask_edge.resize(count);
        for (size_t i = 0; i < count; i++)
            edge_count += on_mask_edge[i] = std::abs(grads.pre[i]) < 1e-5;
    }
    std::printf("backward max error vs float64 reference: dx %.2e",
                max_error(dx.values, grads.dx, on_mask_edge));
    if (o.residual) std::printf(", dz %.2e", max_error(dz.values, grads.dz, on_mask_edge));
    if (o.affine)
        std::printf(", dweight %.2e, dbias %.2e", max_error(dweight, grads.dweight),
                    max_error(dbias, grads.dbias));
    if (o.relu) std::printf(" (%zu elements within 1e-5 of the ReLU edge not compared)", edge_count);
    std::printf("\n");
    const double ms = time_median(o.reps, call_backward);
    // Minimum traffic: read x, dy (and z with residual + ReLU), write dx (and dz).
    const double passes = 3 + (o.residual ? 1 : 0) + (o.residual && o.relu ? 1 : 0);
    std::printf("backward median %.3f ms over %d runs, %.1f GB/s (%.0f passes), %.0f%% of copy "
                "speed\n", ms, o.reps, passes * bytes / ms / 1e6, passes,
                100 * (passes * bytes / ms) / (2 * bytes / copy_ms));
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) return usage();
    const std::string command = argv[1];
    if (command == "tune") {
        // The tuner is its own executable (it builds kernels with the generators); exec it.
        char self[4096];
        const ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
        std::string dir = len > 0 ? std::string(self, size_t(len)) : std::string(argv[0]);
        dir = dir.substr(0, dir.rfind('/') + 1);
        const std::string tuner = dir + "normgen-tune";
        std::vector<char *> args = {const_cast<char *>(tuner.c_str())};
        for (int i = 2; i < argc; i++) args.push_back(argv[i]);
        args.push_back(nullptr);
        execv(tuner.c_str(), args.data());
        std::fprintf(stderr, "normgen tune: cannot run %s: %s\n", tuner.c_str(), std::strerror(errno));
        return 1;
    }
    try {
        if (command == "info") {
            normgen::Runtime rt(argc > 2 ? argv[2] : nullptr);
            std::fputs(rt.describe().c_str(), stdout);
            return 0;
        }
        if (command != "run") return usage();
        RunOptions o;
        for (int i = 2; i < argc; i++) {
            const std::string a = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
                return argv[++i];
            };
            if (a == "--op") {
                const std::string v = value();
                if (v != "forward" && v != "backward")
                    throw std::invalid_argument("--op " + v + ": expected forward or backward");
                o.op = v == "forward" ? NG_OP_FORWARD : NG_OP_BACKWARD;
            } else if (a == "--shape") {
                o.shape = parse_shape(value());
            } else if (a == "--format") {
                const std::string v = value();
                if (v != "contig" && v != "cl")
                    throw std::invalid_argument("--format " + v + ": expected contig or cl");
                o.format = v == "cl" ? NG_CHANNELS_LAST : NG_CONTIGUOUS;
            } else if (a == "--dtype") {
                const std::string v = value();
                if (v != "f32" && v != "f16" && v != "bf16")
                    throw std::invalid_argument("--dtype " + v + ": expected f32, f16 or bf16");
                o.dtype = v == "f16" ? NG_F16 : v == "bf16" ? NG_BF16 : NG_F32;
            } else if (a == "--relu") {
                o.relu = true;
            } else if (a == "--residual") {
                o.residual = true;
            } else if (a == "--eval") {
                o.training = false;
            } else if (a == "--no-affine") {
                o.affine = false;
            } else if (a == "--reps") {
                o.reps = std::max(1, std::stoi(value()));
            } else if (a == "--seed") {
                o.seed = static_cast<unsigned>(std::stoul(value()));
            } else if (a == "--package") {
                o.package = argv[++i < argc ? i : argc - 1];
            } else {
                return usage();
            }
        }
        if (o.shape.size() < 2 || o.shape.size() > 5)
            throw std::invalid_argument("--shape needs 2..5 extents, like 32x64x56x56");
        return run(o);
    } catch (const normgen::Error &e) {
        std::fprintf(stderr, "normgen: %s\n", e.what());
        return 1;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "normgen: %s\n", e.what());
        return 2;
    }
}

// normgen — the command line.
//   normgen info [package_dir]               what a package holds and what this CPU can run
//   normgen run  [options]                   run one op through the runtime on random data,
//                                            check it against the float64 reference, time it
//     --op forward|backward  --shape 32x64x56x56  --format contig|cl  --eval  --no-affine
//     --reps N  --package DIR  --seed N
#include "normgen/normgen.hpp"
#include "../tests/reference.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct RunOptions {
    ng_op op = NG_OP_FORWARD;
    std::vector<int64_t> shape{32, 64, 56, 56};
    ng_memory_format format = NG_CONTIGUOUS;
    bool training = true, affine = true;
    int reps = 20;
    unsigned seed = 1;
    const char *package = nullptr;
};

int usage() {
    std::fprintf(stderr,
                 "usage: normgen info [package_dir]\n"
                 "       normgen run [--op forward|backward] [--shape 32x64x56x56] "
                 "[--format contig|cl] [--eval] [--no-affine] [--reps N] [--package DIR] "
                 "[--seed N]\n");
    return 2;
}

std::vector<int64_t> parse_shape(const std::string &text) {
    std::vector<int64_t> shape;
    std::stringstream ss(text);
    std::string part;
    while (std::getline(ss, part, 'x')) shape.push_back(std::stoll(part));
    return shape;
}

void parallel_copy(const float *from, float *to, size_t count) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < count; i++) to[i] = from[i];
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

// Largest |got - want| / (1 + |want|): absolute near zero, relative for large values.
double max_error(const float *got, const std::vector<double> &want) {
    double e = 0;
    for (size_t i = 0; i < want.size(); i++)
        e = std::max(e, std::abs(got[i] - want[i]) / (1 + std::abs(want[i])));
    return e;
}

int run(const RunOptions &o) {
    normgen::Runtime rt(o.package);
    ng_tensor desc{static_cast<int32_t>(o.shape.size()), {0, 0, 0, 0, 0}, o.format, NG_F32, NG_CPU};
    for (size_t i = 0; i < o.shape.size() && i < 5; i++) desc.shape[i] = o.shape[i];
    ng_batch_norm_params params = ng_batch_norm_params_default();
    params.training = o.training;
    params.affine = o.affine;
    normgen::Plan forward(rt, NG_OP_FORWARD, desc, params);

    normgen::ref::View view;
    view.n = o.shape.at(0);
    view.c = o.shape.at(1);
    for (size_t i = 2; i < o.shape.size(); i++) view.s *= o.shape[i];
    view.channels_last = o.format == NG_CHANNELS_LAST;
    const size_t count = static_cast<size_t>(view.size()), C = static_cast<size_t>(view.c);

    std::mt19937 rng(o.seed);
    std::normal_distribution<float> normal(0.5f, 2.0f);
    std::vector<float> x(count), y(count), dy(count), dx(count);
    std::vector<float> weight(C), bias(C), running_mean(C), running_var(C);
    std::vector<float> save_mean(C), save_invstd(C), dweight(C), dbias(C);
    for (auto &v : x) v = normal(rng);
    for (auto &v : dy) v = normal(rng);
    for (size_t c = 0; c < C; c++) {
        weight[c] = 1.0f + 0.1f * normal(rng);
        bias[c] = 0.1f * normal(rng);
        running_mean[c] = 0.1f * normal(rng);
        running_var[c] = 1.0f + 0.05f * std::abs(normal(rng));
    }
    normgen::ref::Params ref_params;
    ref_params.training = o.training;
    ref_params.affine = o.affine;
    normgen::ref::RunningStats ref_running;
    ref_running.mean.assign(running_mean.begin(), running_mean.end());
    ref_running.var.assign(running_var.begin(), running_var.end());
    const auto want = normgen::ref::forward(view, ref_params, x.data(), weight.data(),
                                            bias.data(), &ref_running);

    // One checked call, then timed repetitions (running stats keep moving; harmless here).
    int64_t batches = 0;
    forward.forward(x.data(), y.data(), weight.data(), bias.data(), running_mean.data(),
                    running_var.data(), &batches, save_mean.data(), save_invstd.data());
    std::printf("forward  kernel %s\n", forward.describe().c_str());
    std::printf("forward  max error vs float64 reference: y %.2e", max_error(y.data(), want.y));
    if (o.training)
        std::printf(", running_mean %.2e, running_var %.2e",
                    max_error(running_mean.data(), ref_running.mean),
                    max_error(running_var.data(), ref_running.var));
    std::printf("\n");

    auto time_it = [&](auto &&call) {
        std::vector<double> ms;
        for (int r = 0; r < o.reps; r++) {
            auto t0 = std::chrono::steady_clock::now();
            call();
            ms.push_back(std::chrono::duration<double, std::milli>(
                             std::chrono::steady_clock::now() - t0).count());
        }
        return median(ms);
    };
    const double bytes = static_cast<double>(count) * sizeof(float);
    // This machine's bandwidth drifts: time a copy of the same tensor (the floor of any forward
    // kernel) right beside the kernel and report the kernel as a fraction of it.
    const double copy_ms = time_it([&] { parallel_copy(x.data(), y.data(), count); });
    std::printf("copy     median %.3f ms, %.1f GB/s (the bandwidth reference)\n", copy_ms,
                2 * bytes / copy_ms / 1e6);
    if (o.op == NG_OP_FORWARD) {
        const double ms = time_it([&] {
            forward.forward(x.data(), y.data(), weight.data(), bias.data(), running_mean.data(),
                            running_var.data(), &batches, save_mean.data(), save_invstd.data());
        });
        std::printf("forward  median %.3f ms over %d runs, %.1f GB/s (read x + write y), "
                    "%.0f%% of copy\n", ms, o.reps, 2 * bytes / ms / 1e6, 100 * copy_ms / ms);
        return 0;
    }

    normgen::Plan backward(rt, NG_OP_BACKWARD, desc, params);
    const bool batch_stats = o.training;
    const auto grads = normgen::ref::backward(
        view, x.data(), dy.data(), o.affine ? weight.data() : nullptr,
        batch_stats ? nullptr : running_mean.data(), batch_stats ? nullptr : running_var.data(),
        batch_stats ? save_mean.data() : nullptr, batch_stats ? save_invstd.data() : nullptr,
        batch_stats, params.eps);
    auto call_backward = [&] {
        backward.backward(x.data(), dy.data(), weight.data(), running_mean.data(),
                          running_var.data(), save_mean.data(), save_invstd.data(), dx.data(),
                          dweight.data(), dbias.data());
    };
    call_backward();
    std::printf("backward kernel %s\n", backward.describe().c_str());
    std::printf("backward max error vs float64 reference: dx %.2e", max_error(dx.data(), grads.dx));
    if (o.affine)
        std::printf(", dweight %.2e, dbias %.2e", max_error(dweight.data(), grads.dweight),
                    max_error(dbias.data(), grads.dbias));
    std::printf("\n");
    const double ms = time_it(call_backward);
    std::printf("backward median %.3f ms over %d runs, %.1f GB/s (read x, dy + write dx), "
                "%.0f%% of copy speed\n", ms, o.reps, 3 * bytes / ms / 1e6,
                100 * (3 * bytes / ms) / (2 * bytes / copy_ms));
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) return usage();
    const std::string command = argv[1];
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

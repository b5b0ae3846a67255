// BatchNorm fp32 on CPU: normgen vs oneDNN vs libtorch, with bandwidth references, in one run;
// plain and fused (BN+ReLU, BN+add+ReLU).
//
//   cmake -S . -B build-bench -DNORMGEN_BUILD_BENCH=ON && cmake --build build-bench -j2
//   build-bench/bin/bench_batch_norm --csv=out.csv --markdown=out.md     (or: scripts/bench)
//   flags: --shapes=FILE (benchdnn-style, one PyTorch shape per line, e.g. 32x64x56x56)
//          --impl=normgen,onednn,torch  --op=fwd_train,fwd_infer,bwd_train  --format=contig,cl
//          --fusion=none,relu,addrelu (default all three)
//          --cache=auto|cold|warm (default auto)  --reps=N (repetitions; default by size)
//          --min-reps=N (the least repetitions by size; default 15, odd)
//          --threads=N (default 2)  --budget=SECONDS (per benchmark, default 0.6)
//          --note=TEXT (added to the markdown's header line)
//          and any --benchmark_* flag of Google Benchmark (e.g. --benchmark_filter=REGEX).
//
// Design. One Google Benchmark per (shape, format, fusion, op, impl), named
// bn/<impl>/<op>/<format>/<shape> (fused: bn_relu/..., bn_addrelu/...), manual time, Iterations(1)
// and R repetitions. Each repetition (one "iteration") times the bandwidth reference and then the
// kernel, back to back on the same buffers (the reference writes the implementation's own y or dx,
// and dz): copy y = x for forward, dx = x + dy for backward; with the residual, y = x + z (3
// passes) and dx = x + dy, dz = dy + z (read three, write two: 5 passes), the minimum bytes of
// the fused kernels. It reports the kernel time as the iteration time and, as counters, the
// reference time and the ratio t_ref / t_kernel. Google Benchmark's median aggregate then gives the
// median kernel time, the median reference time and the median of per-repetition ratios (the
// "fraction of reference", stable while this machine's bandwidth drifts, by 3x within seconds at
// worst); a "min" statistic gives the best kernel time.
//
// Cache state. Every timed call (reference or kernel) starts with the tensors it touches
// flushed from all caches (clflushopt, outside the timed region): the DRAM-pass model of
// DESIGN.md, and no implementation is helped or hurt by what the previous call left in cache
// (oneDNN's JIT kernels can use streaming stores, which evict y and would slow a warm
// reference). Problems whose tensors fit in the threads' L2 (here only 8x32x8x8) are timed warm
// instead, as after the layer that produced them; --cache=cold|warm forces either. Problems
// whose call takes < 0.5 ms are timed k times per sample (the CSV's calls_per_sample), cold
// ones with a flush before each call, and the time divided by k.
//
// Other processes. A pair during which any of our threads was involuntarily switched out
// (getrusage) is timed again, up to 5 times; the CSV counts retries and pairs still disturbed.
//
// Fused forms (see impl_*.cpp): normgen's one kernel against the sequences a framework runs:
// oneDNN BN with fuse_norm_relu, or BN -> binary add -> eltwise relu; libtorch bn -> add_ ->
// relu_, backward threshold_backward -> BN backward. The peers' intermediates (saved y, ReLU
// gradient, workspace) are flushed too when cold.
//
// Every buffer of every implementation is allocated, huge-page advised and touched before
// timing; the timed calls allocate nothing (libtorch: see impl_torch.cpp; oneDNN: user
// scratchpad). All three run on the same OpenMP pool with the same thread count. Before timing,
// each problem's outputs (y, batch stats, running stats, dx, dweight, dbias) of every
// implementation are checked against libtorch's public operators; a mismatch is reported as a
// failed check and that case is not timed, so nothing fast and wrong is published.
//
// GB/s counts the minimum traffic: forward 2 passes over the tensor, backward 3; with the
// residual 3 and 5. The markdown opens with the goals of issue 3 when the run covers them.
#include <benchmark/benchmark.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>

#include "bandwidth_reference.h"
#include "bench_common.h"

namespace bench {
namespace {

constexpr ImplKind kImpls[] = {ImplKind::normgen, ImplKind::onednn, ImplKind::torch};
constexpr Op kOps[] = {Op::fwd_train, Op::fwd_infer, Op::bwd_train};
constexpr Format kFormats[] = {Format::contig, Format::cl};
constexpr Fusion kFusions[] = {Fusion::none, Fusion::relu, Fusion::addrelu};

// ---- options ------------------------------------------------------------------------------

struct Options {
    std::string shapes_file = NORMGEN_BENCH_DEFAULT_SHAPES;
    std::string csv, markdown;
    std::vector<ImplKind> impls{std::begin(kImpls), std::end(kImpls)};
    std::vector<Op> ops{std::begin(kOps), std::end(kOps)};
    std::vector<Format> formats{std::begin(kFormats), std::end(kFormats)};
    std::vector<Fusion> fusions{std::begin(kFusions), std::end(kFusions)};
    int reps = 0;       // 0: by problem size
    int min_reps = 15;  // the least repetitions a problem gets when reps is by size
    int threads = 2;
    std::string note;  // --note=TEXT: a line for the markdown (scripts/bench: the git commit)
    enum class Cache { automatic, cold, warm } cache = Cache::automatic;  // --cache=
    int64_t l2_bytes = 0;  // L2 of the threads together, for --cache=auto
    double budget_s = 0.6;
};

std::vector<std::string> split(const std::string &s, char sep) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    for (std::string item; std::getline(ss, item, sep);)
        if (!item.empty()) out.push_back(item);
    return out;
}

template <typename E, size_t K>
std::vector<E> parse_list(const std::string &flag, const std::string &value, const E (&all)[K],
                          const std::map<std::string, E> &aliases) {
    std::vector<E> out;
    for (const std::string &item : split(value, ',')) {
        bool found = false;
        for (E e : all)
            if (item == name(e)) out.push_back(e), found = true;
        if (!found) {
            auto it = aliases.find(item);
            if (it == aliases.end())
                throw std::invalid_argument(flag + ": unknown value '" + item + "'");
            out.push_back(it->second);
        }
    }
    if (out.empty()) throw std::invalid_argument(flag + ": empty list");
    return out;
}

// Takes our flags out of argv (the rest goes to Google Benchmark).
Options parse_options(int *argc, char **argv) {
    Options o;
    int kept = 1;
    for (int i = 1; i < *argc; i++) {
        const std::string arg = argv[i];
        auto value = [&](const char *flag) -> const char * {
            const size_t n = std::strlen(flag);
            return arg.compare(0, n, flag) == 0 && arg.size() > n && arg[n] == '=' ? argv[i] + n + 1
                                                                                   : nullptr;
        };
        if (const char *v = value("--shapes"))
            o.shapes_file = v;
        else if (const char *v = value("--note"))
            o.note = v;
        else if (const char *v = value("--csv"))
            o.csv = v;
        else if (const char *v = value("--markdown"))
            o.markdown = v;
        else if (const char *v = value("--impl"))
            o.impls = parse_list<ImplKind>(
                "--impl", v, kImpls, {{"dnnl", ImplKind::onednn}, {"libtorch", ImplKind::torch}});
        else if (const char *v = value("--op"))
            o.ops = parse_list<Op>("--op", v, kOps,
                                   {{"forward_training", Op::fwd_train},
                                    {"forward_inference", Op::fwd_infer},
                                    {"backward", Op::bwd_train},
                                    {"bwd", Op::bwd_train}});
        else if (const char *v = value("--format"))
            o.formats = parse_list<Format>("--format", v, kFormats,
                                           {{"nchw", Format::contig},
                                            {"contiguous", Format::contig},
                                            {"nhwc", Format::cl},
                                            {"channels_last", Format::cl}});
        else if (const char *v = value("--fusion"))
            o.fusions = parse_list<Fusion>("--fusion", v, kFusions,
                                           {{"plain", Fusion::none},
                                            {"bn", Fusion::none},
                                            {"bn_relu", Fusion::relu},
                                            {"add_relu", Fusion::addrelu},
                                            {"bn_add_relu", Fusion::addrelu}});
        else if (const char *v = value("--reps"))
            o.reps = std::max(1, std::atoi(v));
        else if (const char *v = value("--min-reps"))
            o.min_reps = std::max(1, std::atoi(v)) | 1;
        else if (const char *v = value("--threads"))
            o.threads = std::max(1, std::atoi(v));
        else if (const char *v = value("--budget"))
            o.budget_s = std::max(0.0, std::atof(v));
        else if (const char *v = value("--cache")) {
            const std::string c = v;
            if (c != "auto" && c != "cold" && c != "warm")
                throw std::invalid_argument("--cache: expected auto, cold or warm, got '" + c +
                                            "'");
            o.cache = c == "cold"   ? Options::Cache::cold
                      : c == "warm" ? Options::Cache::warm
                                    : Options::Cache::automatic;
        } else
            argv[kept++] = argv[i];
    }
    *argc = kept;
    return o;
}

// benchdnn-style shape file: one PyTorch shape per line ("32x64x56x56"), '#' starts a comment.
std::vector<std::vector<int64_t>> read_shapes(const std::string &file) {
    std::ifstream in(file);
    if (!in) throw std::runtime_error("--shapes: cannot open '" + file + "'");
    std::vector<std::vector<int64_t>> shapes;
    for (std::string line; std::getline(in, line);) {
        line = line.substr(0, line.find('#'));
        line.erase(std::remove_if(line.begin(), line.end(), ::isspace), line.end());
        if (line.empty()) continue;
        std::vector<int64_t> dims;
        for (const std::string &d : split(line, 'x')) {
            char *end = nullptr;
            const long long v = std::strtoll(d.c_str(), &end, 10);
            if (*end || v <= 0)
                throw std::runtime_error(file + ": bad extent '" + d + "' in '" + line + "'");
            dims.push_back(v);
        }
        if (dims.size() < 2 || dims.size() > 5)
            throw std::runtime_error(file + ": shape '" + line + "' must have 2..5 extents");
        shapes.push_back(dims);
    }
    if (shapes.empty()) throw std::runtime_error(file + ": no shapes");
    return shapes;
}

// ---- the suite: cases, per-problem fixtures, results --------------------------------------

struct Case {
    size_t shape;  // index into Suite::shapes
    Format format;
    Fusion fusion;
    Op op;
    ImplKind impl;
    std::string bench_name;
};

struct Result {
    bool timed = false;
    double median_ms = NAN, min_ms = NAN, ref_median_ms = NAN, frac = NAN;
    double blocked_loop_frac = NAN;  // plain fwd_train contig normgen: t_ref / t_blocked_loop
    int64_t reps = 0;
    int calls_per_sample = 0;
    int64_t retries = 0, disturbed = 0;  // pairs timed again / still preempted after retries
    int64_t planned_reps = 0;
    bool cold = true;
    std::string kernel, check = "not run";
    double max_err = NAN;
    std::string max_err_output;  // which output had max_err
};

// Everything one (shape, format) needs: inputs, the implementations, check outcomes.
struct Fixture {
    Problem problem;
    std::unique_ptr<Inputs> inputs;
    std::unique_ptr<Impl> impls[3];
    std::string failure[3][3];  // per impl, op: why this case cannot be timed ("" if it can)
    int calls_per_sample[3][3] = {};
};

class Suite {
public:
    Options opt;
    std::vector<std::vector<int64_t>> shapes;
    std::vector<Case> cases;
    std::map<std::string, Result> results;  // by bench_name

    Fixture &fixture(size_t shape, Format format, Fusion fusion) {
        if (!current_ || current_shape_ != shape || current_->problem.format != format ||
            current_->problem.fusion != fusion) {
            current_.reset();  // free the previous problem's buffers first
            current_ = build(shape, format, fusion);
            current_shape_ = shape;
        }
        return *current_;
    }

private:
    std::unique_ptr<Fixture> build(size_t shape, Format format, Fusion fusion) {
        auto f = std::make_unique<Fixture>();
        f->problem = Problem{shapes[shape], format, fusion};
        const Problem &p = f->problem;
        auto record = [&](ImplKind kind, Op op, const std::string &why, const std::string &kernel,
                          double err, const std::string &worst = "") {
            f->failure[int(kind)][int(op)] = why;
            Result &r = result_for(shape, format, fusion, op, kind);
            r.kernel = kernel;
            r.max_err = err;
            r.max_err_output = worst;
            r.check = why.empty() ? "ok" : why;
            if (!why.empty())
                std::fprintf(stderr, "check %s/%s/%s/%s/%s: %s\n", name(kind), name(fusion),
                             name(op), name(format), p.shape().c_str(), why.c_str());
        };
        f->inputs = std::make_unique<Inputs>(p);
        std::vector<Buffer> storage;
        Outputs oracle;
        try {
            oracle = torch_oracle(p, *f->inputs, storage);
        } catch (const std::exception &e) {
            for (ImplKind kind : opt.impls)
                for (Op op : kOps) record(kind, op, std::string("oracle: ") + e.what(), "", NAN);
            return f;
        }
        for (ImplKind kind : opt.impls) {
            try {
                f->impls[int(kind)] = kind == ImplKind::normgen  ? make_normgen(p, *f->inputs)
                                      : kind == ImplKind::onednn ? make_onednn(p, *f->inputs)
                                                                 : make_torch(p, *f->inputs);
            } catch (const std::exception &e) {
                for (Op op : kOps) record(kind, op, std::string("setup: ") + e.what(), "", NAN);
                continue;
            }
            Impl &impl = *f->impls[int(kind)];
            const Outputs out = impl.run_for_check();
            for (Op op : kOps) {
                double err = NAN;
                std::string why, worst;
                if (!impl.unavailable(op).empty())
                    why = "unavailable: " + impl.unavailable(op);
                else if (!out.error[int(op)].empty())
                    why = "error: " + out.error[int(op)];
                else if (std::string diff = check(op, p, oracle, out, &err, &worst); !diff.empty())
                    why = "FAIL: " + diff;
                record(kind, op, why, impl.kernel(op), err, worst);
            }
        }
        return f;
    }

    Result &result_for(size_t shape, Format format, Fusion fusion, Op op, ImplKind impl) {
        for (const Case &c : cases)
            if (c.shape == shape && c.format == format && c.fusion == fusion && c.op == op &&
                c.impl == impl)
                return results[c.bench_name];
        return scratch_;  // an op/impl filtered out: checked but not reported
    }

    std::unique_ptr<Fixture> current_;
    size_t current_shape_ = 0;
    Result scratch_;
};

constexpr int kMaxRetries = 5;

// auto: a problem whose tensors fit in the threads' L2 is timed warm (as after the layer that
// produced it); a larger one cold, from DRAM (bench::timed_warm).
bool timed_cold(const Options &o, const Problem &p, Op op) {
    if (o.cache != Options::Cache::automatic) return o.cache == Options::Cache::cold;
    return !bench::timed_warm(passes(p, op) * p.numel() * int64_t(sizeof(float)), o.threads);
}

long involuntary_switches() {  // of every thread of this process
    rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_nivcsw;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void run_case(benchmark::State &state, Suite &suite, const Case &c) {
    Fixture &f = suite.fixture(c.shape, c.format, c.fusion);
    const int i = int(c.impl), o = int(c.op);
    if (!f.failure[i][o].empty()) {
        state.SkipWithError(f.failure[i][o].c_str());
        return;
    }
    Impl &impl = *f.impls[i];
    const Inputs &in = *f.inputs;
    const int64_t n = f.problem.numel();
    float *out = impl.output(c.op);
    const bool residual = f.problem.residual(), bwd = c.op == Op::bwd_train;
    // The minimum bytes of the op (see passes()): y = x; y = x + z; dx = x + dy; and with the
    // residual dx = x + dy, dz = dy + z.
    auto reference = [&] {
        if (bwd && residual)
            read3_write2_reference(in.x.data(), in.dy.data(), in.z.data(), out,
                                   impl.residual_grad(), n);
        else if (bwd)
            read2_write1_reference(in.x.data(), in.dy.data(), out, n);
        else if (residual)
            read2_write1_reference(in.x.data(), in.z.data(), out, n);
        else
            copy_reference(in.x.data(), out, n);
    };
    auto kernel = [&] { impl.run(c.op); };
    // Goal (2)'s yardstick, beside normgen's plain contiguous forward training: the
    // cache-blocked structure as a plain loop (blocked_forward_loop), timed in the same pairs.
    const bool yardstick = c.impl == ImplKind::normgen && c.fusion == Fusion::none &&
                           c.op == Op::fwd_train && c.format == Format::contig &&
                           f.problem.dims.size() > 2;
    auto blocked_loop = [&] {
        blocked_forward_loop(in.x.data(), out, f.problem.n(), f.problem.c(), f.problem.s());
    };
    // Cold: every timed call starts with the tensors it touches flushed from the caches (the
    // implementation's own intermediates too: a peer's saved y, ReLU gradient or mask).
    std::vector<std::pair<const float *, int64_t>> tensors{{in.x.data(), n}, {out, n}};
    if (bwd) tensors.push_back({in.dy.data(), n});
    if (residual) tensors.push_back({in.z.data(), n});
    if (bwd && residual) tensors.push_back({impl.residual_grad(), n});
    for (const auto &t : impl.internal_tensors(c.op)) tensors.push_back(t);
    auto flush = [&] {
        for (const auto &[ptr, count] : tensors) flush_from_cache(ptr, count);
    };
    const bool cold = timed_cold(suite.opt, f.problem, c.op);
    suite.results[c.bench_name].cold = cold;
    auto timed = [&](int calls, const auto &fn) {
        double total = 0;
        if (cold) {
            for (int k = 0; k < calls; k++) {
                flush();
                const auto t0 = std::chrono::steady_clock::now();
                fn();
                total += seconds_since(t0);
            }
        } else {
            const auto t0 = std::chrono::steady_clock::now();
            for (int k = 0; k < calls; k++) fn();
            total = seconds_since(t0);
        }
        return total / calls;
    };
    try {
        int &calls = f.calls_per_sample[i][o];
        if (calls == 0) {  // first repetition: warm up, then size the samples
            for (int k = 0; k < 2; k++) reference(), kernel();
            if (yardstick) blocked_loop();
            const double t = std::max(timed(1, kernel), timed(1, reference));
            calls = std::clamp(int(std::ceil(5e-4 / std::max(t, 1e-9))), 1, 1000);
            for (int k = 0; k < calls; k++) reference(), kernel();
        }
        Result &r = suite.results[c.bench_name];
        for (auto _ : state) {
            // A pair during which any of our threads was preempted (another process wanted a
            // core) is timed again, up to kMaxRetries times (and at most one retry per
            // repetition on average, so a busy machine cannot stretch a run without bound); one
            // still disturbed is counted.
            double t_ref = 0, t_kernel = 0, t_loop = 0;
            for (int attempt = 0;; attempt++) {
                const long switches = involuntary_switches();
                t_ref = timed(calls, reference);
                if (yardstick) t_loop = timed(calls, blocked_loop);
                t_kernel = timed(calls, kernel);
                if (involuntary_switches() == switches) break;
                if (attempt == kMaxRetries || r.retries >= r.planned_reps) {
                    r.disturbed++;
                    break;
                }
                r.retries++;
            }
            state.SetIterationTime(t_kernel);
            state.counters["ref_us"] = t_ref * 1e6;
            state.counters["frac"] = t_ref / t_kernel;
            if (yardstick) state.counters["loop_frac"] = t_ref / t_loop;
        }
        suite.results[c.bench_name].calls_per_sample = calls;
    } catch (const std::exception &e) {
        f.failure[i][o] = std::string("error: ") + e.what();
        suite.results[c.bench_name].check = f.failure[i][o];
        state.SkipWithError(f.failure[i][o].c_str());
    }
}

// Console output as usual; the median and min aggregates are also kept for the CSV/markdown.
class Reporter : public benchmark::ConsoleReporter {
public:
    explicit Reporter(Suite &suite)
        : ConsoleReporter(isatty(STDOUT_FILENO) ? OO_ColorTabular : OO_Tabular), suite_(suite) {}
    void ReportRuns(const std::vector<Run> &runs) override {
        std::vector<Run> shown;  // an error is printed once, not once per repetition
        for (const Run &run : runs) {
            if (!run.error_occurred || shown.empty() || !shown.back().error_occurred ||
                shown.back().run_name.function_name != run.run_name.function_name)
                shown.push_back(run);
            auto it = suite_.results.find(run.run_name.function_name);
            if (it == suite_.results.end()) continue;
            Result &r = it->second;
            if (run.error_occurred) {
                if (r.check == "ok") r.check = "error: " + run.error_message;
                continue;
            }
            // With one repetition there are no aggregates: the run is its own median and min.
            const bool single = run.run_type != Run::RT_Aggregate && run.repetitions <= 1;
            if (run.run_type != Run::RT_Aggregate && !single) continue;
            auto counter = [&](const char *k) {
                auto c = run.counters.find(k);
                return c == run.counters.end() ? NAN : double(c->second);
            };
            if (single || run.aggregate_name == "median") {
                r.timed = true;
                r.median_ms = run.GetAdjustedRealTime() / 1e3;  // registered in microseconds
                r.ref_median_ms = counter("ref_us") / 1e3;
                r.frac = counter("frac");
                r.blocked_loop_frac = counter("loop_frac");
                r.reps = std::max<int64_t>(1, run.repetitions);
            }
            if (single || run.aggregate_name == "min") r.min_ms = run.GetAdjustedRealTime() / 1e3;
        }
        ConsoleReporter::ReportRuns(shown);
    }

private:
    Suite &suite_;
};

// ---- outputs ------------------------------------------------------------------------------

double gbps(const Problem &p, Op op, double ms) {
    return double(passes(p, op)) * p.numel() * sizeof(float) / (ms * 1e-3) / 1e9;
}

std::string fmt(double v, int digits = 3) {
    if (!std::isfinite(v)) return "";
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f", digits, v);
    return buf;
}

std::string fmt_sci(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2e", v);
    return buf;
}

std::string csv_field(const std::string &s) {
    if (s.find_first_of(",\"\n") == std::string::npos) return s;
    std::string q = "\"";
    for (char ch : s) q += ch == '"' ? std::string("\"\"") : std::string(1, ch);
    return q + "\"";
}

void write_csv(const Suite &suite, const std::string &path) {
    std::ofstream out(path);
    if (!out) throw std::runtime_error("--csv: cannot write '" + path + "'");
    out << "impl,op,fusion,format,shape,passes,median_ms,min_ms,gbps,ref_median_ms,ref_gbps,"
           "fraction_of_ref,kernel,check,max_err,max_err_output,reps,calls_per_sample,retries,"
           "disturbed,cache,blocked_loop_fraction\n";
    for (const Case &c : suite.cases) {
        const Result &r = suite.results.at(c.bench_name);
        const Problem p{suite.shapes[c.shape], c.format, c.fusion};
        const double gb = r.timed ? gbps(p, c.op, r.median_ms) : NAN;
        const double ref_gb = r.timed ? gbps(p, c.op, r.ref_median_ms) : NAN;
        out << name(c.impl) << ',' << name(c.op) << ',' << name(c.fusion) << ',' << name(c.format)
            << ',' << p.shape() << ',' << passes(p, c.op) << ',' << fmt(r.median_ms, 4) << ','
            << fmt(r.min_ms, 4) << ',' << fmt(gb, 2) << ',' << fmt(r.ref_median_ms, 4) << ','
            << fmt(ref_gb, 2) << ',' << fmt(r.frac, 3) << ',' << csv_field(r.kernel) << ','
            << csv_field(r.check) << ',' << (std::isfinite(r.max_err) ? fmt_sci(r.max_err) : "")
            << ',' << r.max_err_output << ',' << r.reps << ',' << r.calls_per_sample << ','
            << r.retries << ',' << r.disturbed << ',' << (r.timed ? (r.cold ? "cold" : "warm") : "")
            << ',' << fmt(r.blocked_loop_frac, 3) << '\n';
    }
}

std::string machine_line(int threads) {
    std::string model = "unknown CPU";
    std::ifstream cpuinfo("/proc/cpuinfo");
    for (std::string line; std::getline(cpuinfo, line);)
        if (line.rfind("model name", 0) == 0) {
            model = line.substr(line.find(':') + 2);
            break;
        }
    auto cache = [](int index) {
        std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) +
                        "/size");
        std::string s;
        return f >> s ? s : std::string("?");
    };
    char date[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%d %H:%M", std::localtime(&now));
    return std::string(date) + ", " + model + " (L2 " + cache(2) + "/core, L3 " + cache(3) + "), " +
           std::to_string(threads) + " OpenMP threads for every implementation";
}

// "fwd_train" plain, "fwd_train + relu", "bwd_train + addrelu": the heading of a fused table.
std::string title(Fusion fusion, Op op) {
    return std::string(name(op)) +
           (fusion == Fusion::none ? "" : std::string(" + ") + name(fusion));
}

class Markdown {
public:
    explicit Markdown(const Suite &suite) : suite_(suite), o_(suite.opt) {}

    void write(std::ostream &out) const {
        const bool fused = std::any_of(o_.fusions.begin(), o_.fusions.end(),
                                       [](Fusion f) { return f != Fusion::none; });
        const bool plain = has(Fusion::none);
        out << "# BatchNorm fp32" << (fused ? (plain ? ", plain and fused" : ", fused") : "")
            << ": normgen vs oneDNN vs libtorch\n\n"
            << machine_line(o_.threads) << "; shapes from `" << o_.shapes_file << "`"
            << (o_.note.empty() ? "" : "; " + o_.note) << ".\n\n";
        method(out, fused);
        goals(out);
        summary(out);
        for (Fusion fusion : o_.fusions)
            for (Op op : o_.ops)
                for (Format f : o_.formats) per_shape(out, fusion, op, f);
        measurement(out);
    }

private:
    const Result *get(size_t s, Format f, Fusion fu, Op op, ImplKind impl) const {
        for (const Case &c : suite_.cases)
            if (c.shape == s && c.format == f && c.fusion == fu && c.op == op && c.impl == impl)
                return &suite_.results.at(c.bench_name);
        return nullptr;
    }
    bool has(ImplKind k) const {
        return std::find(o_.impls.begin(), o_.impls.end(), k) != o_.impls.end();
    }
    bool has(Fusion f) const {
        return std::find(o_.fusions.begin(), o_.fusions.end(), f) != o_.fusions.end();
    }
    bool has(Op op) const { return std::find(o_.ops.begin(), o_.ops.end(), op) != o_.ops.end(); }
    bool has(Format f) const {
        return std::find(o_.formats.begin(), o_.formats.end(), f) != o_.formats.end();
    }
    std::vector<ImplKind> peers() const {
        std::vector<ImplKind> out;
        for (ImplKind k : o_.impls)
            if (k != ImplKind::normgen) out.push_back(k);
        return out;
    }
    // Shapes every implementation in impls timed for (format, fusion, op).
    std::vector<size_t> common(Format f, Fusion fu, Op op,
                               const std::vector<ImplKind> &impls) const {
        std::vector<size_t> out;
        for (size_t s = 0; s < suite_.shapes.size(); s++) {
            bool all = true;
            for (ImplKind k : impls) {
                const Result *r = get(s, f, fu, op, k);
                all = all && r && r->timed;
            }
            if (all) out.push_back(s);
        }
        return out;
    }
    struct Geo {
        double ms = 0, gbps = 0, frac = 0;
    };
    Geo geomean(const std::vector<size_t> &shapes, Format f, Fusion fu, Op op, ImplKind k) const {
        Geo g;
        for (size_t s : shapes) {
            const Result &r = *get(s, f, fu, op, k);
            g.ms += std::log(r.median_ms);
            g.gbps += std::log(gbps(Problem{suite_.shapes[s], f, fu}, op, r.median_ms));
            g.frac += std::log(r.frac);
        }
        const double n = double(shapes.size());
        return {std::exp(g.ms / n), std::exp(g.gbps / n), std::exp(g.frac / n)};
    }

    void method(std::ostream &out, bool fused) const {
        out << "Each repetition times a bandwidth reference and then the kernel on the same "
               "buffers, both moving the op's minimum bytes: a copy (y = x, 2 passes over the "
               "tensor) for the forward, a read-two-write-one (dx = x + dy, 3 passes) for the "
               "backward";
        if (has(Fusion::addrelu))
            out << "; with the residual add, y = x + z (read two, write one: 3 passes) for the "
                   "forward and dx = x + dy, dz = dy + z in one loop (read three, write two: 5 "
                   "passes) for the backward, which must read x, dy, z and write dx, dz";
        out << ". All are plain OpenMP loops with ordinary stores. `frac` is the median over "
               "repetitions of t_ref / t_kernel (1.0: as fast as moving the minimum bytes with a "
               "plain loop; kernels with streaming stores can exceed it); times are medians. GB/s "
               "counts those minimum passes (the CSV's `passes`), whatever the implementation "
               "really moves. Cache: "
            << (o_.cache == Options::Cache::cold
                    ? "cold: each timed call starts with its tensors flushed from the caches"
                : o_.cache == Options::Cache::warm
                    ? "warm: back-to-back calls"
                    : "each timed call starts with every tensor it touches flushed from the "
                      "caches (cold; a peer's intermediates too), except problems that fit in "
                      "the threads' L2 (" +
                          std::to_string(o_.l2_bytes >> 20) +
                          " MiB), timed warm as after the layer that produced them (marked *)")
            << ". libtorch is timed through the kernels its operators dispatch to, without "
               "output allocation (see bench/impl_torch.cpp); oneDNN with nchw/nhwc memory (its "
               "JIT kernels need nhwc: on nchw it runs `ncsp_bnorm:any`).\n\n";
        if (fused)
            out << "Fused forms: normgen runs one kernel (params.activation = NG_ACT_RELU, "
                   "params.residual = 1 with z), whose backward recomputes the ReLU mask from x, "
                   "z and the saved statistics and writes dx, dweight, dbias (and dz). The peers "
                   "run what a framework runs: oneDNN batch normalization with `fuse_norm_relu` "
                   "(its backward reads the forward's workspace) for BN+ReLU, and for "
                   "BN+add+ReLU the sequence batch_normalization -> binary add -> eltwise relu "
                   "in place on y (backward: eltwise_backward relu on the saved y -> "
                   "batch_normalization_backward); libtorch bn -> add_ -> relu_ in place "
                   "(backward as autograd runs it: threshold_backward_out on the saved y -> "
                   "batch_norm_cpu_backward_stub). In both peers dz is the ReLU gradient g "
                   "itself (the add's gradient is the identity), and the saved y is read by the "
                   "backward as a framework would (not counted in the minimum bytes). Inputs are "
                   "chosen so that no training pre-activation lies within 1e-4 of 0 (so every "
                   "correct implementation has the same ReLU mask and dx is checked "
                   "elementwise).\n\n";
    }

    // The two goals, when this run has the data for them.
    void goals(std::ostream &out) const {
        const bool goal1 = has(Fusion::addrelu) && has(Op::fwd_train) && has(Format::contig) &&
                           has(ImplKind::normgen) && !peers().empty();
        const bool goal2 = has(Fusion::none) && has(Op::fwd_train) && has(Format::contig) &&
                           has(ImplKind::normgen);
        if (!goal1 && !goal2) return;
        out << "## Goals\n\n";
        if (goal1) {
            out << "**(1) Fused BN+add+ReLU forward training at least 1.5x faster than the "
                   "fastest unfused peer sequence (geometric mean, contiguous).**\n\n"
                << "| format | shapes | normgen ms | fastest peer | its ms | peer / normgen "
                   "(time) | per-shape best peer / normgen | goal 1.5x |\n"
                << "|---|---:|---:|---|---:|---:|---:|---|\n";
            for (Format f : o_.formats) {
                const std::vector<size_t> shapes =
                    common(f, Fusion::addrelu, Op::fwd_train, o_.impls);
                if (shapes.empty()) continue;
                const Geo ng =
                    geomean(shapes, f, Fusion::addrelu, Op::fwd_train, ImplKind::normgen);
                ImplKind best = peers().front();
                Geo best_g = geomean(shapes, f, Fusion::addrelu, Op::fwd_train, best);
                for (ImplKind k : peers())
                    if (Geo g = geomean(shapes, f, Fusion::addrelu, Op::fwd_train, k);
                        g.ms < best_g.ms)
                        best = k, best_g = g;
                // Stricter: against the faster peer on each shape.
                double per_shape = 0;
                for (size_t s : shapes) {
                    double fastest = INFINITY;
                    for (ImplKind k : peers())
                        fastest = std::min(fastest,
                                           get(s, f, Fusion::addrelu, Op::fwd_train, k)->median_ms);
                    per_shape += std::log(
                        fastest /
                        get(s, f, Fusion::addrelu, Op::fwd_train, ImplKind::normgen)->median_ms);
                }
                per_shape = std::exp(per_shape / shapes.size());
                const double ratio = best_g.ms / ng.ms;
                out << "| " << name(f) << " | " << shapes.size() << " | " << fmt(ng.ms) << " | "
                    << name(best) << " | " << fmt(best_g.ms) << " | **" << fmt(ratio, 2) << "x** | "
                    << fmt(per_shape, 2) << "x | "
                    << (f == Format::contig ? (ratio >= 1.5 ? "met" : "NOT met") : "(contig only)")
                    << " |\n";
            }
            out << "\n";
        }
        if (goal2) {
            const int64_t l2 = bench::l2_bytes_per_core();
            out << "**(2) Cache-blocked forward training within 80% of the 2-pass bandwidth bound "
                   "(the copy reference: frac >= 0.8) on shapes whose channel slice N*S*4 bytes "
                   "fits in L2.** L2 per core read from "
                   "/sys/devices/system/cpu/cpu0/cache/index2/size: "
                << (l2 >> 10)
                << " KiB. Contiguous, plain fp32. `plain blocked loop` is the same 2-pass "
                   "structure written as a plain OpenMP loop (per channel: sum x and x*x over the "
                   "slice, then normalise it from L2; bench/bandwidth_reference.cpp), timed in the "
                   "same repetitions: what this machine gives that structure without any "
                   "overlap of the two passes.\n\n"
                << "| shape | slice KiB | qualifies | normgen frac | normgen GB/s | ref GB/s | "
                   ">= 0.8 | plain blocked loop frac | kernel |\n"
                   "|---|---:|---|---:|---:|---:|---|---:|---|\n";
            int qualifying = 0, met = 0;
            std::string cl_kernels;  // shapes normgen runs with its channels-last kernel
            double log_frac = 0;
            for (size_t s = 0; s < suite_.shapes.size(); s++) {
                const Problem p{suite_.shapes[s], Format::contig, Fusion::none};
                const int64_t slice = p.n() * p.s() * int64_t(sizeof(float));
                const bool fits = slice <= l2;
                const Result *r =
                    get(s, Format::contig, Fusion::none, Op::fwd_train, ImplKind::normgen);
                const bool warm = r && r->timed && !r->cold;
                out << "| " << p.shape() << (warm ? "*" : "") << " | " << fmt(slice / 1024.0, 1)
                    << " | " << (fits ? "yes" : "no") << " | ";
                if (r && r->timed) {
                    out << fmt(r->frac, 2) << (4 * r->disturbed > r->reps ? "!" : "") << " | "
                        << fmt(gbps(p, Op::fwd_train, r->median_ms), 1) << " | "
                        << fmt(gbps(p, Op::fwd_train, r->ref_median_ms), 1) << " | "
                        << (fits ? (r->frac >= 0.8 ? "yes" : "**no**") : "") << " | "
                        << fmt(r->blocked_loop_frac, 2) << " | " << r->kernel << " |\n";
                    if (r->kernel.find("_cl_") != std::string::npos)
                        cl_kernels += (cl_kernels.empty() ? "" : ", ") + p.shape();
                    if (fits) {
                        qualifying++;
                        met += r->frac >= 0.8;
                        log_frac += std::log(r->frac);
                    }
                } else {
                    out << "n/a | | | | | " << (r ? r->check : "") << " |\n";
                }
            }
            out << "\n" << met << " of " << qualifying << " qualifying shapes reach 0.8";
            if (qualifying)
                out << "; geometric mean frac " << fmt(std::exp(log_frac / qualifying), 2);
            out << ". (* timed warm: the problem fits in L2, so its frac is not a DRAM "
                   "figure.)";
            if (!cl_kernels.empty())
                out << " " << cl_kernels
                    << ": an (N, C) input, the same memory in both formats, for which normgen "
                       "runs its channels-last kernel: it qualifies by its slice size, but no "
                       "per-channel blocking runs.";
            out << "\n\n";
        }
    }

    void summary(std::ostream &out) const {
        out << "## Summary (geometric means over the suite)\n\n"
            << "| op | fusion | format | impl | shapes | median ms | GB/s | frac of ref | "
               "normgen / impl (frac) | normgen / impl (time) |\n"
            << "|---|---|---|---|---:|---:|---:|---:|---:|---:|\n";
        std::ostringstream headline;
        headline << "| op | fusion | format | best peer | normgen / best peer (frac) | normgen / "
                    "best peer (time) |\n"
                 << "|---|---|---|---|---:|---:|\n";
        for (Fusion fu : o_.fusions)
            for (Op op : o_.ops)
                for (Format f : o_.formats) {
                    const std::vector<size_t> shapes = common(f, fu, op, o_.impls);
                    if (shapes.empty()) continue;
                    std::map<ImplKind, Geo> g;
                    for (ImplKind k : o_.impls) g[k] = geomean(shapes, f, fu, op, k);
                    for (ImplKind k : o_.impls) {
                        out << "| " << name(op) << " | " << name(fu) << " | " << name(f) << " | "
                            << name(k) << " | " << shapes.size() << " | " << fmt(g[k].ms) << " | "
                            << fmt(g[k].gbps, 1) << " | " << fmt(g[k].frac) << " | ";
                        if (has(ImplKind::normgen) && k != ImplKind::normgen)
                            out << fmt(g[ImplKind::normgen].frac / g[k].frac) << " | "
                                << fmt(g[k].ms / g[ImplKind::normgen].ms) << " |\n";
                        else
                            out << " | |\n";
                    }
                    if (has(ImplKind::normgen) && !peers().empty()) {
                        ImplKind best = peers().front();
                        for (ImplKind k : peers())
                            if (g[k].frac > g[best].frac) best = k;
                        headline << "| " << name(op) << " | " << name(fu) << " | " << name(f)
                                 << " | " << name(best) << " | "
                                 << fmt(g[ImplKind::normgen].frac / g[best].frac) << " | "
                                 << fmt(g[best].ms / g[ImplKind::normgen].ms) << " |\n";
                    }
                }
        out << "\n`normgen / X` > 1 means normgen is faster than X (ratio of geometric-mean "
               "fractions of reference, and inverse ratio of geometric-mean times).\n\n"
            << "### normgen against the best peer (the faster of oneDNN and libtorch by "
               "geometric mean, per op, fusion and format)\n\n"
            << headline.str() << "\n";
    }

    void per_shape(std::ostream &out, Fusion fu, Op op, Format f) const {
        const bool compare = has(ImplKind::normgen) && o_.impls.size() > 1;
        out << "## " << title(fu, op) << ", " << name(f) << "\n\n"
            << "| shape | MB | ref GB/s |" << (has(ImplKind::normgen) ? " normgen GB/s |" : "");
        for (ImplKind k : o_.impls) out << ' ' << name(k) << " ms | frac |";
        if (compare) out << " normgen / best peer |";
        out << " normgen kernel |\n|---|---:|---:|" << (has(ImplKind::normgen) ? "---:|" : "");
        for (size_t k = 0; k < o_.impls.size(); k++) out << "---:|---:|";
        if (compare) out << "---:|";
        out << "---|\n";
        for (size_t s = 0; s < suite_.shapes.size(); s++) {
            const Problem p{suite_.shapes[s], f, fu};
            std::vector<double> refs;
            for (ImplKind k : o_.impls)
                if (const Result *r = get(s, f, fu, op, k); r && r->timed)
                    refs.push_back(gbps(p, op, r->ref_median_ms));
            std::sort(refs.begin(), refs.end());
            const bool warm = o_.cache == Options::Cache::automatic && !timed_cold(o_, p, op);
            const Result *ng = get(s, f, fu, op, ImplKind::normgen);
            out << "| " << p.shape() << (warm ? "*" : "") << " | " << fmt(p.numel() * 4.0 / 1e6, 1)
                << " | " << (refs.empty() ? "" : fmt(refs[refs.size() / 2], 1)) << " |";
            if (has(ImplKind::normgen))
                out << ' ' << (ng && ng->timed ? fmt(gbps(p, op, ng->median_ms), 1) : "") << " |";
            double best_peer = NAN;
            for (ImplKind k : o_.impls) {
                const Result *r = get(s, f, fu, op, k);
                if (r && r->timed) {
                    out << ' ' << fmt(r->median_ms) << " | " << fmt(r->frac, 2)
                        << (4 * r->disturbed > r->reps ? "!" : "") << " |";
                    if (k != ImplKind::normgen && !(r->frac <= best_peer)) best_peer = r->frac;
                } else {
                    out << ' ' << (r && r->check.rfind("FAIL", 0) == 0 ? "FAIL" : "n/a") << " | |";
                }
            }
            if (compare)
                out << ' ' << (ng && ng->timed ? fmt(ng->frac / best_peer, 2) : "") << " |";
            out << ' ' << (ng ? ng->kernel : "") << " |\n";
        }
        out << '\n';
        if (fu != Fusion::none) {  // the peers' sequences (distinct ones over the shapes)
            for (ImplKind k : peers()) {
                std::vector<std::string> paths;
                for (size_t s = 0; s < suite_.shapes.size(); s++)
                    if (const Result *r = get(s, f, fu, op, k);
                        r && !r->kernel.empty() &&
                        std::find(paths.begin(), paths.end(), r->kernel) == paths.end())
                        paths.push_back(r->kernel);
                if (paths.empty()) continue;
                out << "- " << name(k) << ":";
                for (const std::string &path : paths) out << " `" << path << "`";
                out << '\n';
            }
            out << '\n';
        }
    }

    void measurement(std::ostream &out) const {
        std::ostringstream problems;
        int64_t retries = 0, pairs = 0, disturbed = 0, noisy = 0, timed = 0;
        for (const Case &c : suite_.cases) {
            const Result &r = suite_.results.at(c.bench_name);
            if (r.check != "ok") problems << "- " << c.bench_name << ": " << r.check << '\n';
            if (!r.timed) continue;
            timed++;
            retries += r.retries;
            pairs += r.reps;
            disturbed += r.disturbed;
            noisy += 4 * r.disturbed > r.reps;
        }
        if (!problems.str().empty())
            out << "## Not timed or failed checks\n\n" << problems.str() << '\n';
        out << "## Measurement\n\n"
            << pairs << " timed (reference, kernel) pairs in " << timed << " benchmarks; "
            << retries << " retimed because a thread of the benchmark was preempted by another "
            << "process, " << disturbed << " still preempted after " << kMaxRetries << " retries. "
            << noisy
            << " benchmarks had more than a quarter of their repetitions preempted: their `frac` "
               "is marked `!` and is less reliable (the CSV has the counts).\n\n";
    }

    const Suite &suite_;
    const Options &o_;
};

void write_markdown(const Suite &suite, const std::string &path) {
    std::ofstream out(path);
    if (!out) throw std::runtime_error("--markdown: cannot write '" + path + "'");
    Markdown(suite).write(out);
}

}  // namespace
}  // namespace bench

int main(int argc, char **argv) {
    using namespace bench;
    Suite suite;
    try {
        suite.opt = parse_options(&argc, argv);
        suite.shapes = read_shapes(suite.opt.shapes_file);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "bench_batch_norm: %s\n", e.what());
        return 2;
    }
    suite.opt.l2_bytes = bench::l2_bytes_per_core() * suite.opt.threads;
    const Options &o = suite.opt;
    set_threads(o.threads);
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;

    // Benchmark names: bn/<impl>/<op>/<format>/<shape>, fused bn_relu/... and bn_addrelu/...
    for (size_t s = 0; s < suite.shapes.size(); s++)
        for (Format f : o.formats)
            for (Fusion fu : o.fusions)
                for (Op op : o.ops)
                    for (ImplKind impl : o.impls) {
                        const Problem p{suite.shapes[s], f, fu};
                        const std::string family =
                            fu == Fusion::none ? "bn" : std::string("bn_") + name(fu);
                        Case c{
                            s,
                            f,
                            fu,
                            op,
                            impl,
                            family + "/" + name(impl) + "/" + name(op) + "/" + name(f) + "/" + p.shape()};
                        suite.cases.push_back(c);
                        suite.results[c.bench_name];
                    }
    for (const Case &c : suite.cases) {
        const Problem p{suite.shapes[c.shape], c.format, c.fusion};
        // Repetitions: the budget over a pessimistic estimate of one sample pair (10 GB/s, or
        // 1 ms for the small problems that take several calls per sample), odd, in
        // [min_reps, 101] (min_reps 15 unless --min-reps says otherwise).
        const double pair_s =
            std::max(1e-3, 2.0 * passes(p, c.op) * p.numel() * sizeof(float) / 10e9);
        const int reps =
            o.reps ? o.reps : std::clamp(int(o.budget_s / pair_s) | 1, o.min_reps, 101);
        suite.results[c.bench_name].planned_reps = reps;
        benchmark::RegisterBenchmark(c.bench_name.c_str(),
                                     [&suite, &c](benchmark::State &st) { run_case(st, suite, c); })
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond)
            ->Iterations(1)
            ->Repetitions(reps)
            ->ReportAggregatesOnly(true)
            ->ComputeStatistics("min", [](const std::vector<double> &v) {
                return *std::min_element(v.begin(), v.end());
            });
    }

    Reporter reporter(suite);
    benchmark::RunSpecifiedBenchmarks(&reporter);
    benchmark::Shutdown();

    try {
        if (!o.csv.empty()) write_csv(suite, o.csv);
        if (!o.markdown.empty()) write_markdown(suite, o.markdown);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "bench_batch_norm: %s\n", e.what());
        return 2;
    }
    int failed = 0;
    for (const auto &[bench_name, r] : suite.results)
        if (r.check.rfind("FAIL", 0) == 0) failed++;
    if (failed)
        std::fprintf(stderr, "bench_batch_norm: %d case(s) failed the sanity check\n", failed);
    return failed ? 1 : 0;
}

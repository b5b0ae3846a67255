#include "tune_core.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <stdexcept>

#include "../../bench/bandwidth_reference.h"
#include "../../tests/reference.h"

extern char **environ;

namespace normgen::tune {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::vector<Task> &all_tasks() {
    static const std::vector<Task> tasks = {{"bn_fwd_train", "contig"}, {"bn_fwd_train", "cl"},
                                            {"bn_fwd_infer", "contig"}, {"bn_fwd_infer", "cl"},
                                            {"bn_bwd_train", "contig"}, {"bn_bwd_train", "cl"}};
    return tasks;
}

// As cmake/NormgenKernels.cmake lists them (the package's targets).
IsaTarget isa_target(const std::string &isa) {
    if (isa == "sse41") return {isa, "x86-64", "x86-64-linux-sse41"};
    if (isa == "avx2") return {isa, "x86-64", "x86-64-linux-sse41-avx-avx2-fma-f16c"};
    if (isa == "avx512")
        return {isa, "x86-64", "x86-64-linux-sse41-avx-avx2-fma-f16c-avx512-avx512_skylake"};
    throw std::runtime_error("--isa " + isa + ": expected sse41, avx2 or avx512");
}

std::string best_host_isa() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return "avx512";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
    return "sse41";
}

Shape Shape::from_dims(std::vector<int64_t> dims) {
    Shape s;
    s.dims = std::move(dims);
    s.n = s.dims.at(0);
    s.c = s.dims.at(1);
    for (size_t i = 2; i < s.dims.size(); i++) s.s *= s.dims[i];
    return s;
}

Shape Shape::parse(const std::string &text) {
    std::vector<int64_t> dims;
    std::stringstream ss(text);
    std::string part;
    try {
        while (std::getline(ss, part, 'x')) dims.push_back(std::stoll(part));
    } catch (const std::exception &) {
        dims.clear();
    }
    if (dims.size() < 2 || dims.size() > 5 ||
        std::any_of(dims.begin(), dims.end(), [](int64_t d) { return d < 1; }))
        throw std::invalid_argument("'" + text +
                                    "' is not a shape like 32x64x56x56 (2..5 extents >= 1)");
    return from_dims(std::move(dims));
}

std::string Shape::key() const {
    return "n" + std::to_string(n) + "_c" + std::to_string(c) + "_s" + std::to_string(s);
}

std::string Shape::text() const {
    std::string t;
    for (size_t i = 0; i < dims.size(); i++) t += (i ? "x" : "") + std::to_string(dims[i]);
    return t;
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.at(v.size() / 2);
}

std::vector<Shape> read_shape_file(const std::string &path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot read shape file '" + path + "'");
    std::vector<Shape> shapes;
    std::string line;
    for (int number = 1; std::getline(in, line); number++) {
        line = line.substr(0, line.find('#'));
        line.erase(std::remove_if(line.begin(), line.end(), ::isspace), line.end());
        if (line.empty()) continue;
        try {
            shapes.push_back(Shape::parse(line));
        } catch (const std::invalid_argument &e) {
            throw std::runtime_error(path + ":" + std::to_string(number) + ": " + e.what());
        }
    }
    return shapes;
}

bool task_serves(const Task &t, const Shape &s) { return t.layout == "cl" || s.s > 1; }

std::vector<KnobChoices> search_space(const Task &t) {
    std::vector<KnobChoices> space = {{"vectors", {1, 2, 4}}, {"streaming_stores", {false, true}}};
    if (t.layout == "contig") {
        if (t.training()) {
            space.push_back({"stats_per_channel", {true, false}});
            space.push_back({"prefetch_next_channel", {false, true}});
            space.push_back({"float32_stat_rows", {1, 8, 16, 32}});
        }
        space.push_back({"channels_per_task", {1, 2, 4, 8, 16, 32, 64}});
        space.push_back({"batch_outer", {false, true}});
    } else {
        KnobChoices task_elements{"task_elements", {}};
        for (int e = 4096; e <= (1 << 20); e *= 2) task_elements.values.push_back(e);
        space.push_back(task_elements);
        space.push_back({"balanced_tasks", {false, true}});
        if (t.training()) {
            space.push_back({"float32_stat_rows", {1, 8, 16, 32}});
            space.push_back({"sequential_stat_rows", {false, true}});
            space.push_back({"channel_block", {0, 64, 128, 256}});
        }
    }
    return space;
}

bool knobs_run_on(const CpuKnobs &k, const Task &t, const Shape &s) {
    if (!k.streaming_stores) return true;
    const auto whole_lines = [](int64_t elements) { return elements * sizeof(float) % 64 == 0; };
    if (t.layout == "contig" && k.batch_outer && k.flat_block_rows)  // a block's run, a row C*S
        return whole_lines(s.s * k.channels_per_task) && whole_lines(s.c * s.s);
    return whole_lines(t.layout == "contig" ? s.s : s.c);
}

nlohmann::json relevant_knobs(const Task &t, const CpuKnobs &k) {
    const json all = k.to_json();
    json j = json::object();
    for (const auto &choice : search_space(t)) j[choice.name] = all.at(choice.name);
    return j;
}

// ---- Candidates ---------------------------------------------------------------------------

namespace {

// Runs argv, output to log_path; returns the exit status.
int run_process(const std::vector<std::string> &argv, const std::string &log_path) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    std::vector<char *> args;
    for (const auto &a : argv) args.push_back(const_cast<char *>(a.c_str()));
    args.push_back(nullptr);
    pid_t pid;
    const int err = posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (err) throw std::runtime_error("cannot start " + argv[0] + ": " + std::strerror(err));
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string read_text(const std::string &path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

std::string generator_of(const Task &t) {
    return t.backward() ? "batch_norm_backward" : "batch_norm_forward";
}

std::string mode_of(const Task &t) { return t.family == "bn_fwd_infer" ? "inference" : "training"; }

}  // namespace

std::unique_ptr<Candidate> Candidate::build(const BuildTools &tools, const Task &task,
                                            const IsaTarget &target, const CpuKnobs &knobs,
                                            const std::vector<std::string> &extra_params,
                                            const Shape *exact) {
    fs::create_directories(tools.work_dir);
    std::string tmpl = tools.work_dir + "/cand-XXXXXX";
    if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp in " + tools.work_dir + " failed");
    auto cand = std::unique_ptr<Candidate>(new Candidate());
    cand->dir_ = tmpl;
    cand->keep_ = tools.keep;
    // The package's own name for a kernel of this variant.
    cand->name_ = task.family + "_f32_" + task.layout + "_" + target.isa +
                  (exact ? "_" + exact->key() : "");
    cand->knobs_ = knobs;
    const std::string log = cand->dir_ + "/build.log";
    std::vector<std::string> gen = {tools.generator_exe,
                                    "-g",
                                    generator_of(task),
                                    "-f",
                                    cand->name_,
                                    "-n",
                                    cand->name_,
                                    "-e",
                                    "object",
                                    "-o",
                                    cand->dir_,
                                    "target=" + target.halide_target + "-no_runtime",
                                    "mode=" + mode_of(task),
                                    "dtype=f32",
                                    "activation=none",
                                    "residual=false",
                                    "layout=" + task.layout,
                                    "shape=" + (exact ? exact->key() : std::string("generic")),
                                    "knobs=" + knobs.to_json().dump()};
    gen.insert(gen.end(), extra_params.begin(), extra_params.end());
    if (run_process(gen, log) != 0)
        throw std::runtime_error("generator failed for knobs " + knobs.to_json().dump() + ":\n" +
                                 read_text(log));
    const std::string lib = "libcandidate.so", link_log = cand->dir_ + "/link.log";
    if (run_process({tools.cxx, "-shared", "-o", cand->dir_ + "/" + lib,
                     cand->dir_ + "/" + cand->name_ + ".o"},
                    link_log) != 0)
        throw std::runtime_error("linking the candidate failed:\n" + read_text(link_log));

    // The manifest entry, as cmake/NormgenKernels.cmake writes it.
    std::vector<std::string> features;
    {
        std::stringstream ss(target.halide_target);
        std::string part;
        for (int i = 0; std::getline(ss, part, '-'); i++)
            if (i >= 3) features.push_back(part);
    }
    const bool fwd = !task.backward();
    json manifest = {{"format", "normgen-package"},
                     {"abi_version", NG_ABI_VERSION},
                     {"generator", "normgen tune candidate"},
                     {"kernels",
                      {{{"name", cand->name_},
                        {"op", fwd ? "forward" : "backward"},
                        {"statistics", task.training() ? "batch" : "running"},
                        {"dtype", "f32"},
                        {"layout", task.layout},
                        {"activation", "none"},
                        {"residual", false},
                        {"device", "cpu"},
                        {"arch", target.arch},
                        {"isa", target.isa},
                        {"features", features},
                        {"target", target.halide_target},
                        {"shape", exact ? json{{"kind", "exact"},
                                               {"n", exact->n},
                                               {"c", exact->c},
                                               {"s", exact->s}}
                                        : json{{"kind", "generic"}}},
                        {"file", lib},
                        {"symbol", cand->name_}}}}};
    std::ofstream(cand->dir_ + "/manifest.json") << manifest.dump(1);
    if (ng_runtime_open(cand->dir_.c_str(), &cand->rt_) != NG_OK)
        throw std::runtime_error(std::string("cannot open the candidate package: ") +
                                 ng_last_error());
    return cand;
}

std::string Candidate::build_log() const { return read_text(dir_ + "/build.log"); }

Candidate::~Candidate() {
    ng_runtime_close(rt_);
    if (keep_) return;
    std::error_code ec;
    fs::remove_all(dir_, ec);
}

// ---- Workloads ----------------------------------------------------------------------------

namespace {

float *alloc_tensor(int64_t n) {
    const size_t bytes = (static_cast<size_t>(n) * sizeof(float) + 63) / 64 * 64;
    auto *p = static_cast<float *>(std::aligned_alloc(64, bytes));
    if (!p) throw std::runtime_error("out of memory for a tensor of " + std::to_string(n));
    return p;
}

// Fills in parallel with a cheap deterministic generator (large tensors: seconds otherwise).
void fill(float *p, int64_t n, uint64_t seed, double lo, double hi) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        uint64_t z = seed + 0x9E3779B97F4A7C15ull * uint64_t(i + 1);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        p[i] = static_cast<float>(lo + (hi - lo) * double(z >> 11) * 0x1.0p-53);
    }
}

ref::View view_of(const Task &t, const Shape &s) {
    ref::View v;
    v.n = s.n;
    v.c = s.c;
    v.s = s.s;
    v.channels_last = t.layout == "cl";
    return v;
}

// The bandwidth references on the calling thread: y = x, or dx = x + dy (dy non-null).
void serial_reference(const float *__restrict x, const float *__restrict dy, float *__restrict out,
                      int64_t n) {
    if (dy)
        for (int64_t i = 0; i < n; i++) out[i] = x[i] + dy[i];
    else
        for (int64_t i = 0; i < n; i++) out[i] = x[i];
}

double seconds_of(const std::function<void()> &f) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// First element where |got - want| > tol * (1 + |want|), as a message; "" if none.
// |got - want| <= tol * (1 + |want|) (+ allowance[i], if given).
std::string compare(const char *what, const float *got, const std::vector<double> &want,
                    double tol, const std::vector<double> &allowance = {}) {
    for (size_t i = 0; i < want.size(); i++) {
        const double err = std::abs(double(got[i]) - want[i]);
        const double extra = allowance.empty() ? 0.0 : allowance[i];
        if (!(err <= tol * (1 + std::abs(want[i])) + extra)) {
            std::ostringstream os;
            os << what << "[" << i << "] = " << got[i] << ", reference " << want[i] << " (error "
               << err << " > " << tol << " * (1 + |reference|)"
               << (extra > 0 ? " + " + std::to_string(extra) : "") << ")";
            return os.str();
        }
    }
    return "";
}

// Behind the output: a guard region holding a sentinel, so that a kernel writing past its
// output's end is caught by the check (before it corrupts the heap further on).
constexpr int64_t kMisalignRoom = 16, kGuardFloats = 1024;
constexpr float kGuardSentinel = -12345.678f;

}  // namespace

Workload::Workload(const Task &task, const Shape &shape, uint64_t seed)
    : task_(task), shape_(shape) {
    const int64_t n = shape.elements();
    const size_t C = static_cast<size_t>(shape.c);
    x_ = alloc_tensor(n);
    out_base_ = alloc_tensor(n + kMisalignRoom + kGuardFloats);
    out_ = out_base_;
    std::fill(out_ + n, out_base_ + n + kMisalignRoom + kGuardFloats, kGuardSentinel);
    // Channels get distinct offsets so a channel mix-up cannot pass the check.
    fill(x_, n, seed, -1.0, 1.0);
    const ref::View v = view_of(task, shape);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const int64_t c = v.channels_last ? i % v.c : (i / v.s) % v.c;
        x_[i] = x_[i] * float(1 + c % 7) + float(c % 13) - 6.0f;
    }
    std::fill(out_, out_ + n, 0.0f);
    if (task.backward()) {
        dy_ = alloc_tensor(n);
        fill(dy_, n, seed * 3 + 1, -1.0, 1.0);
    }
    std::mt19937 rng(static_cast<unsigned>(seed));
    std::uniform_real_distribution<float> u(0.5f, 1.5f), b(-0.5f, 0.5f);
    for (auto *vec : {&weight_, &bias_, &running_mean_, &running_var_, &save_mean_, &save_invstd_,
                      &dweight_, &dbias_})
        vec->assign(C, 0.0f);
    for (size_t c = 0; c < C; c++) {
        weight_[c] = u(rng) * (c % 2 ? -1.0f : 1.0f);
        bias_[c] = b(rng);
        running_mean_[c] = b(rng);
        running_var_[c] = u(rng);
    }
    if (task.backward()) {
        // The statistics a forward pass would save (float64, rounded to float).
        ref::Params p;
        p.training = true;
        p.track_running_stats = false;
        const auto fwd = ref::forward(v, p, x_, weight_.data(), bias_.data(), nullptr, nullptr);
        given_mean_.assign(fwd.mean.begin(), fwd.mean.end());
        given_invstd_.assign(fwd.invstd.begin(), fwd.invstd.end());
    }
}

Workload::~Workload() {
    std::free(x_);
    std::free(dy_);
    std::free(out_base_);
}

void Workload::misalign_output() {
    out_ = out_base_ + 1;
    std::fill(out_, out_ + shape_.elements(), 0.0f);
    std::fill(out_ + shape_.elements(),
              out_base_ + shape_.elements() + kMisalignRoom + kGuardFloats, kGuardSentinel);
}

ng_tensor Workload::tensor() const {
    ng_tensor t{static_cast<int32_t>(shape_.dims.size()),
                {0, 0, 0, 0, 0},
                task_.layout == "cl" ? NG_CHANNELS_LAST : NG_CONTIGUOUS,
                NG_F32,
                NG_CPU};
    for (size_t i = 0; i < shape_.dims.size(); i++) t.shape[i] = shape_.dims[i];
    return t;
}

ng_batch_norm_params Workload::params() const {
    ng_batch_norm_params p = ng_batch_norm_params_default();
    p.training = task_.training();
    return p;
}

ng_plan *make_plan(ng_runtime *rt, const Workload &w, const Task &task) {
    const ng_tensor t = w.tensor();
    const ng_batch_norm_params p = w.params();
    ng_plan *plan = nullptr;
    if (ng_plan_create(rt, task.backward() ? NG_OP_BACKWARD : NG_OP_FORWARD, &t, &p, &plan) !=
        NG_OK)
        throw std::runtime_error(std::string("plan: ") + ng_last_error());
    return plan;
}

void Workload::run(ng_plan *plan) {
    ng_status st;
    if (task_.backward()) {
        st = ng_batch_norm_backward(plan, x_, dy_, nullptr, weight_.data(), bias_.data(),
                                    running_mean_.data(), running_var_.data(), given_mean_.data(),
                                    given_invstd_.data(), out_, dweight_.data(), dbias_.data(),
                                    nullptr);
    } else {
        // Training moves the running statistics; inference reads them (kept constant).
        std::vector<float> rm = running_mean_, rv = running_var_;
        st = ng_batch_norm_forward(plan, x_, nullptr, out_, weight_.data(), bias_.data(),
                                   task_.training() ? rm.data() : running_mean_.data(),
                                   task_.training() ? rv.data() : running_var_.data(), &batches_,
                                   save_mean_.data(), save_invstd_.data());
    }
    if (st != NG_OK) throw std::runtime_error(std::string("kernel call: ") + ng_last_error());
}

std::string Workload::compare_with_reference(int float32_stat_rows) const {
    constexpr double kTol = 1e-5;  // fp32 results of float64 sums: errors measured ~1e-7
    const ref::View v = view_of(task_, shape_);
    const int64_t n = shape_.elements();
    for (const float *g = out_ + n; g < out_base_ + n + kMisalignRoom + kGuardFloats; g++)
        if (*g != kGuardSentinel)
            return std::string(task_.backward() ? "dx" : "y") + ": written past its end (element " +
                   std::to_string(g - out_) + " of " + std::to_string(n) + ")";
    if (task_.backward()) {
        const auto want = ref::backward(v, x_, dy_, weight_.data(), nullptr, nullptr,
                                        given_mean_.data(), given_invstd_.data(), true, 1e-5);
        // Float32 row blocks: the sums' error bound (as in test_kernels).
        std::vector<double> dweight_allow, dbias_allow;
        if (float32_stat_rows > 1) {
            const ref::BlockSumError be = ref::backward_block_sum_error(
                v, float32_stat_rows, x_, [&](int64_t i) { return double(dy_[i]); },
                given_mean_.data());
            for (int64_t c = 0; c < v.c; c++) {
                dbias_allow.push_back(be.first[size_t(c)]);
                dweight_allow.push_back(be.second[size_t(c)] * given_invstd_[size_t(c)]);
            }
        }
        for (const auto &msg :
             {compare("dx", out_, want.dx, kTol),
              compare("dweight", dweight_.data(), want.dweight, kTol, dweight_allow),
              compare("dbias", dbias_.data(), want.dbias, kTol, dbias_allow)})
            if (!msg.empty()) return msg;
        return "";
    }
    ref::Params p;
    p.training = task_.training();
    ref::RunningStats running;
    running.mean.assign(running_mean_.begin(), running_mean_.end());
    running.var.assign(running_var_.begin(), running_var_.end());
    const auto want = ref::forward(v, p, x_, weight_.data(), bias_.data(), &running);
    if (auto msg = compare("y", out_, want.y, kTol); !msg.empty()) return msg;
    if (task_.training()) {
        if (auto msg = compare("save_mean", save_mean_.data(), want.mean, kTol); !msg.empty())
            return msg;
        if (auto msg = compare("save_invstd", save_invstd_.data(), want.invstd, kTol); !msg.empty())
            return msg;
    }
    return "";
}

const char *Workload::reference_name() const { return task_.backward() ? "read2_write1" : "copy"; }

double Workload::bytes_moved() const {
    return double(shape_.elements()) * sizeof(float) * (task_.backward() ? 3 : 2);
}

void Workload::flush_all() const {
    const int64_t n = shape_.elements();
    bench::flush_from_cache(x_, n);
    bench::flush_from_cache(out_, n);
    if (dy_) bench::flush_from_cache(dy_, n);
}

Workload::Timing Workload::time(ng_plan *plan, int reps) {
    const int64_t n = shape_.elements();
    // Tensors under 1 MiB: the reference runs on one thread. On this oversubscribed 2-core
    // machine a 2-thread parallel region often waits a time slice (milliseconds) for its second
    // thread, which swamps a copy of microseconds (measured: 8x32x8x8 "kernel 200x faster than
    // a copy"); the kernel keeps its own threading, as it would run in use.
    const bool small = shape_.elements() * sizeof(float) < (size_t(1) << 20);
    // (Changing OpenMP's thread count instead would make the kernel's next parallel loop
    // rebuild its thread team: measured 1000x slower kernels.)
    auto reference = [&] {
        if (small)
            serial_reference(x_, dy_, out_, n);
        else if (task_.backward())
            bench::read2_write1_reference(x_, dy_, out_, n);
        else
            bench::copy_reference(x_, out_, n);
    };
    auto kernel = [&] { run(plan); };
    // One repetition: cold (reference and kernel each start with every tensor flushed), then
    // warm (each run once untimed, then timed). Reference and kernel are timed side by side so
    // that both see the same memory bandwidth, which drifts on this machine.
    struct Rep {
        double ref_cold, k_cold, ref_warm, k_warm;
    };
    std::vector<Rep> all;
    auto repeat = [&](int count) {
        for (int r = 0; r < count; r++) {
            Rep rep;
            flush_all();
            rep.ref_cold = seconds_of(reference);
            flush_all();
            rep.k_cold = seconds_of(kernel);
            reference();
            rep.ref_warm = seconds_of(reference);
            kernel();
            rep.k_warm = seconds_of(kernel);
            all.push_back(rep);
        }
    };
    // Other processes share the 2 cores: a parallel loop whose second thread is descheduled
    // takes a time slice (milliseconds) longer. A cold (or warm) measurement is "disturbed" when
    // its reference or kernel time exceeds 1.5x the fastest of its kind; disturbed ones are left
    // out of the medians, and more repetitions are taken (up to 3x reps) until at least 3 are
    // clean. If fewer remain, the ratio of the fastest reference to the fastest kernel is used.
    struct Stat {
        double frac = 0, ms = 0;
        int clean = 0;
    };
    auto summarise = [&](double Rep::*ref_time, double Rep::*k_time) {
        double best_ref = 1e30, best_k = 1e30;
        for (const Rep &r : all) {
            best_ref = std::min(best_ref, r.*ref_time);
            best_k = std::min(best_k, r.*k_time);
        }
        std::vector<double> ratio, ms;
        for (const Rep &r : all)
            if (r.*ref_time <= 1.5 * best_ref && r.*k_time <= 1.5 * best_k) {
                ratio.push_back(r.*ref_time / r.*k_time);
                ms.push_back(r.*k_time * 1e3);
            }
        Stat st;
        st.clean = int(ratio.size());
        if (ratio.size() >= 3) {
            st.frac = median(ratio);
            st.ms = median(ms);
        } else {
            st.frac = best_ref / best_k;
            st.ms = best_k * 1e3;
        }
        return st;
    };
    Stat cold, warm;
    for (int round = 0; round < 3; round++) {
        repeat(reps);
        cold = summarise(&Rep::ref_cold, &Rep::k_cold);
        warm = summarise(&Rep::ref_warm, &Rep::k_warm);
        if (cold.clean >= 3 && warm.clean >= 3) break;
    }
    Timing t;
    t.frac_cold = cold.frac;
    t.frac_warm = warm.frac;
    t.ms_cold = cold.ms;
    t.ms_warm = warm.ms;
    t.gbps_cold = bytes_moved() / (t.ms_cold * 1e-3) / 1e9;
    t.reps = int(all.size());
    t.disturbed = int(all.size()) - cold.clean;
    return t;
}

std::vector<Shape> check_shapes(bool streaming_stores) {
    // C odd and not a multiple of any channel block; S not a multiple of any vector width; one
    // shape with few elements per channel, one with C > 16 lanes * 4 vectors in channels-last.
    if (!streaming_stores)
        return {Shape::from_dims({2, 37, 29}), Shape::from_dims({3, 19, 131}),
                Shape::from_dims({5, 70, 3})};
    // A kernel with streaming stores runs only on rows of a multiple of 16 floats (S contiguous,
    // C channels-last): three shapes have such rows in each layout (check_candidate runs a
    // candidate on those it runs on), odd extents elsewhere, and rows that are not a multiple of
    // 2 or 4 vectors (a tail of one vector).
    return {Shape::from_dims({3, 19, 144}), Shape::from_dims({5, 37, 48}),
            Shape::from_dims({2, 7, 80}),   Shape::from_dims({2, 80, 29}),
            Shape::from_dims({3, 48, 3}),   Shape::from_dims({5, 112, 7})};
}

std::string check_candidate(const Candidate &cand, const Task &task,
                            const std::vector<Shape> &shapes) {
    uint64_t seed = 7;
    for (const Shape &s : shapes) {
        if (!knobs_run_on(cand.knobs(), task, s)) continue;  // the runtime would pass it over
        try {
            Workload w(task, s, seed++);
            ng_plan *plan = make_plan(cand.runtime(), w, task);
            std::string why;
            try {
                w.run(plan);
                why = w.compare_with_reference(cand.knobs().float32_stat_rows);
            } catch (...) {
                ng_plan_destroy(plan);
                throw;
            }
            ng_plan_destroy(plan);
            if (!why.empty()) return s.text() + ": " + why;
        } catch (const std::exception &e) {
            return s.text() + ": " + e.what();
        }
    }
    return "";
}

std::string cpu_model() {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line))
        if (line.rfind("model name", 0) == 0) {
            auto colon = line.find(':');
            return colon == std::string::npos ? line : line.substr(colon + 2);
        }
    return "unknown";
}

std::string utc_now() {
    char buf[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    return buf;
}

}  // namespace normgen::tune

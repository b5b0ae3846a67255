// The parts of `normgen tune` that tests reuse: building a candidate kernel from knob values,
// checking it against the float64 reference, and timing it beside a bandwidth reference.
//
// A candidate is the existing generator (normgen_generators, run with knobs={...}) compiled for
// one target into a one-kernel package, opened with libnormgen's runtime: the tuner runs exactly
// the code path a shipped kernel runs, and never links libHalide itself.
#pragma once

#include <normgen/normgen.h>

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../../schedules/cpu_knobs.h"

namespace normgen::tune {

// An op family the tuner searches, in one layout: bn_fwd_train | bn_fwd_infer | bn_bwd_train,
// contig | cl (fp32, no fusion).
struct Task {
    std::string family, layout;
    std::string key() const { return family + "/" + layout; }
    bool backward() const { return family == "bn_bwd_train"; }
    bool training() const { return family != "bn_fwd_infer"; }
};
const std::vector<Task> &all_tasks();

// An x86 ISA level as the kernel package names it, with its Halide target.
struct IsaTarget {
    std::string isa, arch = "x86-64", halide_target;
    std::string tuned_name() const { return arch + "-" + isa; }  // schedules/tuned/<this>.json
};
IsaTarget isa_target(const std::string &isa);  // sse41 | avx2 | avx512; throws on others
std::string best_host_isa();

// A tensor shape: the PyTorch dims and the canonical (N, C, S) view.
struct Shape {
    std::vector<int64_t> dims;
    int64_t n = 1, c = 1, s = 1;
    static Shape from_dims(std::vector<int64_t> dims);
    // "32x64x56x56": 2..5 extents >= 1; throws std::invalid_argument saying so.
    static Shape parse(const std::string &text);
    std::string key() const;   // n32_c64_s3136, as tuned entries and exact kernels name it
    std::string text() const;  // 32x64x56x56
    int64_t elements() const { return n * c * s; }
};
// The median of a non-empty sample.
double median(std::vector<double> v);
// One shape a line (e.g. 32x64x56x56), '#' comments; throws naming the file and line.
std::vector<Shape> read_shape_file(const std::string &path);
// Does the task's layout serve this shape? Contiguous tensors with S = 1 run channels-last.
bool task_serves(const Task &t, const Shape &s);
// Can a kernel with these knobs run on the shape? One with streaming stores needs output rows
// (S contiguous, C channels-last; with flat_block_rows a block's run and C*S) of a multiple of
// 64 bytes; the runtime passes it over elsewhere, so the tuner times it only where it runs.
bool knobs_run_on(const CpuKnobs &k, const Task &t, const Shape &s);

// The search space of a task: the knobs its schedule reads, each with its allowed values.
struct KnobChoices {
    std::string name;
    std::vector<nlohmann::json> values;
};
std::vector<KnobChoices> search_space(const Task &t);
// The knobs a task's schedule reads, from a full knob set (the rest are irrelevant to it).
nlohmann::json relevant_knobs(const Task &t, const CpuKnobs &k);

struct BuildTools {
    std::string generator_exe;  // normgen_generators
    std::string cxx;            // links the object into a shared library
    std::string work_dir;       // candidate packages go here
    bool keep = false;          // leave each candidate's folder behind (to profile its kernel)
};

// A candidate kernel: a one-kernel package in its own folder, opened with the runtime.
class Candidate {
public:
    // Runs the generator with the knobs (and extra generator params, e.g. for tests), links the
    // object and opens the package. A generic kernel, or with `exact` one for that shape only
    // (extents fixed at generation, as the build's exact kernels). Throws std::runtime_error
    // with the generator's output.
    static std::unique_ptr<Candidate> build(const BuildTools &tools, const Task &task,
                                            const IsaTarget &target, const CpuKnobs &knobs,
                                            const std::vector<std::string> &extra_params = {},
                                            const Shape *exact = nullptr);
    ~Candidate();
    ng_runtime *runtime() const { return rt_; }
    const std::string &name() const { return name_; }
    // The package folder; build.log there holds the generator's output (build_log()).
    const std::string &dir() const { return dir_; }
    std::string build_log() const;
    const CpuKnobs &knobs() const { return knobs_; }

private:
    Candidate() = default;
    ng_runtime *rt_ = nullptr;
    std::string dir_, name_;
    CpuKnobs knobs_;
    bool keep_ = false;
};

// Buffers for one task on one shape: inputs filled with deterministic data, outputs.
class Workload {
public:
    Workload(const Task &task, const Shape &shape, uint64_t seed);
    ~Workload();
    Workload(const Workload &) = delete;
    Workload &operator=(const Workload &) = delete;
    // Runs the candidate's plan once; throws with the runtime's message on a failed call.
    void run(ng_plan *plan);
    ng_tensor tensor() const;
    ng_batch_norm_params params() const;

    // Compares the outputs of the last run with the float64 reference (reference.h): y or dx
    // within 1e-5 of each element's magnitude (|got - want| <= 1e-5 * (1 + |want|)), and the
    // per-channel outputs (save_mean, save_invstd / dweight, dbias) likewise. Returns "" when
    // every value is within tolerance, else which output is off, where, and by how much.
    // float32_stat_rows: the candidate's knob; with float32 row blocks the backward's sums
    // (dweight, dbias) may also err by their blocks' running error bound (reference.h), which
    // on large channels exceeds 1e-5 of a sum that cancels to nearly 0.
    // A write past the output's end (into a guard region behind it) fails the check too.
    std::string compare_with_reference(int float32_stat_rows = 1) const;

    // Cold (every tensor flushed from the caches before each timed call) and warm medians, each
    // as a fraction of the bandwidth reference moving the same bytes, timed just before;
    // repetitions disturbed by other processes are left out (see the definition).
    struct Timing {
        double frac_cold = 0, frac_warm = 0, ms_cold = 0, ms_warm = 0, gbps_cold = 0;
        int reps = 0, disturbed = 0;  // repetitions taken; cold ones left out as disturbed
    };
    Timing time(ng_plan *plan, int reps);
    // "copy" (forward: read x, write y) or "read2_write1" (backward: read x, dy, write dx).
    const char *reference_name() const;

    float *y_or_dx() const { return out_; }  // for tests that tamper with a result
    // Moves the output one float past a 64-byte boundary (for tests of streaming stores, which
    // need it aligned); cleared.
    void misalign_output();

private:
    void flush_all() const;
    double bytes_moved() const;
    Task task_;
    Shape shape_;
    float *x_ = nullptr, *dy_ = nullptr, *out_ = nullptr, *out_base_ = nullptr;
    std::vector<float> weight_, bias_, running_mean_, running_var_, save_mean_, save_invstd_,
        dweight_, dbias_;
    std::vector<float> given_mean_, given_invstd_;  // backward: the forward's statistics
    int64_t batches_ = 0;
};

// Builds a plan for the workload's tensor on the candidate's runtime; throws on failure.
ng_plan *make_plan(ng_runtime *rt, const Workload &w, const Task &task);

// Odd shapes that exercise every tail a schedule can have (vector, channel block, row block):
// a candidate must pass on all of them before it is timed.
// With streaming_stores (the candidate's knob), shapes whose rows it can run on.
std::vector<Shape> check_shapes(bool streaming_stores = false);
// Runs the candidate on each shape and compares with the reference; "" if all pass, else why.
std::string check_candidate(const Candidate &cand, const Task &task,
                            const std::vector<Shape> &shapes);

// CPU model (from /proc/cpuinfo) and the current UTC date, for tuned entries.
std::string cpu_model();
std::string utc_now();

}  // namespace normgen::tune

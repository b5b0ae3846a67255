// normgen-compare: A/B timing of knob sets on one shape. Each knob set (a JSON object, as in a
// tuned entry) is built as the exact kernel of the shape, checked against the float64
// reference there, then all are timed in interleaved rounds (each round times every kernel
// once, in rotated order, beside the bandwidth reference), so that they see the same moments
// of the machine's drifting bandwidth. Prints each kernel's median fraction of the reference
// (cold and warm) and its milliseconds.
//
//   normgen-compare --task bn_fwd_train/contig --shape 32x1024x14x14 [--isa avx512]
//                   [--rounds 5] [--reps 11] [--generic] [--keep]
//                   '{"batch_outer":true,...}' '{...}'
#include "tune/tune_core.h"

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

using namespace normgen;
using namespace normgen::tune;
using json = nlohmann::json;

namespace {

int usage() {
    std::fprintf(stderr,
                 "usage: normgen-compare --task FAMILY/LAYOUT --shape NxCxHxW [--isa ISA]\n"
                 "                       [--rounds R] [--reps K] [--generic] [--work-dir DIR]\n"
                 "                       [--keep] KNOBS_JSON...\n");
    return 2;
}

int compare(int argc, char **argv) {
    std::string task_key, shape_text, isa = best_host_isa(), work_dir = "build-compare";
    int rounds = 5, reps = 11;
    bool generic = false, keep = false;
    std::vector<json> knob_sets;
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw std::invalid_argument(a + ": missing value");
            return argv[++i];
        };
        if (a == "--task")
            task_key = value();
        else if (a == "--shape")
            shape_text = value();
        else if (a == "--isa")
            isa = value();
        else if (a == "--rounds")
            rounds = std::stoi(value());
        else if (a == "--reps")
            reps = std::stoi(value());
        else if (a == "--keep")
            keep = true;
        else if (a == "--generic")
            generic = true;
        else if (a == "--work-dir")
            work_dir = value();
        else if (!a.empty() && a[0] == '{')
            knob_sets.push_back(json::parse(a));
        else
            throw std::invalid_argument("unknown argument '" + a + "'");
    }
    if (task_key.empty() || shape_text.empty() || knob_sets.empty() || rounds < 1 || reps < 1)
        return usage();
    const Task *task = nullptr;
    for (const Task &t : all_tasks())
        if (t.key() == task_key) task = &t;
    if (!task) throw std::invalid_argument("--task " + task_key + ": no such tuning task");
    const Shape shape = Shape::parse(shape_text);
    const IsaTarget target = isa_target(isa);
    const BuildTools tools{NORMGEN_GENERATOR_EXE, NORMGEN_CXX, work_dir, keep};

    std::vector<std::unique_ptr<Candidate>> kernels;
    for (const json &k : knob_sets) {
        const CpuKnobs knobs = parse_cpu_knobs(k, "knobs " + k.dump());
        kernels.push_back(Candidate::build(tools, *task, target, knobs, {},
                                           generic ? nullptr : &shape));
        Workload check(*task, shape, 23);
        ng_plan *plan = make_plan(kernels.back()->runtime(), check, *task);
        check.run(plan);
        ng_plan_destroy(plan);
        const std::string why = check.compare_with_reference(knobs.float32_stat_rows);
        if (!why.empty()) throw std::runtime_error(k.dump() + ": reference check: " + why);
        std::fprintf(stderr, "built and checked %zu in %s: %s\n", kernels.size(),
                     kernels.back()->dir().c_str(), k.dump().c_str());
    }
    Workload w(*task, shape, 7);
    std::vector<std::vector<Workload::Timing>> times(kernels.size());
    for (int r = 0; r < rounds; r++)
        for (size_t j = 0; j < kernels.size(); j++) {
            const size_t i = (j + size_t(r)) % kernels.size();
            ng_plan *plan = make_plan(kernels[i]->runtime(), w, *task);
            times[i].push_back(w.time(plan, reps));
            ng_plan_destroy(plan);
        }
    std::printf("%s %s, %s reference, %d rounds of %d repetitions\n", task_key.c_str(),
                shape.text().c_str(), w.reference_name(), rounds, reps);
    std::printf("%-4s %9s %9s %9s  %s\n", "", "frac_cold", "frac_warm", "ms_cold", "knobs");
    for (size_t i = 0; i < kernels.size(); i++) {
        std::vector<double> cold, warm, ms;
        for (const auto &t : times[i]) {
            cold.push_back(t.frac_cold);
            warm.push_back(t.frac_warm);
            ms.push_back(t.ms_cold);
        }
        std::printf("%-4zu %9.3f %9.3f %9.4f  %s\n", i + 1, median(cold), median(warm), median(ms),
                    knob_sets[i].dump().c_str());
    }
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    try {
        return compare(argc, argv);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "normgen-compare: %s\n", e.what());
        return 1;
    }
}

// normgen-tune (run as `normgen tune ...`): searches the CPU schedule's knobs per op family,
// layout and shape, and writes schedules/tuned/<target>.json, which the build reads.
//
//   normgen tune [--isa avx512] [--shapes shapes/resnet50_b32.txt] [--budget-minutes 25]
//                [--reps 5] [--shard k/n] [--tasks bn_fwd_train/contig,...] [-o FILE]
//   normgen tune merge a.json b.json [...] -o out.json
//
// Each candidate (a knob set) is generated with the existing generators (knobs={...}), checked
// against the float64 reference on odd shapes, and only then timed on every shape of the file:
// cold and warm medians, each as a fraction of a copy (forward) or read-two-write-one
// (backward) of the same bytes timed right beside it. Random + local search within the budget,
// which is search time only: verifying the winners on their shapes and the confirmation rounds
// come on top (about 1-1.5 min per task on 11 shapes).
// Every trial is stored in the output file ("tuning"), so re-running continues where the last
// run stopped and `merge` combines shards. Entries (exact shape, shape class, generic) are
// derived from the trials; winners are checked against the reference on their real shapes.
// After the search, the baseline and the winners are re-timed in interleaved rounds
// (--confirm-rounds) and winners are chosen again from those medians. Last, each shape's exact
// entry is chosen among exact kernels, the kind the build ships for it (--exact-rounds; see
// TaskSearch::refine_exact): 9 min for the six tasks on the ResNet-50 file (280 kernels).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>
#include <sstream>

#include "../bench/bandwidth_reference.h"
#include "tune/tune_core.h"
#include "tune/tuned_entries.h"

namespace {

using json = nlohmann::json;
using namespace normgen;
using namespace normgen::tune;

int usage() {
    std::fprintf(stderr,
                 "usage: normgen tune [--isa sse41|avx2|avx512] [--shapes FILE] "
                 "[--budget-minutes M] [--reps R] [--shard k/n] [--tasks family/layout,...] "
                 "[--confirm-rounds N] [--confirm-only] [--exact-rounds N] "
                 "[--exact-candidates K] [--exact-only] [--seed N] [-o FILE] [--work-dir DIR] "
                 "[--generator EXE]\n"
                 "       normgen tune merge A.json B.json [...] -o OUT.json\n");
    return 2;
}

json read_json(const std::string &path) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot read '" + path + "'");
    try {
        return json::parse(in);
    } catch (const std::exception &e) {
        throw std::runtime_error("'" + path + "' is not valid JSON: " + e.what());
    }
}

void write_json(const std::string &path, const json &doc) {
    const std::string tmp = path + ".tmp";
    std::ofstream(tmp) << doc.dump(1) << "\n";
    std::rename(tmp.c_str(), path.c_str());  // a crash never leaves a half-written file
}

// ---- The search ---------------------------------------------------------------------------

struct Options {
    std::string isa = best_host_isa();
    std::string shapes_path = NORMGEN_DEFAULT_SHAPES;
    std::string output;
    double budget_minutes = 25;
    int reps = 5;
    int shard = 0, shards = 1;
    std::vector<std::string> task_filter;
    unsigned seed = 1;
    BuildTools tools{NORMGEN_GENERATOR_EXE, NORMGEN_CXX, ""};
    std::string command_line;
    bool output_existed = false;  // the baseline is the knobs the existing file gives
    int confirm_rounds = 3;       // after the search; 0: none
    bool confirm_only = false;    // no search: confirm the winners of the existing trials
    int exact_rounds = 3;         // exact kernels per shape, after confirming; 0: none
    int exact_candidates = 2;     // the best generic trials per shape built as exact kernels
    bool exact_only = false;      // neither search nor confirmation: the exact kernels only
};

// The variants the exact step builds of its candidates `base` (the entry now first, then the
// best earlier exact kernel, then the rest): for the contiguous layout, each with flat rows
// (batch_outer, flat_block_rows) at a few channel block sizes (in inference where S * 4 bytes is
// not whole lines, also streaming: only flat rows can there), the first two also prefetching
// the next block (prefetch_next_block) in training, with their float32 statistics rows as they
// are and in one block of all N rows, and the first as one task where the tensor is at most a
// quarter of the L2; for channels-last training, each with its float32 row blocks summed row by
// row (sequential_stat_rows), the first two also at 16 and 32 rows, the first two with
// balanced_tasks, and the first two in channel blocks (channel_block) of 64 to 256 channels
// whose slice of the statistics inputs is at most twice the L2 (`l2_bytes`), two tasks or more.
std::vector<json> exact_variants(const Task &task, const Shape &s, const std::vector<json> &base,
                                int64_t l2_bytes) {
    std::vector<json> variants;
    auto add = [&](const json &k) {
        if (std::find(variants.begin(), variants.end(), k) == variants.end())
            variants.push_back(k);
    };
    if (task.layout == "contig") {
        // The first two (the entry now and the best earlier exact kernel) at two more block
        // sizes (backward 32x1024x14x14 ran at 0.83 of the reference in blocks of 4 channels,
        // 0.80 in 8, normgen-compare), and with statistics, each flat variant of them also
        // prefetching its next block, about 8 tasks in all (4 per thread here), with streaming
        // stores.
        for (size_t i = 0; i < base.size(); i++) {
            std::vector<int> blocks = {base[i].value("channels_per_task", 1), 16, 32};
            if (i < 2) blocks.insert(blocks.end(), {8, 4});
            for (int block : blocks) {
                json k = base[i];
                k["batch_outer"] = true;
                k["flat_block_rows"] = true;
                k["channels_per_task"] = block;
                k.erase("prefetch_next_block");
                k.erase("blocks_per_task");
                add(k);
                // Inference with S of no whole lines (S = 196): only flat rows can stream.
                if (!task.training() && !k.value("streaming_stores", false) &&
                    s.s * 4 % 64 != 0 && block * s.s % 16 == 0) {
                    json streaming = k;
                    streaming["streaming_stores"] = true;
                    add(streaming);
                }
                // A task of one block would prefetch another task's block: at least 2.
                // The block's run must be whole 64-byte lines (16 floats): the variant
                // streams its stores, and a prefetch needs whole vectors.
                const int64_t per_task = s.c / block / 8;
                if (i >= 2 || !task.training() || block * s.s % 16 != 0 || per_task < 2)
                    continue;
                // As in a copy: the output streams out while the next block streams in.
                k["prefetch_next_block"] = true;
                k["blocks_per_task"] = int(per_task);
                k["streaming_stores"] = true;
                add(k);
                // And with one float32 block of rows (all N) per column: the float64
                // sums then add one block per column, not N / float32_stat_rows. Measured
                // on forward 32x1024x14x14: 0.86 -> 0.93 of a copy with 8-channel blocks.
                if (s.n > k.value("float32_stat_rows", 1) && s.n <= kMaxFloat32StatRows) {
                    k["float32_stat_rows"] = int(s.n);
                    add(k);
                }
            }
        }
        // A tensor of at most a quarter of one core's L2 (8x32x8x8: 64 KiB) also as one task,
        // rows and flat rows: waking the other threads costs about what the kernel does.
        if (!base.empty() && s.n * s.c * s.s * 4 <= l2_bytes / 4) {
            for (bool flat : {false, true}) {
                json k = base[0];
                k["batch_outer"] = true;
                k["flat_block_rows"] = flat;
                k["channels_per_task"] = int(s.c);
                k.erase("prefetch_next_block");
                k.erase("blocks_per_task");
                add(k);
            }
        }
    } else if (task.training()) {
        // Channels-last: each of them with its float32 row blocks summed row by row, the
        // first two also at 16 and 32 rows, with balanced tasks, and in channel blocks.
        const int64_t statistics_inputs = task.backward() ? 2 : 1;  // x; x and dy
        for (size_t i = 0; i < base.size(); i++) {
            if (i < 2) {
                json k = base[i];
                k["balanced_tasks"] = true;
                add(k);
                for (int block : {64, 128, 256}) {
                    // Up to twice the L2: backward 32x2048x7x7 ran best in blocks of 128
                    // channels, a 1.6 MB slice for 1 MiB of L2 (part of it comes from L3).
                    const int64_t slice = s.n * s.s * block * 4 * statistics_inputs;
                    if (slice > 2 * l2_bytes || 2 * block > s.c) continue;
                    json blocked = base[i];
                    blocked["channel_block"] = block;
                    add(blocked);
                }
            }
            std::vector<int> rows = {base[i].value("float32_stat_rows", 1)};
            if (i < 2) rows.insert(rows.end(), {16, 32});
            for (int r : rows) {
                if (r < 2) continue;
                json k = base[i];
                k["float32_stat_rows"] = r;
                k["sequential_stat_rows"] = true;
                add(k);
            }
        }
    }
    return variants;
}

class TaskSearch {
public:
    TaskSearch(const Options &o, const Task &task, const IsaTarget &target,
               const std::vector<Shape> &shapes, json &doc, std::mt19937 &rng)
        : o_(o), task_(task), target_(target), doc_(doc), rng_(rng) {
        for (const Shape &s : shapes)
            if (task_serves(task, s)) shapes_.push_back(s);
        space_ = search_space(task);
        json &state = doc_["tuning"]["tasks"][task.key()];
        if (!state.contains("trials")) state["trials"] = json::array();
        if (!state.contains("seconds")) state["seconds"] = 0.0;
    }

    // Searches until `seconds` have passed or the space is exhausted, then verifies the winners;
    // returns the seconds spent searching.
    double run(double seconds) {
        const auto start = std::chrono::steady_clock::now();
        auto elapsed = [&] {
            return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        };
        while (elapsed() < seconds) {
            std::optional<json> knobs = next_candidate();
            if (!knobs) {
                std::fprintf(stderr, "[%s] search space exhausted\n", task_.key().c_str());
                break;
            }
            evaluate(*knobs);
            progress(*knobs, elapsed(), seconds);
            save();
        }
        // The budget's share is search time: verification is not charged, or a task whose
        // winners take long to verify would leave the last task no search at all (measured:
        // 60-90 s per task on the ResNet-50 file, and a 15 min budget gave the sixth task 0 s).
        const double searched = elapsed();
        verify_winners();
        state()["seconds"] = state()["seconds"].get<double>() + elapsed();
        save();
        return searched;
    }

    // Re-times the baseline and every current winner (per shape, per class, generic) on every
    // shape, interleaved: `rounds` rounds, each timing every candidate once in rotated order,
    // so that all of them see the same moments of this machine's drifting bandwidth. The median
    // over rounds becomes the trial's "confirmed" result, by which winners are then chosen.
    void confirm(int rounds) {
        // A new confirmation starts from the search's ranking, not the last confirmation's.
        for (auto &t : state()["trials"])
            if (!t.contains("exact")) t.erase("confirmed");
        derive_entries(doc_);
        std::vector<json *> chosen;
        auto add = [&](const json &knobs) {
            for (auto &t : state()["trials"])
                if (t["knobs"] == knobs && !t.contains("exact") && !t.contains("rejected") &&
                    t.contains("results") &&
                    std::find(chosen.begin(), chosen.end(), &t) == chosen.end())
                    chosen.push_back(&t);
        };
        add(state()["baseline_knobs"]);
        for (const auto &e : doc_["entries"])
            if (e["family"] == task_.family && e["layout"] == task_.layout && e["dtype"] == "f32")
                add(e["knobs"]);
        std::fprintf(stderr, "[%s] confirming %zu candidates, %d interleaved rounds per shape\n",
                     task_.key().c_str(), chosen.size(), rounds);
        for (const Shape &s : shapes_) {
            confirm_on(chosen, s, rounds);
            std::fprintf(stderr, "[%s] confirmed on %s\n", task_.key().c_str(), s.text().c_str());
        }
        // Unconfirmed winners lose their place (usable_trials); the new ones were winners
        // before, so they are verified on their shapes already; verify_winners() makes sure.
        derive_entries(doc_);
        verify_winners();
        save();
    }

    // The build ships an exact kernel for each tuned shape, and it is not the generic kernel the
    // search timed: extents fixed at generation change the loops (measured: 1.4x slower on
    // channels-last inference 32x512x7x7 with the same knobs), and some knobs apply to exact
    // kernels only (flat_block_rows). So for each shape, the candidates for its exact entry are
    // built as exact kernels, checked against the reference on the shape, and timed in
    // interleaved rounds; the exact entry is chosen from these timings. The candidates: the
    // shape's entry now (hand-set, an earlier refinement or the search's winner), the
    // `per_shape` best exact trials of earlier runs and best generic trials on the shape, and
    // their exact_variants.
    void refine_exact(int rounds, int per_shape) {
        derive_entries(doc_);
        for (const Shape &s : shapes_) {
            const std::string key = s.key();
            std::vector<json> variants;
            auto add = [&](const json &k) {
                if (std::find(variants.begin(), variants.end(), k) == variants.end())
                    variants.push_back(k);
            };
            json current;
            for (const auto &e : doc_["entries"])
                if (e["family"] == task_.family && e["layout"] == task_.layout &&
                    e["dtype"] == "f32" && e["shape"] == key)
                    current = e["knobs"];
            if (!current.is_null()) add(current);
            const auto earlier =
                ranked_trials(task_.family, state()["trials"], {key}, EntryKind::Exact, key);
            for (size_t i = 0; i < earlier.size() && i < size_t(per_shape); i++)
                add((*earlier[i].trial)["knobs"]);
            const auto ranked =
                ranked_trials(task_.family, state()["trials"], {key}, EntryKind::Exact);
            for (size_t i = 0; i < ranked.size() && i < size_t(per_shape); i++)
                add((*ranked[i].trial)["knobs"]);
            const int64_t l2_bytes = bench::l2_bytes_per_core();
            for (const json &k : exact_variants(task_, s, variants, l2_bytes)) add(k);
            for (const json &k : variants)
                if (!find_trial(k, key)) evaluate_exact(k, s, k == current);
            // Pointers into the trials once no more are added.
            std::vector<json *> timed;
            for (const json &k : variants) {
                json *t = find_trial(k, key);
                if (!t->contains("rejected")) timed.push_back(t);
            }
            std::fprintf(stderr, "[%s] %s: timing %zu exact kernels, %d interleaved rounds\n",
                         task_.key().c_str(), s.text().c_str(), timed.size(), rounds);
            confirm_on(timed, s, rounds, &s);
            // Exact trials of earlier runs not timed again keep no confirmation: a median from
            // another run (another moment of this machine's bandwidth) does not compete with
            // this run's.
            for (auto &t : state()["trials"])
                if (t.value("exact", "") == key &&
                    std::find(timed.begin(), timed.end(), &t) == timed.end())
                    t.erase("confirmed");
            const Winner best =
                best_over(task_.family, state()["trials"], {key}, EntryKind::Exact, key);
            if (best.trial)
                std::fprintf(stderr, "[%s] %s: best exact kernel %.3f of %s: %s\n",
                             task_.key().c_str(), s.text().c_str(), best.score,
                             task_.backward() ? "read2_write1" : "copy",
                             (*best.trial)["knobs"].dump().c_str());
            // The shape's kernels are not needed again: free their packages.
            for (auto it = built_.begin(); it != built_.end();)
                it = it->first.size() > key.size() &&
                             it->first.compare(it->first.size() - key.size(), key.size(), key) == 0
                         ? built_.erase(it)
                         : std::next(it);
            save();
        }
    }

private:
    // Times the trials on `shape` in `rounds` interleaved rounds, each timing every trial once in
    // rotated order, so that all of them see the same moments of this machine's drifting
    // bandwidth; the medians become each trial's "confirmed" result there. `exact`: the trials
    // are exact kernels of that shape.
    void confirm_on(const std::vector<json *> &trials, const Shape &shape, int rounds,
                    const Shape *exact = nullptr) {
        Workload &w = workload(shape);
        std::vector<std::vector<Workload::Timing>> times(trials.size());
        for (int r = 0; r < rounds; r++)
            for (size_t j = 0; j < trials.size(); j++) {
                const size_t i = (j + size_t(r)) % trials.size();
                if (!(*trials[i])["results"].contains(shape.key())) continue;  // does not run there
                ng_plan *plan =
                    make_plan(candidate((*trials[i])["knobs"], exact).runtime(), w, task_);
                times[i].push_back(w.time(plan, o_.reps));
                ng_plan_destroy(plan);
            }
        for (size_t i = 0; i < trials.size(); i++) {
            if (times[i].empty()) continue;
            auto med = [&](double Workload::Timing::*field) {
                std::vector<double> v;
                for (const auto &t : times[i]) v.push_back(t.*field);
                std::sort(v.begin(), v.end());
                return v[v.size() / 2];
            };
            (*trials[i])["confirmed"][shape.key()] = {
                {"frac_cold", med(&Workload::Timing::frac_cold)},
                {"frac_warm", med(&Workload::Timing::frac_warm)},
                {"ms_cold", med(&Workload::Timing::ms_cold)},
                {"ms_warm", med(&Workload::Timing::ms_warm)},
                {"gbps_cold", med(&Workload::Timing::gbps_cold)},
                {"rounds", rounds}};
        }
    }

    static json timing_json(const Workload::Timing &t) {
        return {{"frac_cold", t.frac_cold}, {"frac_warm", t.frac_warm}, {"ms_cold", t.ms_cold},
                {"ms_warm", t.ms_warm},     {"gbps_cold", t.gbps_cold}, {"reps", t.reps},
                {"disturbed", t.disturbed}};
    }

    // Builds the exact kernel of `knobs` for `shape`, checks it against the reference there
    // (the only shape it runs), and records it as an exact trial with one timing.
    void evaluate_exact(const json &knobs, const Shape &shape, bool baseline) {
        json trial = {{"knobs", knobs},
                      {"exact", shape.key()},
                      {"machine", doc_["tuning"]["machine"]},
                      {"baseline", baseline}};
        try {
            Candidate &cand = candidate(knobs, &shape);
            Workload check(task_, shape, 23);
            ng_plan *plan = make_plan(cand.runtime(), check, task_);
            check.run(plan);
            ng_plan_destroy(plan);
            const std::string why = check.compare_with_reference(cand.knobs().float32_stat_rows);
            if (!why.empty()) {
                trial["rejected"] = "reference check on " + shape.text() + ": " + why;
            } else {
                Workload &w = workload(shape);
                plan = make_plan(cand.runtime(), w, task_);
                const auto t = w.time(plan, o_.reps);
                ng_plan_destroy(plan);
                trial["check"] = "passed";
                trial["verified"] = json::array({shape.key()});
                trial["results"] = {{shape.key(), timing_json(t)}};
            }
        } catch (const std::exception &e) {
            trial["rejected"] = std::string("build or run failed: ") + e.what();
        }
        if (trial.contains("rejected"))
            std::fprintf(stderr, "[%s] rejected exact %s %s: %s\n", task_.key().c_str(),
                         shape.text().c_str(), knobs.dump().c_str(),
                         trial["rejected"].get<std::string>().c_str());
        state()["trials"].push_back(trial);
    }

    json &state() { return doc_["tuning"]["tasks"][task_.key()]; }
    void save() {
        derive_entries(doc_);
        write_json(o_.output, doc_);
    }

    // Whether a generic trial (or with `exact`, an exact trial of that shape) has these knobs.
    json *find_trial(const json &knobs, const std::string &exact = "") {
        for (auto &t : state()["trials"])
            if (t["knobs"] == knobs && t.value("exact", "") == exact) return &t;
        return nullptr;
    }
    bool tried(const json &knobs) { return find_trial(knobs) != nullptr; }

    json random_knobs() {
        json k = json::object();
        for (const auto &c : space_)
            k[c.name] =
                c.values[std::uniform_int_distribution<size_t>(0, c.values.size() - 1)(rng_)];
        return k;
    }

    // One knob of `from` moved to a neighbouring value.
    json neighbour(const json &from) {
        json k = from;
        const auto &c = space_[std::uniform_int_distribution<size_t>(0, space_.size() - 1)(rng_)];
        auto at = std::find(c.values.begin(), c.values.end(), from[c.name]);
        long i = at == c.values.end() ? 0 : long(at - c.values.begin());
        i += std::uniform_int_distribution<int>(0, 1)(rng_) ? 1 : -1;
        i = std::clamp(i, 0L, long(c.values.size()) - 1);
        k[c.name] = c.values[size_t(i)];
        return k;
    }

    // Baseline first (the knobs the build used before tuning), then alternately a neighbour of
    // a current winner (local search) and a random point, never one tried before.
    std::optional<json> next_candidate() {
        if (!state().contains("baseline_knobs")) {
            std::string entry;
            const CpuKnobs base =
                load_cpu_knobs(o_.output_existed ? o_.output : "",
                               {task_.family, "f32", task_.layout, "generic"}, &entry);
            state()["baseline_knobs"] = relevant_knobs(task_, base);
        }
        if (!tried(state()["baseline_knobs"])) return state()["baseline_knobs"];
        std::vector<json> winners;
        for (const auto &e : doc_["entries"])
            if (e["family"] == task_.family && e["layout"] == task_.layout && e["dtype"] == "f32") {
                // Exact entries may carry knobs generic kernels ignore (flat_block_rows).
                json k = json::object();
                for (const auto &c : space_)
                    if (e["knobs"].contains(c.name)) k[c.name] = e["knobs"][c.name];
                winners.push_back(k);
            }
        for (int attempt = 0; attempt < 200; attempt++) {
            json k = (attempt % 2 == 0 && !winners.empty())
                         ? neighbour(winners[std::uniform_int_distribution<size_t>(
                               0, winners.size() - 1)(rng_)])
                         : random_knobs();
            if (!tried(k)) return k;
        }
        // Few untried points left: enumerate.
        std::vector<json> all = {json::object()};
        for (const auto &c : space_) {
            std::vector<json> next;
            for (const auto &partial : all)
                for (const auto &v : c.values) {
                    json k = partial;
                    k[c.name] = v;
                    next.push_back(k);
                }
            all = next;
        }
        for (const auto &k : all)
            if (!tried(k)) return k;
        return std::nullopt;
    }

    // The generic kernel of these knobs, or with `exact` the exact kernel of that shape.
    Candidate &candidate(const json &knobs, const Shape *exact = nullptr) {
        const std::string key = knobs.dump() + (exact ? " " + exact->key() : "");
        auto it = built_.find(key);
        if (it == built_.end())
            it = built_
                     .emplace(key, Candidate::build(o_.tools, task_, target_,
                                                    parse_cpu_knobs(knobs, "candidate"), {}, exact))
                     .first;
        return *it->second;
    }

    void evaluate(const json &knobs) {
        json trial = {{"knobs", knobs},
                      {"machine", doc_["tuning"]["machine"]},
                      {"baseline", knobs == state()["baseline_knobs"]}};
        try {
            Candidate &cand = candidate(knobs);
            const std::string why =
                check_candidate(cand, task_, check_shapes(cand.knobs().streaming_stores));
            if (!why.empty()) {
                trial["rejected"] = "reference check: " + why;
            } else {
                json results = json::object();
                for (const Shape &s : shapes_) {
                    if (!knobs_run_on(cand.knobs(), task_, s)) continue;
                    Workload &w = workload(s);
                    ng_plan *plan = make_plan(cand.runtime(), w, task_);
                    const auto t = w.time(plan, o_.reps);
                    ng_plan_destroy(plan);
                    results[s.key()] = timing_json(t);
                }
                trial["check"] = "passed";
                trial["results"] = results;
            }
        } catch (const std::exception &e) {
            trial["rejected"] = std::string("build or run failed: ") + e.what();
        }
        if (trial.contains("rejected"))
            std::fprintf(stderr, "[%s] rejected %s: %s\n", task_.key().c_str(),
                         knobs.dump().c_str(), trial["rejected"].get<std::string>().c_str());
        state()["trials"].push_back(trial);
    }

    Workload &workload(const Shape &s) {
        auto it = workloads_.find(s.key());
        if (it == workloads_.end())
            it = workloads_.emplace(s.key(), std::make_unique<Workload>(task_, s, 11)).first;
        return *it->second;
    }

    // Every winner is run on its real shapes against the reference before it is kept; a winner
    // that fails is rejected and the next best takes its place.
    void verify_winners() {
        for (bool changed = true; changed;) {
            changed = false;
            for (const auto &e : doc_["entries"]) {
                if (e["family"] != task_.family || e["layout"] != task_.layout ||
                    e["dtype"] != "f32" || e["measured"].is_null() ||
                    e["measured"].value("verified_on_shape", true))
                    continue;
                for (auto &t : state()["trials"]) {
                    if (t["knobs"] != e["knobs"] || t.contains("exact") || t.contains("rejected"))
                        continue;
                    if (!t.contains("verified")) t["verified"] = json::array();
                    for (const Shape &s : shapes_) {
                        if (std::count(t["verified"].begin(), t["verified"].end(), s.key()) ||
                            !t["results"].contains(s.key()))
                            continue;
                        std::string why;
                        try {
                            Candidate &cand = candidate(t["knobs"]);
                            Workload w(task_, s, 23);
                            ng_plan *plan = make_plan(cand.runtime(), w, task_);
                            w.run(plan);
                            ng_plan_destroy(plan);
                            why = w.compare_with_reference(cand.knobs().float32_stat_rows);
                        } catch (const std::exception &ex) {
                            why = ex.what();
                        }
                        if (!why.empty()) {
                            t["rejected"] = "reference check on " + s.text() + ": " + why;
                            break;
                        }
                        t["verified"].push_back(s.key());
                    }
                    changed = true;
                }
                if (changed) break;
            }
            derive_entries(doc_);
        }
    }

    void progress(const json &knobs, double elapsed, double budget) {
        const json &t = state()["trials"].back();
        std::vector<std::string> keys;
        for (const Shape &s : shapes_) keys.push_back(s.key());
        const Winner best = best_over(task_.family, state()["trials"], keys, EntryKind::Exact);
        double mine = 0;
        if (t.contains("results")) {
            std::vector<double> fr;
            for (const auto &k : keys)  // a streaming candidate runs on some shapes only
                if (t["results"].contains(k))
                    fr.push_back(t["results"][k][ranked_fraction(task_.family, k)]);
            mine = geomean(fr);
        }
        std::fprintf(stderr, "[%s] trial %zu, %.0f/%.0f s: %s geomean %.3f of %s | best %.3f %s\n",
                     task_.key().c_str(), state()["trials"].size(), elapsed, budget,
                     knobs.dump().c_str(), mine, task_.backward() ? "read2_write1" : "copy",
                     best.score, best.trial ? (*best.trial)["knobs"].dump().c_str() : "-");
    }

    const Options &o_;
    Task task_;
    IsaTarget target_;
    json &doc_;
    std::mt19937 &rng_;
    std::vector<Shape> shapes_;
    std::vector<KnobChoices> space_;
    std::map<std::string, std::unique_ptr<Candidate>> built_;
    std::map<std::string, std::unique_ptr<Workload>> workloads_;
};

}  // namespace

namespace {

int merge(int argc, char **argv) {
    std::vector<std::string> inputs;
    std::string output;
    for (int i = 2; i < argc; i++) {
        const std::string a = argv[i];
        if (a == "-o" && i + 1 < argc)
            output = argv[++i];
        else
            inputs.push_back(a);
    }
    if (inputs.empty() || output.empty()) return usage();
    json doc = read_json(inputs[0]);
    if (!doc.contains("tuning")) doc["tuning"] = {{"tasks", json::object()}};
    for (size_t i = 1; i < inputs.size(); i++) {
        const json other = read_json(inputs[i]);
        if (other.value("target", "") != doc.value("target", ""))
            throw std::runtime_error("'" + inputs[i] + "' is for target " +
                                     other.value("target", "?") + ", '" + inputs[0] + "' for " +
                                     doc.value("target", "?"));
        if (!other.contains("tuning")) continue;
        for (const auto &[key, state] : other["tuning"]["tasks"].items()) {
            json &mine = doc["tuning"]["tasks"][key];
            if (!mine.contains("trials"))
                mine = state;
            else {
                // Union of the trials; a knob set tried in both (as a generic kernel, or as the
                // exact kernel of the same shape) keeps the first file's record.
                for (const auto &t : state["trials"]) {
                    bool seen = false;
                    for (const auto &m : mine["trials"])
                        seen = seen || (m["knobs"] == t["knobs"] &&
                                        m.value("exact", "") == t.value("exact", ""));
                    if (!seen) mine["trials"].push_back(t);
                }
                mine["seconds"] = mine.value("seconds", 0.0) + state.value("seconds", 0.0);
                if (!mine.contains("baseline_knobs") && state.contains("baseline_knobs"))
                    mine["baseline_knobs"] = state["baseline_knobs"];
            }
        }
    }
    derive_entries(doc);
    write_json(output, doc);
    std::fprintf(stderr, "merged %zu files into %s: %zu entries\n", inputs.size(), output.c_str(),
                 doc["entries"].size());
    return 0;
}

int run_tune(int argc, char **argv) {
    Options o;
    for (int i = 1; i < argc; i++) o.command_line += (i > 1 ? " " : "") + std::string(argv[i]);
    auto value = [&](int &i) -> std::string {
        if (i + 1 >= argc) throw std::runtime_error(std::string(argv[i]) + " needs a value");
        return argv[++i];
    };
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        if (a == "tune") continue;  // `normgen tune ...` passes its verb along
        if (a == "--isa")
            o.isa = value(i);
        else if (a == "--shapes")
            o.shapes_path = value(i);
        else if (a == "--budget-minutes")
            o.budget_minutes = std::stod(value(i));
        else if (a == "--reps")
            o.reps = std::stoi(value(i));
        else if (a == "--confirm-rounds")
            o.confirm_rounds = std::stoi(value(i));
        else if (a == "--confirm-only")
            o.confirm_only = true;
        else if (a == "--exact-rounds")
            o.exact_rounds = std::stoi(value(i));
        else if (a == "--exact-candidates")
            o.exact_candidates = std::stoi(value(i));
        else if (a == "--exact-only")
            o.exact_only = true;
        else if (a == "--seed")
            o.seed = unsigned(std::stoul(value(i)));
        else if (a == "-o")
            o.output = value(i);
        else if (a == "--work-dir")
            o.tools.work_dir = value(i);
        else if (a == "--generator")
            o.tools.generator_exe = value(i);
        else if (a == "--shard") {
            const std::string v = value(i);
            if (std::sscanf(v.c_str(), "%d/%d", &o.shard, &o.shards) != 2 || o.shards < 1 ||
                o.shard < 1 || o.shard > o.shards)
                throw std::runtime_error("--shard " + v + ": expected k/n with 1 <= k <= n");
            o.shard--;
        } else if (a == "--tasks") {
            std::stringstream ss(value(i));
            std::string t;
            while (std::getline(ss, t, ',')) o.task_filter.push_back(t);
        } else
            return usage();
    }
    const IsaTarget target = isa_target(o.isa);
    if (o.output.empty()) o.output = "schedules/tuned/" + target.tuned_name() + ".json";
    if (o.tools.work_dir.empty())
        o.tools.work_dir = "/tmp/normgen-tune-" + std::to_string(getpid());
    const std::vector<Shape> shapes = read_shape_file(o.shapes_path);

    json doc = {{"target", target.tuned_name()}, {"entries", json::array()}};
    if (std::ifstream(o.output).good()) {
        doc = read_json(o.output);
        o.output_existed = true;
    }
    doc["about"] =
        "Knob values per (family, dtype, layout, shape) read by the generators at build time: an "
        "exact shape (n<N>_c<C>_s<S>) wins over its shape class (class_c<lo>to<hi>_s<lo>to<hi>, "
        "half-open), which wins over the family's generic entry. Entries with 'measured' were "
        "written by `normgen tune` from the trials under 'tuning' (fraction_of_reference: the "
        "geometric mean over the entry's shapes of t_reference / t_kernel, cold caches, median of "
        "repetitions; kernel: whether the shape's exact kernel or a generic kernel was timed); "
        "entries with measured=null or measured.hand_set are hand-set.";
    if (!doc.contains("tuning")) doc["tuning"] = {{"tasks", json::object()}};
    doc["tuning"]["machine"] = {
        {"cpu", cpu_model()},
        {"date", utc_now()},
        {"threads", std::getenv("OMP_NUM_THREADS") ? std::getenv("OMP_NUM_THREADS") : "default"}};
    json runs = doc["tuning"].value("runs", json::array());
    runs.push_back({{"command", "normgen tune " + o.command_line},
                    {"shapes", o.shapes_path},
                    {"started", utc_now()}});
    doc["tuning"]["runs"] = runs;

    std::vector<Task> mine;
    const auto &tasks = all_tasks();
    for (size_t i = 0; i < tasks.size(); i++) {
        if (int(i % size_t(o.shards)) != o.shard) continue;
        if (!o.task_filter.empty() && std::find(o.task_filter.begin(), o.task_filter.end(),
                                                tasks[i].key()) == o.task_filter.end())
            continue;
        mine.push_back(tasks[i]);
    }
    if (mine.empty()) {
        std::fprintf(stderr, "normgen tune: no task in shard %d/%d\n", o.shard + 1, o.shards);
        return 0;
    }
    std::fprintf(stderr,
                 "normgen tune: %s, %zu tasks, %zu shapes from %s, budget %.1f min, "
                 "writing %s (resumes its trials)\n",
                 target.halide_target.c_str(), mine.size(), shapes.size(), o.shapes_path.c_str(),
                 o.budget_minutes, o.output.c_str());
    std::mt19937 rng(o.seed + unsigned(doc["tuning"]["runs"].size()));
    double left = o.budget_minutes * 60;
    for (size_t i = 0; i < mine.size(); i++) {
        // Time a task leaves unused (its space exhausted) goes to the tasks after it.
        const double share = left / double(mine.size() - i);
        TaskSearch search(o, mine[i], target, shapes, doc, rng);
        if (!o.confirm_only && !o.exact_only) left -= search.run(share);
        if (o.confirm_rounds > 0 && !o.exact_only) search.confirm(o.confirm_rounds);
        if (o.exact_rounds > 0) search.refine_exact(o.exact_rounds, o.exact_candidates);
    }
    doc["tuning"]["runs"].back()["finished"] = utc_now();
    std::error_code ec;
    std::filesystem::remove(o.tools.work_dir, ec);  // empty by now: candidates remove their own
    derive_entries(doc);
    write_json(o.output, doc);
    std::fprintf(stderr, "normgen tune: wrote %s (%zu entries)\n", o.output.c_str(),
                 doc["entries"].size());
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    try {
        if (argc >= 2 && std::string(argv[1]) == "merge") return merge(argc, argv);
        if (argc >= 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h"))
            return usage();
        return run_tune(argc, argv);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "normgen tune: %s\n", e.what());
        return 1;
    }
}

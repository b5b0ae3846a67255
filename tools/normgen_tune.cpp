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
// (--confirm-rounds) and winners are chosen again from those medians.
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

#include "tune/tune_core.h"

namespace {

using json = nlohmann::json;
using namespace normgen;
using namespace normgen::tune;

int usage() {
    std::fprintf(stderr,
                 "usage: normgen tune [--isa sse41|avx2|avx512] [--shapes FILE] "
                 "[--budget-minutes M] [--reps R] [--shard k/n] [--tasks family/layout,...] "
                 "[--confirm-rounds N] [--confirm-only] [--seed N] [-o FILE] [--work-dir DIR] "
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

double geomean(const std::vector<double> &v) {
    double log_sum = 0;
    for (double x : v) log_sum += std::log(x);
    return v.empty() ? 0 : std::exp(log_sum / double(v.size()));
}

// (C, S) of an n<N>_c<C>_s<S> key.
std::pair<int64_t, int64_t> channels_spatial(const std::string &key) {
    int64_t n, c, s;
    std::sscanf(key.c_str(), "n%ld_c%ld_s%ld", &n, &c, &s);
    return {c, s};
}

// ---- Deriving entries from trials -----------------------------------------------------------

struct Winner {
    const json *trial = nullptr;
    double score = 0;
};

// The results a trial is ranked by: its confirmation if it has one (see confirm()), else its
// search-time measurement.
const json &results_of(const json &trial) {
    return trial.contains("confirmed") ? trial["confirmed"] : trial["results"];
}

// Trials that passed the check and were timed on every one of `shapes`. Once a task has
// confirmed trials, only those compete: a single search-time measurement on this shared
// machine is noisier than the median of the confirmation rounds, and the luckiest of many
// noisy measurements would win (the winner's curse).
std::vector<const json *> usable_trials(const json &trials,
                                        const std::vector<std::string> &shapes) {
    const bool confirmed = std::any_of(trials.begin(), trials.end(), [](const json &t) {
        return t.contains("confirmed") && !t.contains("rejected");
    });
    std::vector<const json *> out;
    for (const auto &t : trials) {
        if (t.contains("rejected") || !t.contains("results")) continue;
        if (confirmed && !t.contains("confirmed")) continue;
        bool all = true;
        for (const auto &s : shapes) all = all && results_of(t).contains(s);
        if (all) out.push_back(&t);
    }
    return out;
}

// Which entry a winner is chosen for: its key's kind decides which knob sets qualify.
enum class EntryKind { Exact, Class, Generic };
EntryKind entry_kind(const std::string &key) {
    if (key == "generic") return EntryKind::Generic;
    return key.rfind("class_", 0) == 0 ? EntryKind::Class : EntryKind::Exact;
}

// Generic entries keep float64 terms (generic kernels serve any data); generic and class
// entries do not stream (they serve shapes whose rows are not 64-byte multiples, which a
// streaming kernel leaves to the next kernel).
Winner best_over(const json &trials, const std::vector<std::string> &shapes, EntryKind kind) {
    Winner w;
    for (const json *t : usable_trials(trials, shapes)) {
        const json &knobs = (*t)["knobs"];
        if (kind == EntryKind::Generic && knobs.value("float32_stat_rows", 1) != 1) continue;
        if (kind != EntryKind::Exact && knobs.value("streaming_stores", false)) continue;
        std::vector<double> fr;
        for (const auto &s : shapes) fr.push_back(results_of(*t)[s]["frac_cold"].get<double>());
        const double g = geomean(fr);
        if (g > w.score) w = {t, g};
    }
    return w;
}

// Every shape key any trial of the task was timed on.
std::vector<std::string> task_shapes(const json &task_state) {
    std::set<std::string> keys;
    for (const auto &t : task_state["trials"])
        if (t.contains("results"))
            for (const auto &[k, v] : t["results"].items()) keys.insert(k);
    return {keys.begin(), keys.end()};
}

// The groups a task's entries are made for: each shape, each shape class, and all (generic).
struct Group {
    std::string shape;  // entry key: n.._c.._s.., class_..., generic
    std::vector<std::string> shapes;
};
std::vector<Group> groups_of(const std::vector<std::string> &shapes) {
    std::vector<Group> groups;
    std::map<std::string, std::vector<std::string>> classes;
    for (const auto &s : shapes) {
        groups.push_back({s, {s}});
        const auto [c, sp] = channels_spatial(s);
        classes[shape_class_of(c, sp).key()].push_back(s);
    }
    for (auto &[k, v] : classes) groups.push_back({k, v});
    groups.push_back({"generic", shapes});
    return groups;
}

// Replaces the entries of every tuned task with the winners of its trials.
void derive_entries(json &doc) {
    const json &tasks = doc["tuning"]["tasks"];
    const json machine = doc["tuning"].value("machine", json::object());
    json kept = json::array();
    for (const auto &e : doc.value("entries", json::array())) {
        const std::string key = e.value("family", "") + "/" + e.value("layout", "");
        if (e.value("dtype", "") == "f32" && tasks.contains(key) && !tasks[key]["trials"].empty())
            continue;
        kept.push_back(e);
    }
    for (const auto &[key, state] : tasks.items()) {
        const auto slash = key.find('/');
        const std::string family = key.substr(0, slash), layout = key.substr(slash + 1);
        const json *baseline = nullptr;
        for (const auto &t : state["trials"])
            if (t.value("baseline", false) && t.contains("results")) baseline = &t;
        const json no_results = json::object();
        const json &baseline_results = baseline ? results_of(*baseline) : no_results;
        for (const Group &g : groups_of(task_shapes(state))) {
            const Winner w = best_over(state["trials"], g.shapes, entry_kind(g.shape));
            if (!w.trial) continue;
            json per_shape = json::object();
            std::vector<double> ms, gbps, warm, base;
            for (const auto &s : g.shapes) {
                const json &r = results_of(*w.trial)[s];
                per_shape[s] = r;
                ms.push_back(r["ms_cold"]);
                gbps.push_back(r["gbps_cold"]);
                warm.push_back(r["frac_warm"]);
                if (baseline_results.contains(s)) base.push_back(baseline_results[s]["frac_cold"]);
            }
            json measured = {{"reference", family == "bn_bwd_train" ? "read2_write1" : "copy"},
                             {"fraction_of_reference", w.score},
                             {"confirmed", w.trial->contains("confirmed")},
                             {"fraction_of_reference_warm", geomean(warm)},
                             {"time_ms", g.shapes.size() == 1 ? json(ms[0]) : json(nullptr)},
                             {"gb_per_s", geomean(gbps)},
                             {"verified_on_shape",
                              std::all_of(g.shapes.begin(), g.shapes.end(),
                                          [&](const std::string &s) {
                                              return w.trial->contains("verified") &&
                                                     std::count((*w.trial)["verified"].begin(),
                                                                (*w.trial)["verified"].end(), s);
                                          })},
                             {"machine", w.trial->value("machine", machine)}};
            if (base.size() == g.shapes.size()) {
                measured["baseline_knobs"] = (*baseline)["knobs"];
                measured["baseline_fraction"] = geomean(base);
            }
            if (g.shapes.size() > 1) measured["shapes"] = per_shape;
            kept.push_back({{"family", family},
                            {"dtype", "f32"},
                            {"layout", layout},
                            {"shape", g.shape},
                            {"knobs", (*w.trial)["knobs"]},
                            {"measured", measured}});
        }
    }
    doc["entries"] = kept;
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
};

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
        for (auto &t : state()["trials"]) t.erase("confirmed");
        derive_entries(doc_);
        std::vector<json *> chosen;
        auto add = [&](const json &knobs) {
            for (auto &t : state()["trials"])
                if (t["knobs"] == knobs && !t.contains("rejected") && t.contains("results") &&
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
            Workload &w = workload(s);
            std::vector<std::vector<Workload::Timing>> times(chosen.size());
            for (int r = 0; r < rounds; r++)
                for (size_t j = 0; j < chosen.size(); j++) {
                    const size_t i = (j + size_t(r)) % chosen.size();
                    if (!(*chosen[i])["results"].contains(s.key())) continue;  // does not run there
                    ng_plan *plan = make_plan(candidate((*chosen[i])["knobs"]).runtime(), w, task_);
                    times[i].push_back(w.time(plan, o_.reps));
                    ng_plan_destroy(plan);
                }
            for (size_t i = 0; i < chosen.size(); i++) {
                if (times[i].empty()) continue;
                auto med = [&](double Workload::Timing::*field) {
                    std::vector<double> v;
                    for (const auto &t : times[i]) v.push_back(t.*field);
                    std::sort(v.begin(), v.end());
                    return v[v.size() / 2];
                };
                json &c = (*chosen[i])["confirmed"];
                c[s.key()] = {{"frac_cold", med(&Workload::Timing::frac_cold)},
                              {"frac_warm", med(&Workload::Timing::frac_warm)},
                              {"ms_cold", med(&Workload::Timing::ms_cold)},
                              {"ms_warm", med(&Workload::Timing::ms_warm)},
                              {"gbps_cold", med(&Workload::Timing::gbps_cold)},
                              {"rounds", rounds}};
            }
            std::fprintf(stderr, "[%s] confirmed on %s\n", task_.key().c_str(), s.text().c_str());
        }
        // Unconfirmed winners lose their place (usable_trials); the new ones were winners
        // before, so they are verified on their shapes already; verify_winners() makes sure.
        derive_entries(doc_);
        verify_winners();
        save();
    }

private:
    json &state() { return doc_["tuning"]["tasks"][task_.key()]; }
    void save() {
        derive_entries(doc_);
        write_json(o_.output, doc_);
    }

    bool tried(const json &knobs) {
        for (const auto &t : state()["trials"])
            if (t["knobs"] == knobs) return true;
        return false;
    }

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
            if (e["family"] == task_.family && e["layout"] == task_.layout && e["dtype"] == "f32")
                winners.push_back(e["knobs"]);
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

    Candidate &candidate(const json &knobs) {
        const std::string key = knobs.dump();
        auto it = built_.find(key);
        if (it == built_.end())
            it = built_
                     .emplace(key, Candidate::build(o_.tools, task_, target_,
                                                    parse_cpu_knobs(knobs, "candidate")))
                     .first;
        return *it->second;
    }

    void evaluate(const json &knobs) {
        json trial = {{"knobs", knobs},
                      {"machine", doc_["tuning"]["machine"]},
                      {"baseline", knobs == state()["baseline_knobs"]}};
        try {
            Candidate &cand = candidate(knobs);
            const std::string why = check_candidate(cand, task_, check_shapes(cand.knobs().streaming_stores));
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
                    results[s.key()] = {{"frac_cold", t.frac_cold}, {"frac_warm", t.frac_warm},
                                        {"ms_cold", t.ms_cold},     {"ms_warm", t.ms_warm},
                                        {"gbps_cold", t.gbps_cold}, {"reps", t.reps},
                                        {"disturbed", t.disturbed}};
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
                    if (t["knobs"] != e["knobs"] || t.contains("rejected")) continue;
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
        const Winner best = best_over(state()["trials"], keys, EntryKind::Exact);
        double mine = 0;
        if (t.contains("results")) {
            std::vector<double> fr;
            for (const auto &k : keys)  // a streaming candidate runs on some shapes only
                if (t["results"].contains(k)) fr.push_back(t["results"][k]["frac_cold"]);
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
                // Union of the trials; a knob set tried in both keeps the first file's record.
                for (const auto &t : state["trials"]) {
                    bool seen = false;
                    for (const auto &m : mine["trials"]) seen = seen || m["knobs"] == t["knobs"];
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
        "repetitions); entries with measured=null are hand-set.";
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
        if (!o.confirm_only) left -= search.run(share);
        if (o.confirm_rounds > 0) search.confirm(o.confirm_rounds);
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

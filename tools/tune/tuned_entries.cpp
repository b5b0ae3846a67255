#include "tuned_entries.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>

#include <omp.h>

#include "../../bench/bandwidth_reference.h"
#include "../../schedules/tuned_knobs.h"

namespace normgen::tune {

using json = nlohmann::json;

double geomean(const std::vector<double> &values) {
    double log_sum = 0;
    for (double x : values) log_sum += std::log(x);
    return values.empty() ? 0 : std::exp(log_sum / double(values.size()));
}

const json &results_of(const json &trial) {
    return trial.contains("confirmed") ? trial["confirmed"] : trial["results"];
}

EntryKind entry_kind(const std::string &key) {
    if (key == "generic") return EntryKind::Generic;
    return key.rfind("class_", 0) == 0 ? EntryKind::Class : EntryKind::Exact;
}

namespace {

// Trials of the pool (the exact trials of one shape, or the generic trials) that passed the
// check and were timed on every one of `shapes`.
std::vector<const json *> usable_trials(const json &trials, const std::vector<std::string> &shapes,
                                        const std::string &exact_shape) {
    auto in_pool = [&](const json &t) { return t.value("exact", "") == exact_shape; };
    const bool confirmed = std::any_of(trials.begin(), trials.end(), [&](const json &t) {
        return in_pool(t) && t.contains("confirmed") && !t.contains("rejected");
    });
    std::vector<const json *> out;
    for (const auto &t : trials) {
        if (!in_pool(t) || t.contains("rejected") || !t.contains("results")) continue;
        if (confirmed && !t.contains("confirmed")) continue;
        bool all = true;
        for (const auto &s : shapes) all = all && results_of(t).contains(s);
        if (all) out.push_back(&t);
    }
    return out;
}

bool has_exact_trials(const json &trials, const std::string &shape) {
    return std::any_of(trials.begin(), trials.end(), [&](const json &t) {
        return t.value("exact", "") == shape && !t.contains("rejected") && t.contains("results");
    });
}

// (C, S) of an n<N>_c<C>_s<S> key.
std::pair<int64_t, int64_t> channels_spatial(const std::string &key) {
    int64_t n, c, s;
    std::sscanf(key.c_str(), "n%ld_c%ld_s%ld", &n, &c, &s);
    return {c, s};
}

// Every shape key any generic trial of the task was timed on.
std::vector<std::string> task_shapes(const json &task_state) {
    std::set<std::string> keys;
    for (const auto &t : task_state["trials"])
        if (t.contains("results") && !t.contains("exact"))
            for (const auto &[k, v] : t["results"].items()) keys.insert(k);
    return {keys.begin(), keys.end()};
}

// The groups a task's entries are made for: each shape, each shape class, and all (generic).
struct Group {
    std::string key;  // entry key: n.._c.._s.., class_..., generic
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

bool is_hand_set(const json &entry) {
    return entry.contains("measured") && entry["measured"].is_object() &&
           entry["measured"].contains("hand_set");
}

}  // namespace

// Generic entries keep float64 terms (generic kernels serve any data); generic and class
// entries do not stream (they serve shapes whose rows are not 64-byte multiples, which a
// streaming kernel leaves to the next kernel).
const char *ranked_fraction(const std::string &family, const std::string &shape_key) {
    long long n = 0, c = 0, s = 0;
    if (std::sscanf(shape_key.c_str(), "n%lld_c%lld_s%lld", &n, &c, &s) != 3) return "frac_cold";
    const int64_t passes = family == "bn_bwd_train" ? 3 : 2;  // copy, read-two-write-one
    const int64_t bytes = passes * n * c * s * int64_t(sizeof(float));
    return bench::timed_warm(bytes, omp_get_max_threads()) ? "frac_warm" : "frac_cold";
}

std::vector<Winner> ranked_trials(const std::string &family, const json &trials,
                                  const std::vector<std::string> &shapes, EntryKind kind,
                                  const std::string &exact_shape) {
    std::vector<Winner> ranked;
    for (const json *t : usable_trials(trials, shapes, exact_shape)) {
        const json &knobs = (*t)["knobs"];
        if (kind == EntryKind::Generic && knobs.value("float32_stat_rows", 1) != 1) continue;
        if (kind != EntryKind::Exact && knobs.value("streaming_stores", false)) continue;
        std::vector<double> fr;
        for (const auto &s : shapes)
            fr.push_back(results_of(*t)[s][ranked_fraction(family, s)].get<double>());
        ranked.push_back({t, geomean(fr)});
    }
    // Stable: of equal scores the earlier trial stays first, as before.
    std::stable_sort(ranked.begin(), ranked.end(),
                     [](const Winner &a, const Winner &b) { return a.score > b.score; });
    return ranked;
}

Winner best_over(const std::string &family, const json &trials,
                 const std::vector<std::string> &shapes, EntryKind kind,
                 const std::string &exact_shape) {
    const auto ranked = ranked_trials(family, trials, shapes, kind, exact_shape);
    return ranked.empty() ? Winner{} : ranked.front();
}

void derive_entries(json &doc) {
    const json &tasks = doc["tuning"]["tasks"];
    const json machine = doc["tuning"].value("machine", json::object());
    json kept = json::array();
    std::map<std::string, json> hand_set;  // family/layout/shape -> entry
    for (const auto &e : doc.value("entries", json::array())) {
        const std::string key = e.value("family", "") + "/" + e.value("layout", "");
        if (e.value("dtype", "") == "f32" && tasks.contains(key) && !tasks[key]["trials"].empty()) {
            if (is_hand_set(e)) hand_set[key + "/" + e.value("shape", "")] = e;
            continue;
        }
        kept.push_back(e);
    }
    for (const auto &[key, state] : tasks.items()) {
        const auto slash = key.find('/');
        const std::string family = key.substr(0, slash), layout = key.substr(slash + 1);
        const json &trials = state["trials"];
        for (const Group &g : groups_of(task_shapes(state))) {
            const EntryKind kind = entry_kind(g.key);
            const bool exact_kernel = kind == EntryKind::Exact && has_exact_trials(trials, g.key);
            if (!exact_kernel && hand_set.count(key + "/" + g.key)) {
                kept.push_back(hand_set[key + "/" + g.key]);
                hand_set.erase(key + "/" + g.key);
                continue;
            }
            hand_set.erase(key + "/" + g.key);  // superseded by exact trials
            const std::string pool = exact_kernel ? g.key : "";
            const Winner w = best_over(family, trials, g.shapes, kind, pool);
            // The baseline of the pool: the knobs the build used before (generic trials) or the
            // entry the shape had before its exact trials (exact ones).
            const json *baseline = nullptr;
            for (const auto &t : trials)
                if (t.value("baseline", false) && t.contains("results") &&
                    t.value("exact", "") == pool)
                    baseline = &t;
            const json no_results = json::object();
            const json &baseline_results = baseline ? results_of(*baseline) : no_results;
            if (!w.trial) continue;
            json per_shape = json::object();
            std::vector<double> ms, gbps, warm, base;
            for (const auto &s : g.shapes) {
                const json &r = results_of(*w.trial)[s];
                per_shape[s] = r;
                ms.push_back(r["ms_cold"]);
                gbps.push_back(r["gbps_cold"]);
                warm.push_back(r["frac_warm"]);
                if (baseline_results.contains(s))
                    base.push_back(baseline_results[s][ranked_fraction(family, s)]);
            }
            const json &verified = w.trial->value("verified", json::array());
            json measured = {
                {"reference", family == "bn_bwd_train" ? "read2_write1" : "copy"},
                {"kernel", exact_kernel ? "exact" : "generic"},  // the kernel that was timed
                {"fraction_of_reference", w.score},
                {"ranked_by", g.shapes.size() == 1 ? ranked_fraction(family, g.shapes[0])
                                                   : "frac_cold, frac_warm where the problem "
                                                     "fits in the threads' L2"},
                {"confirmed", w.trial->contains("confirmed")},
                {"fraction_of_reference_warm", geomean(warm)},
                {"time_ms", g.shapes.size() == 1 ? json(ms[0]) : json(nullptr)},
                {"gb_per_s", geomean(gbps)},
                {"verified_on_shape", std::all_of(g.shapes.begin(), g.shapes.end(),
                                                  [&](const std::string &s) {
                                                      return std::count(verified.begin(),
                                                                        verified.end(), s) > 0;
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
                            {"shape", g.key},
                            {"knobs", (*w.trial)["knobs"]},
                            {"measured", measured}});
        }
    }
    // Hand-set entries for shapes no trial was timed on stay as they are.
    for (auto &[k, e] : hand_set) kept.push_back(e);
    doc["entries"] = kept;
}

}  // namespace normgen::tune

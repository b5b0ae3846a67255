// How `normgen tune` turns its trials into the entries of schedules/tuned/<target>.json: a pure
// function of the document, kept apart from the search so that tests can feed it trials.
//
// A trial is a knob set with its check and timings. Generic trials ("exact" absent) were timed
// as generic kernels on every shape of the task; exact trials ("exact": a shape key) as the
// build's exact kernel for that one shape (see TaskSearch::refine_exact). An exact entry
// comes from its shape's exact trials where there are any (they measured the kernel the build
// ships), else from the generic trials; class and generic entries from the generic trials.
// Hand-set entries (measured.hand_set) survive a derivation unless exact trials for their
// shape exist, which time the hand-set knobs beside the alternatives (refine_exact includes
// them).
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace normgen::tune {

double geomean(const std::vector<double> &values);

// The results a trial is ranked by: its confirmation if it has one, else its search-time
// measurement.
const nlohmann::json &results_of(const nlohmann::json &trial);

// Which entry a winner is chosen for: its key's kind decides which knob sets qualify.
enum class EntryKind { Exact, Class, Generic };
EntryKind entry_kind(const std::string &key);

// The fraction of the reference a trial of `family` is ranked by on an exact shape (a key such
// as n8_c32_s64): "frac_cold", or "frac_warm" where the problem fits in the L2 of this process's
// OpenMP threads (bench::timed_warm), as the benchmark times it, and as it would run after the
// layer that produced it.
const char *ranked_fraction(const std::string &family, const std::string &shape_key);

struct Winner {
    const nlohmann::json *trial = nullptr;
    double score = 0;  // geometric mean of the ranked fractions over the shapes
};
// The best usable trial for an entry of `kind` over `shapes`: among the exact trials of
// `exact_shape` if it is given, else among the generic trials. Once a pool has confirmed
// trials only those compete (a single search-time timing on this shared machine is noisier
// than the median of interleaved rounds: the winner's curse).
// The usable trials of that pool for `kind` over `shapes`, best first.
std::vector<Winner> ranked_trials(const std::string &family, const nlohmann::json &trials,
                                  const std::vector<std::string> &shapes, EntryKind kind,
                                  const std::string &exact_shape = "");
Winner best_over(const std::string &family, const nlohmann::json &trials,
                 const std::vector<std::string> &shapes, EntryKind kind,
                 const std::string &exact_shape = "");

// Replaces the f32 entries of every tuned task (doc.tuning.tasks) with the winners of its
// trials: one per shape, per shape class and generic.
void derive_entries(nlohmann::json &doc);

}  // namespace normgen::tune

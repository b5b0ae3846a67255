// Where schedule knobs come from: schedules/tuned/<target>.json, one entry per (family, dtype,
// layout, shape) with a "knobs" object. The CPU and CUDA schedules each parse their own knobs
// from the entry this lookup picks.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace normgen {

// The key of one tuned entry: kernel family (e.g. "bn_fwd_train"), dtype, layout ("contig" |
// "cl") and shape ("generic" or an exact shape such as "n32_c64_s3136").
struct KnobsKey {
    std::string family, dtype, layout, shape;
};

struct TunedEntry {
    nlohmann::json knobs = nlohmann::json::object();  // empty: the schedule's defaults
    std::string chosen = "defaults";                  // which entry, for the build log
    std::string where;                                // file [family shape], for error messages
};

// The exact-shape entry for key if present, else the family's generic entry, else no knobs.
// An empty path means no knobs. Throws std::runtime_error naming the file on a malformed file.
TunedEntry find_tuned_entry(const std::string &tuned_json_path, const KnobsKey &key);

}  // namespace normgen

// Where schedule knobs come from: schedules/tuned/<target>.json, one entry per (family, dtype,
// layout, shape) with a "knobs" object. The CPU and CUDA schedules each parse their own knobs
// from the entry this lookup picks.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>

namespace normgen {

// Shape classes: buckets of C and S (the canonical (N, C, S) view) that a tuned entry and a
// class kernel serve. Bounds are half-open [lo, hi); hi = 0 means unbounded.
struct ShapeClass {
    int64_t c_lo = 1, c_hi = 0, s_lo = 1, s_hi = 0;
    bool contains(int64_t c, int64_t s) const {
        return c >= c_lo && (c_hi == 0 || c < c_hi) && s >= s_lo && (s_hi == 0 || s < s_hi);
    }
    // "class_c64to256_s1024to16384", "class_c1024toinf_s16384toinf" (also a symbol suffix).
    std::string key() const;
    bool operator==(const ShapeClass &o) const {
        return c_lo == o.c_lo && c_hi == o.c_hi && s_lo == o.s_lo && s_hi == o.s_hi;
    }
};
// The bucket of (C, S): C in [1,64) [64,256) [256,1024) [1024,inf), S in [1,64) [64,1024)
// [1024,16384) [16384,inf) (S = 1 is its own bucket: BatchNorm1d).
ShapeClass shape_class_of(int64_t c, int64_t s);
// Parses a key made by ShapeClass::key(); false if `text` is not one.
bool parse_shape_class(const std::string &text, ShapeClass *out);

// The key of one tuned entry: kernel family (e.g. "bn_fwd_train"), dtype, layout ("contig" |
// "cl") and shape ("generic", a class key, or an exact shape such as "n32_c64_s3136").
struct KnobsKey {
    std::string family, dtype, layout, shape;
};

struct TunedEntry {
    nlohmann::json knobs = nlohmann::json::object();  // empty: the schedule's defaults
    std::string chosen = "defaults";                  // which entry, for the build log
    std::string where;                                // file [family shape], for error messages
};

// The entry for key.shape if present; for an exact shape, else the entry of the class holding
// it; else the family's generic entry; else no knobs.
// An empty path means no knobs. Throws std::runtime_error naming the file on a malformed file.
TunedEntry find_tuned_entry(const std::string &tuned_json_path, const KnobsKey &key);

}  // namespace normgen

// The knobs of the CPU schedule and where their values come from (schedules/tuned/<target>.json,
// or a knobs JSON object given directly, as the tuner does).
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>

namespace normgen {

struct CpuKnobs {
    // Vector lanes = the target's natural f32 width * vectors (1: one register per step).
    int vectors = 1;
    // Contiguous layout: true computes a channel's statistics inside the loop that writes that
    // channel, while its slice is still in L2 (2 DRAM passes for forward training instead of 3);
    // false computes all statistics first. Channels-last always computes them first.
    bool stats_per_channel = true;
    // Contiguous layout: channels per parallel task (1: one task per channel).
    int channels_per_task = 1;
    // Channels-last: elements per parallel task (rounded to whole rows of C elements), in the
    // reduction and the elementwise loops. Sized in elements, not rows, so that wide and narrow
    // tensors both split into enough tasks for every thread.
    int task_elements = 65536;

    std::string to_string() const;
    nlohmann::json to_json() const;  // every field, in the form parse_cpu_knobs reads
    bool operator==(const CpuKnobs &o) const;
};

// The one knob parser: a JSON object of knob values (any subset; the rest keep their defaults).
// Throws std::runtime_error naming `where` and the field on an unknown knob or a bad value.
CpuKnobs parse_cpu_knobs(const nlohmann::json &j, const std::string &where);

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

// Reads the knobs for key from a tuned JSON file: the entry for key.shape if present; for an
// exact shape, else the entry of the class holding it; else the family's generic entry, else
// the defaults above. An empty path means the defaults. Throws std::runtime_error naming the
// file and field on a malformed file or an invalid knob value.
CpuKnobs load_cpu_knobs(const std::string &tuned_json_path, const KnobsKey &key,
                        std::string *chosen_entry = nullptr);

}  // namespace normgen

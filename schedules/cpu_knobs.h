// The knobs of the CPU schedule and where their values come from (schedules/tuned/<target>.json).
#pragma once

#include "tuned_knobs.h"

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
};

// Reads the knobs for key from a tuned JSON file: the exact-shape entry if present, else the
// family's generic entry, else the defaults above. An empty path means the defaults. Throws
// std::runtime_error naming the file and field on a malformed file or an invalid knob value.
CpuKnobs load_cpu_knobs(const std::string &tuned_json_path, const KnobsKey &key,
                        std::string *chosen_entry = nullptr);

}  // namespace normgen

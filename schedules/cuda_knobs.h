// The knobs of the CUDA schedule (schedules/tuned/<cuda target>.json, same lookup as the CPU's).
#pragma once

#include "tuned_knobs.h"

#include <string>

namespace normgen {

struct CudaKnobs {
    // Threads per block of the elementwise kernels (one element per thread, over the tensor
    // flattened in storage order: coalesced in both layouts whatever the extents).
    int threads = 256;
    // Threads per block of the statistics' first stage: partial sums along the innermost
    // storage dimension, one thread per element column, so loads are coalesced.
    int stats_threads = 256;
    // Contiguous layout: also split the statistics over the batch (a block per (n, c) instead of
    // per c), for enough blocks when C is small.
    bool stats_split_batch = true;
    // Channels-last: rows (of C elements) summed by one block of the first statistics stage.
    int stats_rows = 64;

    std::string to_string() const;
};

// A JSON object of CUDA knob values (any subset). Throws std::runtime_error naming `where`.
CudaKnobs parse_cuda_knobs(const nlohmann::json &knobs, const std::string &where);
// As load_cpu_knobs, for the CUDA schedule. Throws std::runtime_error on an invalid knob.
CudaKnobs load_cuda_knobs(const std::string &tuned_json_path, const KnobsKey &key,
                          std::string *chosen_entry = nullptr);

}  // namespace normgen

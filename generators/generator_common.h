// GeneratorParams and steps shared by the BatchNorm generators: layout and shape constraints on
// the buffers, and handing the finished algorithm to the schedule for the target.
#pragma once

#include "norm_pipeline.h"

#include <string>

namespace normgen {

inline const std::map<std::string, Layout> kLayoutNames = {{"contig", Layout::Contiguous},
                                                           {"cl", Layout::ChannelsLast}};

// A shape the kernel is specialised for, in PyTorch's canonical view (N, C, S); 0 = any.
struct FixedShape {
    int n = 0, c = 0, s = 0;
    bool generic() const { return n == 0; }
};

// "generic" or "n32_c64_s3136". Throws std::invalid_argument on anything else.
FixedShape parse_fixed_shape(const std::string &text);

// Constrains a 3-D tensor buffer to the storage the runtime passes: mins 0, innermost stride 1,
// and (for an exact shape) every extent and stride. In channels-last the runtime folds N into
// the row dimension, so the kernel sees (C, N*S, 1).
void constrain_tensor(Halide::OutputImageParam buffer, Layout layout, const FixedShape &shape);
// Constrains a per-channel vector (weight, statistics...) to min 0 and, if known, extent C.
void constrain_channel_vector(Halide::OutputImageParam buffer, const FixedShape &shape);

// Schedules the pipeline for the generator's target with the knobs tuned for `family`.
void schedule_for_target(NormPipeline &p, const Halide::Target &target, const std::string &family,
                         const std::string &shape, const std::string &tuned_json_path);

}  // namespace normgen

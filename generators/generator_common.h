// GeneratorParams and steps shared by the BatchNorm generators: layout and shape constraints on
// the buffers, and handing the finished algorithm to the schedule for the target.
#pragma once

#include "norm_pipeline.h"

#include <string>
#include <vector>

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

// What every BatchNorm generator shares: the layout, the exact shape (if any) and the tuned
// knobs file; and its last step, constraining the buffers and scheduling for the target.
template <typename Derived>
class BatchNormGenerator : public Halide::Generator<Derived> {
public:
    Halide::GeneratorParam<Layout> layout{"layout", Layout::Contiguous, kLayoutNames};
    Halide::GeneratorParam<std::string> shape{"shape", "generic"};  // or e.g. n32_c64_s3136
    Halide::GeneratorParam<std::string> tuned{"tuned", ""};         // schedules/tuned/<target>.json

protected:
    // tensors: the 3-D arguments; channel_vectors: the per-channel ones.
    void constrain_and_schedule(NormPipeline &p, const std::string &family,
                                const std::vector<Halide::OutputImageParam> &tensors,
                                const std::vector<Halide::OutputImageParam> &channel_vectors) {
        const FixedShape fixed = parse_fixed_shape(shape);
        for (const auto &t : tensors) constrain_tensor(t, layout, fixed);
        for (const auto &v : channel_vectors) constrain_channel_vector(v, fixed);
        schedule_for_target(p, this->get_target(), family, shape, tuned);
    }
};

}  // namespace normgen

#include "generator_common.h"

#include "../schedules/cpu_schedule.h"
#include "../schedules/cuda_schedule.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <regex>
#include <stdexcept>

namespace normgen {

using namespace Halide;

FixedShape parse_fixed_shape(const std::string &text) {
    ShapeClass cls;
    if (text == "generic" || parse_shape_class(text, &cls)) return {};
    std::smatch m;
    static const std::regex pattern("n([0-9]+)_c([0-9]+)_s([0-9]+)");
    if (!std::regex_match(text, m, pattern))
        throw std::invalid_argument("shape '" + text + "' is neither 'generic' nor n<N>_c<C>_s<S>");
    FixedShape shape{std::stoi(m[1]), std::stoi(m[2]), std::stoi(m[3])};
    if (shape.n < 1 || shape.c < 1 || shape.s < 1)
        throw std::invalid_argument("shape '" + text + "' has a zero extent");
    return shape;
}

void constrain_tensor(OutputImageParam buffer, Layout layout, const FixedShape &shape,
                      bool flat_rows) {
    for (int d = 0; d < 3; d++) buffer.dim(d).set_min(0);
    buffer.dim(0).set_stride(1);
    if (shape.generic()) return;
    const int inner = flat_rows ? shape.c * shape.s
                      : layout == Layout::Contiguous ? shape.s : shape.c;
    const int rows = flat_rows ? 1 : layout == Layout::Contiguous ? shape.c : shape.n * shape.s;
    const int outer = layout == Layout::Contiguous ? shape.n : 1;
    buffer.dim(0).set_extent(inner);
    buffer.dim(1).set_extent(rows).set_stride(inner);
    buffer.dim(2).set_extent(outer).set_stride(inner * rows);
}

void constrain_channel_vector(OutputImageParam buffer, const FixedShape &shape) {
    buffer.dim(0).set_min(0);
    if (!shape.generic()) buffer.dim(0).set_extent(shape.c);
}

ScheduleChoice choose_schedule(const Target &target, const KnobsKey &key,
                               const std::string &tuned_json_path, const std::string &knobs_json,
                               bool emulate_cuda) {
    ScheduleChoice choice;
    choice.key = key;
    if (!knobs_json.empty()) {
        try {
            choice.entry.knobs = nlohmann::json::parse(knobs_json);
        } catch (const std::exception &e) {
            throw std::runtime_error("knobs='" + knobs_json + "' is not valid JSON: " + e.what());
        }
        choice.entry.chosen = "the knobs parameter";
        choice.entry.where = "knobs='" + knobs_json + "'";
    } else {
        choice.entry = find_tuned_entry(tuned_json_path, key);
    }
    choice.cuda = target.has_feature(Target::CUDA) || emulate_cuda;
    if (choice.cuda)
        choice.gpu = parse_cuda_knobs(choice.entry.knobs, choice.entry.where);
    else
        choice.cpu = parse_cpu_knobs(choice.entry.knobs, choice.entry.where);
    return choice;
}

void schedule_for_target(NormPipeline &p, const ScheduleChoice &choice, const Target &target) {
    if (choice.cuda)
        schedule_cuda(p, choice.gpu, target);
    else
        schedule_cpu(p, choice.cpu, target);
    // Shown in the build log: which tuned entry each kernel was scheduled with.
    const KnobsKey &key = choice.key;
    std::fprintf(stderr, "normgen: %s %s %s %s %s: knobs from %s: %s\n", key.family.c_str(),
                 key.dtype.c_str(), key.layout.c_str(), key.shape.c_str(),
                 target.to_string().c_str(), choice.entry.chosen.c_str(),
                 (choice.cuda ? choice.gpu.to_string() : choice.cpu.to_string()).c_str());
}

namespace {
std::vector<std::string> &streaming_store_request() {
    static std::vector<std::string> buffers;
    return buffers;
}
}  // namespace

void request_streaming_stores(const std::vector<std::string> &output_buffers) {
    streaming_store_request() = output_buffers;
}

const std::vector<std::string> &streaming_store_buffers() { return streaming_store_request(); }

namespace {
bool &l2_prefetch_request() {
    static bool requested = false;
    return requested;
}
}  // namespace

void request_l2_prefetches(bool requested) { l2_prefetch_request() = requested; }
bool l2_prefetches_requested() { return l2_prefetch_request(); }

void schedule_channel_update(const std::vector<Func> &outputs, const Target &target) {
    for (Func f : outputs) {
        if (target.has_feature(Target::CUDA))
            schedule_cuda_channel_vector(f, target);
        else
            f.vectorize(f.args()[0], target.natural_vector_size<float>(), TailStrategy::GuardWithIf);
    }
}

}  // namespace normgen

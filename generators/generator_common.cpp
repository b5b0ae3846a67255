#include "generator_common.h"

#include "../schedules/cpu_schedule.h"

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

void constrain_tensor(OutputImageParam buffer, Layout layout, const FixedShape &shape) {
    for (int d = 0; d < 3; d++) buffer.dim(d).set_min(0);
    buffer.dim(0).set_stride(1);
    if (shape.generic()) return;
    const int inner = layout == Layout::Contiguous ? shape.s : shape.c;
    const int rows = layout == Layout::Contiguous ? shape.c : shape.n * shape.s;
    const int outer = layout == Layout::Contiguous ? shape.n : 1;
    buffer.dim(0).set_extent(inner);
    buffer.dim(1).set_extent(rows).set_stride(inner);
    buffer.dim(2).set_extent(outer).set_stride(inner * rows);
}

void constrain_channel_vector(OutputImageParam buffer, const FixedShape &shape) {
    buffer.dim(0).set_min(0);
    if (!shape.generic()) buffer.dim(0).set_extent(shape.c);
}

void schedule_for_target(NormPipeline &p, const Target &target, const std::string &family,
                         const std::string &dtype, const std::string &shape,
                         const std::string &tuned_json_path, const std::string &knobs_json) {
    const std::string layout = p.view.layout == Layout::Contiguous ? "contig" : "cl";
    std::string entry;
    CpuKnobs knobs;
    if (!knobs_json.empty()) {
        nlohmann::json j;
        try {
            j = nlohmann::json::parse(knobs_json);
        } catch (const std::exception &e) {
            throw std::runtime_error("knobs='" + knobs_json + "' is not valid JSON: " + e.what());
        }
        knobs = parse_cpu_knobs(j, "knobs='" + knobs_json + "'");
        entry = "the knobs parameter";
    } else {
        knobs = load_cpu_knobs(tuned_json_path, {family, dtype, layout, shape}, &entry);
    }
    // Shown in the build log: which tuned entry each kernel was scheduled with.
    std::fprintf(stderr, "normgen: %s %s %s %s %s: knobs from %s: %s\n", family.c_str(),
                 dtype.c_str(), layout.c_str(), shape.c_str(), target.to_string().c_str(), entry.c_str(),
                 knobs.to_string().c_str());
    schedule_cpu(p, knobs, target);
}

}  // namespace normgen

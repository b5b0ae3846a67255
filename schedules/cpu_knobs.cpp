#include "cpu_knobs.h"

#include <nlohmann/json.hpp>

#include <sstream>
#include <stdexcept>

namespace normgen {

std::string CpuKnobs::to_string() const {
    std::ostringstream os;
    os << "vectors=" << vectors << " stats_per_channel=" << stats_per_channel
       << " channels_per_task=" << channels_per_task << " task_elements=" << task_elements;
    return os.str();
}

namespace {

CpuKnobs parse_knobs(const nlohmann::json &j, const std::string &where) {
    CpuKnobs k;
    auto bad = [&](const std::string &field, const std::string &why) {
        return std::runtime_error(where + ": knob '" + field + "' " + why);
    };
    for (const auto &[name, value] : j.items()) {
        if (name == "vectors") {
            k.vectors = value.get<int>();
            if (k.vectors < 1 || k.vectors > 8) throw bad(name, "must be in 1..8");
        } else if (name == "stats_per_channel") {
            k.stats_per_channel = value.get<bool>();
        } else if (name == "channels_per_task") {
            k.channels_per_task = value.get<int>();
            if (k.channels_per_task < 1) throw bad(name, "must be >= 1");
        } else if (name == "task_elements") {
            k.task_elements = value.get<int>();
            if (k.task_elements < 1) throw bad(name, "must be >= 1");
        } else {
            throw bad(name, "is not a CPU knob");
        }
    }
    return k;
}

}  // namespace

CpuKnobs load_cpu_knobs(const std::string &path, const KnobsKey &key, std::string *chosen_entry) {
    const TunedEntry entry = find_tuned_entry(path, key);
    if (chosen_entry) *chosen_entry = entry.chosen;
    return parse_knobs(entry.knobs, entry.where);
}

}  // namespace normgen

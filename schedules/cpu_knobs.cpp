#include "cpu_knobs.h"

#include <nlohmann/json.hpp>

#include <fstream>
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
    if (chosen_entry) *chosen_entry = "defaults";
    if (path.empty()) return CpuKnobs{};
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot open tuned knobs file '" + path + "'");
    nlohmann::json doc;
    try {
        doc = nlohmann::json::parse(in);
    } catch (const std::exception &e) {
        throw std::runtime_error("tuned knobs file '" + path + "' is not valid JSON: " + e.what());
    }
    const nlohmann::json *generic = nullptr;
    try {
        for (const auto &entry : doc.at("entries")) {
            if (entry.at("family") != key.family || entry.at("dtype") != key.dtype ||
                entry.at("layout") != key.layout)
                continue;
            const std::string shape = entry.at("shape");
            if (shape == key.shape) {
                if (chosen_entry) *chosen_entry = path + ": " + shape;
                return parse_knobs(entry.at("knobs"), path + " [" + key.family + " " + shape + "]");
            }
            if (shape == "generic") generic = &entry;
        }
        if (generic) {
            if (chosen_entry) *chosen_entry = path + ": generic";
            return parse_knobs(generic->at("knobs"), path + " [" + key.family + " generic]");
        }
    } catch (const nlohmann::json::exception &e) {
        throw std::runtime_error("tuned knobs file '" + path + "': " + e.what());
    }
    return CpuKnobs{};
}

}  // namespace normgen

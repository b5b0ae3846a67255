#include "cpu_knobs.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <stdexcept>

namespace normgen {

std::string CpuKnobs::to_string() const {
    std::ostringstream os;
    os << "vectors=" << vectors << " stats_per_channel=" << stats_per_channel
       << " channels_per_task=" << channels_per_task << " task_elements=" << task_elements;
    return os.str();
}

nlohmann::json CpuKnobs::to_json() const {
    return {{"vectors", vectors},
            {"stats_per_channel", stats_per_channel},
            {"channels_per_task", channels_per_task},
            {"task_elements", task_elements}};
}

bool CpuKnobs::operator==(const CpuKnobs &o) const { return to_json() == o.to_json(); }

CpuKnobs parse_cpu_knobs(const nlohmann::json &j, const std::string &where) {
    CpuKnobs k;
    auto bad = [&](const std::string &field, const std::string &why) {
        return std::runtime_error(where + ": knob '" + field + "' " + why);
    };
    if (!j.is_object()) throw std::runtime_error(where + ": knobs must be a JSON object");
    for (const auto &[name, value] : j.items()) {
        try {
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
        } catch (const nlohmann::json::exception &e) {
            throw bad(name, std::string("has the wrong type: ") + e.what());
        }
    }
    return k;
}

std::string ShapeClass::key() const {
    auto bound = [](int64_t hi) { return hi == 0 ? std::string("inf") : std::to_string(hi); };
    return "class_c" + std::to_string(c_lo) + "to" + bound(c_hi) + "_s" + std::to_string(s_lo) +
           "to" + bound(s_hi);
}

ShapeClass shape_class_of(int64_t c, int64_t s) {
    static const int64_t c_edges[] = {1, 64, 256, 1024};
    static const int64_t s_edges[] = {1, 2, 64, 1024, 16384};
    ShapeClass k;
    for (size_t i = 0; i < std::size(c_edges); i++)
        if (c >= c_edges[i]) {
            k.c_lo = c_edges[i];
            k.c_hi = i + 1 < std::size(c_edges) ? c_edges[i + 1] : 0;
        }
    for (size_t i = 0; i < std::size(s_edges); i++)
        if (s >= s_edges[i]) {
            k.s_lo = s_edges[i];
            k.s_hi = i + 1 < std::size(s_edges) ? s_edges[i + 1] : 0;
        }
    return k;
}

bool parse_shape_class(const std::string &text, ShapeClass *out) {
    static const std::regex pattern("class_c([0-9]+)to([0-9]+|inf)_s([0-9]+)to([0-9]+|inf)");
    std::smatch m;
    if (!std::regex_match(text, m, pattern)) return false;
    auto bound = [](const std::string &b) { return b == "inf" ? int64_t(0) : std::stoll(b); };
    *out = {std::stoll(m[1]), bound(m[2]), std::stoll(m[3]), bound(m[4])};
    return true;
}

namespace {

// n<N>_c<C>_s<S> -> (C, S); false for anything else.
bool exact_channels_and_spatial(const std::string &shape, int64_t *c, int64_t *s) {
    static const std::regex pattern("n[0-9]+_c([0-9]+)_s([0-9]+)");
    std::smatch m;
    if (!std::regex_match(shape, m, pattern)) return false;
    *c = std::stoll(m[1]);
    *s = std::stoll(m[2]);
    return true;
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
    int64_t c = 0, s = 0;
    const bool exact = exact_channels_and_spatial(key.shape, &c, &s);
    // Most specialised first: the shape's own entry, its class's (exact shapes), the generic.
    const nlohmann::json *own = nullptr, *in_class = nullptr, *generic = nullptr;
    try {
        for (const auto &entry : doc.at("entries")) {
            if (entry.at("family") != key.family || entry.at("dtype") != key.dtype ||
                entry.at("layout") != key.layout)
                continue;
            const std::string shape = entry.at("shape");
            ShapeClass cls;
            if (shape == key.shape)
                own = &entry;
            else if (exact && parse_shape_class(shape, &cls) && cls.contains(c, s))
                in_class = &entry;
            else if (shape == "generic")
                generic = &entry;
        }
        for (const nlohmann::json *e : {own, in_class, generic}) {
            if (!e) continue;
            const std::string shape = e->at("shape");
            if (chosen_entry) *chosen_entry = path + ": " + shape;
            return parse_cpu_knobs(e->at("knobs"), path + " [" + key.family + " " + shape + "]");
        }
    } catch (const nlohmann::json::exception &e) {
        throw std::runtime_error("tuned knobs file '" + path + "': " + e.what());
    }
    return CpuKnobs{};
}

}  // namespace normgen

#include "tuned_knobs.h"

#include <fstream>
#include <stdexcept>

namespace normgen {

TunedEntry find_tuned_entry(const std::string &path, const KnobsKey &key) {
    TunedEntry found;
    if (path.empty()) return found;
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
                found.knobs = entry.at("knobs");
                found.chosen = path + ": " + shape;
                found.where = path + " [" + key.family + " " + shape + "]";
                return found;
            }
            if (shape == "generic") generic = &entry;
        }
        if (generic) {
            found.knobs = generic->at("knobs");
            found.chosen = path + ": generic";
            found.where = path + " [" + key.family + " generic]";
        }
    } catch (const nlohmann::json::exception &e) {
        throw std::runtime_error("tuned knobs file '" + path + "': " + e.what());
    }
    return found;
}

}  // namespace normgen

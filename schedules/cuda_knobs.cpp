#include "cuda_knobs.h"

#include <sstream>
#include <stdexcept>

namespace normgen {

std::string CudaKnobs::to_string() const {
    std::ostringstream os;
    os << "threads=" << threads << " stats_threads=" << stats_threads
       << " stats_split_batch=" << stats_split_batch << " stats_rows=" << stats_rows;
    return os.str();
}

CudaKnobs parse_cuda_knobs(const nlohmann::json &knobs, const std::string &where) {
    if (!knobs.is_object()) throw std::runtime_error(where + ": knobs must be a JSON object");
    CudaKnobs k;
    auto threads_knob = [&](const std::string &name, const nlohmann::json &value) {
        const int v = value.get<int>();
        // A warp is 32 threads and a block at most 1024.
        if (v < 32 || v > 1024 || v % 32 != 0)
            throw std::runtime_error(where + ": knob '" + name +
                                     "' must be a multiple of 32 in 32..1024");
        return v;
    };
    for (const auto &[name, value] : knobs.items()) {
        if (name == "threads") {
            k.threads = threads_knob(name, value);
        } else if (name == "stats_threads") {
            k.stats_threads = threads_knob(name, value);
        } else if (name == "stats_split_batch") {
            k.stats_split_batch = value.get<bool>();
        } else if (name == "stats_rows") {
            k.stats_rows = value.get<int>();
            if (k.stats_rows < 1) throw std::runtime_error(where + ": knob 'stats_rows' must be >= 1");
        } else {
            throw std::runtime_error(where + ": knob '" + name + "' is not a CUDA knob");
        }
    }
    return k;
}

CudaKnobs load_cuda_knobs(const std::string &path, const KnobsKey &key, std::string *chosen_entry) {
    const TunedEntry entry = find_tuned_entry(path, key);
    if (chosen_entry) *chosen_entry = entry.chosen;
    return parse_cuda_knobs(entry.knobs, entry.where);
}

}  // namespace normgen

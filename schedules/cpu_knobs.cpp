#include "cpu_knobs.h"

#include <nlohmann/json.hpp>

#include <sstream>
#include <stdexcept>
#include <string>

namespace normgen {

std::string CpuKnobs::to_string() const {
    std::ostringstream os;
    os << "vectors=" << vectors << " stats_per_channel=" << stats_per_channel
       << " channels_per_task=" << channels_per_task << " batch_outer=" << batch_outer
       << " flat_block_rows=" << flat_block_rows
       << " prefetch_next_channel=" << prefetch_next_channel
       << " prefetch_next_block=" << prefetch_next_block
       << " blocks_per_task=" << blocks_per_task
       << " float32_stat_rows=" << float32_stat_rows
       << " sequential_stat_rows=" << sequential_stat_rows << " balanced_tasks=" << balanced_tasks
       << " channel_block=" << channel_block
       << " task_elements=" << task_elements
       << " streaming_stores=" << streaming_stores;
    return os.str();
}

nlohmann::json CpuKnobs::to_json() const {
    return {{"vectors", vectors},
            {"stats_per_channel", stats_per_channel},
            {"channels_per_task", channels_per_task},
            {"batch_outer", batch_outer},
            {"flat_block_rows", flat_block_rows},
            {"prefetch_next_channel", prefetch_next_channel},
            {"prefetch_next_block", prefetch_next_block},
            {"blocks_per_task", blocks_per_task},
            {"float32_stat_rows", float32_stat_rows},
            {"sequential_stat_rows", sequential_stat_rows},
            {"balanced_tasks", balanced_tasks},
            {"channel_block", channel_block},
            {"task_elements", task_elements},
            {"streaming_stores", streaming_stores}};
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
            } else if (name == "batch_outer") {
                k.batch_outer = value.get<bool>();
            } else if (name == "flat_block_rows") {
                k.flat_block_rows = value.get<bool>();
            } else if (name == "prefetch_next_channel") {
                k.prefetch_next_channel = value.get<bool>();
            } else if (name == "prefetch_next_block") {
                k.prefetch_next_block = value.get<bool>();
            } else if (name == "blocks_per_task") {
                k.blocks_per_task = value.get<int>();
                if (k.blocks_per_task < 1) throw bad(name, "must be >= 1");
            } else if (name == "float32_stat_rows") {
                k.float32_stat_rows = value.get<int>();
                if (k.float32_stat_rows < 1 || k.float32_stat_rows > kMaxFloat32StatRows)
                    throw bad(name, "must be in 1.." + std::to_string(kMaxFloat32StatRows));
            } else if (name == "sequential_stat_rows") {
                k.sequential_stat_rows = value.get<bool>();
            } else if (name == "balanced_tasks") {
                k.balanced_tasks = value.get<bool>();
            } else if (name == "channel_block") {
                k.channel_block = value.get<int>();
                if (k.channel_block < 0) throw bad(name, "must be >= 0");
            } else if (name == "streaming_stores") {
                k.streaming_stores = value.get<bool>();
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

CpuKnobs load_cpu_knobs(const std::string &path, const KnobsKey &key, std::string *chosen_entry) {
    const TunedEntry entry = find_tuned_entry(path, key);
    if (chosen_entry) *chosen_entry = entry.chosen;
    return parse_cpu_knobs(entry.knobs, entry.where);
}

}  // namespace normgen

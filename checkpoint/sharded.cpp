#include "checkpoint/sharded.hpp"

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "checkpoint/files.hpp"
#include "core/error.hpp"

namespace caftrain {

using nlohmann::json;

namespace {

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  throw Error(Errc::corrupt_checkpoint, "sharded checkpoint '" + path + "': " + what);
}

} // namespace

std::string shard_file(int64_t rank) {
  return "shards/rank_" + std::to_string(rank) + ".pt";
}

std::string to_json(const ShardLayout& layout) {
  json flats = json::array();
  for (auto& f : layout.flats) {
    json entries = json::array();
    for (auto& e : f.entries)
      entries.push_back({{"name", e.name}, {"shape", e.shape}, {"offset", e.offset}, {"numel", e.numel}});
    flats.push_back({{"id", f.id},
                     {"numel", f.numel},
                     {"padded", f.padded},
                     {"shard_size", f.shard_size},
                     {"entries", entries}});
  }
  return json{{"world_size", layout.world_size}, {"strategy", layout.strategy}, {"flats", flats}}
    .dump(1);
}

ShardLayout layout_from_json(const std::string& text, const std::string& origin) {
  ShardLayout layout;
  try {
    auto j = json::parse(text);
    layout.world_size = j.at("world_size").get<int64_t>();
    layout.strategy = j.value("strategy", "");
    for (auto& f : j.at("flats")) {
      FlatLayout flat;
      flat.id = f.at("id").get<std::string>();
      flat.numel = f.at("numel").get<int64_t>();
      flat.padded = f.at("padded").get<int64_t>();
      flat.shard_size = f.at("shard_size").get<int64_t>();
      for (auto& e : f.at("entries"))
        flat.entries.push_back({e.at("name").get<std::string>(),
                                e.at("shape").get<std::vector<int64_t>>(),
                                e.at("offset").get<int64_t>(), e.at("numel").get<int64_t>()});
      layout.flats.push_back(std::move(flat));
    }
  } catch (const json::exception& e) {
    corrupt(origin, std::string("layout.json is not valid (") + e.what() + ")");
  }
  if (layout.world_size < 1)
    corrupt(origin, "layout.json has world_size < 1");
  return layout;
}

bool is_sharded(const Checkpoint& checkpoint) {
  return checkpoint.has_file(kLayoutFile);
}

ConsolidatedState consolidate(const Checkpoint& checkpoint) {
  auto& path = checkpoint.path();
  if (!is_sharded(checkpoint))
    corrupt(path, "has no layout.json; it is not sharded (read model.pt instead)");
  auto bytes = read_file(checkpoint.file(kLayoutFile));
  auto layout = layout_from_json(std::string(bytes.begin(), bytes.end()), path);
  std::vector<StateDict> shards;
  for (int64_t r = 0; r < layout.world_size; ++r) {
    auto name = shard_file(r);
    if (!checkpoint.has_file(name))
      corrupt(path, "the shard of rank " + std::to_string(r) + " (" + name + ") is missing");
    shards.push_back(load_state_dict_file(checkpoint.file(name)));
  }
  ConsolidatedState result;
  for (auto& flat : layout.flats) {
    // Parameters: the ranks' chunks in rank order form the padded flat buffer.
    std::vector<at::Tensor> chunks;
    std::map<std::string, std::vector<at::Tensor>> state_chunks;
    at::Tensor step;
    for (int64_t r = 0; r < layout.world_size; ++r) {
      auto& shard = shards[static_cast<size_t>(r)];
      auto* chunk = shard.find(flat.id);
      if (!chunk || chunk->numel() != flat.shard_size)
        corrupt(path, "rank " + std::to_string(r) + "'s shard lacks flat buffer '" + flat.id +
                        "' of " + std::to_string(flat.shard_size) + " elements");
      chunks.push_back(*chunk);
      for (auto& item : shard) {
        auto& key = item.key();
        if (key.rfind(flat.id + "/", 0) != 0)
          continue;
        auto state_key = key.substr(flat.id.size() + 1);
        if (state_key == "step")
          step = item.value();
        else
          state_chunks[state_key].push_back(item.value());
      }
    }
    auto full = torch::cat(chunks);
    std::map<std::string, at::Tensor> full_state;
    for (auto& [key, parts] : state_chunks) {
      if (static_cast<int64_t>(parts.size()) != layout.world_size)
        corrupt(path, "optimizer state '" + key + "' of '" + flat.id + "' is missing on some ranks");
      full_state[key] = torch::cat(parts);
    }
    for (auto& e : flat.entries) {
      if (e.offset + e.numel > flat.numel)
        corrupt(path, "entry '" + e.name + "' lies outside flat buffer '" + flat.id + "'");
      result.model.insert(e.name, full.narrow(0, e.offset, e.numel).view(e.shape).clone());
      auto& state = result.optimizer[e.name];
      for (auto& [key, t] : full_state)
        state[key] = t.narrow(0, e.offset, e.numel).view(e.shape).clone();
      if (step.defined() && !full_state.empty())
        state["step"] = step.clone();
    }
  }
  if (checkpoint.has_file(kBuffersFile))
    for (auto& item : load_state_dict_file(checkpoint.file(kBuffersFile)))
      result.model.insert(item.key(), item.value());
  return result;
}

void consolidate_to_file(const Checkpoint& checkpoint, const std::string& path) {
  save_state_dict(consolidate(checkpoint).model, path);
}

} // namespace caftrain

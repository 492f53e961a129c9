#include "train/trainer_state.hpp"

#include <filesystem>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "checkpoint/checkpoint.hpp"
#include "checkpoint/files.hpp"
#include "checkpoint/optimizer_archive.hpp"
#include "checkpoint/sharded.hpp"
#include "core/error.hpp"
#include "core/metrics_json.hpp"
#include "core/process_role.hpp"
#include "train/trainer_impl.hpp"

namespace caftrain {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

void load_optimizers(Trainer::Impl& s, const std::vector<char>& bytes, const std::string& origin) {
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(bytes.data(), bytes.size());
    auto count = torch::empty({}, torch::kLong);
    archive.read("count", count, true);
    if (count.item<int64_t>() != static_cast<int64_t>(s.optimizers.size()))
      throw Error(Errc::state_mismatch,
                  "checkpoint '" + origin + "' has " + std::to_string(count.item<int64_t>()) +
                    " optimizers but configure_optimizers returned " +
                    std::to_string(s.optimizers.size()));
    for (size_t i = 0; i < s.optimizers.size(); ++i) {
      torch::serialize::InputArchive nested;
      archive.read("optimizer_" + std::to_string(i), nested);
      s.optimizers[i]->load(nested);
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    std::string what = e.what();
    throw Error(Errc::state_mismatch, "optimizer state in '" + origin +
                                        "' does not fit the optimizers: " +
                                        what.substr(0, what.find('\n')));
  }
}

json trainer_state(Trainer& trainer) {
  auto& s = trainer.impl();
  // Resume point: after the epoch once its last batch is done, else after the last
  // batch whose step completed.
  int64_t resume_epoch = s.epoch_finished ? s.epoch + 1 : s.epoch;
  int64_t resume_batch = s.epoch_finished ? 0 : s.batches_done;
  // Saved at an epoch's end (in on_train_epoch_end), the epoch-interval schedulers have
  // not stepped yet; the resumed fit starts after that step, so count it.
  json schedulers = json::array();
  for (auto& sc : s.schedulers) {
    auto count = sc.scheduler->last_epoch();
    if (s.epoch_finished && !s.epoch_schedulers_stepped && sc.interval == Interval::epoch &&
        (s.epoch + 1) % std::max<int64_t>(sc.frequency, 1) == 0)
      ++count;
    schedulers.push_back(count);
  }
  json callbacks = json::object();
  for (auto& cb : s.callbacks) {
    auto state = cb->state_dict();
    if (!state.is_null())
      callbacks[cb->state_key()] = state;
  }
  json hparams = json::object();
  for (auto& [k, v] : s.module->hparams().values())
    std::visit([&](const auto& x) { hparams[k] = x; }, v);
  json state = {{"epoch", resume_epoch},
                {"batch", resume_batch},
                {"global_step", s.global_step},
                {"current_epoch", s.epoch},
                {"schedulers", schedulers},
                {"callbacks", callbacks},
                {"hparams", hparams},
                {"loss_scale", s.precision ? s.precision->loss_scale() : 1.0},
                {"world_size", s.environment->world_size()},
                {"strategy", s.strategy->name()},
                {"callback_metrics", metrics_to_json(s.callback_metrics)}};
  for (auto& cb : s.callbacks)
    cb->on_save_checkpoint(trainer, *s.module, state);
  return state;
}

} // namespace

namespace {

/// libtorch's default CPU generator, as `rng.pt` holds it.
std::vector<char> rng_bytes() {
  StateDict rng;
  rng.insert("cpu", at::detail::getDefaultCPUGenerator().get_state());
  return serialize_state_dict(rng);
}

std::string rank_rng_file(int64_t rank) {
  return "rng_rank_" + std::to_string(rank) + ".pt";
}

} // namespace

CheckpointFiles checkpoint_files(Trainer& trainer) {
  auto& s = trainer.impl();
  if (!s.module || !s.strategy)
    throw Error(Errc::bad_state, "save_checkpoint needs a running fit (call it from a callback or "
                                 "after fit has set the trainer up)");
  CheckpointFiles files;
  auto rank = s.environment->global_rank();
  // A worker process's CPU generator is its rank's own: each rank saves it beside rank
  // 0's `rng.pt`. (Ranks that are threads of one process share libtorch's one default
  // generator, whose state rank 0 saves for all.)
  if (rank != 0 && single_rank_process())
    files[rank_rng_file(rank)] = bytes_source(rng_bytes());
  bool sharded = s.strategy->sharded_checkpoints();
  if (sharded) {
    auto shard = s.strategy->shard_files(s.snapshot_copies); // rank 0 adds layout and buffers
    files.insert(shard.begin(), shard.end());
    if (rank != 0)
      return files;
  } else {
    if (s.environment->global_rank() != 0)
      return files;
    StateDict model;
    for (auto& item : s.strategy->model_state_dict())
      model.insert(item.key(), s.snapshot_copies.copy("model/" + item.key(), item.value()));
    files["model.pt"] = state_dict_source(std::move(model));
    files["optimizer.pt"] = optimizers_source(s.optimizers, s.snapshot_copies);
  }
  auto state = trainer_state(trainer).dump(2);
  files["trainer_state.json"] = bytes_source(std::vector<char>(state.begin(), state.end()));
  files["rng.pt"] = bytes_source(rng_bytes());
  return files;
}

void write_checkpoint(Trainer& trainer, const std::string& path) {
  auto files = checkpoint_files(trainer);
  auto& s = trainer.impl();
  auto rank = s.environment->global_rank();
  // Every rank stages its part beside the destination; rank 0 commits them all.
  auto parts = fs::path(path + ".parts");
  auto mine = parts / ("rank_" + std::to_string(rank));
  std::error_code ec;
  fs::create_directories(mine, ec);
  write_staged_files(mine.string(), files, /*sync=*/true);
  s.strategy->barrier();
  if (rank == 0) {
    CheckpointWriter writer(path);
    for (int64_t r = 0; r < s.environment->world_size(); ++r) {
      auto part = parts / ("rank_" + std::to_string(r));
      if (fs::is_directory(part, ec))
        writer.move_directory(part.string());
    }
    fs::remove_all(parts, ec);
    CheckpointMetadata meta;
    meta.epoch = s.epoch;
    meta.global_step = s.global_step;
    meta.metrics = s.callback_metrics;
    meta.world_size = s.environment->world_size();
    meta.strategy = s.strategy->name();
    writer.commit(meta);
  }
  s.strategy->barrier();
}

namespace {

/// The consolidated optimizer state of a sharded checkpoint (by parameter name), indexed
/// like the optimizers' param groups as configure_optimizers built them.
std::vector<SavedOptimizer> saved_by_index(const Trainer::Impl& s, const ConsolidatedState& state) {
  std::map<const c10::TensorImpl*, std::string> names;
  for (auto& item : s.module->named_parameters())
    names[item.value().unsafeGetTensorImpl()] = item.key();
  std::vector<SavedOptimizer> result;
  for (auto& opt : s.optimizers) {
    SavedOptimizer saved;
    for (auto& group : opt->param_groups()) {
      SavedOptimizer::Group g;
      for (auto& p : group.params()) {
        auto name = names.find(p.unsafeGetTensorImpl());
        auto it = name == names.end() ? state.optimizer.end() : state.optimizer.find(name->second);
        g.state.push_back(it == state.optimizer.end() ? std::map<std::string, at::Tensor>{}
                                                      : it->second);
      }
      saved.groups.push_back(std::move(g));
    }
    result.push_back(std::move(saved));
  }
  return result;
}

/// Restores every optimizer's param-group options (lr, weight_decay, ...) from `saved`.
void restore_all_options(Trainer::Impl& s, const std::vector<SavedOptimizer>& saved,
                         const std::string& origin) {
  for (size_t i = 0; i < s.optimizers.size() && i < saved.size(); ++i)
    restore_options(*s.optimizers[i], saved[i], origin);
}

} // namespace

void restore_checkpoint(Trainer& trainer, const std::string& path) {
  auto& s = trainer.impl();
  auto ckpt = Checkpoint::open(path);
  ckpt.validate_once(); // a restart's trainer validated it already
  auto& strategy = *s.strategy;
  if (is_sharded(ckpt)) {
    if (strategy.sharded_checkpoints()) {
      strategy.load_sharded(ckpt); // parameters, optimizer state and options, resharded
    } else {
      auto state = consolidate(ckpt);
      strategy.load_model_state_dict(state.model);
      try {
        strategy.load_optimizer_state(saved_by_index(s, state));
      } catch (const Error& e) {
        throw Error(Errc::invalid_config, "checkpoint '" + path + "' is sharded and holds "
                                            "element-wise optimizer state: " + e.what());
      }
      if (ckpt.has_file(kOptimizerOptionsFile)) {
        auto file = ckpt.file(kOptimizerOptionsFile);
        restore_all_options(s, read_saved_optimizers(read_file(file), s.optimizers, file), file);
      }
    }
  } else {
    strategy.load_model_state_dict(ckpt.model_state_dict());
    if (ckpt.has_file("optimizer.pt")) {
      auto bytes = read_file(ckpt.file("optimizer.pt"));
      if (strategy.sharded_checkpoints()) {
        // Unsharded state, indexed by param group and parameter: each rank cuts its shards.
        auto saved = read_saved_optimizers(bytes, s.optimizers, path);
        strategy.load_optimizer_state(saved);
        restore_all_options(s, saved, path);
      } else {
        load_optimizers(s, bytes, path); // libtorch's load restores state, not options
        restore_all_options(s, read_saved_optimizers(bytes, s.optimizers, path), path);
      }
    }
  }
  if (!ckpt.has_file("trainer_state.json"))
    throw Error(Errc::corrupt_checkpoint,
                "checkpoint '" + path + "' has no trainer_state.json; it holds weights only "
                                        "(load them with load_state_dict instead of resuming)");
  auto bytes = read_file(ckpt.file("trainer_state.json"));
  json state;
  try {
    state = json::parse(bytes.begin(), bytes.end());
    s.epoch = state.at("epoch").get<int64_t>();
    s.resume_batch = state.at("batch").get<int64_t>();
    s.global_step = state.at("global_step").get<int64_t>();
    auto& schedulers = state.at("schedulers");
    for (size_t i = 0; i < s.schedulers.size() && i < schedulers.size(); ++i)
      s.schedulers[i].scheduler->set_last_epoch(schedulers[i].get<int64_t>());
    auto& callbacks = state.at("callbacks");
    for (auto& cb : s.callbacks)
      if (callbacks.contains(cb->state_key()))
        cb->load_state_dict(callbacks.at(cb->state_key()));
    s.callback_metrics = metrics_from_json(state.value("callback_metrics", json::object()));
  } catch (const json::exception& e) {
    throw Error(Errc::corrupt_checkpoint,
                "trainer_state.json of '" + path + "' is not valid: " + e.what());
  }
  for (auto& cb : s.callbacks)
    cb->on_load_checkpoint(trainer, *s.module, state);
  // A worker process restores its own rank's generator when the checkpoint has it (a
  // run of as many worker processes); otherwise rank 0's, as thread ranks do.
  auto rng_file = std::string("rng.pt");
  auto rank = s.environment ? s.environment->global_rank() : 0;
  if (rank != 0 && single_rank_process() && ckpt.has_file(rank_rng_file(rank)))
    rng_file = rank_rng_file(rank);
  if (ckpt.has_file(rng_file)) {
    auto rng = load_state_dict_file(ckpt.file(rng_file));
    if (auto* cpu = rng.find("cpu"))
    {
      auto generator = at::detail::getDefaultCPUGenerator();
      generator.set_state(cpu->contiguous());
    }
  }
}

} // namespace caftrain

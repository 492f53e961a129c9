#include "strategies/sharded_strategy.hpp"

#include <cmath>
#include <functional>
#include <map>
#include <set>

#include <torch/torch.h>

#include "checkpoint/files.hpp"
#include "checkpoint/optimizer_archive.hpp"
#include "checkpoint/sharded.hpp"
#include "core/error.hpp"
#include "environment/cluster_environment.hpp"
#include "strategies/block_cache.hpp"
#include "strategies/ddp_strategy.hpp"
#include "strategies/gradient_reducer.hpp"

namespace caftrain {

namespace {

/// Per-parameter state (full shape) of a parameter by name; null when it has none.
using StateLookup = std::function<const std::map<std::string, at::Tensor>*(const std::string&)>;

/// Installs in `optimizer` the state of `flat`'s shard, cut from its parameters' full
/// state: each state tensor of the shard is the part of the flat layout this rank owns
/// (zeros in the padding), so each rank copies only its own elements.
void install_shard_state(torch::optim::Optimizer& optimizer, const FlatShard& flat,
                         const StateLookup& lookup) {
  torch::NoGradGuard no_grad;
  int64_t begin = flat.rank() * flat.shard_size();
  int64_t end = begin + flat.shard_size();
  std::map<std::string, at::Tensor> mine;
  for (auto& e : flat.entries()) {
    auto* state = lookup(e.name);
    if (!state)
      continue;
    int64_t lo = std::max(begin, e.offset);
    int64_t hi = std::min(end, e.offset + e.numel);
    for (auto& [key, t] : *state) {
      if (key == "step") {
        mine[key] = t;
        continue;
      }
      if (t.numel() != e.numel)
        throw Error(Errc::state_mismatch, "optimizer state '" + key + "' of parameter '" + e.name +
                                            "' has " + std::to_string(t.numel()) +
                                            " elements but the parameter has " +
                                            std::to_string(e.numel));
      auto& buffer = mine[key];
      if (!buffer.defined())
        buffer = torch::zeros({flat.shard_size()}, flat.shard().options().requires_grad(false));
      if (lo < hi)
        buffer.narrow(0, lo - begin, hi - lo).copy_(t.reshape({-1}).narrow(0, lo - e.offset, hi - lo));
    }
  }
  if (!mine.empty()) // else: saved before the first step, no optimizer state yet
    set_optimizer_state(optimizer, flat.shard(), mine);
}

} // namespace

ShardedStrategy::ShardedStrategy() = default;
ShardedStrategy::~ShardedStrategy() = default;

std::string ShardedStrategy::label() const {
  return name();
}

void ShardedStrategy::add_transient(int64_t bytes) {
  transient_ += bytes;
  peak_transient_ = std::max(peak_transient_, transient_);
}

void ShardedStrategy::setup(torch::nn::Module& module,
                            std::shared_ptr<ClusterEnvironment> environment, c10::Device device) {
  // Set up again (validate then fit, a second fit): the previous setup's hooks and flats
  // go; the module's parameters keep their values (FlatShard copies them anew).
  ShardedStrategy::teardown();
  flats_.clear();
  owners_.clear();
  group_names_.clear();
  slots_.clear();
  grad_outputs_.clear();
  transient_ = 0;
  peak_transient_ = 0;
  Strategy::setup(module, std::move(environment), device);
  if (communicator_ && communicator_->size() > 1) {
    verify_same_parameters(module, *communicator_);
    broadcast_module_state(module, *communicator_);
  }
}

void ShardedStrategy::setup_optimizers(
  std::vector<std::shared_ptr<torch::optim::Optimizer>>& optimizers) {
  Strategy::setup_optimizers(optimizers); // checks there is something to train
  std::map<c10::TensorImpl*, std::string> names;
  for (auto& item : module_->named_parameters())
    names[item.value().unsafeGetTensorImpl()] = item.key();
  int world = communicator_ ? communicator_->size() : 1;
  int rank = communicator_ ? communicator_->rank() : 0;
  if (replicate()) {
    world = 1;
    rank = 0;
  }
  std::map<c10::TensorImpl*, bool> covered;
  for (size_t oi = 0; oi < optimizers.size(); ++oi) {
    auto& opt = *optimizers[oi];
    require_elementwise(opt, label());
    std::vector<size_t> owned;
    std::vector<std::vector<std::string>> names_of_groups;
    auto& groups = opt.param_groups();
    for (size_t g = 0; g < groups.size(); ++g) {
      std::vector<std::pair<std::string, at::Tensor>> named;
      std::vector<std::string> order;
      for (auto& p : groups[g].params()) {
        auto it = names.find(p.unsafeGetTensorImpl());
        if (it == names.end())
          throw Error(Errc::invalid_config, label() + ": an optimizer holds a tensor that is not "
                                                      "a parameter of the module; optimize the "
                                                      "module's parameters");
        if (covered[p.unsafeGetTensorImpl()])
          throw Error(Errc::invalid_config, label() + ": parameter '" + it->second +
                                              "' is in two param groups or optimizers");
        covered[p.unsafeGetTensorImpl()] = true;
        named.emplace_back(it->second, p);
        order.push_back(it->second);
      }
      names_of_groups.push_back(std::move(order));
      // State the optimizer already holds for these parameters (Adagrad creates its
      // accumulators when it is built) moves into the shards; the full-size state goes.
      std::map<std::string, std::map<std::string, at::Tensor>> existing;
      for (auto& [name, p] : named) {
        auto state = optimizer_state_of(opt, p);
        if (!state.empty())
          existing[name] = std::move(state);
        opt.state().erase(c10::guts::to_string(p.unsafeGetTensorImpl()));
      }
      std::vector<at::Tensor> shards;
      size_t k = 0;
      for (auto& part : partition(named)) {
        auto id = "o" + std::to_string(oi) + ".g" + std::to_string(g) + ".f" + std::to_string(k++);
        flats_.push_back(std::make_unique<FlatShard>(id, part, rank, world, parameters_resident()));
        owned.push_back(flats_.size() - 1);
        shards.push_back(flats_.back()->shard());
        install_shard_state(opt, *flats_.back(), [&](const std::string& name) {
          auto it = existing.find(name);
          return it == existing.end() ? nullptr : &it->second;
        });
      }
      groups[g].params() = shards;
    }
    owners_.emplace_back(optimizers[oi].get(), owned);
    group_names_.push_back(std::move(names_of_groups));
  }
  for (auto& item : module_->named_parameters())
    if (item.value().requires_grad() && !covered[item.value().unsafeGetTensorImpl()])
      throw Error(Errc::invalid_config,
                  label() + ": parameter '" + item.key() +
                    "' is in no optimizer; freeze it (requires_grad false) or optimize it");
  // One reducer bucket per flat, laid out as the flat (padding included): reduce-scattered
  // into the shards (all-reduced under NO_SHARD), the full gradients persistent (ZeRO-1)
  // or transient (ZeRO-2, FSDP).
  std::vector<at::Tensor> params;
  std::vector<std::string> param_names;
  std::vector<GradientReducer::Bucket> buckets;
  for (size_t f = 0; f < flats_.size(); ++f) {
    auto& flat = *flats_[f];
    GradientReducer::Bucket bucket;
    bucket.size = flat.padded();
    bucket.options = flat.full().options();
    for (size_t e = 0; e < flat.params().size(); ++e) {
      bucket.members.push_back(params.size());
      bucket.offsets.push_back(flat.entries()[e].offset);
      params.push_back(flat.params()[e]);
      param_names.push_back(flat.entries()[e].name);
      slots_.push_back({f, e});
    }
    buckets.push_back(std::move(bucket));
  }
  grad_outputs_.assign(flats_.size(), at::Tensor());
  GradientReducer::Policy policy;
  policy.label = label();
  policy.persistent = persistent_gradients();
  policy.find_unused = true; // the step then leaves parameters no rank used alone
  policy.in_flight = kInFlight;
  reducer_ = std::make_unique<GradientReducer>(
    std::move(params), std::move(param_names), std::move(buckets), policy, communicator_,
    sync_enabled_, [this](size_t f, at::Tensor& buffer) { return launch(f, buffer); },
    [this](size_t f, at::Tensor& buffer) { fold(f, buffer); },
    [this](int64_t bytes) {
      if (bytes > 0)
        add_transient(bytes);
      else
        transient_ += bytes;
    });
}

void ShardedStrategy::teardown() {
  reducer_.reset(); // removes the hooks
  grad_outputs_.clear();
  Strategy::teardown();
}

void ShardedStrategy::before_training_step() {
  if (communicator_ && communicator_->size() > 1 && !module_->buffers().empty())
    broadcast_module_state(*module_, *communicator_, false, true);
}

std::shared_ptr<Work> ShardedStrategy::launch(size_t f, at::Tensor& buffer) {
  auto& flat = *flats_[f];
  if (!communicator_ || communicator_->size() == 1)
    return nullptr; // one rank: the buffer is already the average
  if (replicate())
    return communicator_->allreduce(buffer, ReduceOp::avg);
  if (persistent_gradients())
    return communicator_->reduce_scatter(buffer, flat.shard_grad(), ReduceOp::avg);
  // The reducer folded the flats kInFlight places back before this one launches, so
  // FSDP's peak (these, the next flat's buffer filling up, and the gathered units) stays
  // under its at-rest saving.
  grad_outputs_[f] = block_cache::empty(flat.shard_size(), flat.full().options());
  add_transient(flat.shard_size_bytes());
  return communicator_->reduce_scatter(buffer, grad_outputs_[f], ReduceOp::avg);
}

void ShardedStrategy::fold(size_t f, at::Tensor& buffer) {
  auto& flat = *flats_[f];
  bool local = !communicator_ || communicator_->size() == 1 || replicate();
  torch::NoGradGuard no_grad;
  auto own = [&] { return buffer.narrow(0, flat.rank() * flat.shard_size(), flat.shard_size()); };
  if (persistent_gradients()) {
    if (local) // else the reduce-scatter wrote the shard gradient
      flat.shard_grad().copy_(own());
    return;
  }
  // Transient: the window's reduced gradient adds into the shard gradient.
  flat.shard_grad().add_(local ? own() : grad_outputs_[f]);
  if (grad_outputs_[f].defined()) {
    transient_ -= flat.shard_size_bytes();
    grad_outputs_[f] = at::Tensor();
  }
}

void ShardedStrategy::backward(const at::Tensor& loss) {
  Strategy::backward(loss);
  // Without persistent full gradients the last micro-batch of a window is reduced into
  // the shards as backward produces it (its flats' buffers freed as they go out); with
  // them, in finish_gradient_sync. The micro-batches before it (no_sync) communicate
  // nothing.
  if (reducer_ && !persistent_gradients() && sync_enabled_)
    reducer_->finish();
}

void ShardedStrategy::finish_gradient_sync() {
  if (reducer_ && sync_enabled_)
    reducer_->finish();
}

double ShardedStrategy::clip_grad_norm(double max_norm, double norm_type) {
  torch::NoGradGuard no_grad;
  bool inf = std::isinf(norm_type);
  double local = 0;
  for (auto& flat : flats_) {
    auto g = flat->shard_grad();
    local = inf ? std::max(local, g.abs().max().item<double>())
                : local + g.abs().pow(norm_type).sum().item<double>();
  }
  bool distributed = communicator_ && communicator_->size() > 1 && !replicate();
  double total = distributed ? reduce(local, inf ? ReduceOp::max : ReduceOp::sum) : local;
  double norm = inf ? total : std::pow(total, 1.0 / norm_type);
  double coef = max_norm / (norm + 1e-6);
  if (coef < 1)
    for (auto& flat : flats_)
      flat->shard_grad().mul_(coef);
  return norm;
}

void ShardedStrategy::clip_grad_value(double clip_value) {
  torch::NoGradGuard no_grad;
  for (auto& flat : flats_)
    flat->shard_grad().clamp_(-clip_value, clip_value);
}

void ShardedStrategy::optimizer_step(torch::optim::Optimizer& optimizer) {
  const std::vector<size_t>* owned = nullptr;
  for (auto& [opt, flats] : owners_)
    if (opt == &optimizer)
      owned = &flats;
  // The parts of this rank's shards that belong to parameters no rank used keep their
  // values and optimizer state: the optimizer steps whole shards, so what it would do to
  // them (momentum, weight decay) is undone. Only the shard's step count advances.
  struct Kept {
    at::Tensor target;
    at::Tensor saved;
  };
  std::vector<Kept> kept;
  if (owned && reducer_ && !reducer_->unused().empty()) {
    torch::NoGradGuard no_grad;
    for (auto index : reducer_->unused()) {
      auto [f, e] = slots_[index];
      if (std::find(owned->begin(), owned->end(), f) == owned->end())
        continue;
      auto& flat = *flats_[f];
      auto& entry = flat.entries()[e];
      int64_t begin = flat.rank() * flat.shard_size();
      int64_t lo = std::max(begin, entry.offset);
      int64_t hi = std::min(begin + flat.shard_size(), entry.offset + entry.numel);
      if (lo >= hi)
        continue;
      auto keep = [&](const at::Tensor& t) {
        auto part = t.narrow(0, lo - begin, hi - lo);
        kept.push_back({part, part.clone()});
      };
      keep(flat.shard());
      for (auto& [key, t] : optimizer_state_of(optimizer, flat.shard()))
        if (key != "step" && t.dim() == 1 && t.numel() == flat.shard_size())
          keep(t);
    }
  }
  optimizer.step();
  if (!kept.empty()) {
    // State this very step created (the first) saw a zero gradient there: it is zero.
    torch::NoGradGuard no_grad;
    for (auto& k : kept)
      k.target.copy_(k.saved);
  }
  if (owned)
    after_step(*owned);
  // Nothing stays cached between steps: FSDP's memory at rest is its shards'. (Keeping the
  // blocks across steps measured 1.33x against 1.34x of DDP's step time: not worth it.)
  block_cache::trim();
}

void ShardedStrategy::zero_grad(torch::optim::Optimizer& optimizer) {
  torch::NoGradGuard no_grad;
  for (auto& [opt, owned] : owners_) {
    if (opt != &optimizer)
      continue;
    for (auto f : owned) {
      flats_[f]->shard_grad().zero_();
      if (persistent_gradients())
        reducer_->buffer(f).zero_();
    }
  }
}

std::vector<at::Tensor> ShardedStrategy::gradients() {
  std::vector<at::Tensor> result;
  for (auto& flat : flats_)
    result.push_back(flat->shard_grad());
  return result;
}

StateDict ShardedStrategy::model_state_dict() {
  require_setup("model_state_dict");
  for (size_t f = 0; f < flats_.size(); ++f)
    ensure_gathered(f);
  StateDict result;
  for (auto& item : state_dict(*module_))
    result.insert(item.key(), item.value().clone());
  return result;
}

void ShardedStrategy::load_model_state_dict(const StateDict& state, bool strict) {
  require_setup("load_model_state_dict");
  for (size_t f = 0; f < flats_.size(); ++f)
    ensure_gathered(f);
  load_state_dict(*module_, state, {strict});
  for (auto& flat : flats_)
    flat->shard_from_full();
}

ParameterScope ShardedStrategy::summon_full_params(bool writeback) {
  if (!writeback || flats_.empty())
    return Strategy::summon_full_params(writeback);
  return ParameterScope([this] {
    for (auto& flat : flats_)
      if (flat->gathered())
        flat->shard_from_full(); // the optimizer steps the shard: it takes the change
  });
}

std::map<std::string, FileSource> ShardedStrategy::shard_files(TensorCopies& copies) {
  std::map<std::string, FileSource> files;
  int rank = communicator_ ? communicator_->rank() : 0;
  if (replicate() && rank != 0)
    return files; // every rank holds the same: rank 0 writes it
  StateDict shard;
  for (auto& [opt, owned] : owners_) {
    for (auto f : owned) {
      auto& flat = *flats_[f];
      shard.insert(flat.id(), copies.copy("shard/" + flat.id(), flat.shard()));
      for (auto& [key, t] : optimizer_state_of(*opt, flat.shard()))
        shard.insert(flat.id() + "/" + key, copies.copy("shard/" + flat.id() + "/" + key, t));
    }
  }
  files[shard_file(replicate() ? 0 : rank)] = state_dict_source(std::move(shard));
  if (rank == 0) {
    ShardLayout layout;
    layout.world_size = flats_.empty() ? 1 : flats_.front()->world();
    layout.strategy = name();
    for (auto& flat : flats_) {
      FlatLayout fl;
      fl.id = flat->id();
      fl.numel = flat->numel();
      fl.padded = flat->padded();
      fl.shard_size = flat->shard_size();
      for (auto& e : flat->entries())
        fl.entries.push_back({e.name, e.shape, e.offset, e.numel});
      layout.flats.push_back(std::move(fl));
    }
    auto text = to_json(layout);
    files[kLayoutFile] = bytes_source(std::vector<char>(text.begin(), text.end()));
    StateDict buffers;
    for (auto& item : module_->named_buffers())
      buffers.insert(item.key(), item.value().detach());
    files[kBuffersFile] = bytes_source(serialize_state_dict(buffers)); // small: now
    files[kOptimizerOptionsFile] = bytes_source(optimizer_options_bytes(optimizers_));
  }
  return files;
}

void ShardedStrategy::load_sharded(const Checkpoint& checkpoint) {
  require_setup("load_sharded");
  auto& path = checkpoint.path();
  if (!is_sharded(checkpoint))
    throw Error(Errc::corrupt_checkpoint, "checkpoint '" + path + "' has no " +
                                            std::string(kLayoutFile) + "; it is not sharded");
  auto text = read_file(checkpoint.file(kLayoutFile));
  auto layout = layout_from_json(std::string(text.begin(), text.end()), path);
  auto fail = [&](const std::string& what) {
    throw Error(Errc::state_mismatch, label() + ": sharded checkpoint '" + path + "': " + what);
  };
  // Where each saved parameter lives: its flat and its place in that flat.
  struct Source {
    size_t flat = 0;
    int64_t offset = 0;
    int64_t numel = 0;
  };
  std::map<std::string, Source> sources;
  for (size_t k = 0; k < layout.flats.size(); ++k)
    for (auto& e : layout.flats[k].entries)
      sources[e.name] = {k, e.offset, e.numel};
  std::set<std::string> ours;
  for (auto& flat : flats_)
    for (auto& e : flat->entries()) {
      ours.insert(e.name);
      auto it = sources.find(e.name);
      if (it == sources.end())
        fail("it has no parameter '" + e.name + "'; load a checkpoint of the same model");
      if (it->second.numel != e.numel)
        fail("parameter '" + e.name + "' has " + std::to_string(it->second.numel) +
             " elements there but " + std::to_string(e.numel) + " here");
    }
  for (auto& [name, source] : sources)
    if (!ours.count(name))
      fail("it has parameter '" + name + "', which this model (or its optimizers) lacks");
  // What this rank's shards need, by the saved rank whose shard holds it: a piece of
  // shard f (from `dst`, `n` elements) is elements `src` on of saved flat `saved_flat`'s
  // shard. Each saved shard is then read once, one at a time, and only those this rank
  // needs: with the same world size, its own.
  struct Piece {
    size_t flat;
    int64_t dst;
    size_t saved_flat;
    int64_t src;
    int64_t n;
  };
  std::map<int64_t, std::vector<Piece>> by_saved_rank;
  for (size_t f = 0; f < flats_.size(); ++f) {
    auto& flat = *flats_[f];
    int64_t begin = flat.rank() * flat.shard_size();
    int64_t end = begin + flat.shard_size();
    for (auto& e : flat.entries()) {
      int64_t lo = std::max(begin, e.offset);
      int64_t hi = std::min(end, e.offset + e.numel);
      auto& source = sources.at(e.name);
      auto& saved = layout.flats[source.flat];
      // Elements [lo, hi) of this flat are the parameter's [lo - offset, hi - offset),
      // which the saved flat holds at source.offset on, cut into shards of its own size.
      for (int64_t at = lo; at < hi;) {
        int64_t pos = source.offset + (at - e.offset);
        int64_t q = pos / saved.shard_size;
        int64_t within = pos - q * saved.shard_size;
        int64_t n = std::min(hi - at, saved.shard_size - within);
        by_saved_rank[q].push_back({f, at - begin, source.flat, within, n});
        at += n;
      }
    }
  }
  torch::NoGradGuard no_grad;
  std::vector<std::map<std::string, at::Tensor>> states(flats_.size());
  int64_t peak = 0;
  for (auto& [q, pieces] : by_saved_rank) {
    auto name = shard_file(q);
    if (q >= layout.world_size || !checkpoint.has_file(name))
      throw Error(Errc::corrupt_checkpoint, "sharded checkpoint '" + path + "': the shard of rank " +
                                              std::to_string(q) + " (" + name + ") is missing");
    auto shard = load_state_dict_file(checkpoint.file(name));
    int64_t bytes = 0;
    for (auto& item : shard)
      bytes += static_cast<int64_t>(item.value().nbytes());
    peak = std::max(peak, bytes);
    for (auto& piece : pieces) {
      auto& saved = layout.flats[piece.saved_flat];
      auto& flat = *flats_[piece.flat];
      auto* values = shard.find(saved.id);
      if (!values || values->numel() != saved.shard_size)
        throw Error(Errc::corrupt_checkpoint, "sharded checkpoint '" + path + "': rank " +
                                                std::to_string(q) + "'s shard lacks flat buffer '" +
                                                saved.id + "' of " + std::to_string(saved.shard_size) +
                                                " elements");
      flat.shard().narrow(0, piece.dst, piece.n).copy_(values->narrow(0, piece.src, piece.n));
      auto prefix = saved.id + "/";
      for (auto& item : shard) {
        auto& key = item.key();
        if (key.rfind(prefix, 0) != 0)
          continue;
        auto state_key = key.substr(prefix.size());
        auto& state = states[piece.flat];
        if (state_key == "step") {
          if (!state.count("step"))
            state["step"] = item.value().clone();
          continue;
        }
        auto& buffer = state[state_key];
        if (!buffer.defined())
          buffer = torch::zeros({flat.shard_size()}, flat.shard().options().requires_grad(false));
        buffer.narrow(0, piece.dst, piece.n).copy_(item.value().narrow(0, piece.src, piece.n));
      }
    }
  }
  last_load_peak_bytes_ = peak;
  // Buffers (rank 0 wrote them once; they are small) go into every rank's module.
  if (checkpoint.has_file(kBuffersFile)) {
    auto buffers = load_state_dict_file(checkpoint.file(kBuffersFile));
    for (auto& item : module_->named_buffers()) {
      auto* saved = buffers.find(item.key());
      if (!saved)
        fail("it has no buffer '" + item.key() + "'; load a checkpoint of the same model");
      item.value().copy_(*saved);
    }
  }
  for (auto& [opt, owned] : owners_)
    for (auto f : owned)
      if (!states[f].empty()) // else: saved before the first step, no optimizer state yet
        set_optimizer_state(*opt, flats_[f]->shard(), states[f]);
  after_load();
  if (checkpoint.has_file(kOptimizerOptionsFile)) {
    auto options_path = checkpoint.file(kOptimizerOptionsFile);
    auto saved = read_saved_optimizers(read_file(options_path), optimizers_, options_path);
    for (size_t i = 0; i < saved.size(); ++i)
      restore_options(*optimizers_[i], saved[i], options_path);
  }
}

void ShardedStrategy::after_load() {
  std::vector<size_t> all(flats_.size());
  for (size_t f = 0; f < all.size(); ++f)
    all[f] = f;
  after_step(all); // the parameters follow the loaded shards
}

void ShardedStrategy::load_optimizer_state(const std::vector<SavedOptimizer>& saved) {
  require_setup("load_optimizer_state");
  if (saved.size() != owners_.size())
    throw Error(Errc::state_mismatch, label() + ": the checkpoint has " +
                                        std::to_string(saved.size()) + " optimizers but "
                                        "configure_optimizers returned " +
                                        std::to_string(owners_.size()));
  for (size_t i = 0; i < owners_.size(); ++i) {
    auto& names = group_names_[i];
    auto& groups = saved[i].groups;
    if (groups.size() != names.size())
      throw Error(Errc::state_mismatch, label() + ": optimizer " + std::to_string(i) + " has " +
                                          std::to_string(groups.size()) +
                                          " param groups in the checkpoint but " +
                                          std::to_string(names.size()) + " here");
    // The saved state is indexed like configure_optimizers' groups: name it, then cut it.
    std::map<std::string, const std::map<std::string, at::Tensor>*> by_name;
    for (size_t g = 0; g < names.size(); ++g) {
      if (groups[g].state.size() != names[g].size())
        throw Error(Errc::state_mismatch,
                    label() + ": param group " + std::to_string(g) + " of optimizer " +
                      std::to_string(i) + " has " + std::to_string(groups[g].state.size()) +
                      " parameters in the checkpoint but " + std::to_string(names[g].size()) +
                      " here; build the groups as the run that saved it did");
      for (size_t k = 0; k < names[g].size(); ++k)
        by_name[names[g][k]] = &groups[g].state[k];
    }
    auto& [opt, owned] = owners_[i];
    for (auto f : owned)
      install_shard_state(*opt, *flats_[f], [&](const std::string& name) {
        auto it = by_name.find(name);
        return it == by_name.end() || it->second->empty() ? nullptr : it->second;
      });
  }
}

MemoryStats ShardedStrategy::memory_stats() const {
  MemoryStats stats;
  for (size_t f = 0; f < flats_.size(); ++f) {
    auto& flat = *flats_[f];
    stats.parameter_bytes += flat.shard_bytes() + (flat.gathered() ? flat.full_bytes() : 0);
    if (flat.shard().grad().defined())
      stats.gradient_bytes += flat.shard_size_bytes();
  }
  if (reducer_)
    stats.gradient_bytes += reducer_->buffer_bytes();
  for (auto& opt : optimizers_)
    stats.optimizer_state_bytes += optimizer_state_bytes(*opt);
  stats.peak_transient_bytes = peak_transient_;
  return stats;
}

} // namespace caftrain

#include "strategies/fsdp_strategy.hpp"

#include <algorithm>
#include <functional>
#include <mutex>
#include <set>
#include <utility>

#include <ATen/record_function.h>
#include <torch/torch.h>

#include "core/error.hpp"

namespace caftrain {

namespace {

/// The FSDP strategy whose units this thread computes, and whether the thread is inside
/// one of the strategy's own operations (which must not trigger gathers themselves).
thread_local FSDPStrategy* active = nullptr;
thread_local bool internal = false;

/// Every FSDP strategy with its observer installed. The observer is a thread-local
/// callback of the thread that trains, and autograd carries thread-local callbacks to the
/// threads it runs backward on (its device threads, for CUDA tensors), but not `active`:
/// there the observer finds the strategy by the storage of the operator's inputs.
std::mutex observed_mtx;
std::vector<FSDPStrategy*> observed;

void start_observing(FSDPStrategy* fsdp) {
  std::lock_guard<std::mutex> guard(observed_mtx);
  if (std::find(observed.begin(), observed.end(), fsdp) == observed.end())
    observed.push_back(fsdp);
}

void stop_observing(FSDPStrategy* fsdp) {
  std::lock_guard<std::mutex> guard(observed_mtx);
  observed.erase(std::remove(observed.begin(), observed.end(), fsdp), observed.end());
}

/// Counts a step (or backward, or an optimizer step) the strategy is inside.
struct InStep {
  explicit InStep(int& count) : count(count) {
    ++count;
  }
  ~InStep() {
    --count;
  }
  int& count;
};

struct Internal {
  Internal() : previous(internal) {
    internal = true;
  }
  ~Internal() {
    internal = previous;
  }
  bool previous;
};

void collect(const c10::IValue& value, FSDPStrategy& fsdp, std::vector<size_t>& touched) {
  auto add = [&](const at::Tensor& t) {
    if (!t.defined() || !t.has_storage())
      return;
    auto f = fsdp.flat_of(t.storage().unsafeGetStorageImpl());
    if (f >= 0 && std::find(touched.begin(), touched.end(), static_cast<size_t>(f)) == touched.end())
      touched.push_back(static_cast<size_t>(f));
  };
  if (value.isTensor())
    add(value.toTensor());
  else if (value.isTensorList())
    for (const at::Tensor& t : value.toTensorVector())
      add(t);
}

std::unique_ptr<at::ObserverContext> observe(const at::RecordFunction& fn) {
  if (internal)
    return nullptr;
  std::vector<size_t> touched;
  auto* fsdp = active;
  if (fsdp) {
    for (auto& input : fn.inputs())
      collect(input, *fsdp, touched);
  } else {
    // Another thread of the training thread's backward: the strategy whose units the
    // inputs are (one at a time; the training thread waits for its backward).
    std::lock_guard<std::mutex> guard(observed_mtx);
    for (auto* candidate : observed) {
      for (auto& input : fn.inputs())
        collect(input, *candidate, touched);
      if (!touched.empty()) {
        fsdp = candidate;
        break;
      }
    }
  }
  if (!touched.empty()) {
    try {
      fsdp->on_access(touched);
    } catch (...) {
      fsdp->record_failure(std::current_exception());
    }
  }
  return nullptr;
}

int64_t count_params(torch::nn::Module& m, const std::set<const c10::TensorImpl*>& taken) {
  int64_t n = 0;
  for (auto& p : m.parameters(/*recurse=*/true))
    if (!taken.count(p.unsafeGetTensorImpl()))
      n += p.numel();
  return n;
}

} // namespace

const char* to_string(ShardingStrategy strategy) {
  switch (strategy) {
    case ShardingStrategy::FULL_SHARD: return "FULL_SHARD";
    case ShardingStrategy::SHARD_GRAD_OP: return "SHARD_GRAD_OP";
    case ShardingStrategy::NO_SHARD: return "NO_SHARD";
  }
  return "?";
}

FSDPStrategy::FSDPStrategy(FSDPOptions options) : options_(options) {
  if (options_.min_num_params < 0)
    throw Error(Errc::invalid_config, "FSDPStrategy: min_num_params must not be negative");
}

FSDPStrategy::FSDPStrategy(const FSDPStrategy& other) : ShardedStrategy(), options_(other.options_) {
  // A copy starts unconfigured: units, flats and the observer belong to one setup.
}

FSDPStrategy::~FSDPStrategy() {
  if (observing_ && active == this)
    active = nullptr;
  if (observing_) {
    at::removeCallback(observer_);
    stop_observing(this);
  }
}

std::string FSDPStrategy::name() const {
  return "fsdp";
}

void FSDPStrategy::setup(torch::nn::Module& module, std::shared_ptr<ClusterEnvironment> environment,
                         c10::Device device) {
  ShardedStrategy::setup(module, std::move(environment), device);
  assign_units(module);
}

void FSDPStrategy::assign_units(torch::nn::Module& root) {
  unit_names_.clear();
  unit_of_.clear();
  std::set<const c10::TensorImpl*> taken;
  auto claim = [&](torch::nn::Module& m, const std::string& name) {
    bool any = false;
    for (auto& p : m.parameters(true))
      if (!taken.count(p.unsafeGetTensorImpl())) {
        taken.insert(p.unsafeGetTensorImpl());
        unit_of_[p.unsafeGetTensorImpl()] = unit_names_.size();
        any = true;
      }
    if (any)
      unit_names_.push_back(name);
  };
  if (options_.min_num_params == 0) {
    for (auto& child : root.named_children())
      claim(*child.value(), child.key());
  } else {
    // Deepest first: a submodule with enough parameters not yet wrapped becomes a unit.
    std::function<void(torch::nn::Module&, const std::string&)> visit =
      [&](torch::nn::Module& m, const std::string& prefix) {
        for (auto& child : m.named_children()) {
          auto path = prefix.empty() ? child.key() : prefix + "." + child.key();
          visit(*child.value(), path);
          if (count_params(*child.value(), taken) >= options_.min_num_params)
            claim(*child.value(), path);
        }
      };
    visit(root, "");
  }
  claim(root, ""); // whatever is left
}

std::vector<std::vector<std::pair<std::string, at::Tensor>>>
FSDPStrategy::partition(const std::vector<std::pair<std::string, at::Tensor>>& params) {
  std::map<size_t, std::vector<std::pair<std::string, at::Tensor>>> by_unit;
  for (auto& item : params)
    by_unit[unit_of_.at(item.second.unsafeGetTensorImpl())].push_back(item);
  // Units in reverse registration order: the order backward produces their gradients.
  std::vector<std::vector<std::pair<std::string, at::Tensor>>> result;
  for (auto it = by_unit.rbegin(); it != by_unit.rend(); ++it)
    result.push_back(it->second);
  return result;
}

void FSDPStrategy::setup_optimizers(std::vector<std::shared_ptr<torch::optim::Optimizer>>& optimizers) {
  ShardedStrategy::setup_optimizers(optimizers);
  failure_ = nullptr;
  prefetching_.clear();
  forward_order_.clear(); // a new setup records its own forward order
  order_recorded_ = false;
  storage_to_flat_.clear();
  for (size_t f = 0; f < flats_.size(); ++f)
    storage_to_flat_[flats_[f]->full().storage().unsafeGetStorageImpl()] = f;
  lru_.clear();
  if (options_.sharding_strategy != ShardingStrategy::NO_SHARD)
    for (size_t f = 0; f < flats_.size(); ++f)
      flats_[f]->free_full(); // at rest: shards only
  else
    for (size_t f = 0; f < flats_.size(); ++f)
      lru_.push_back(f);
  if (active && active != this)
    throw Error(Errc::invalid_config, "another FSDPStrategy is active on this thread; one fit at "
                                      "a time per thread");
  active = this;
  observer_ = at::addThreadLocalCallback(
    at::RecordFunctionCallback(&observe)
      .needsInputs(true)
      .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
  observing_ = true;
  start_observing(this);
}

void FSDPStrategy::teardown() {
  {
    Internal guard;
    if (failed_) {
      // Gathering needs every rank, and they may be gone: what is not here reads as NaN.
      for (auto& [f, work] : prefetching_)
        try {
          if (work)
            work->wait();
        } catch (...) {
          // The fit's own failure is the one to report.
        }
      prefetching_.clear();
      for (auto& flat : flats_)
        flat->poison();
    } else {
      check_reads_outside();
      for (size_t f = 0; f < flats_.size(); ++f)
        ensure_gathered(f); // the module is an ordinary one again
    }
  }
  failed_ = false;
  in_step_ = 0;
  summoned_ = 0;
  read_outside_.clear();
  if (observing_) {
    at::removeCallback(observer_);
    stop_observing(this);
    observing_ = false;
  }
  if (active == this)
    active = nullptr;
  ShardedStrategy::teardown();
}

int64_t FSDPStrategy::flat_of(const c10::StorageImpl* storage) const {
  auto it = storage_to_flat_.find(storage);
  return it == storage_to_flat_.end() ? -1 : static_cast<int64_t>(it->second);
}

size_t FSDPStrategy::capacity() const {
  return options_.forward_prefetch ? 3 : 2;
}

void FSDPStrategy::ensure_gathered(size_t f) {
  Internal guard;
  auto& flat = *flats_[f];
  auto pending = prefetching_.find(f);
  if (pending != prefetching_.end()) {
    auto work = pending->second;
    prefetching_.erase(pending);
    if (work)
      work->wait();
  } else if (!flat.gathered()) {
    ++gathers_;
    add_transient(flat.full_bytes());
    auto work = flat.gather(communicator_.get());
    if (work)
      work->wait();
  }
  lru_.remove(f);
  lru_.push_front(f);
}

void FSDPStrategy::free_flat(size_t f) {
  auto& flat = *flats_[f];
  if (options_.sharding_strategy == ShardingStrategy::NO_SHARD)
    return;
  if (!flat.gathered()) {
    flat.free_full(); // NaN that a read outside a step saw, if any
    return;
  }
  flat.free_full();
  transient_ -= flat.full_bytes();
  lru_.remove(f);
}

void FSDPStrategy::free_all() {
  Internal guard;
  for (auto& [f, work] : prefetching_)
    if (work)
      work->wait();
  prefetching_.clear();
  for (size_t f = 0; f < flats_.size(); ++f)
    free_flat(f);
}

void FSDPStrategy::on_access(const std::vector<size_t>& touched) {
  Internal guard;
  if (in_step_ == 0 && summoned_ == 0) {
    // Outside every rank's step a gather would be this rank's alone: the read sees NaN,
    // and the next step fails naming summon_full_params.
    for (auto f : touched) {
      bool in_flight = prefetching_.count(f) > 0;
      if (flats_[f]->gathered() && !in_flight)
        continue; // here already: the read works
      if (!in_flight)
        flats_[f]->poison();
      if (std::find(read_outside_.begin(), read_outside_.end(), f) == read_outside_.end())
        read_outside_.push_back(f);
    }
    return;
  }
  bool new_gather = false;
  for (auto f : touched) {
    if (!flats_[f]->gathered() || prefetching_.count(f)) {
      new_gather = true;
      if (!order_recorded_ && torch::GradMode::is_enabled() &&
          std::find(forward_order_.begin(), forward_order_.end(), f) == forward_order_.end())
        forward_order_.push_back(f);
    }
    ensure_gathered(f);
  }
  if (options_.sharding_strategy == ShardingStrategy::FULL_SHARD && summoned_ == 0) {
    // Free the least recently used units beyond the capacity (never one this op reads).
    while (lru_.size() > capacity()) {
      auto victim = std::find_if(lru_.rbegin(), lru_.rend(), [&](size_t f) {
        return std::find(touched.begin(), touched.end(), f) == touched.end() &&
               !prefetching_.count(f);
      });
      if (victim == lru_.rend())
        break;
      free_flat(*victim);
    }
  }
  if (options_.forward_prefetch && new_gather && order_recorded_ && torch::GradMode::is_enabled()) {
    // Start gathering the unit that came next in the first forward.
    auto pos = std::find(forward_order_.begin(), forward_order_.end(), touched.front());
    if (pos != forward_order_.end() && std::next(pos) != forward_order_.end()) {
      auto next = *std::next(pos);
      if (!flats_[next]->gathered() && !prefetching_.count(next)) {
        ++gathers_;
        add_transient(flats_[next]->full_bytes());
        prefetching_[next] = flats_[next]->gather(communicator_.get());
        lru_.remove(next);
        lru_.push_front(next);
      }
    }
  }
}

void FSDPStrategy::after_step(const std::vector<size_t>& flats) {
  Internal guard;
  order_recorded_ = true; // the first step's forward order is the order
  if (options_.sharding_strategy == ShardingStrategy::NO_SHARD) {
    for (auto f : flats)
      flats_[f]->gather(nullptr); // world 1: copy the stepped shard into the parameters
    return;
  }
  for (auto f : flats) {
    auto pending = prefetching_.find(f);
    if (pending != prefetching_.end()) {
      if (pending->second)
        pending->second->wait();
      prefetching_.erase(pending);
    }
    free_flat(f); // stale now: gathered again from the new shards at the next use
  }
}

void FSDPStrategy::record_failure(std::exception_ptr failure) {
  if (!failure_)
    failure_ = std::move(failure);
}

void FSDPStrategy::rethrow_failure() {
  if (auto failure = std::exchange(failure_, nullptr))
    std::rethrow_exception(failure);
}

void FSDPStrategy::backward(const at::Tensor& loss) {
  rethrow_failure(); // a gather of the forward failed: its outputs are not to be trusted
  check_reads_outside();
  InStep step(in_step_);
  ShardedStrategy::backward(loss);
  rethrow_failure();
}

void FSDPStrategy::optimizer_step(torch::optim::Optimizer& optimizer) {
  rethrow_failure();
  check_reads_outside();
  InStep step(in_step_);
  ShardedStrategy::optimizer_step(optimizer);
}

void FSDPStrategy::begin_module_step() {
  rethrow_failure();
  check_reads_outside();
  ++in_step_;
}

void FSDPStrategy::end_module_step() {
  --in_step_;
}

void FSDPStrategy::on_exception(const std::exception&) {
  failed_ = true;
}

void FSDPStrategy::check_reads_outside() {
  if (read_outside_.empty())
    return;
  auto flats = std::exchange(read_outside_, {});
  std::string names;
  size_t count = 0;
  for (auto f : flats)
    for (auto& entry : flats_[f]->entries())
      if (count++ < 3)
        names += (names.empty() ? "'" : ", '") + entry.name + "'";
  if (count > 3)
    names += " and " + std::to_string(count - 3) + " more";
  throw Error(Errc::bad_state,
              "FSDP " + std::string(to_string(options_.sharding_strategy)) + ": rank " +
                std::to_string(global_rank()) + " read " + names +
                " outside a step (training_step, validation_step, test_step, backward, the "
                "optimizer step), where only this rank's shard of them is here; the read saw "
                "NaN, because gathering them there would take every rank. Read parameters "
                "outside a step inside `auto full = trainer.strategy().summon_full_params();`, "
                "called on every rank at the same point (writes inside it are kept), or inside "
                "the module's step");
}

ParameterScope FSDPStrategy::summon_full_params(bool writeback) {
  if (flats_.empty())
    return {}; // not set up for training, or torn down: the parameters are whole
  rethrow_failure();
  check_reads_outside();
  {
    Internal guard;
    // Free first: every rank then issues the same gathers in the same order, whatever it
    // had gathered before. An open scope has everything gathered already.
    if (summoned_ == 0)
      free_all();
    for (size_t f = 0; f < flats_.size(); ++f)
      ensure_gathered(f);
  }
  ++summoned_;
  return ParameterScope([this, writeback] { end_summon(writeback); });
}

void FSDPStrategy::end_summon(bool writeback) noexcept {
  --summoned_;
  try {
    Internal guard;
    bool no_shard = options_.sharding_strategy == ShardingStrategy::NO_SHARD;
    for (auto& flat : flats_) {
      if (!flat->gathered())
        continue;
      if (writeback)
        flat->shard_from_full(); // this rank keeps the part of the change in its shard
      else if (no_shard)
        flat->gather(nullptr); // the parameters stay whole: back to the shard's values
    }
    if (summoned_ == 0 && !no_shard)
      free_all(); // gathered again from the shards at the next use
  } catch (...) {
    record_failure(std::current_exception());
  }
}

void FSDPStrategy::after_load() {
  Internal guard;
  if (options_.sharding_strategy == ShardingStrategy::NO_SHARD) {
    for (auto& flat : flats_)
      flat->gather(nullptr); // world 1: copy the loaded shard into the parameters
    return;
  }
  free_all(); // whatever was gathered is stale: gathered again from the shards at use
}

StateDict FSDPStrategy::model_state_dict() {
  Internal guard;
  auto result = ShardedStrategy::model_state_dict();
  if (options_.sharding_strategy == ShardingStrategy::FULL_SHARD)
    free_all();
  return result;
}

void FSDPStrategy::load_model_state_dict(const StateDict& state, bool strict) {
  Internal guard;
  ShardedStrategy::load_model_state_dict(state, strict);
  if (options_.sharding_strategy != ShardingStrategy::NO_SHARD)
    free_all();
}

} // namespace caftrain

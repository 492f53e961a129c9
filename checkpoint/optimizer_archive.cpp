#include "checkpoint/optimizer_archive.hpp"

#include <spdlog/spdlog.h>
#include <torch/optim/serialize.h>
#include <torch/torch.h>

#include "checkpoint/files.hpp"
#include "checkpoint/state_dict.hpp"
#include "core/error.hpp"

namespace caftrain {

namespace o = torch::optim;

namespace {

/// The state and options types of one libtorch optimizer.
template <class State, class Options>
struct Kind {
  using state_type = State;
  using options_type = Options;
};

/// Calls `f(Kind<...>{})` for the type of `optimizer`; returns false (without calling)
/// for an optimizer type that is not one of libtorch's.
template <class F>
bool with_kind(const o::Optimizer& optimizer, F&& f) {
  if (dynamic_cast<const o::AdamW*>(&optimizer))
    f(Kind<o::AdamWParamState, o::AdamWOptions>{});
  else if (dynamic_cast<const o::Adam*>(&optimizer))
    f(Kind<o::AdamParamState, o::AdamOptions>{});
  else if (dynamic_cast<const o::SGD*>(&optimizer))
    f(Kind<o::SGDParamState, o::SGDOptions>{});
  else if (dynamic_cast<const o::RMSprop*>(&optimizer))
    f(Kind<o::RMSpropParamState, o::RMSpropOptions>{});
  else if (dynamic_cast<const o::Adagrad*>(&optimizer))
    f(Kind<o::AdagradParamState, o::AdagradOptions>{});
  else if (dynamic_cast<const o::LBFGS*>(&optimizer))
    f(Kind<o::LBFGSParamState, o::LBFGSOptions>{});
  else
    return false;
  return true;
}

std::vector<char> archive_bytes(torch::serialize::OutputArchive& archive) {
  std::vector<char> bytes;
  archive.save_to([&](const void* data, size_t size) {
    auto* p = static_cast<const char*>(data);
    bytes.insert(bytes.end(), p, p + size);
    return size;
  });
  return bytes;
}

std::string key_of(size_t i) {
  return "optimizer_" + std::to_string(i);
}

[[noreturn]] void mismatch(const std::string& origin, const std::string& what) {
  throw Error(Errc::state_mismatch, "optimizer state in '" + origin + "' does not fit the "
                                      "optimizers configure_optimizers returned: " + what);
}

} // namespace

std::vector<char> optimizers_bytes(const std::vector<std::shared_ptr<o::Optimizer>>& optimizers) {
  torch::serialize::OutputArchive archive;
  archive.write("count", torch::tensor(static_cast<int64_t>(optimizers.size())), true);
  for (size_t i = 0; i < optimizers.size(); ++i) {
    torch::serialize::OutputArchive nested;
    optimizers[i]->save(nested);
    archive.write(key_of(i), nested);
  }
  return archive_bytes(archive);
}

namespace {

// Each kind's state with its tensors replaced by copies (TensorCopies, under `key`).
/// Adam's and AdamW's states (two types with the same fields).
template <class AdamState>
void copy_adam_tensors(AdamState& s, const std::string& key, TensorCopies& c) {
  s.exp_avg(c.copy(key + "/exp_avg", s.exp_avg()));
  s.exp_avg_sq(c.copy(key + "/exp_avg_sq", s.exp_avg_sq()));
  s.max_exp_avg_sq(c.copy(key + "/max_exp_avg_sq", s.max_exp_avg_sq()));
}

void copy_tensors(o::AdamParamState& s, const std::string& key, TensorCopies& c) {
  copy_adam_tensors(s, key, c);
}

void copy_tensors(o::AdamWParamState& s, const std::string& key, TensorCopies& c) {
  copy_adam_tensors(s, key, c);
}

void copy_tensors(o::SGDParamState& s, const std::string& key, TensorCopies& c) {
  s.momentum_buffer(c.copy(key + "/momentum_buffer", s.momentum_buffer()));
}

void copy_tensors(o::RMSpropParamState& s, const std::string& key, TensorCopies& c) {
  s.square_avg(c.copy(key + "/square_avg", s.square_avg()));
  s.momentum_buffer(c.copy(key + "/momentum_buffer", s.momentum_buffer()));
  s.grad_avg(c.copy(key + "/grad_avg", s.grad_avg()));
}

void copy_tensors(o::AdagradParamState& s, const std::string& key, TensorCopies& c) {
  s.sum(c.copy(key + "/sum", s.sum()));
}

using SaveFn = std::function<void(torch::serialize::OutputArchive&)>;

/// What `optimizer.save(archive)` writes, from a copy of its state taken now; empty for
/// an optimizer without a copy here (LBFGS, or not one of libtorch's).
SaveFn snapshot_save(const o::Optimizer& optimizer, const std::string& prefix, TensorCopies& copies) {
  SaveFn save;
  with_kind(optimizer, [&](auto kind) {
    using K = decltype(kind);
    using State = typename K::state_type;
    using Options = typename K::options_type;
    if constexpr (!std::is_same_v<State, o::LBFGSParamState>) {
      using StateMap = ska::flat_hash_map<std::string, std::unique_ptr<o::OptimizerParamState>>;
      auto state = std::make_shared<StateMap>();
      for (auto& [key, value] : optimizer.state()) {
        auto copy = std::make_unique<State>(static_cast<const State&>(*value)); // shares tensors
        copy_tensors(*copy, prefix + key, copies);
        (*state)[key] = std::move(copy);
      }
      // The groups keep the parameters only for their addresses, the keys of the state.
      auto groups = std::make_shared<std::vector<o::OptimizerParamGroup>>();
      for (auto& group : optimizer.param_groups())
        groups->emplace_back(group.params(), group.options().clone());
      // What libtorch's Optimizer::save writes for these kinds (torch::optim::serialize).
      save = [state, groups](torch::serialize::OutputArchive& archive) {
        archive.write("pytorch_version", c10::IValue("1.5.0"));
        torch::serialize::OutputArchive state_archive(archive.compilation_unit());
        o::detail::serialize<State>(state_archive, *state);
        archive.write("state", state_archive);
        torch::serialize::OutputArchive groups_archive(archive.compilation_unit());
        o::detail::serialize<Options>(groups_archive, *groups);
        archive.write("param_groups", groups_archive);
      };
    }
  });
  return save;
}

} // namespace

FileSource optimizers_source(const std::vector<std::shared_ptr<o::Optimizer>>& optimizers,
                             TensorCopies& copies) {
  std::vector<SaveFn> saves;
  for (size_t i = 0; i < optimizers.size(); ++i) {
    auto save = snapshot_save(*optimizers[i], key_of(i) + "/", copies);
    if (!save)
      return bytes_source(optimizers_bytes(optimizers));
    saves.push_back(std::move(save));
  }
  return [saves = std::move(saves)](const ByteSink& out) {
    torch::serialize::OutputArchive archive;
    archive.write("count", torch::tensor(static_cast<int64_t>(saves.size())), true);
    for (size_t i = 0; i < saves.size(); ++i) {
      torch::serialize::OutputArchive nested;
      saves[i](nested);
      archive.write(key_of(i), nested);
    }
    archive.save_to([&](const void* data, size_t size) {
      out(static_cast<const char*>(data), size);
      return size;
    });
  };
}

std::vector<char> optimizer_options_bytes(const std::vector<std::shared_ptr<o::Optimizer>>& optimizers) {
  torch::serialize::OutputArchive archive;
  archive.write("count", torch::tensor(static_cast<int64_t>(optimizers.size())), true);
  for (size_t i = 0; i < optimizers.size(); ++i) {
    torch::serialize::OutputArchive nested(archive.compilation_unit());
    torch::serialize::OutputArchive groups(archive.compilation_unit());
    // The same "param_groups" record libtorch's Optimizer::save writes, without "state".
    if (with_kind(*optimizers[i], [&](auto kind) {
          using K = decltype(kind);
          o::detail::serialize<typename K::options_type>(groups, optimizers[i]->param_groups());
        }))
      nested.write("param_groups", groups);
    archive.write(key_of(i), nested);
  }
  return archive_bytes(archive);
}

std::vector<SavedOptimizer> read_saved_optimizers(const std::vector<char>& bytes,
                                                  const std::vector<std::shared_ptr<o::Optimizer>>& like,
                                                  const std::string& origin) {
  std::vector<SavedOptimizer> result;
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(bytes.data(), bytes.size());
    auto count = torch::empty({}, torch::kLong);
    archive.read("count", count, true);
    if (count.item<int64_t>() != static_cast<int64_t>(like.size()))
      mismatch(origin, "it has " + std::to_string(count.item<int64_t>()) + " optimizers but "
                         "configure_optimizers returned " + std::to_string(like.size()));
    for (size_t i = 0; i < like.size(); ++i) {
      torch::serialize::InputArchive nested;
      archive.read(key_of(i), nested);
      SavedOptimizer saved;
      bool known = with_kind(*like[i], [&](auto kind) {
        using K = decltype(kind);
        // libtorch keys state by the saved tensors' addresses and lists those addresses per
        // param group in order: the order maps state back to parameters.
        ska::flat_hash_map<std::string, std::unique_ptr<o::OptimizerParamState>> state;
        torch::serialize::InputArchive state_archive;
        if (nested.try_read("state", state_archive))
          o::detail::serialize<typename K::state_type>(state_archive, state);
        torch::serialize::InputArchive groups_archive;
        if (!nested.try_read("param_groups", groups_archive))
          return;
        std::vector<std::pair<std::vector<std::string>, std::unique_ptr<o::OptimizerOptions>>> groups;
        o::detail::serialize<typename K::options_type>(groups_archive, groups);
        for (auto& [keys, options] : groups) {
          SavedOptimizer::Group group;
          group.options = std::shared_ptr<o::OptimizerOptions>(std::move(options));
          for (auto& key : keys) {
            auto it = state.find(key);
            group.state.push_back(it == state.end() ? std::map<std::string, at::Tensor>{}
                                                    : state_tensors(*it->second));
          }
          saved.groups.push_back(std::move(group));
        }
      });
      if (!known)
        spdlog::warn("caftrain: optimizer {} is not one of libtorch's (Adam, AdamW, SGD, RMSprop, "
                     "Adagrad, LBFGS); its param-group options are not restored from '{}'",
                     i, origin);
      else if (saved.groups.size() != like[i]->param_groups().size())
        mismatch(origin, "optimizer " + std::to_string(i) + " has " +
                           std::to_string(saved.groups.size()) + " param groups in the checkpoint "
                           "but " + std::to_string(like[i]->param_groups().size()) + " here");
      result.push_back(std::move(saved));
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    std::string what = e.what();
    mismatch(origin, what.substr(0, what.find('\n')) + " (is the optimizer of the type it was saved "
                                                       "with?)");
  }
  return result;
}

void restore_options(o::Optimizer& optimizer, const SavedOptimizer& saved, const std::string& origin) {
  auto& groups = optimizer.param_groups();
  if (saved.groups.empty())
    return; // an optimizer type whose options were not recorded
  if (saved.groups.size() != groups.size())
    mismatch(origin, "the checkpoint has " + std::to_string(saved.groups.size()) +
                       " param groups but the optimizer has " + std::to_string(groups.size()));
  for (size_t g = 0; g < groups.size(); ++g)
    if (saved.groups[g].options)
      groups[g].set_options(saved.groups[g].options->clone());
}

std::map<std::string, at::Tensor> state_tensors(const o::OptimizerParamState& state) {
  std::map<std::string, at::Tensor> result;
  auto put = [&](const char* name, const at::Tensor& t) {
    if (t.defined())
      result[name] = t;
  };
  auto step = [](int64_t n) { return torch::tensor(n, torch::kLong); };
  if (auto* s = dynamic_cast<const o::AdamParamState*>(&state)) {
    result["step"] = step(s->step());
    put("exp_avg", s->exp_avg());
    put("exp_avg_sq", s->exp_avg_sq());
    put("max_exp_avg_sq", s->max_exp_avg_sq());
  } else if (auto* s = dynamic_cast<const o::AdamWParamState*>(&state)) {
    result["step"] = step(s->step());
    put("exp_avg", s->exp_avg());
    put("exp_avg_sq", s->exp_avg_sq());
    put("max_exp_avg_sq", s->max_exp_avg_sq());
  } else if (auto* s = dynamic_cast<const o::SGDParamState*>(&state)) {
    put("momentum_buffer", s->momentum_buffer());
  } else if (auto* s = dynamic_cast<const o::RMSpropParamState*>(&state)) {
    result["step"] = step(s->step());
    put("square_avg", s->square_avg());
    put("momentum_buffer", s->momentum_buffer());
    put("grad_avg", s->grad_avg());
  } else if (auto* s = dynamic_cast<const o::AdagradParamState*>(&state)) {
    result["step"] = step(s->step());
    put("sum", s->sum());
  }
  return result;
}

} // namespace caftrain

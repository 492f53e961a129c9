#include <map>
#include <mutex>

#include "core/error.hpp"
#include "strategies/ddp_strategy.hpp"
#include "strategies/fsdp_strategy.hpp"
#include "strategies/zero_strategy.hpp"
#include "strategies/strategy.hpp"

namespace caftrain {

namespace {

struct Registry {
  std::mutex mtx;
  std::map<std::string, StrategyFactory> factories;

  Registry() {
    factories["single_device"] = [] { return std::make_shared<SingleDeviceStrategy>(); };
    factories["ddp"] = [] { return std::make_shared<DDPStrategy>(); };
    factories["fsdp"] = [] { return std::make_shared<FSDPStrategy>(); };
    for (int stage : {1, 2}) {
      auto make = [stage] { return std::make_shared<ZeroStrategy>(ZeroOptions{stage}); };
      factories["zero_stage_" + std::to_string(stage)] = make;
      factories["deepspeed_stage_" + std::to_string(stage)] = make; // Lightning's names
    }
    factories["zero"] = [] { return std::make_shared<ZeroStrategy>(); };
  }
};

Registry& registry() {
  static Registry instance;
  return instance;
}

} // namespace

void register_strategy(const std::string& name, StrategyFactory factory) {
  auto& r = registry();
  std::lock_guard<std::mutex> guard(r.mtx);
  r.factories[name] = std::move(factory);
}

std::shared_ptr<Strategy> make_strategy(const std::string& name) {
  auto& r = registry();
  std::lock_guard<std::mutex> guard(r.mtx);
  auto it = r.factories.find(name);
  if (it == r.factories.end()) {
    std::string known = "auto";
    for (auto& [n, f] : r.factories)
      known += ", " + n;
    throw Error(Errc::invalid_config,
                "unknown strategy '" + name + "'; known strategies: " + known);
  }
  return it->second();
}

std::vector<std::string> strategy_names() {
  auto& r = registry();
  std::lock_guard<std::mutex> guard(r.mtx);
  std::vector<std::string> names;
  for (auto& [n, f] : r.factories)
    names.push_back(n);
  return names;
}

} // namespace caftrain

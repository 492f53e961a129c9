#include "tune/basic_variant_generator.hpp"

#include "core/error.hpp"

namespace caftrain::tune {

BasicVariantGenerator::BasicVariantGenerator(ParamSpace space, BasicVariantGeneratorOptions options)
  : space_(std::move(space)), options_(options), rng_(options.seed) {
  if (options_.num_samples == 0 || options_.num_samples < -1)
    throw Error(Errc::invalid_config,
                "BasicVariantGenerator: num_samples = " + std::to_string(options_.num_samples) +
                  "; pass at least 1, or -1 to repeat the grid until the experiment stops");
}

int64_t BasicVariantGenerator::grid_size() const {
  int64_t n = 1;
  for (auto& key : space_.grid_keys())
    n *= static_cast<int64_t>(space_.domains().at(key).values().size());
  return n;
}

int64_t BasicVariantGenerator::total_trials() const {
  return options_.num_samples < 0 ? -1 : options_.num_samples * grid_size();
}

bool BasicVariantGenerator::set_search_properties(const std::string&, const std::string&,
                                                  const ParamSpace& space) {
  if (space.empty())
    return true;
  if (!space_.empty())
    return false;
  space_ = space;
  return true;
}

Suggestion BasicVariantGenerator::suggest(const TrialId&) {
  auto total = total_trials();
  if (total >= 0 && next_ >= total)
    return {Suggestion::Status::finished, {}};
  // Decode the grid point as a mixed-radix number, the first axis the fastest digit.
  auto point = next_ % grid_size();
  Config assigned;
  for (auto& key : space_.grid_keys()) {
    auto& values = space_.domains().at(key).values();
    auto n = static_cast<int64_t>(values.size());
    assigned.set(key, values[static_cast<std::size_t>(point % n)]);
    point /= n;
  }
  ++next_;
  return {Suggestion::Status::ready, space_.resolve(assigned, rng_)};
}

void BasicVariantGenerator::on_trial_complete(const TrialId&, const Metrics&, bool) {
  // nop
}

} // namespace caftrain::tune

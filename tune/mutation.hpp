// How PBT may change one hyperparameter (an entry of Ray's `hyperparam_mutations`).
#pragma once

#include <functional>
#include <initializer_list>
#include <utility>
#include <variant>
#include <vector>

#include "core/config.hpp"
#include "tune/domain.hpp"

namespace caftrain::tune {

/// One entry of `hyperparam_mutations` (Ray's three forms): a list of values (explore
/// shifts to a neighbour or resamples from the list), a search-space `Domain` (explore
/// multiplies by a perturbation factor or resamples from the domain), or a function
/// returning a new value (multiply, or call it to resample).
class Mutation {
 public:
  /// The resampling function of the third form.
  using Function = std::function<ConfigValue()>;

  // -- constructors -----------------------------------------------------------------

  /// A list of values, e.g. `{1e-4, 1e-3, 1e-2}`.
  Mutation(std::initializer_list<ConfigValue> values) : value_(std::vector<ConfigValue>(values)) {
    // nop
  }

  /// A list of values.
  Mutation(std::vector<ConfigValue> values) : value_(std::move(values)) {
    // nop
  }

  /// A domain, e.g. `loguniform(1e-4, 1e-1)`.
  Mutation(Domain domain) : value_(std::move(domain)) {
    // nop
  }

  /// A function that draws a new value.
  Mutation(Function fn) : value_(std::move(fn)) {
    // nop
  }

  // -- properties -------------------------------------------------------------------

  /// The list, or nullptr for the other forms.
  const std::vector<ConfigValue>* values() const {
    return std::get_if<std::vector<ConfigValue>>(&value_);
  }

  /// The domain, or nullptr.
  const Domain* domain() const {
    return std::get_if<Domain>(&value_);
  }

  /// The function, or nullptr.
  const Function* function() const {
    return std::get_if<Function>(&value_);
  }

 private:
  std::variant<std::vector<ConfigValue>, Domain, Function> value_;
};

} // namespace caftrain::tune

// A Tune param space: the tree of constants, domains and nested spaces a Tuner samples.
#pragma once

#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "core/config.hpp"
#include "tune/domain.hpp"

namespace caftrain::tune {

class ParamSpace;
class Rng;

/// One entry of a param space: a constant passed through unchanged, a `Domain`, or a
/// nested `ParamSpace`. Converts implicitly from each, so a space reads like Ray's dict.
class Param {
 public:
  // -- constructors -----------------------------------------------------------------

  /// A constant bool.
  Param(bool x) : value_(ConfigValue{x}) {
    // nop
  }

  /// A constant integer.
  Param(int x) : value_(ConfigValue{int64_t{x}}) {
    // nop
  }

  /// A constant integer.
  Param(int64_t x) : value_(ConfigValue{x}) {
    // nop
  }

  /// A constant double.
  Param(double x) : value_(ConfigValue{x}) {
    // nop
  }

  /// A constant string.
  Param(const char* x) : value_(ConfigValue{std::string{x}}) {
    // nop
  }

  /// A constant string.
  Param(std::string x) : value_(ConfigValue{std::move(x)}) {
    // nop
  }

  /// A constant of any config type.
  Param(ConfigValue x) : value_(std::move(x)) {
    // nop
  }

  /// A dimension to search.
  Param(Domain x) : value_(std::move(x)) {
    // nop
  }

  /// A nested space; its keys reach the config as "outer/inner".
  Param(ParamSpace x);

 private:
  friend class ParamSpace;

  std::variant<ConfigValue, Domain, std::shared_ptr<const ParamSpace>> value_;
};

/// Ray Tune's `param_space`: a tree whose leaves are constants or domains. Nested spaces
/// are flattened when added, with Ray's `flatten_dict` delimiter: `{"model": {"width":
/// 64}}` reaches `caftrain::Config` (a flat map) as the key "model/width", and searchers,
/// schedulers and results all use that flat key. Keys are kept sorted; that order is the
/// sampling order and the grid-axis order, so a seed reproduces the same configs.
class ParamSpace {
 public:
  /// The delimiter between a nested key and its parent, as in Ray's flattened results.
  static constexpr const char* separator = "/";

  // -- constructors -----------------------------------------------------------------

  /// An empty space.
  ParamSpace() = default;

  /// A space from `{key, value}` pairs, e.g.
  /// `{{"lr", loguniform(1e-4, 1e-1)}, {"layer_1", choice({32, 64, 128})}}`.
  /// Throws `Error(invalid_config)` for a duplicate or empty key or a bad domain.
  ParamSpace(std::initializer_list<std::pair<std::string, Param>> entries);

  // -- modifiers --------------------------------------------------------------------

  /// Adds `key` (a nested space adds each of its keys under "key/"). Throws
  /// `Error(invalid_config)` naming the key when it exists already or a domain's bounds
  /// are bad.
  void set(const std::string& key, Param value);

  // -- properties -------------------------------------------------------------------

  /// The constants, by flat key.
  const std::map<std::string, ConfigValue>& constants() const noexcept {
    return constants_;
  }

  /// The domains (grid axes and `sample_from` included), by flat key.
  const std::map<std::string, Domain>& domains() const noexcept {
    return domains_;
  }

  /// The keys of the `grid_search` axes, sorted.
  std::vector<std::string> grid_keys() const;

  /// True when the space has neither constants nor domains.
  bool empty() const noexcept {
    return constants_.empty() && domains_.empty();
  }

  // -- resolution -------------------------------------------------------------------

  /// A full config: the constants, then `assigned` (grid points, or values a searcher
  /// chose), then every other domain sampled in key order, then the `sample_from`
  /// functions in passes until all resolve (a function that reads a key not resolved yet
  /// is retried in the next pass, as Ray's resolver retries on an unresolved access).
  /// Throws `Error(invalid_config)` for a grid axis missing from `assigned`, and for
  /// functions that make no progress, naming their keys (a cycle, or a key the space
  /// lacks) and the last error of each.
  Config resolve(const Config& assigned, Rng& rng) const;

 private:
  void add(const std::string& key, Param value);

  std::map<std::string, ConfigValue> constants_;
  std::map<std::string, Domain> domains_;
};

} // namespace caftrain::tune

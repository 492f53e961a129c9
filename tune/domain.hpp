// One dimension of a Tune search space: Ray Tune's `Domain` and its constructors
// (`choice`, `uniform`, `loguniform`, `randint`, `grid_search`, `sample_from`, ...).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/config.hpp"

namespace caftrain::tune {

class Rng;

/// A dimension of a search space (Ray's `tune.search.sample.Domain`): categorical,
/// float, integer, a function of the rest of the config, or a grid axis. Build one with
/// the free functions below; `ParamSpace` checks its bounds under the parameter's name.
///
/// Bounds follow Ray: `uniform`/`loguniform`/`randint`/`lograndint` sample
/// [lower, upper) (upper exclusive); the quantized forms round a draw from that range to
/// the nearest multiple of `q` (half to even, as `np.round`), which makes upper reachable.
class Domain {
 public:
  /// What kind of values a domain yields.
  enum class Kind : uint8_t {
    /// One of a list of values (`choice`).
    categorical,
    /// A double (`uniform`, `quniform`, `loguniform`, `qloguniform`, `randn`, `qrandn`).
    real,
    /// An int64 (`randint`, `qrandint`, `lograndint`, `qlograndint`).
    integer,
    /// A function of the other resolved values (`sample_from`).
    function,
    /// An axis crossed with the other axes by the variant generator (`grid_search`).
    grid,
  };

  /// How a `real` or `integer` domain draws.
  enum class Sampler : uint8_t {
    /// Uniform over [lower, upper).
    uniform,
    /// `base ^ uniform(log_base lower, log_base upper)`; integers take the floor.
    log,
    /// Normal with `mean` and `sd` (unbounded).
    normal,
  };

  /// What `sample_from` wraps: the values resolved so far (flat "a/b" keys) and the
  /// experiment's generator. Reading a key that is not resolved yet throws
  /// `Error(invalid_argument)` from `Config::get`, and the resolver retries later.
  using Function = std::function<ConfigValue(const Config&, Rng&)>;

  // -- properties -------------------------------------------------------------------

  /// The kind of values.
  Kind kind() const noexcept {
    return kind_;
  }

  /// How a real or integer domain draws.
  Sampler sampler() const noexcept {
    return sampler_;
  }

  /// Lower bound (inclusive) of a bounded real or integer domain.
  double lower() const noexcept {
    return lower_;
  }

  /// Upper bound: exclusive for unquantized domains, reachable with a quantum.
  double upper() const noexcept {
    return upper_;
  }

  /// True for the q-forms (`quniform`, `qrandint`, ...).
  bool quantized() const noexcept {
    return quantized_;
  }

  /// The quantum of a quantized domain.
  double q() const noexcept {
    return q_;
  }

  /// Logarithm base of a log domain (default 10).
  double base() const noexcept {
    return base_;
  }

  /// Mean of a normal domain.
  double mean() const noexcept {
    return mean_;
  }

  /// Standard deviation of a normal domain.
  double sd() const noexcept {
    return sd_;
  }

  /// The values of a `choice` or `grid_search`.
  const std::vector<ConfigValue>& values() const noexcept {
    return values_;
  }

  /// The constructor call that made it, e.g. "qloguniform(0.0001, 0.1, 0.0001)".
  std::string to_string() const;

  // -- sampling ---------------------------------------------------------------------

  /// Throws `Error(invalid_config)` naming `name` (the parameter), the bad bound and the
  /// fix: lower >= upper, a log bound <= 0, a log base <= 0 or 1, a quantum <= 0 or one
  /// that does not divide both bounds, sd <= 0, an empty choice or grid, an empty function.
  void validate(const std::string& name) const;

  /// One value. `resolved` is what a `sample_from` function sees; grid axes are assigned
  /// by the variant generator and cannot be sampled (an error says so).
  ConfigValue sample(Rng& rng, const Config& resolved = {}) const;

  // -- constructors (the free functions below are the public ones) --------------------

  /// A real or integer domain; `quantized` with quantum `q`.
  static Domain numeric(std::string name, Kind kind, Sampler sampler, double lower,
                        double upper, bool quantized, double q, double base);

  /// A normal real domain; `quantized` with quantum `q`.
  static Domain normal(std::string name, double mean, double sd, bool quantized, double q);

  /// A categorical or grid domain.
  static Domain list(std::string name, Kind kind, std::vector<ConfigValue> values);

  /// A `sample_from` domain.
  static Domain function(Function fn);

 private:
  Domain() = default;

  std::string name_;
  Kind kind_ = Kind::real;
  Sampler sampler_ = Sampler::uniform;
  double lower_ = 0;
  double upper_ = 0;
  bool quantized_ = false;
  double q_ = 0;
  double base_ = 10;
  double mean_ = 0;
  double sd_ = 1;
  std::vector<ConfigValue> values_;
  Function fn_;
};

/// One of `categories`, each equally likely (Ray's `tune.choice`).
Domain choice(std::vector<ConfigValue> categories);

/// A double uniform in [lower, upper) (Ray's `tune.uniform`).
Domain uniform(double lower, double upper);

/// `uniform(lower, upper)` rounded to the nearest multiple of `q`; both bounds must be
/// multiples of `q`, and upper is reachable (Ray's `tune.quniform`).
Domain quniform(double lower, double upper, double q);

/// A double whose logarithm is uniform: `base ^ uniform(log lower, log upper)`, 0 < lower
/// < upper (Ray's `tune.loguniform`).
Domain loguniform(double lower, double upper, double base = 10);

/// `loguniform(lower, upper, base)` rounded to a multiple of `q` (Ray's `tune.qloguniform`).
Domain qloguniform(double lower, double upper, double q, double base = 10);

/// An int64 uniform in [lower, upper), upper exclusive (Ray's `tune.randint`).
Domain randint(int64_t lower, int64_t upper);

/// A multiple of `q` in [lower, upper], both inclusive (Ray's `tune.qrandint`): an integer
/// uniform in [lower, upper) rounded to the nearest multiple of `q`, half to even. For
/// q == 1 it is uniform over [lower, upper] as Ray's docstring states (Ray's sampler skips
/// quantization at q == 1 and so never returns upper).
Domain qrandint(int64_t lower, int64_t upper, int64_t q = 1);

/// An int64 `floor(base ^ uniform(log lower, log upper))` in [lower, upper)
/// (Ray's `tune.lograndint`).
Domain lograndint(int64_t lower, int64_t upper, double base = 10);

/// `lograndint` rounded to a multiple of `q`, upper inclusive (Ray's `tune.qlograndint`).
Domain qlograndint(int64_t lower, int64_t upper, int64_t q, double base = 10);

/// A double from a normal distribution (Ray's `tune.randn`).
Domain randn(double mean = 0.0, double sd = 1.0);

/// `randn(mean, sd)` rounded to a multiple of `q` (Ray's `tune.qrandn`).
Domain qrandn(double mean, double sd, double q);

/// A grid axis: the variant generator crosses every grid axis and runs each point
/// `num_samples` times (Ray's `tune.grid_search`).
Domain grid_search(std::vector<ConfigValue> values);

/// A value computed from the rest of the config, e.g.
/// `sample_from([](const Config& c) { return c.get<int64_t>("layer_1") / 2; })`.
/// Chains resolve in dependency order; a cycle is an error naming its keys
/// (Ray's `tune.sample_from`).
Domain sample_from(std::function<ConfigValue(const Config&)> fn);

/// `sample_from` for a function that also draws from the experiment's seeded generator.
Domain sample_from(Domain::Function fn);

} // namespace caftrain::tune

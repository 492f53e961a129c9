// The one-dimensional Parzen estimators of TPE (Optuna's `_ParzenEstimator`).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace caftrain::tune {

class Domain;
class Rng;

/// One dimension as TPE models it: a categorical index, or a bounded number on a linear
/// or log scale, continuous (step 0) or on the grid low, low + step, ..., high.
struct ParzenDimension {
  /// True for `choice`: values are indices 0 .. n_choices - 1.
  bool categorical = false;
  /// Number of categories of a categorical dimension.
  std::size_t n_choices = 0;
  /// Smallest value (inclusive).
  double low = 0;
  /// Largest value: inclusive on a grid, the open upper bound when continuous.
  double high = 0;
  /// Grid spacing, 0 for a continuous dimension.
  double step = 0;
  /// True when the estimator works on log(x).
  bool log = false;
  /// True when values are int64 (the config gets an integer).
  bool integer = false;

  /// The dimension of `domain` as Ray's Optuna converter maps it: randint(l, u) is the
  /// integers l..u-1, qrandint(l, u, q) the multiples of q in [l, u], quniform a grid of q,
  /// the log forms on log scale. Throws `Error(invalid_config)` naming `key` for domains
  /// TPE cannot model (grid_search, randn, qrandn); sample_from is not a dimension.
  static ParzenDimension from(const std::string& key, const Domain& domain);

  /// log(x) on a log scale, else x.
  double transform(double x) const;

  /// Inverse of `transform`.
  double inverse(double z) const;

  /// The transformed support: [low, high], widened by half a step on each side on a grid
  /// (as Optuna's discrete estimators), then transformed.
  double support_low() const;

  /// See `support_low`.
  double support_high() const;

  /// `x` rounded to the grid and clamped to [low, high] (identity when continuous).
  double snap(double x) const;
};

/// What shapes the estimators (Optuna's `_ParzenEstimatorParameters`); defaults are
/// Optuna's `TPESampler` defaults.
struct ParzenOptions {
  /// Add a wide prior kernel (Optuna's `consider_prior`). Default true.
  bool consider_prior = true;
  /// Weight of the prior kernel. Default 1.0.
  double prior_weight = 1.0;
  /// Bound each kernel's sigma below by range / min(100, 1 + kernels). Default true.
  bool consider_magic_clip = true;
  /// Let the outermost kernels' sigma reach to the bounds. Default false.
  bool consider_endpoints = false;
};

/// A mixture of truncated normals (numbers) or of smoothed one-hot distributions
/// (categories) over one dimension, fitted to observations with given weights, plus the
/// prior. `l(x)` of TPE is one fitted to the good trials, `g(x)` one to the rest.
class ParzenEstimator {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Fits `observations` (values, or category indices) with `weights` (one each, e.g.
  /// Optuna's `default_weights`).
  ParzenEstimator(const ParzenDimension& dim, const std::vector<double>& observations,
                  const std::vector<double>& weights, const ParzenOptions& options);

  // -- sampling ---------------------------------------------------------------------

  /// A draw: a kernel by weight, then a value from it (snapped to the grid).
  double sample(Rng& rng) const;

  /// Log density at `x` (a value of the dimension); on a grid the log probability mass of
  /// x's cell [x - step/2, x + step/2].
  double log_pdf(double x) const;

 private:
  ParzenDimension dim_;
  std::vector<double> weights_;
  std::vector<double> mus_;
  std::vector<double> sigmas_;
  std::vector<std::vector<double>> categories_;
};

} // namespace caftrain::tune

#include "tune/parzen_estimator.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.hpp"
#include "tune/domain.hpp"
#include "tune/rng.hpp"

namespace caftrain::tune {

namespace {

constexpr double inf = std::numeric_limits<double>::infinity();

double phi(double x) {
  return 0.5 * std::erfc(-x / std::sqrt(2.0));
}

// Phi(b) - Phi(a) for a <= b, from the nearer tail so that it does not cancel to zero.
double mass(double a, double b) {
  if (a > 0)
    return phi(-a) - phi(-b);
  return phi(b) - phi(a);
}

double log_sum_exp(const std::vector<double>& xs) {
  double top = -inf;
  for (double x : xs)
    top = std::max(top, x);
  if (top == -inf)
    return -inf;
  double sum = 0;
  for (double x : xs)
    sum += std::exp(x - top);
  return top + std::log(sum);
}

std::size_t pick(const std::vector<double>& weights, Rng& rng) {
  double u = rng.uniform01();
  double acc = 0;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    acc += weights[i];
    if (u < acc)
      return i;
  }
  return weights.size() - 1;
}

} // namespace

// -- ParzenDimension ----------------------------------------------------------------

ParzenDimension ParzenDimension::from(const std::string& key, const Domain& d) {
  ParzenDimension dim;
  switch (d.kind()) {
    case Domain::Kind::categorical:
      dim.categorical = true;
      dim.n_choices = d.values().size();
      return dim;
    case Domain::Kind::grid:
      throw Error(Errc::invalid_config, "TPESearch cannot search '" + key +
                                          "', a grid_search axis; use choice() for TPE, or "
                                          "BasicVariantGenerator for a grid");
    case Domain::Kind::function:
      throw Error(Errc::invalid_config,
                  "'" + key + "' is a sample_from: it is resolved, not searched");
    case Domain::Kind::real:
    case Domain::Kind::integer:
      break;
  }
  if (d.sampler() == Domain::Sampler::normal)
    throw Error(Errc::invalid_config, "TPESearch cannot model '" + key + "' = " + d.to_string() +
                                        ", an unbounded normal; bound it with uniform()");
  dim.log = d.sampler() == Domain::Sampler::log;
  dim.low = d.lower();
  dim.high = d.upper();
  if (d.kind() == Domain::Kind::real) {
    dim.step = d.quantized() ? d.q() : 0;
    return dim;
  }
  dim.integer = true;
  bool upper_inclusive = d.quantized() && (d.q() > 1 || !dim.log);
  dim.step = d.quantized() ? d.q() : 1;
  if (!upper_inclusive)
    dim.high -= 1; // randint, lograndint: upper exclusive
  return dim;
}

double ParzenDimension::transform(double x) const {
  return log ? std::log(x) : x;
}

double ParzenDimension::inverse(double z) const {
  return log ? std::exp(z) : z;
}

double ParzenDimension::support_low() const {
  return transform(low - step / 2);
}

double ParzenDimension::support_high() const {
  return transform(high + step / 2);
}

double ParzenDimension::snap(double x) const {
  if (step > 0)
    x = low + std::nearbyint((x - low) / step) * step;
  return std::clamp(x, low, high);
}

// -- ParzenEstimator ----------------------------------------------------------------

ParzenEstimator::ParzenEstimator(const ParzenDimension& dim,
                                 const std::vector<double>& observations,
                                 const std::vector<double>& weights, const ParzenOptions& options)
  : dim_(dim) {
  auto n = observations.size();
  // Mixture weights: the observations' weights and the prior's, normalised.
  if (n == 0) {
    weights_ = {1.0};
  } else {
    weights_ = weights;
    if (options.consider_prior)
      weights_.push_back(options.prior_weight);
  }
  double total = std::accumulate(weights_.begin(), weights_.end(), 0.0);
  for (auto& w : weights_)
    w /= total;
  if (dim.categorical) {
    auto k = dim.n_choices;
    if (n == 0) {
      categories_.assign(1, std::vector<double>(k, 1.0 / k));
      return;
    }
    // Each kernel: prior_weight / n_kernels on every category, plus 1 on its own.
    auto kernels = n + (options.consider_prior ? 1 : 0);
    categories_.assign(kernels, std::vector<double>(k, options.prior_weight / kernels));
    for (std::size_t i = 0; i < n; ++i)
      categories_[i][static_cast<std::size_t>(observations[i])] += 1.0;
    for (auto& row : categories_) {
      double sum = std::accumulate(row.begin(), row.end(), 0.0);
      for (auto& p : row)
        p /= sum;
    }
    return;
  }
  double lo = dim.support_low();
  double hi = dim.support_high();
  double range = hi - lo;
  for (double x : observations)
    mus_.push_back(dim.transform(x));
  if (n > 0) {
    // Each kernel's sigma is the larger gap to its sorted neighbours (the bounds at the
    // ends), as in Optuna's univariate estimator.
    std::vector<std::size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t a, std::size_t b) { return mus_[a] < mus_[b]; });
    std::vector<double> sorted(n + 2);
    sorted[0] = lo;
    for (std::size_t i = 0; i < n; ++i)
      sorted[i + 1] = mus_[order[i]];
    sorted[n + 1] = hi;
    std::vector<double> s(n);
    for (std::size_t i = 0; i < n; ++i)
      s[i] = std::max(sorted[i + 1] - sorted[i], sorted[i + 2] - sorted[i + 1]);
    if (!options.consider_endpoints && n + 2 >= 4) {
      s[0] = sorted[2] - sorted[1];
      s[n - 1] = sorted[n] - sorted[n - 1];
    }
    double maxsigma = range;
    double kernels = static_cast<double>(n) + (options.consider_prior ? 1.0 : 0.0);
    double minsigma = options.consider_magic_clip ? range / std::min(100.0, 1.0 + kernels)
                                                  : std::numeric_limits<double>::epsilon();
    sigmas_.assign(n, 0);
    for (std::size_t i = 0; i < n; ++i)
      sigmas_[order[i]] = std::clamp(s[i], minsigma, maxsigma);
  }
  if (n == 0 || options.consider_prior) {
    mus_.push_back(0.5 * (lo + hi));
    sigmas_.push_back(range);
  }
}

double ParzenEstimator::sample(Rng& rng) const {
  auto k = pick(weights_, rng);
  if (dim_.categorical)
    return static_cast<double>(pick(categories_[k], rng));
  double lo = dim_.support_low();
  double hi = dim_.support_high();
  // Truncated normal by rejection: every kernel's mean lies inside the support and its
  // sigma is at most the support's width, so at least a third of the draws land inside.
  double z = mus_[k];
  for (int attempt = 0; attempt < 1000; ++attempt) {
    double x = rng.normal(mus_[k], sigmas_[k]);
    if (x >= lo && x <= hi) {
      z = x;
      break;
    }
  }
  return dim_.snap(dim_.inverse(z));
}

double ParzenEstimator::log_pdf(double x) const {
  std::vector<double> terms(weights_.size());
  if (dim_.categorical) {
    auto c = static_cast<std::size_t>(x);
    for (std::size_t k = 0; k < weights_.size(); ++k)
      terms[k] = std::log(weights_[k]) + std::log(categories_[k][c]);
    return log_sum_exp(terms);
  }
  double lo = dim_.support_low();
  double hi = dim_.support_high();
  for (std::size_t k = 0; k < weights_.size(); ++k) {
    double mu = mus_[k];
    double sigma = sigmas_[k];
    double z_mass = mass((lo - mu) / sigma, (hi - mu) / sigma);
    double p;
    if (dim_.step > 0) {
      double a = std::max(lo, dim_.transform(x - dim_.step / 2));
      double b = std::min(hi, dim_.transform(x + dim_.step / 2));
      p = std::log(mass((a - mu) / sigma, (b - mu) / sigma));
    } else {
      double u = (dim_.transform(x) - mu) / sigma;
      p = -0.5 * u * u - std::log(sigma) - 0.5 * std::log(2 * 3.14159265358979323846);
    }
    terms[k] = std::log(weights_[k]) + p - std::log(z_mass);
  }
  return log_sum_exp(terms);
}

} // namespace caftrain::tune

#include "tune/domain.hpp"

#include <cmath>
#include <sstream>

#include "core/error.hpp"
#include "tune/rng.hpp"

namespace caftrain::tune {

namespace {

std::string number(double x) {
  std::ostringstream out;
  out << x;
  return out.str();
}

// Python's math.isclose(a, b) with its default rel_tol=1e-9, which Ray's Float.quantized uses.
bool isclose(double a, double b) {
  return std::fabs(a - b) <= 1e-9 * std::max(std::fabs(a), std::fabs(b));
}

bool is_multiple(double x, double q) {
  return isclose(x / q, std::nearbyint(x / q));
}

// np.round: to nearest, half to even (the default rounding mode).
double round_to(double x, double q) {
  return std::nearbyint(x / q) * q;
}

[[noreturn]] void bad(const std::string& name, const Domain& d, const std::string& why) {
  throw Error(Errc::invalid_config, "param '" + name + "': " + d.to_string() + " " + why);
}

} // namespace

// -- constructors -------------------------------------------------------------------

Domain Domain::numeric(std::string name, Kind kind, Sampler sampler, double lower, double upper,
                       bool quantized, double q, double base) {
  Domain d;
  d.name_ = std::move(name);
  d.kind_ = kind;
  d.sampler_ = sampler;
  d.lower_ = lower;
  d.upper_ = upper;
  d.quantized_ = quantized;
  d.q_ = q;
  d.base_ = base;
  return d;
}

Domain Domain::normal(std::string name, double mean, double sd, bool quantized, double q) {
  Domain d;
  d.name_ = std::move(name);
  d.kind_ = Kind::real;
  d.sampler_ = Sampler::normal;
  d.mean_ = mean;
  d.sd_ = sd;
  d.quantized_ = quantized;
  d.q_ = q;
  return d;
}

Domain Domain::list(std::string name, Kind kind, std::vector<ConfigValue> values) {
  Domain d;
  d.name_ = std::move(name);
  d.kind_ = kind;
  d.values_ = std::move(values);
  return d;
}

Domain Domain::function(Function fn) {
  Domain d;
  d.name_ = "sample_from";
  d.kind_ = Kind::function;
  d.fn_ = std::move(fn);
  return d;
}

// -- properties ---------------------------------------------------------------------

std::string Domain::to_string() const {
  std::string args;
  auto add = [&](const std::string& x) { args += (args.empty() ? "" : ", ") + x; };
  switch (kind_) {
    case Kind::categorical:
    case Kind::grid:
      for (auto& v : values_)
        add(caftrain::to_string(v));
      return name_ + "([" + args + "])";
    case Kind::function:
      return "sample_from(<function>)";
    case Kind::real:
    case Kind::integer:
      if (sampler_ == Sampler::normal) {
        add(number(mean_));
        add(number(sd_));
      } else {
        add(number(lower_));
        add(number(upper_));
      }
      if (quantized_)
        add(number(q_));
      if (sampler_ == Sampler::log && base_ != 10)
        add("base=" + number(base_));
      return name_ + "(" + args + ")";
  }
  return name_;
}

// -- sampling -----------------------------------------------------------------------

void Domain::validate(const std::string& name) const {
  switch (kind_) {
    case Kind::categorical:
    case Kind::grid:
      if (values_.empty())
        bad(name, *this, "has no values; give at least one");
      return;
    case Kind::function:
      if (!fn_)
        bad(name, *this, "holds an empty function; pass a callable");
      return;
    case Kind::real:
    case Kind::integer:
      break;
  }
  if (sampler_ == Sampler::normal) {
    if (!(sd_ > 0) || !std::isfinite(sd_))
      bad(name, *this, "needs sd > 0; pass a positive standard deviation");
  } else {
    if (!std::isfinite(lower_) || !std::isfinite(upper_))
      bad(name, *this, "needs finite bounds");
    if (!(lower_ < upper_))
      bad(name, *this, "needs lower < upper; swap or widen the bounds");
    if (sampler_ == Sampler::log) {
      if (!(lower_ > 0))
        bad(name, *this,
            "needs lower > 0 (a log scale has no zero or negatives); pass the untransformed "
            "positive bound, e.g. 1e-6");
      if (!(base_ > 0) || base_ == 1)
        bad(name, *this, "needs a log base > 0 and != 1, e.g. 10 or 2");
    }
  }
  if (quantized_) {
    if (!(q_ > 0) || !std::isfinite(q_))
      bad(name, *this, "needs a quantum q > 0");
    if (sampler_ != Sampler::normal && (!is_multiple(lower_, q_) || !is_multiple(upper_, q_)))
      bad(name, *this,
          "has bounds that are not multiples of q = " + number(q_) +
            "; choose q dividing both bounds, or bounds that are multiples of q");
  }
}

ConfigValue Domain::sample(Rng& rng, const Config& resolved) const {
  validate(name_);
  switch (kind_) {
    case Kind::categorical:
      return values_[rng.index(values_.size())];
    case Kind::grid:
      throw Error(Errc::invalid_config,
                  "grid_search cannot be sampled: the variant generator (BasicVariantGenerator) "
                  "assigns grid values; use choice() for a random pick among values");
    case Kind::function:
      return fn_(resolved, rng);
    case Kind::real: {
      double x = 0;
      if (sampler_ == Sampler::normal)
        x = rng.normal(mean_, sd_);
      else if (sampler_ == Sampler::log)
        x = std::pow(base_, rng.uniform(std::log(lower_) / std::log(base_),
                                        std::log(upper_) / std::log(base_)));
      else
        x = rng.uniform(lower_, upper_);
      return quantized_ ? round_to(x, q_) : x;
    }
    case Kind::integer: {
      auto lo = static_cast<int64_t>(lower_);
      auto hi = static_cast<int64_t>(upper_);
      double x = 0;
      if (sampler_ == Sampler::log)
        x = std::floor(std::pow(base_, rng.uniform(std::log(lower_) / std::log(base_),
                                                   std::log(upper_) / std::log(base_))));
      else if (quantized_ && q_ == 1)
        return rng.integer(lo, hi + 1); // qrandint(l, u, 1): both bounds inclusive
      else
        x = static_cast<double>(rng.integer(lo, hi));
      return static_cast<int64_t>(quantized_ ? round_to(x, q_) : x);
    }
  }
  return {};
}

// -- free constructors --------------------------------------------------------------

Domain choice(std::vector<ConfigValue> categories) {
  return Domain::list("choice", Domain::Kind::categorical, std::move(categories));
}

Domain uniform(double lower, double upper) {
  return Domain::numeric("uniform", Domain::Kind::real, Domain::Sampler::uniform, lower, upper,
                         false, 0, 10);
}

Domain quniform(double lower, double upper, double q) {
  return Domain::numeric("quniform", Domain::Kind::real, Domain::Sampler::uniform, lower, upper,
                         true, q, 10);
}

Domain loguniform(double lower, double upper, double base) {
  return Domain::numeric("loguniform", Domain::Kind::real, Domain::Sampler::log, lower, upper,
                         false, 0, base);
}

Domain qloguniform(double lower, double upper, double q, double base) {
  return Domain::numeric("qloguniform", Domain::Kind::real, Domain::Sampler::log, lower, upper,
                         true, q, base);
}

Domain randint(int64_t lower, int64_t upper) {
  return Domain::numeric("randint", Domain::Kind::integer, Domain::Sampler::uniform,
                         static_cast<double>(lower), static_cast<double>(upper), false, 0, 10);
}

Domain qrandint(int64_t lower, int64_t upper, int64_t q) {
  return Domain::numeric("qrandint", Domain::Kind::integer, Domain::Sampler::uniform,
                         static_cast<double>(lower), static_cast<double>(upper), true,
                         static_cast<double>(q), 10);
}

Domain lograndint(int64_t lower, int64_t upper, double base) {
  return Domain::numeric("lograndint", Domain::Kind::integer, Domain::Sampler::log,
                         static_cast<double>(lower), static_cast<double>(upper), false, 0, base);
}

Domain qlograndint(int64_t lower, int64_t upper, int64_t q, double base) {
  return Domain::numeric("qlograndint", Domain::Kind::integer, Domain::Sampler::log,
                         static_cast<double>(lower), static_cast<double>(upper), true,
                         static_cast<double>(q), base);
}

Domain randn(double mean, double sd) {
  return Domain::normal("randn", mean, sd, false, 0);
}

Domain qrandn(double mean, double sd, double q) {
  return Domain::normal("qrandn", mean, sd, true, q);
}

Domain grid_search(std::vector<ConfigValue> values) {
  return Domain::list("grid_search", Domain::Kind::grid, std::move(values));
}

Domain sample_from(std::function<ConfigValue(const Config&)> fn) {
  if (!fn)
    return Domain::function(nullptr);
  return Domain::function([fn = std::move(fn)](const Config& c, Rng&) { return fn(c); });
}

Domain sample_from(Domain::Function fn) {
  return Domain::function(std::move(fn));
}

} // namespace caftrain::tune

#include "tune/param_space.hpp"

#include "core/error.hpp"
#include "tune/rng.hpp"

namespace caftrain::tune {

Param::Param(ParamSpace x) : value_(std::make_shared<const ParamSpace>(std::move(x))) {
  // nop
}

ParamSpace::ParamSpace(std::initializer_list<std::pair<std::string, Param>> entries) {
  for (auto& [key, value] : entries)
    set(key, value);
}

void ParamSpace::set(const std::string& key, Param value) {
  if (key.empty())
    throw Error(Errc::invalid_config, "param space has an empty key; give every entry a name");
  add(key, std::move(value));
}

void ParamSpace::add(const std::string& key, Param value) {
  if (auto nested = std::get_if<std::shared_ptr<const ParamSpace>>(&value.value_)) {
    if ((*nested)->empty())
      throw Error(Errc::invalid_config, "param '" + key +
                                          "' is an empty nested space; drop it or give it "
                                          "entries");
    for (auto& [k, v] : (*nested)->constants_)
      add(key + separator + k, Param{v});
    for (auto& [k, d] : (*nested)->domains_)
      add(key + separator + k, Param{d});
    return;
  }
  if (constants_.count(key) > 0 || domains_.count(key) > 0)
    throw Error(Errc::invalid_config, "param space has key '" + key +
                                        "' twice (nested keys flatten to \"outer" +
                                        separator + "inner\"); rename one of them");
  if (auto d = std::get_if<Domain>(&value.value_)) {
    d->validate(key);
    domains_.emplace(key, *d);
  } else {
    constants_.emplace(key, std::get<ConfigValue>(value.value_));
  }
}

std::vector<std::string> ParamSpace::grid_keys() const {
  std::vector<std::string> keys;
  for (auto& [k, d] : domains_)
    if (d.kind() == Domain::Kind::grid)
      keys.push_back(k);
  return keys;
}

Config ParamSpace::resolve(const Config& assigned, Rng& rng) const {
  Config out{Config::map_type{constants_.begin(), constants_.end()}};
  for (auto& [k, v] : assigned.values())
    out.set(k, v);
  std::vector<std::string> pending;
  for (auto& [k, d] : domains_) {
    if (out.contains(k))
      continue;
    if (d.kind() == Domain::Kind::grid)
      throw Error(Errc::invalid_config,
                  "param '" + k +
                    "' is a grid_search axis without an assigned value; grid axes are "
                    "crossed by BasicVariantGenerator, use choice() with other searchers");
    if (d.kind() == Domain::Kind::function)
      pending.push_back(k);
    else
      out.set(k, d.sample(rng, out));
  }
  std::map<std::string, std::string> last_error;
  while (!pending.empty()) {
    std::vector<std::string> still;
    for (auto& k : pending) {
      try {
        out.set(k, domains_.at(k).sample(rng, out));
      } catch (const Error& e) {
        if (e.code() != Errc::invalid_argument)
          throw;
        last_error[k] = e.what();
        still.push_back(k);
      }
    }
    if (still.size() == pending.size()) {
      std::string keys;
      std::string errors;
      for (auto& k : still) {
        keys += (keys.empty() ? "'" : ", '") + k + "'";
        errors += "; '" + k + "': " + last_error[k];
      }
      throw Error(Errc::invalid_config,
                  "sample_from cannot resolve " + keys +
                    ": each reads a key that never resolves, a cycle among them or a key the "
                    "param space lacks; break the cycle or add the key" +
                    errors);
    }
    pending = std::move(still);
  }
  return out;
}

} // namespace caftrain::tune

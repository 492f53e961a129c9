#include "actors/resource_pool.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <numeric>
#include <sstream>
#include <tuple>

#include "core/error.hpp"

namespace caftrain {

namespace {

/// Resolution of resource amounts: 1/10000 of a unit (Ray uses the same).
constexpr double kUnitsPerResource = 10000.0;

int64_t to_units(const std::string& name, double amount) {
  if (!std::isfinite(amount) || amount < 0)
    throw Error(Errc::invalid_config, "resource '" + name + "' has amount " + std::to_string(amount) +
                                        "; amounts are finite and >= 0");
  return static_cast<int64_t>(std::llround(amount * kUnitsPerResource));
}

std::string format_amount(double amount) {
  std::ostringstream os;
  os << amount;
  return os.str();
}

/// A bundle's weight for ordering: GPUs first, then CPUs, then everything else.
std::tuple<double, double, double> weight(const ResourceSet& r) {
  double other = 0;
  for (auto& [name, amount] : r.to_map())
    if (name != "CPU" && name != "GPU")
      other += amount;
  return {r.get("GPU"), r.get("CPU"), other};
}

} // namespace

// -- ResourceSet ----------------------------------------------------------------------

ResourceSet::ResourceSet(std::initializer_list<std::pair<const std::string, double>> amounts) {
  for (auto& [name, amount] : amounts)
    set(name, amount);
}

ResourceSet ResourceSet::from_map(const std::map<std::string, double>& amounts) {
  ResourceSet result;
  for (auto& [name, amount] : amounts)
    result.set(name, amount);
  return result;
}

double ResourceSet::get(const std::string& name) const {
  auto i = units_.find(name);
  return i == units_.end() ? 0.0 : static_cast<double>(i->second) / kUnitsPerResource;
}

void ResourceSet::set(const std::string& name, double amount) {
  if (name.empty())
    throw Error(Errc::invalid_config, "a resource needs a name (\"CPU\", \"GPU\" or a custom one)");
  auto units = to_units(name, amount);
  if (units == 0)
    units_.erase(name);
  else
    units_[name] = units;
}

std::map<std::string, double> ResourceSet::to_map() const {
  std::map<std::string, double> result;
  for (auto& [name, units] : units_)
    result[name] = static_cast<double>(units) / kUnitsPerResource;
  return result;
}

std::string ResourceSet::to_string() const {
  std::string s = "{";
  for (auto& [name, amount] : to_map())
    s += (s.size() > 1 ? ", " : "") + name + ": " + format_amount(amount);
  return s + "}";
}

bool ResourceSet::contains(const ResourceSet& other) const {
  for (auto& [name, units] : other.units_) {
    auto i = units_.find(name);
    if (i == units_.end() || i->second < units)
      return false;
  }
  return true;
}

ResourceSet& ResourceSet::operator+=(const ResourceSet& other) {
  for (auto& [name, units] : other.units_)
    units_[name] += units;
  return *this;
}

ResourceSet& ResourceSet::operator-=(const ResourceSet& other) {
  for (auto& [name, units] : other.units_) {
    auto i = units_.find(name);
    if (i == units_.end())
      continue;
    i->second -= std::min(i->second, units);
    if (i->second == 0)
      units_.erase(i);
  }
  return *this;
}

ResourceSet ResourceSet::times(int64_t count) const {
  ResourceSet result;
  for (auto& [name, units] : units_)
    result.units_[name] = units * count;
  if (count <= 0)
    result.units_.clear();
  return result;
}

// -- strategies -----------------------------------------------------------------------

const char* to_string(PlacementStrategy strategy) {
  switch (strategy) {
    case PlacementStrategy::pack: return "PACK";
    case PlacementStrategy::spread: return "SPREAD";
    case PlacementStrategy::strict_pack: return "STRICT_PACK";
    case PlacementStrategy::strict_spread: return "STRICT_SPREAD";
  }
  return "?";
}

PlacementStrategy placement_strategy_from_string(const std::string& name) {
  std::string upper = name;
  std::transform(upper.begin(), upper.end(), upper.begin(),
                 [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  for (auto s : {PlacementStrategy::pack, PlacementStrategy::spread, PlacementStrategy::strict_pack,
                 PlacementStrategy::strict_spread})
    if (upper == to_string(s))
      return s;
  throw Error(Errc::invalid_config, "placement strategy '" + name +
                                      "' is unknown; use PACK, SPREAD, STRICT_PACK or STRICT_SPREAD");
}

// -- ResourcePool: nodes --------------------------------------------------------------

std::vector<std::pair<uint64_t, Placement>> ResourcePool::add_node(const std::string& id, ResourceSet total) {
  if (id.empty())
    throw Error(Errc::invalid_config, "a pool node needs an id");
  auto& node = nodes_[id];
  // Keep what placements hold of it: available = new total - held.
  ResourceSet held = node.total;
  held -= node.available;
  node.id = id;
  node.total = total;
  node.available = std::move(total);
  node.available -= held;
  return grant_pending();
}

std::vector<Placement> ResourcePool::remove_node(const std::string& id) {
  std::vector<Placement> lost;
  if (!nodes_.count(id))
    return lost;
  for (auto i = placements_.begin(); i != placements_.end();) {
    auto& nodes = i->second.nodes;
    if (std::find(nodes.begin(), nodes.end(), id) == nodes.end()) {
      ++i;
      continue;
    }
    for (size_t b = 0; b < nodes.size(); ++b)
      if (nodes[b] != id)
        nodes_[nodes[b]].available += i->second.bundles[b];
    lost.push_back(std::move(i->second));
    i = placements_.erase(i);
  }
  nodes_.erase(id);
  return lost;
}

ResourceSet ResourcePool::total() const {
  ResourceSet sum;
  for (auto& [id, node] : nodes_)
    sum += node.total;
  return sum;
}

ResourceSet ResourcePool::available() const {
  ResourceSet sum;
  for (auto& [id, node] : nodes_)
    sum += node.available;
  return sum;
}

// -- ResourcePool: placements ---------------------------------------------------------

std::optional<std::vector<std::string>>
ResourcePool::assign(const PlacementRequest& request, const std::map<std::string, ResourceSet>& capacity) {
  auto& bundles = request.bundles;
  auto n = bundles.size();
  std::vector<std::string> result(n);
  auto cap = capacity;
  // Largest bundles first: a greedy choice then rarely strands a big one.
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return weight(bundles[a]) > weight(bundles[b]); });
  // The roomiest node first; ties by id, so placements are deterministic.
  auto roomier = [&](const std::string& a, const std::string& b) {
    auto wa = weight(cap.at(a)), wb = weight(cap.at(b));
    return wa != wb ? wa > wb : a < b;
  };
  auto fitting = [&](const ResourceSet& bundle) {
    std::vector<std::string> ids;
    for (auto& [id, room] : cap)
      if (room.contains(bundle))
        ids.push_back(id);
    return ids;
  };
  std::map<std::string, int64_t> used; // bundles of this request per node
  std::vector<std::string> used_order;
  auto put = [&](size_t b, const std::string& id) {
    result[b] = id;
    cap.at(id) -= bundles[b];
    if (used[id]++ == 0)
      used_order.push_back(id);
  };
  switch (request.strategy) {
    case PlacementStrategy::strict_pack:
    case PlacementStrategy::pack: {
      ResourceSet sum;
      for (auto& b : bundles)
        sum += b;
      auto whole = fitting(sum);
      if (!whole.empty()) {
        // The tightest node that holds them all leaves bigger nodes for bigger jobs.
        auto best = *std::min_element(whole.begin(), whole.end(), [&](auto& a, auto& b) {
          auto wa = weight(cap.at(a)), wb = weight(cap.at(b));
          return wa != wb ? wa < wb : a < b;
        });
        for (size_t b = 0; b < n; ++b)
          put(b, best);
        return result;
      }
      if (request.strategy == PlacementStrategy::strict_pack)
        return std::nullopt;
      for (auto b : order) {
        auto it = std::find_if(used_order.begin(), used_order.end(),
                               [&](auto& id) { return cap.at(id).contains(bundles[b]); });
        if (it != used_order.end()) {
          put(b, *it);
          continue;
        }
        auto ids = fitting(bundles[b]);
        if (ids.empty())
          return std::nullopt;
        put(b, *std::min_element(ids.begin(), ids.end(), roomier));
      }
      return result;
    }
    case PlacementStrategy::spread:
    case PlacementStrategy::strict_spread: {
      bool strict = request.strategy == PlacementStrategy::strict_spread;
      for (auto b : order) {
        auto ids = fitting(bundles[b]);
        if (strict)
          ids.erase(std::remove_if(ids.begin(), ids.end(), [&](auto& id) { return used[id] > 0; }),
                    ids.end());
        if (ids.empty())
          return std::nullopt;
        // Fewest bundles of this request first, then the roomiest.
        put(b, *std::min_element(ids.begin(), ids.end(), [&](auto& x, auto& y) {
          return used[x] != used[y] ? used[x] < used[y] : roomier(x, y);
        }));
      }
      return result;
    }
  }
  return std::nullopt;
}

std::optional<std::string> ResourcePool::infeasible(const PlacementRequest& request) const {
  if (request.bundles.empty())
    return "the request from '" + request.owner + "' has no bundles; a job needs at least one worker";
  for (auto& b : request.bundles)
    if (b.empty())
      return "a bundle of '" + request.owner +
             "' asks for no resources; give each worker at least some CPU (e.g. {CPU: 1})";
  if (nodes_.empty())
    return std::string("the resource pool has no nodes; start a node (or use local placement)");
  std::map<std::string, ResourceSet> totals;
  for (auto& [id, node] : nodes_)
    totals[id] = node.total;
  if (assign(request, totals))
    return std::nullopt;
  std::string nodes;
  for (auto& [id, node] : nodes_)
    nodes += (nodes.empty() ? "" : ", ") + id + " " + node.total.to_string();
  auto& first = request.bundles.front();
  bool uniform = std::all_of(request.bundles.begin(), request.bundles.end(),
                             [&](auto& b) { return b == first; });
  std::string asked = uniform ? std::to_string(request.bundles.size()) + " x " + first.to_string()
                              : std::to_string(request.bundles.size()) + " bundles";
  std::string why;
  for (auto& b : request.bundles) {
    bool fits_somewhere = std::any_of(totals.begin(), totals.end(),
                                      [&](auto& t) { return t.second.contains(b); });
    if (!fits_somewhere) {
      why = "a bundle " + b.to_string() + " is larger than every node";
      break;
    }
  }
  if (why.empty()) {
    switch (request.strategy) {
      case PlacementStrategy::strict_pack: why = "no single node holds them all"; break;
      case PlacementStrategy::strict_spread:
        why = "each bundle needs a node of its own and only " + std::to_string(nodes_.size()) +
              " node(s) exist";
        break;
      default: why = "the nodes together cannot hold them"; break;
    }
  }
  return "'" + request.owner + "' asks for " + asked + " (" + to_string(request.strategy) + ") but " +
         why + "; nodes: " + nodes +
         ". Lower num_workers or resources_per_worker, choose another placement strategy, or add nodes";
}

Placement ResourcePool::commit(const PlacementRequest& request, std::vector<std::string> nodes) {
  Placement p;
  p.id = next_id_++;
  p.owner = request.owner;
  p.bundles = request.bundles;
  p.nodes = std::move(nodes);
  for (size_t b = 0; b < p.nodes.size(); ++b)
    nodes_.at(p.nodes[b]).available -= p.bundles[b];
  placements_[p.id] = p;
  return p;
}

std::optional<Placement> ResourcePool::try_place(const PlacementRequest& request) {
  if (request.bundles.empty())
    return std::nullopt;
  std::map<std::string, ResourceSet> room;
  for (auto& [id, node] : nodes_)
    room[id] = node.available;
  auto nodes = assign(request, room);
  if (!nodes)
    return std::nullopt;
  return commit(request, std::move(*nodes));
}

std::optional<std::vector<std::string>>
ResourcePool::placement_without(const PlacementRequest& request, uint64_t placement_id,
                                const std::string& lost) const {
  if (request.bundles.empty())
    return std::nullopt;
  std::map<std::string, ResourceSet> room;
  for (auto& [id, node] : nodes_)
    if (id != lost)
      room[id] = node.available;
  if (auto p = placements_.find(placement_id); p != placements_.end())
    for (size_t i = 0; i < p->second.nodes.size(); ++i)
      if (auto r = room.find(p->second.nodes[i]); r != room.end())
        r->second += p->second.bundles[i];
  return assign(request, room);
}

std::pair<uint64_t, std::optional<Placement>> ResourcePool::submit(PlacementRequest request) {
  if (auto why = infeasible(request))
    throw Error(Errc::invalid_config, *why);
  auto ticket = next_id_++;
  // Only when nothing is queued ahead of it or it fits beside what waits.
  if (auto placed = try_place(request))
    return {ticket, std::move(placed)};
  queue_.emplace_back(ticket, std::move(request));
  return {ticket, std::nullopt};
}

bool ResourcePool::withdraw(uint64_t ticket) {
  auto i = std::find_if(queue_.begin(), queue_.end(), [&](auto& q) { return q.first == ticket; });
  if (i == queue_.end())
    return false;
  queue_.erase(i);
  return true;
}

std::vector<std::pair<uint64_t, Placement>> ResourcePool::release(uint64_t placement_id) {
  auto i = placements_.find(placement_id);
  if (i == placements_.end())
    return {};
  auto& p = i->second;
  for (size_t b = 0; b < p.nodes.size(); ++b) {
    auto node = nodes_.find(p.nodes[b]);
    if (node != nodes_.end())
      node->second.available += p.bundles[b];
  }
  placements_.erase(i);
  return grant_pending();
}

std::vector<std::pair<uint64_t, Placement>> ResourcePool::grant_pending() {
  std::vector<std::pair<uint64_t, Placement>> granted;
  for (auto i = queue_.begin(); i != queue_.end();) {
    if (auto placed = try_place(i->second)) {
      granted.emplace_back(i->first, std::move(*placed));
      i = queue_.erase(i);
    } else {
      ++i;
    }
  }
  return granted;
}

std::string ResourcePool::reason_for(const PlacementRequest& request) const {
  ResourceSet sum;
  for (auto& b : request.bundles)
    sum += b;
  std::string holders;
  for (auto& [id, p] : placements_) {
    ResourceSet held;
    for (auto& b : p.bundles)
      held += b;
    holders += (holders.empty() ? "" : ", ") + p.owner + " " + held.to_string();
  }
  return "waiting for " + sum.to_string() + " (" + to_string(request.strategy) + "); available " +
         available().to_string() + " of " + total().to_string() +
         (holders.empty() ? "" : "; held by " + holders);
}

std::vector<PendingRequest> ResourcePool::pending() const {
  std::vector<PendingRequest> result;
  for (auto& [ticket, request] : queue_)
    result.push_back({ticket, request, reason_for(request)});
  return result;
}

std::string ResourcePool::waiting_reason(uint64_t ticket) const {
  for (auto& [t, request] : queue_)
    if (t == ticket)
      return reason_for(request);
  return "";
}

} // namespace caftrain

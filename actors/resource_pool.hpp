// ResourcePool: what can be placed where (CPUs, GPUs, custom resources per node), and the
// placements (a bundle per worker) handed out of it. One pool serves every job of a
// process, or of a cluster when the head serves it.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace caftrain {

/// Amounts of named resources: "CPU", "GPU" and any custom name (Ray's resource dicts).
/// Amounts are kept in units of 1/10000 so that fractional requests add up exactly.
class ResourceSet {
 public:
  // -- constructors -----------------------------------------------------------------

  ResourceSet() = default;

  /// E.g. `ResourceSet({{"CPU", 2}, {"GPU", 1}})`. Throws `Error(invalid_config)` naming a
  /// negative or non-finite amount.
  ResourceSet(std::initializer_list<std::pair<const std::string, double>> amounts); // NOLINT

  /// From a map of amounts; same checks.
  static ResourceSet from_map(const std::map<std::string, double>& amounts);

  // -- properties -------------------------------------------------------------------

  /// The amount of `name` (0 when absent).
  double get(const std::string& name) const;

  /// Sets `name` to `amount` (0 removes it). Throws for a negative or non-finite amount.
  void set(const std::string& name, double amount);

  /// Every non-zero amount by name.
  std::map<std::string, double> to_map() const;

  bool empty() const noexcept {
    return units_.empty();
  }

  /// E.g. "{CPU: 2, GPU: 1}".
  std::string to_string() const;

  // -- arithmetic -------------------------------------------------------------------

  /// True when every amount of `other` is at most this one's.
  bool contains(const ResourceSet& other) const;

  ResourceSet& operator+=(const ResourceSet& other);

  /// Subtracts `other`; amounts never go below 0.
  ResourceSet& operator-=(const ResourceSet& other);

  /// This set `count` times.
  ResourceSet times(int64_t count) const;

  friend ResourceSet operator+(ResourceSet x, const ResourceSet& y) {
    return x += y;
  }

  friend bool operator==(const ResourceSet& x, const ResourceSet& y) {
    return x.units_ == y.units_;
  }

  /// Serialisation for actor messages (defined in actors/pool_actor.hpp).
  template <class Inspector>
  friend typename Inspector::result_type inspect(Inspector& f, ResourceSet& x);

 private:
  std::map<std::string, int64_t> units_;
};

/// How the bundles of one placement are spread over nodes (Ray's placement group
/// strategies).
enum class PlacementStrategy {
  /// As few nodes as possible; spills onto more when no single node fits them all.
  pack,
  /// Each bundle on a different node where possible; shares nodes when it must.
  spread,
  /// Every bundle on one node; waits until one node can hold them all.
  strict_pack,
  /// Every bundle on a different node; waits until enough nodes have room.
  strict_spread,
};

/// "PACK", "SPREAD", "STRICT_PACK" or "STRICT_SPREAD".
const char* to_string(PlacementStrategy strategy);

/// Parses Ray's names (case-insensitive); throws `Error(invalid_config)` listing them.
PlacementStrategy placement_strategy_from_string(const std::string& name);

/// What a job asks of the pool: one bundle per worker (plus, for a run, the trainer's).
struct PlacementRequest {
  /// Who asks (a run or trial name); shown in the reasons other requests wait.
  std::string owner;
  /// The bundles, in worker order; bundle i goes to worker i.
  std::vector<ResourceSet> bundles;
  /// How the bundles are spread over nodes. Default PACK (Ray's default).
  PlacementStrategy strategy = PlacementStrategy::pack;
};

/// Resources handed out to one request: where each of its bundles stands.
struct Placement {
  /// Identifies the placement for `release`.
  uint64_t id = 0;
  std::string owner;
  /// Node of each bundle, in request order.
  std::vector<std::string> nodes;
  std::vector<ResourceSet> bundles;
};

/// One node of the pool.
struct PoolNode {
  std::string id;
  ResourceSet total;
  ResourceSet available;
};

/// A request the pool is holding until resources free up.
struct PendingRequest {
  /// Ticket returned by `submit`.
  uint64_t ticket = 0;
  PlacementRequest request;
  /// Why it cannot be placed now, naming what holds the resources.
  std::string reason;
};

/// Knows the nodes and their resources and hands out placements. Requests that fit now
/// are placed at once; requests that could fit once others release are queued and
/// granted in submission order as resources free up (a later, smaller request may pass
/// a waiting larger one when it fits in what is left); requests that no configuration
/// of the known nodes could ever satisfy are refused with the reason.
///
/// Not thread-safe: one owner (the pool actor) drives it.
class ResourcePool {
 public:
  // -- nodes ------------------------------------------------------------------------

  /// Adds (or replaces the totals of) node `id`. Returns the queued requests this grants.
  std::vector<std::pair<uint64_t, Placement>> add_node(const std::string& id, ResourceSet total);

  /// Removes node `id`: returns the placements that had a bundle on it (they are gone;
  /// their owners must stop those workers). The other bundles of those placements are
  /// released too.
  std::vector<Placement> remove_node(const std::string& id);

  const std::map<std::string, PoolNode>& nodes() const noexcept {
    return nodes_;
  }

  /// Sum of every node's totals.
  ResourceSet total() const;

  /// Sum of every node's available resources.
  ResourceSet available() const;

  // -- placements -------------------------------------------------------------------

  /// Why `request` can never be placed on the known nodes (bundle larger than every
  /// node, too few nodes for STRICT_SPREAD, ...), or nothing when it could be.
  std::optional<std::string> infeasible(const PlacementRequest& request) const;

  /// Places `request` now if it fits, else nothing (the pool is unchanged).
  std::optional<Placement> try_place(const PlacementRequest& request);

  /// Places `request` now if it fits (returned with ticket), else queues it and returns
  /// only its ticket. Throws `Error(invalid_config)` with the reason when it is
  /// infeasible, or when it has no bundle or an empty one.
  std::pair<uint64_t, std::optional<Placement>> submit(PlacementRequest request);

  /// Drops a queued request; false when the ticket is not queued.
  bool withdraw(uint64_t ticket);

  /// Returns a placement's resources to its nodes and grants what now fits, in
  /// submission order. Releasing an unknown id does nothing.
  std::vector<std::pair<uint64_t, Placement>> release(uint64_t placement_id);

  /// Grants the queued requests that fit now, in submission order (after `remove_node`,
  /// whose lost placements leave resources on other nodes free).
  std::vector<std::pair<uint64_t, Placement>> grant_pending();

  /// Where `request`, which placement `placement_id` holds, would be placed again if node
  /// `lost` were removed now (that placement released, every other kept), as `try_place`
  /// would place it; nothing when it would not fit then. The pool is unchanged. A run
  /// with warm spares starts them where this says its ranks would go after a node's loss.
  std::optional<std::vector<std::string>>
  placement_without(const PlacementRequest& request, uint64_t placement_id, const std::string& lost) const;

  /// Placements handed out and not released.
  const std::map<uint64_t, Placement>& placements() const noexcept {
    return placements_;
  }

  /// Queued requests in submission order, each with the reason it waits.
  std::vector<PendingRequest> pending() const;

  /// Why the queued request `ticket` waits ("" when it is not queued).
  std::string waiting_reason(uint64_t ticket) const;

 private:
  /// Node of each bundle when `request` fits `capacity` (node id -> resources), else
  /// nothing.
  static std::optional<std::vector<std::string>>
  assign(const PlacementRequest& request, const std::map<std::string, ResourceSet>& capacity);

  Placement commit(const PlacementRequest& request, std::vector<std::string> nodes);
  std::string reason_for(const PlacementRequest& request) const;

  std::map<std::string, PoolNode> nodes_;
  std::map<uint64_t, Placement> placements_;
  std::vector<std::pair<uint64_t, PlacementRequest>> queue_;
  uint64_t next_id_ = 1;
};

} // namespace caftrain

// The resource pool: placements of bundles over nodes, queues, and clear refusals.
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>

#include "actors/resource_pool.hpp"
#include "core/error.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;

namespace {

PlacementRequest request(const std::string& owner, int64_t workers, ResourceSet bundle,
                         PlacementStrategy strategy = PlacementStrategy::pack) {
  return {owner, std::vector<ResourceSet>(static_cast<size_t>(workers), bundle), strategy};
}

ResourcePool two_nodes(double cpus_each) {
  ResourcePool pool;
  pool.add_node("a", {{"CPU", cpus_each}});
  pool.add_node("b", {{"CPU", cpus_each}});
  return pool;
}

} // namespace

TEST_CASE("resource amounts add up exactly, fractions included", "[pool]") {
  ResourceSet third{{"CPU", 1.0 / 3.0}};
  ResourceSet sum;
  for (int i = 0; i < 3; ++i)
    sum += third;
  CHECK(sum.get("CPU") == Approx(1.0).margin(1e-4));
  ResourceSet quarter{{"CPU", 0.25}, {"GPU", 0.5}, {"accelerator_x", 2}};
  CHECK(quarter.times(4) == ResourceSet({{"CPU", 1}, {"GPU", 2}, {"accelerator_x", 8}}));
  CHECK(ResourceSet({{"CPU", 2}}).contains({{"CPU", 1.5}}));
  CHECK_FALSE(ResourceSet({{"CPU", 2}}).contains({{"CPU", 1}, {"GPU", 1}}));
  CHECK(quarter.to_string() == "{CPU: 0.25, GPU: 0.5, accelerator_x: 2}");
  CHECK_THROWS_WITH(ResourceSet({{"CPU", -1}}), Contains("'CPU'") && Contains(">= 0"));
}

TEST_CASE("placement strategies put bundles where Ray's would", "[pool]") {
  SECTION("PACK fills one node before the next") {
    auto pool = two_nodes(4);
    auto p = pool.try_place(request("job", 3, {{"CPU", 1}}));
    REQUIRE(p);
    CHECK(p->nodes == std::vector<std::string>{"a", "a", "a"});
    CHECK(pool.nodes().at("a").available.get("CPU") == 1);
  }
  SECTION("PACK spills onto a second node when one cannot hold them all") {
    auto pool = two_nodes(2);
    auto p = pool.try_place(request("job", 3, {{"CPU", 1}}));
    REQUIRE(p);
    CHECK(std::count(p->nodes.begin(), p->nodes.end(), "a") +
            std::count(p->nodes.begin(), p->nodes.end(), "b") == 3);
    CHECK(pool.available().get("CPU") == 1);
  }
  SECTION("SPREAD puts each bundle on a different node while it can") {
    auto pool = two_nodes(4);
    auto p = pool.try_place(request("job", 3, {{"CPU", 1}}, PlacementStrategy::spread));
    REQUIRE(p);
    CHECK(std::count(p->nodes.begin(), p->nodes.end(), "a") == 2 - (p->nodes[0] == "b"));
    CHECK(p->nodes[0] != p->nodes[1]);
  }
  SECTION("STRICT_PACK waits for one node that holds every bundle") {
    auto pool = two_nodes(2);
    CHECK_FALSE(pool.try_place(request("job", 2, {{"CPU", 1.5}}, PlacementStrategy::strict_pack)));
    auto p = pool.try_place(request("job", 2, {{"CPU", 1}}, PlacementStrategy::strict_pack));
    REQUIRE(p);
    CHECK(p->nodes[0] == p->nodes[1]);
  }
  SECTION("STRICT_SPREAD gives every bundle its own node") {
    auto pool = two_nodes(4);
    auto p = pool.try_place(request("job", 2, {{"CPU", 1}}, PlacementStrategy::strict_spread));
    REQUIRE(p);
    CHECK(p->nodes[0] != p->nodes[1]);
    CHECK_FALSE(pool.try_place(request("more", 3, {{"CPU", 1}}, PlacementStrategy::strict_spread)));
  }
  SECTION("GPU bundles go to the nodes that have GPUs") {
    ResourcePool pool;
    pool.add_node("cpu_only", {{"CPU", 16}});
    pool.add_node("gpu_box", {{"CPU", 8}, {"GPU", 2}});
    auto p = pool.try_place(request("job", 2, {{"CPU", 1}, {"GPU", 1}}));
    REQUIRE(p);
    CHECK(p->nodes == std::vector<std::string>{"gpu_box", "gpu_box"});
  }
  CHECK(placement_strategy_from_string("strict_spread") == PlacementStrategy::strict_spread);
  CHECK_THROWS_WITH(placement_strategy_from_string("TIGHT"), Contains("STRICT_PACK"));
}

TEST_CASE("a request the pool can never satisfy is refused with the reason", "[pool]") {
  auto pool = two_nodes(2);
  CHECK_THROWS_WITH(pool.submit(request("big", 1, {{"CPU", 3}})),
                    Contains("'big'") && Contains("larger than every node") && Contains("a {CPU: 2}"));
  CHECK_THROWS_WITH(pool.submit(request("spread", 3, {{"CPU", 1}}, PlacementStrategy::strict_spread)),
                    Contains("only 2 node(s)"));
  CHECK_THROWS_WITH(pool.submit(request("pack", 2, {{"CPU", 1.5}}, PlacementStrategy::strict_pack)),
                    Contains("no single node"));
  CHECK_THROWS_WITH(pool.submit(request("gpu", 1, {{"GPU", 1}})), Contains("{GPU: 1}"));
  CHECK_THROWS_WITH(pool.submit(request("none", 0, {{"CPU", 1}})), Contains("no bundles"));
  CHECK_THROWS_WITH(pool.submit(request("empty", 1, {})), Contains("no resources"));
  // Refusals change nothing.
  CHECK(pool.available() == pool.total());
  CHECK(pool.pending().empty());
}

TEST_CASE("a busy pool queues requests and grants them as resources free up", "[pool]") {
  ResourcePool pool;
  pool.add_node("local", {{"CPU", 2}});
  auto [t1, first] = pool.submit(request("run_1", 2, {{"CPU", 1}}));
  REQUIRE(first);
  auto [t2, second] = pool.submit(request("run_2", 1, {{"CPU", 2}}));
  auto [t3, third] = pool.submit(request("run_3", 1, {{"CPU", 1}}));
  CHECK_FALSE(second);
  CHECK_FALSE(third);
  REQUIRE(pool.pending().size() == 2);
  CHECK_THAT(pool.waiting_reason(t2), Contains("waiting for {CPU: 2}") && Contains("available {} of {CPU: 2}") &&
                                        Contains("held by run_1 {CPU: 2}"));
  auto granted = pool.release(first->id);
  // In submission order: run_2 takes both CPUs, run_3 goes on waiting.
  REQUIRE(granted.size() == 1);
  CHECK(granted[0].first == t2);
  CHECK(granted[0].second.owner == "run_2");
  CHECK(pool.waiting_reason(t3) != "");
  granted = pool.release(granted[0].second.id);
  REQUIRE(granted.size() == 1);
  CHECK(granted[0].first == t3);
  CHECK(pool.pending().empty());
  SECTION("a withdrawn request is never granted") {
    auto [t4, fourth] = pool.submit(request("run_4", 1, {{"CPU", 2}}));
    CHECK_FALSE(fourth);
    CHECK(pool.withdraw(t4));
    CHECK_FALSE(pool.withdraw(t4));
    CHECK(pool.release(granted[0].second.id).empty());
    CHECK(pool.available().get("CPU") == 2);
  }
}

TEST_CASE("a smaller request passes a waiting larger one when it fits", "[pool]") {
  ResourcePool pool;
  pool.add_node("local", {{"CPU", 4}});
  auto [t1, held] = pool.submit(request("run_1", 3, {{"CPU", 1}}));
  REQUIRE(held);
  auto [t2, large] = pool.submit(request("large", 1, {{"CPU", 4}}));
  CHECK_FALSE(large);
  auto [t3, small] = pool.submit(request("small", 1, {{"CPU", 1}}));
  CHECK(small);
}

TEST_CASE("placement_without says where a placement would go again after a node's loss, "
          "as the placement after that loss then goes, and changes nothing", "[pool]") {
  ResourcePool pool;
  for (auto id : {"a", "b", "c"})
    pool.add_node(id, {{"CPU", 1}});
  auto req = request("run", 2, {{"CPU", 1}}, PlacementStrategy::spread);
  auto p = pool.try_place(req);
  REQUIRE(p);
  auto other = pool.try_place(request("other", 1, {{"CPU", 1}}));
  REQUIRE(other); // the third node is taken: a loss leaves no room for the run
  for (auto& lost : p->nodes)
    CHECK_FALSE(pool.placement_without(req, p->id, lost));
  pool.release(other->id);
  std::map<std::string, std::vector<std::string>> predicted;
  for (auto& lost : p->nodes) {
    auto where = pool.placement_without(req, p->id, lost);
    REQUIRE(where);
    CHECK(std::find(where->begin(), where->end(), lost) == where->end());
    predicted[lost] = *where;
  }
  // Nothing changed: the placement is whole and the free node is free.
  CHECK(pool.placements().size() == 1);
  CHECK(pool.available() == ResourceSet({{"CPU", 1}}));
  // A node is lost: placed again, the run goes where the prediction said.
  auto lost = p->nodes[1];
  pool.remove_node(lost);
  auto again = pool.try_place(req);
  REQUIRE(again);
  CHECK(again->nodes == predicted[lost]);
}

TEST_CASE("losing a node ends the placements on it and frees their other bundles", "[pool]") {
  auto pool = two_nodes(1);
  auto across = pool.try_place(request("across", 2, {{"CPU", 1}}, PlacementStrategy::strict_spread));
  REQUIRE(across);
  auto lost = pool.remove_node("b");
  REQUIRE(lost.size() == 1);
  CHECK(lost[0].id == across->id);
  CHECK(pool.placements().empty());
  CHECK(pool.nodes().at("a").available.get("CPU") == 1);
  CHECK(pool.total() == ResourceSet({{"CPU", 1}}));
  SECTION("a node that joins grants what waited for it") {
    REQUIRE(pool.try_place(request("one", 1, {{"CPU", 1}})));
    auto [ticket, now] = pool.submit(request("next", 1, {{"CPU", 1}}));
    CHECK_FALSE(now);
    auto granted = pool.add_node("c", {{"CPU", 1}});
    REQUIRE(granted.size() == 1);
    CHECK(granted[0].first == ticket);
  }
  SECTION("a node that comes back with new totals keeps what is placed on it") {
    auto p = pool.try_place(request("one", 1, {{"CPU", 1}}));
    REQUIRE(p);
    pool.add_node("a", {{"CPU", 3}});
    CHECK(pool.nodes().at("a").available.get("CPU") == 2);
  }
}

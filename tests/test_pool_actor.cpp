// The pool actor: placements by message, queues with reasons, cleanup when a holder ends.
#include <catch2/catch.hpp>

#include <chrono>
#include <thread>

#include "actors/pool_actor.hpp"
#include "helpers.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;
using namespace std::chrono_literals;

namespace {

PlacementRequest workers(const std::string& owner, size_t n, double cpus) {
  return {owner, std::vector<ResourceSet>(n, ResourceSet{{"CPU", cpus}}), PlacementStrategy::pack};
}

caf::actor two_cpu_pool(caf::actor_system& sys) {
  return sys.spawn(pool_actor, std::map<std::string, ResourceSet>{{"node", {{"CPU", 2}}}});
}

/// Asks `pool` for `request` from `self` and waits up to `wait` for the placement.
std::optional<Placement> ask(caf::scoped_actor& self, const caf::actor& pool, const PlacementRequest& request,
                             std::chrono::milliseconds wait) {
  self->send(pool, pool_request_atom::value, request);
  std::optional<Placement> result;
  self->receive([&](Placement& p) { result = std::move(p); }, caf::after(wait) >> [] {});
  return result;
}

} // namespace

TEST_CASE("a request the pool cannot hold now waits, with the reason, until the holder releases",
          "[pool]") {
  test::ActorSystem fx;
  auto pool = two_cpu_pool(fx.sys);
  caf::scoped_actor first{fx.sys};
  caf::scoped_actor second{fx.sys};
  auto held = ask(first, pool, workers("run_a", 2, 1), 5s);
  REQUIRE(held);
  CHECK((held->nodes == std::vector<std::string>{"node", "node"}));
  CHECK_FALSE(ask(second, pool, workers("run_b", 1, 1), 200ms));
  std::string reason;
  first->request(pool, caf::infinite, pool_reason_atom::value, std::string("run_b"))
    .receive([&](std::string& r) { reason = r; }, [](caf::error&) {});
  CHECK_THAT(reason, Contains("waiting for {CPU: 1}") && Contains("held by run_a {CPU: 2}"));
  first->send(pool, pool_release_atom::value, held->id);
  std::optional<Placement> granted;
  second->receive([&](Placement& p) { granted = std::move(p); }, caf::after(5s) >> [] {});
  REQUIRE(granted);
  CHECK(granted->owner == "run_b");
  PoolStatus status;
  first->request(pool, caf::infinite, pool_status_atom::value)
    .receive([&](PoolStatus& s) { status = std::move(s); }, [](caf::error&) {});
  REQUIRE(status.nodes.size() == 1);
  CHECK(status.nodes[0].available.get("CPU") == 1);
  CHECK(status.pending.empty());
  anon_send_exit(pool, caf::exit_reason::user_shutdown);
}

TEST_CASE("a holder that terminates gives its resources back", "[pool]") {
  test::ActorSystem fx;
  auto pool = two_cpu_pool(fx.sys);
  caf::scoped_actor waiter{fx.sys};
  // The holder takes both CPUs and ends, without releasing them, when told to.
  caf::scoped_actor self{fx.sys};
  auto holder = fx.sys.spawn([pool, me = caf::actor(self)](caf::event_based_actor* h) -> caf::behavior {
    h->request(pool, caf::infinite, pool_request_atom::value, workers("gone", 1, 2))
      .then([h, me](Placement&) { h->send(me, ack_atom::value); });
    return {[h](done_atom) { h->quit(); }};
  });
  self->receive([](ack_atom) {});
  CHECK_FALSE(ask(waiter, pool, workers("next", 2, 1), 100ms));
  self->send(holder, done_atom::value);
  std::optional<Placement> granted;
  waiter->receive([&](Placement& p) { granted = std::move(p); }, caf::after(5s) >> [] {});
  anon_send_exit(pool, caf::exit_reason::user_shutdown);
  REQUIRE(granted);
  CHECK(granted->owner == "next");
}

TEST_CASE("a request no node can ever hold is answered with an error naming it", "[pool]") {
  test::ActorSystem fx;
  auto pool = two_cpu_pool(fx.sys);
  caf::scoped_actor self{fx.sys};
  std::string message;
  self->request(pool, caf::infinite, pool_request_atom::value, workers("huge", 3, 1))
    .receive([](Placement&) {}, [&](caf::error& err) { message = to_run_error(err).message; });
  CHECK_THAT(message, Contains("'huge' asks for 3 x {CPU: 1}") && Contains("node {CPU: 2}"));
  anon_send_exit(pool, caf::exit_reason::user_shutdown);
}

TEST_CASE("every job of an actor system shares one local pool of this machine's CPUs", "[pool]") {
  test::ActorSystem fx;
  auto a = local_pool(fx.sys);
  auto b = local_pool(fx.sys);
  CHECK(a == b);
  caf::scoped_actor self{fx.sys};
  PoolStatus status;
  self->request(a, caf::infinite, pool_status_atom::value)
    .receive([&](PoolStatus& s) { status = std::move(s); }, [](caf::error&) {});
  REQUIRE(status.nodes.size() == 1);
  CHECK(status.nodes[0].id == "local");
  CHECK(status.nodes[0].total.get("CPU") == static_cast<double>(std::max(1u, std::thread::hardware_concurrency())));
}

namespace {

/// Options of a run named `name` under `dir` whose one worker needs `cpus` CPUs.
TorchTrainerOptions run_needing(const test::TempDir& dir, const std::string& name, double cpus) {
  TorchTrainerOptions o;
  o.run.storage_path = dir.path();
  o.run.name = name;
  o.scaling.resources_per_worker.cpus = cpus;
  return o;
}

RunStatus status_of(caf::scoped_actor& self, const caf::actor& run) {
  RunStatus status;
  self->request(run, caf::infinite, status_atom::value)
    .receive([&](RunStatus& s) { status = std::move(s); }, [](caf::error&) {});
  return status;
}

} // namespace

TEST_CASE("two runs that together need more CPUs than the machine has run one after the other, "
          "the second pending with the reason",
          "[pool][torch_trainer]") {
  test::ActorSystem fx;
  test::TempDir dir;
  auto cores = static_cast<double>(std::max(1u, std::thread::hardware_concurrency()));
  std::atomic<bool> release_first{false};
  std::atomic<int> first_running{0}, second_started_while_first_ran{0};
  std::atomic<bool> second_ran{false};
  TorchTrainer first(fx.sys, [&] {
    first_running = 1;
    while (!release_first)
      std::this_thread::sleep_for(5ms);
    first_running = 0;
  }, run_needing(dir, "whole_machine", cores));
  TorchTrainer second(fx.sys, [&] {
    second_started_while_first_ran += first_running.load();
    second_ran = true;
  }, run_needing(dir, "one_cpu", 1));
  CHECK(second.name() == "one_cpu");
  auto a = first.start();
  auto deadline = std::chrono::steady_clock::now() + 30s;
  while (!first_running && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(5ms);
  REQUIRE(first_running);
  auto b = second.start();
  caf::scoped_actor self{fx.sys};
  RunStatus waiting;
  while (std::chrono::steady_clock::now() < deadline) {
    waiting = status_of(self, b);
    if (!waiting.waiting_reason.empty())
      break;
    std::this_thread::sleep_for(5ms);
  }
  CHECK(waiting.state == "pending");
  CHECK_THAT(waiting.waiting_reason, Contains("waiting for {CPU: 1}") && Contains("held by whole_machine"));
  CHECK_FALSE(second_ran);
  release_first = true;
  CHECK(first.fit().ok());
  auto result = second.fit();
  INFO((result.error ? result.error->message : std::string("no error")));
  CHECK(result.ok());
  CHECK(second_ran);
  CHECK(second_started_while_first_ran == 0);
}

TEST_CASE("a run no node of the pool can ever hold ends with the pool's explanation", "[pool][torch_trainer]") {
  test::ActorSystem fx;
  test::TempDir dir;
  auto o = run_needing(dir, "needs_tpu", 1);
  o.scaling.resources_per_worker.custom = {{"TPU", 1}};
  o.scaling.num_workers = 2;
  CHECK(o.scaling.total_resources().get("TPU") == 2);
  auto result = TorchTrainer(fx.sys, [] {}, o).fit();
  REQUIRE_FALSE(result.ok());
  CHECK(result.error->code == Errc::invalid_config);
  CHECK_THAT(result.error->message, Contains("'needs_tpu' asks for 2 x {CPU: 1, TPU: 1}") &&
                                      Contains("larger than every node"));
}

TEST_CASE("ScalingConfig bundles: one CPU per worker by default, an even share when workers outnumber cores",
          "[pool]") {
  auto cores = static_cast<double>(std::max(1u, std::thread::hardware_concurrency()));
  ScalingConfig two{.num_workers = 2};
  CHECK(two.worker_bundles().size() == 2);
  CHECK(two.total_resources().get("CPU") == Approx(std::min(2.0, cores)));
  auto many = static_cast<int64_t>(cores) * 2;
  ScalingConfig crowded{.num_workers = many};
  CHECK(crowded.total_resources().get("CPU") == Approx(cores).margin(1e-3));
  ScalingConfig sized{.num_workers = 2, .resources_per_worker = {.cpus = 0.5}, .trainer_resources = {.cpus = 0.25}};
  CHECK(sized.worker_bundles().front() == ResourceSet({{"CPU", 0.75}}));
  CHECK(sized.total_resources() == ResourceSet({{"CPU", 1.25}}));
  TorchTrainerOptions bad;
  bad.scaling.placement_strategy = "TIGHT";
  CHECK_THROWS_WITH(validate(bad), Contains("STRICT_SPREAD"));
}

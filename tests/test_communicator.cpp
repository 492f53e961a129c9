// GlooCommunicator: every collective against a reference, bad inputs, timeouts and close;
// the store server through which a run's ranks rendezvous.
#include <catch2/catch.hpp>

#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "actors/messages.hpp"
#include "actors/store_server.hpp"
#include "core/error.hpp"
#include "environment/actor_store.hpp"
#include "environment/gloo_communicator.hpp"
#include "environment/store.hpp"
#include "environment/store_protocol.hpp"
#include "helpers.hpp"

using namespace caftrain;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;
using Clock = std::chrono::steady_clock;
using Group = std::vector<std::shared_ptr<GlooCommunicator>>;

namespace {

const std::vector<int64_t> kNumels = {1, 7, 1001, 262147}; // the last is > 256K elements
const std::vector<ReduceOp> kOps = {ReduceOp::sum, ReduceOp::avg, ReduceOp::min, ReduceOp::max,
                                    ReduceOp::product};

using test::run_ranks;

/// `size` communicators rendezvoused concurrently, each rank through its own PrefixStore
/// over one shared store.
Group make_group(int size, GlooOptions options = {}) {
  static std::atomic<int> attempt{0};
  auto store = std::make_shared<InMemoryStore>();
  auto prefix = "attempt" + std::to_string(attempt++);
  Group group(size);
  run_ranks(size, [&](int rank) {
    group[rank] =
      GlooCommunicator::create(std::make_shared<PrefixStore>(prefix, store), rank, size, options);
  });
  return group;
}

/// Rank `rank`'s input: values of magnitude 0.5 to 1.5 with random signs (so that
/// products stay finite), or integers from -3 to 3.
at::Tensor input_of(int rank, int64_t numel, at::ScalarType dtype) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + rank);
  if (!at::isFloatingType(dtype))
    return at::randint(-3, 4, {numel}, gen, at::TensorOptions(dtype));
  auto magnitude = at::rand({numel}, gen, at::kDouble) + 0.5;
  auto sign = at::randint(0, 2, {numel}, gen, at::kDouble) * 2 - 1;
  return (magnitude * sign).to(dtype);
}

/// The reduction of every rank's input, computed in float64 on one rank.
at::Tensor reference(ReduceOp op, const std::vector<at::Tensor>& inputs) {
  auto all = at::stack(inputs).to(at::kDouble);
  switch (op) {
    case ReduceOp::sum: return all.sum(0);
    case ReduceOp::avg: return all.sum(0) / static_cast<double>(inputs.size());
    case ReduceOp::min: return all.amin(0);
    case ReduceOp::max: return all.amax(0);
    case ReduceOp::product: return all.prod(0);
  }
  return {};
}

bool close_to(const at::Tensor& actual, const at::Tensor& expected) {
  auto dtype = actual.scalar_type();
  if (!at::isFloatingType(dtype))
    return at::equal(actual.to(at::kDouble), expected);
  double tolerance = dtype == at::kDouble ? 1e-12
                   : dtype == at::kFloat  ? 1e-5
                   : dtype == at::kHalf   ? 1e-2
                                          : 5e-2;
  return at::allclose(actual.to(at::kDouble), expected, tolerance, tolerance);
}

/// The Error `fn` throws; fails the test when it throws none.
Error error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e;
  }
  FAIL("no caftrain::Error was thrown");
  return Error(Errc::none, "");
}

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

/// What a rank saw when it waited for a collective that was to fail.
struct Outcome {
  Errc code = Errc::none;
  std::string message;
  Clock::time_point at;
};

Outcome outcome_of(const std::shared_ptr<Work>& work) {
  Outcome outcome;
  try {
    work->wait();
  } catch (const Error& e) {
    outcome.code = e.code();
    outcome.message = e.what();
  }
  outcome.at = Clock::now();
  return outcome;
}

} // namespace

TEST_CASE("allreduce matches a reference for every op on 1 to 4 ranks", "[communicator]") {
  for (int size = 1; size <= 4; ++size) {
    auto group = make_group(size);
    for (auto dtype : {at::kFloat, at::kDouble, at::kLong}) {
      for (auto numel : kNumels) {
        std::vector<ReduceOp> ops;
        for (auto op : kOps)
          if (op != ReduceOp::avg || at::isFloatingType(dtype))
            ops.push_back(op);
        // results[rank][i]: rank's tensor after ops[i]; all issued before any wait.
        std::vector<std::vector<at::Tensor>> results(size);
        run_ranks(size, [&](int rank) {
          std::vector<std::shared_ptr<Work>> works;
          for (auto op : ops) {
            results[rank].push_back(input_of(rank, numel, dtype));
            works.push_back(group[rank]->allreduce(results[rank].back(), op));
          }
          for (auto& work : works)
            work->wait();
        });
        std::vector<at::Tensor> inputs;
        for (int rank = 0; rank < size; ++rank)
          inputs.push_back(input_of(rank, numel, dtype));
        for (size_t i = 0; i < ops.size(); ++i) {
          auto expected = reference(ops[i], inputs);
          for (int rank = 0; rank < size; ++rank) {
            INFO(size << " ranks, rank " << rank << ", " << c10::toString(dtype) << ", numel "
                      << numel << ", " << to_string(ops[i]));
            CHECK(close_to(results[rank][i], expected));
          }
        }
      }
    }
  }
}

TEST_CASE("allreduce reduces float16 and bfloat16 within their precision", "[communicator]") {
  for (int size : {2, 3}) {
    auto group = make_group(size);
    for (auto dtype : {at::kHalf, at::kBFloat16}) {
      for (auto op : kOps) {
        std::vector<at::Tensor> results(size);
        run_ranks(size, [&](int rank) {
          results[rank] = input_of(rank, 1001, dtype);
          group[rank]->allreduce(results[rank], op)->wait();
        });
        std::vector<at::Tensor> inputs;
        for (int rank = 0; rank < size; ++rank)
          inputs.push_back(input_of(rank, 1001, dtype));
        auto expected = reference(op, inputs);
        for (int rank = 0; rank < size; ++rank) {
          INFO(size << " ranks, rank " << rank << ", " << c10::toString(dtype) << ", "
                    << to_string(op));
          CHECK(results[rank].scalar_type() == dtype);
          CHECK(close_to(results[rank], expected));
        }
      }
    }
  }
}

TEST_CASE("broadcast copies the root's tensor to every rank, from every root", "[communicator]") {
  for (int size = 1; size <= 4; ++size) {
    auto group = make_group(size);
    for (auto dtype : {at::kFloat, at::kDouble, at::kLong}) {
      for (auto numel : kNumels) {
        // results[rank][root]: rank's tensor after the broadcast from root.
        std::vector<std::vector<at::Tensor>> results(size);
        run_ranks(size, [&](int rank) {
          std::vector<std::shared_ptr<Work>> works;
          for (int root = 0; root < size; ++root) {
            results[rank].push_back(input_of(rank, numel, dtype));
            works.push_back(group[rank]->broadcast(results[rank].back(), root));
          }
          for (auto& work : works)
            work->wait();
        });
        for (int root = 0; root < size; ++root) {
          auto expected = input_of(root, numel, dtype);
          for (int rank = 0; rank < size; ++rank) {
            INFO(size << " ranks, root " << root << ", rank " << rank << ", "
                      << c10::toString(dtype) << ", numel " << numel);
            CHECK(at::equal(results[rank][root], expected));
          }
        }
      }
    }
  }
}

TEST_CASE("allgather concatenates every rank's input in rank order", "[communicator]") {
  for (int size = 1; size <= 4; ++size) {
    auto group = make_group(size);
    for (auto dtype : {at::kFloat, at::kDouble, at::kLong}) {
      for (auto numel : kNumels) {
        std::vector<at::Tensor> results(size);
        run_ranks(size, [&](int rank) {
          results[rank] = at::zeros({size * numel}, at::TensorOptions(dtype));
          group[rank]->allgather(input_of(rank, numel, dtype), results[rank])->wait();
        });
        std::vector<at::Tensor> inputs;
        for (int rank = 0; rank < size; ++rank)
          inputs.push_back(input_of(rank, numel, dtype));
        auto expected = at::cat(inputs);
        for (int rank = 0; rank < size; ++rank) {
          INFO(size << " ranks, rank " << rank << ", " << c10::toString(dtype) << ", numel "
                    << numel);
          CHECK(at::equal(results[rank], expected));
        }
      }
    }
  }
}

TEST_CASE("reduce_scatter leaves rank r the r-th chunk of the reduction, input untouched",
          "[communicator]") {
  for (int size = 1; size <= 4; ++size) {
    auto group = make_group(size);
    for (auto dtype : {at::kFloat, at::kDouble, at::kLong}) {
      for (auto chunk : kNumels) {
        std::vector<ReduceOp> ops;
        for (auto op : kOps)
          if (op != ReduceOp::avg || at::isFloatingType(dtype))
            ops.push_back(op);
        std::vector<std::vector<at::Tensor>> outputs(size);
        std::vector<at::Tensor> inputs_after(size);
        run_ranks(size, [&](int rank) {
          auto input = input_of(rank, size * chunk, dtype);
          std::vector<std::shared_ptr<Work>> works;
          for (auto op : ops) {
            outputs[rank].push_back(at::zeros({chunk}, at::TensorOptions(dtype)));
            works.push_back(group[rank]->reduce_scatter(input, outputs[rank].back(), op));
          }
          for (auto& work : works)
            work->wait();
          inputs_after[rank] = input;
        });
        std::vector<at::Tensor> inputs;
        for (int rank = 0; rank < size; ++rank)
          inputs.push_back(input_of(rank, size * chunk, dtype));
        for (size_t i = 0; i < ops.size(); ++i) {
          auto expected = reference(ops[i], inputs);
          for (int rank = 0; rank < size; ++rank) {
            INFO(size << " ranks, rank " << rank << ", " << c10::toString(dtype) << ", chunk "
                      << chunk << ", " << to_string(ops[i]));
            CHECK(close_to(outputs[rank][i], expected.narrow(0, rank * chunk, chunk)));
          }
        }
        for (int rank = 0; rank < size; ++rank)
          CHECK(at::equal(inputs_after[rank], inputs[rank]));
      }
    }
  }
}

TEST_CASE("barrier completes once every rank has reached it", "[communicator]") {
  for (int size = 1; size <= 4; ++size) {
    auto group = make_group(size);
    constexpr auto late = 200ms;
    std::vector<double> waited(size);
    run_ranks(size, [&](int rank) {
      if (rank == size - 1)
        std::this_thread::sleep_for(late);
      auto start = Clock::now();
      group[rank]->barrier()->wait();
      waited[rank] = ms_since(start);
    });
    for (int rank = 0; rank + 1 < size; ++rank) {
      INFO(size << " ranks, rank " << rank << " waited " << waited[rank] << " ms");
      CHECK(waited[rank] > 150);
    }
  }
}

TEST_CASE("collectives of different kinds issued back to back complete in issue order",
          "[communicator]") {
  constexpr int size = 3;
  auto group = make_group(size);
  std::vector<std::vector<at::Tensor>> results(size);
  run_ranks(size, [&](int rank) {
    auto& comm = *group[rank];
    std::vector<std::shared_ptr<Work>> works;
    auto& r = results[rank];
    for (int round = 0; round < 5; ++round) {
      r.push_back(at::full({10}, rank + round, at::kFloat));
      works.push_back(comm.allreduce(r.back()));
      r.push_back(at::full({3}, rank * 10 + round, at::kLong));
      works.push_back(comm.broadcast(r.back(), round % size));
      r.push_back(at::zeros({size * 2}, at::kDouble));
      works.push_back(comm.allgather(at::full({2}, rank, at::kDouble), r.back()));
      works.push_back(comm.barrier());
      r.push_back(at::zeros({4}, at::kFloat));
      works.push_back(comm.reduce_scatter(at::arange(size * 4, at::kFloat) * rank, r.back()));
    }
    for (auto& work : works)
      work->wait();
    for (auto& work : works)
      if (!work->is_completed() || work->exception())
        throw std::runtime_error("a completed work reports no completion or a failure");
  });
  for (int rank = 0; rank < size; ++rank) {
    auto& r = results[rank];
    for (int round = 0; round < 5; ++round) {
      INFO("rank " << rank << ", round " << round);
      CHECK(at::equal(r[4 * round], at::full({10}, 3 + 3 * round, at::kFloat)));
      CHECK(at::equal(r[4 * round + 1], at::full({3}, (round % size) * 10 + round, at::kLong)));
      CHECK(at::equal(r[4 * round + 2],
                      at::tensor({0.0, 0.0, 1.0, 1.0, 2.0, 2.0}, at::kDouble)));
      CHECK(at::equal(r[4 * round + 3], at::arange(rank * 4, rank * 4 + 4, at::kFloat) * 3));
    }
  }
}

TEST_CASE("bad inputs are refused at once with errors that name the problem",
          "[communicator]") {
  auto group = make_group(2);
  auto& comm = *group[1];
  auto check = [](const std::function<void()>& call, const std::string& needle) {
    auto e = error_of(call);
    CHECK(e.code() == Errc::invalid_argument);
    CHECK_THAT(e.what(), Contains(needle) && Contains("rank 1"));
  };
  check([&] { comm.allreduce(at::ones({4, 4}).t().narrow(0, 0, 2)); }, "not contiguous");
  check([&] { comm.allreduce(at::empty({4}, at::TensorOptions().device(at::kMeta))); },
        "CPU tensors only");
  check([&] { comm.allreduce(at::ones({4}, at::kBool)); }, "does not support");
  check([&] { comm.allreduce(at::ones({4}, at::kLong), ReduceOp::avg); }, "avg of an integer");
  check([&] { comm.allreduce(at::Tensor()); }, "undefined");
  check([&] { comm.broadcast(at::ones({4}), 2); }, "root 2 is not a rank");
  check([&] { comm.allgather(at::ones({4}), at::ones({7})); }, "size() * input.numel()");
  check([&] { comm.allgather(at::ones({4}), at::ones({8}, at::kDouble)); }, "must match");
  check([&] { comm.reduce_scatter(at::ones({7}), at::ones({4})); }, "size() * output.numel()");
  check([&] { comm.reduce_scatter(at::ones({8}, at::kInt), at::ones({4}, at::kInt),
                                  ReduceOp::avg); },
        "avg of an integer");

  auto store = std::make_shared<InMemoryStore>();
  CHECK(error_of([&] { GlooCommunicator::create(store, 2, 2); }).code() ==
        Errc::invalid_argument);
  CHECK(error_of([&] { GlooCommunicator::create(store, 0, 0); }).code() ==
        Errc::invalid_argument);
  CHECK(error_of([&] { GlooCommunicator::create(nullptr, 0, 1); }).code() ==
        Errc::invalid_argument);
  CHECK(error_of([&] { GlooCommunicator::create(store, 0, 1, {std::chrono::milliseconds{0}}); })
          .code() == Errc::invalid_argument);

  // The group still works: nothing was enqueued by the refused calls.
  run_ranks(2, [&](int rank) { group[rank]->barrier()->wait(); });
}

TEST_CASE("a rendezvous that a rank never joins fails with collective_timeout",
          "[communicator]") {
  for (int rank : {0, 1}) {
    auto store = std::make_shared<PrefixStore>("lonely", std::make_shared<InMemoryStore>());
    auto start = Clock::now();
    auto e = error_of([&] { GlooCommunicator::create(store, rank, 2, {300ms}); });
    auto elapsed = ms_since(start);
    INFO("rank " << rank << " gave up after " << elapsed << " ms: " << e.what());
    CHECK(e.code() == Errc::collective_timeout);
    CHECK_THAT(e.what(), Contains("rank " + std::to_string(rank)));
    CHECK(elapsed < 300 + 1000);
  }
}

TEST_CASE("a collective that a rank never joins times out on the others", "[communicator]") {
  constexpr auto timeout = 500ms;
  SECTION("on 2 ranks") {
    auto group = make_group(2, {timeout});
    auto start = Clock::now();
    auto outcome = outcome_of(group[0]->allreduce(at::ones({100})));
    auto elapsed = std::chrono::duration<double, std::milli>(outcome.at - start).count();
    INFO(outcome.message << " after " << elapsed << " ms");
    CHECK(outcome.code == Errc::collective_timeout);
    CHECK_THAT(outcome.message, Contains("allreduce") && Contains("rank 0") &&
                                  Contains("500 ms"));
    CHECK(elapsed >= 450);
    CHECK(elapsed < 500 + 1000);
    // The communicator is unusable afterwards, and says why.
    auto later = outcome_of(group[0]->barrier());
    CHECK(later.code == Errc::collective_aborted);
    CHECK_THAT(later.message, Contains("barrier") && Contains("earlier collective failed"));
  }
  SECTION("on 3 ranks") {
    auto group = make_group(3, {timeout});
    std::vector<Outcome> outcomes(2);
    auto start = Clock::now();
    run_ranks(2, [&](int rank) {
      outcomes[rank] = outcome_of(group[rank]->allreduce(at::ones({100})));
    });
    for (int rank = 0; rank < 2; ++rank) {
      auto elapsed = std::chrono::duration<double, std::milli>(outcomes[rank].at - start).count();
      INFO("rank " << rank << ": " << outcomes[rank].message << " after " << elapsed << " ms");
      // The first rank to time out closes its connections, which may abort the other
      // before its own timeout.
      CHECK((outcomes[rank].code == Errc::collective_timeout ||
             outcomes[rank].code == Errc::collective_aborted));
      CHECK(elapsed < 500 + 1000);
    }
    CHECK((outcomes[0].code == Errc::collective_timeout ||
           outcomes[1].code == Errc::collective_timeout));
  }
}

TEST_CASE("Work::wait with a short timeout gives up while the collective goes on",
          "[communicator]") {
  auto group = make_group(2, {5000ms});
  std::vector<at::Tensor> results(2);
  std::vector<Errc> first(2, Errc::none);
  run_ranks(2, [&](int rank) {
    results[rank] = at::full({8}, rank + 1.0);
    if (rank == 1)
      std::this_thread::sleep_for(300ms);
    auto work = group[rank]->allreduce(results[rank]);
    if (rank == 0) {
      try {
        work->wait(50ms);
      } catch (const Error& e) {
        first[rank] = e.code();
      }
    }
    work->wait();
  });
  CHECK(first[0] == Errc::collective_timeout);
  CHECK(at::equal(results[0], at::full({8}, 3.0)));
  CHECK(at::equal(results[1], at::full({8}, 3.0)));
}

TEST_CASE("closing one rank unblocks the ranks waiting in a collective at once",
          "[communicator]") {
  for (int size : {2, 4}) {
    auto group = make_group(size, {10000ms});
    std::vector<Outcome> outcomes(size);
    Clock::time_point closed_at;
    std::atomic<int> waiting{0};
    run_ranks(size, [&](int rank) {
      if (rank == 0) {
        while (waiting < size - 1)
          std::this_thread::sleep_for(1ms);
        std::this_thread::sleep_for(100ms); // the others are inside wait() by now
        closed_at = Clock::now();
        group[0]->close();
        return;
      }
      auto work = group[rank]->allreduce(at::ones({1000}));
      ++waiting;
      outcomes[rank] = outcome_of(work);
    });
    CHECK(group[0]->closed());
    for (int rank = 1; rank < size; ++rank) {
      auto latency = std::chrono::duration<double, std::milli>(outcomes[rank].at - closed_at);
      INFO(size << " ranks, rank " << rank << ": " << outcomes[rank].message);
      CHECK(outcomes[rank].code == Errc::collective_aborted);
      CHECK(latency.count() < 250); // against a 10 s timeout
    }
  }
}

TEST_CASE("close fails this rank's own pending work at once, even while gloo blocks it",
          "[communicator]") {
  // Rank 1 never joins, so rank 0's communication thread stays blocked in gloo.
  auto group = make_group(2, {2000ms});
  auto pending = group[0]->allreduce(at::ones({1000}));
  auto queued = group[0]->barrier();
  std::this_thread::sleep_for(100ms);
  auto closed_at = Clock::now();
  std::thread closer([&] { group[0]->close(); });
  auto outcome = outcome_of(pending);
  closer.join();
  group[0]->close(); // idempotent
  auto latency = std::chrono::duration<double, std::milli>(outcome.at - closed_at).count();
  INFO(outcome.message);
  CHECK(outcome.code == Errc::collective_aborted);
  CHECK_THAT(outcome.message, Contains("allreduce") && Contains("closed"));
  CHECK(latency < 250);
  CHECK(outcome_of(queued).code == Errc::collective_aborted);
  CHECK(pending->is_completed());
  CHECK(pending->exception() != nullptr);

  auto start = Clock::now();
  group[0].reset(); // its thread is still inside gloo: the destructor must not wait for it
  CHECK(ms_since(start) < 500);
}

TEST_CASE("collectives after close fail at once", "[communicator]") {
  auto group = make_group(2);
  group[1]->close();
  REQUIRE(group[1]->closed());
  auto& comm = *group[1];
  std::vector<std::shared_ptr<Work>> works = {
    comm.allreduce(at::ones({4})), comm.broadcast(at::ones({4})),
    comm.allgather(at::ones({2}), at::ones({4})), comm.reduce_scatter(at::ones({4}), at::ones({2})),
    comm.barrier()};
  for (auto& work : works) {
    auto start = Clock::now();
    auto outcome = outcome_of(work);
    CHECK(outcome.code == Errc::collective_aborted);
    CHECK_THAT(outcome.message, Contains("closed"));
    CHECK(ms_since(start) < 50);
  }
  // The peer's next collective fails promptly too: its connection was reset.
  auto start = Clock::now();
  CHECK(outcome_of(group[0]->allreduce(at::ones({4}))).code == Errc::collective_aborted);
  CHECK(ms_since(start) < 1000);
}

TEST_CASE("the destructor of a communicator whose peer vanished returns quickly",
          "[communicator]") {
  auto group = make_group(2, {5000ms});
  auto pending = group[0]->allreduce(at::ones({1000}));
  group[1].reset(); // the peer vanishes: its destructor closes its connections
  CHECK(outcome_of(pending).code == Errc::collective_aborted);
  auto start = Clock::now();
  group[0].reset();
  CHECK(ms_since(start) < 500);
}

TEST_CASE("a peer closing in the middle of a transfer does not kill the process with SIGPIPE",
          "[communicator]") {
  // gloo writes with writev, which raises SIGPIPE on a reset connection. Whether a write
  // meets the reset depends on timing, hence rounds that close at different moments.
  for (int round = 0; round < 20; ++round) {
    GlooOptions options;
    options.timeout = std::chrono::seconds(5);
    auto group = make_group(2, options);
    std::vector<Outcome> outcomes(2);
    run_ranks(2, [&](int rank) {
      auto work = group[rank]->allreduce(at::ones({1 << 22})); // 16 MiB: many writes
      if (rank == 1) {
        std::this_thread::sleep_for(std::chrono::microseconds(250 * round));
        group[1]->close();
      }
      outcomes[rank] = outcome_of(work);
    });
    for (int rank = 0; rank < 2; ++rank) {
      INFO("round " << round << ", rank " << rank << ": " << outcomes[rank].message);
      // Rank 0 may finish before the close lands; what matters is that we got here. On a
      // loaded machine the close can also race the transfer so that gloo never sees the
      // reset and rank 0 waits out its timeout (the trainer closes every rank, so in a
      // run rank 0's own close ends that wait at once).
      CHECK((outcomes[rank].code == Errc::none || outcomes[rank].code == Errc::collective_aborted ||
             outcomes[rank].code == Errc::collective_timeout));
    }
  }
}

TEST_CASE("ranks that pass different sizes, dtypes or operations get rank_mismatch naming each rank's request, not a crash", "[communicator]") {
  using Issue = std::function<std::shared_ptr<Work>(GlooCommunicator&, int rank)>;
  struct Case {
    const char* name;
    Issue issue;
    const char* rank0;
    const char* rank1;
  };
  std::vector<Case> cases = {
    {"allreduce sizes",
     [](GlooCommunicator& c, int r) { return c.allreduce(at::ones({r == 0 ? 100 : 200})); },
     "allreduce of 100 Float elements", "allreduce of 200 Float elements"},
    {"allreduce dtypes",
     [](GlooCommunicator& c, int r) {
       return c.allreduce(at::ones({8}, r == 0 ? at::kFloat : at::kDouble));
     },
     "allreduce of 8 Float elements", "allreduce of 8 Double elements"},
    {"allgather against broadcast",
     [](GlooCommunicator& c, int r) {
       return r == 0 ? c.allgather(at::ones({4}), at::empty({8})) : c.broadcast(at::ones({4}));
     },
     "allgather of 4", "broadcast of 4"},
    {"reduce_scatter sizes",
     [](GlooCommunicator& c, int r) {
       int64_t n = r == 0 ? 3 : 5;
       return c.reduce_scatter(at::ones({2 * n}), at::empty({n}));
     },
     "reduce_scatter of 3", "reduce_scatter of 5"},
  };
  for (auto& c : cases) {
    CAPTURE(c.name);
    auto group = make_group(2, {5s});
    std::vector<Outcome> outcomes(2);
    run_ranks(2, [&](int rank) { outcomes[rank] = outcome_of(c.issue(*group[rank], rank)); });
    for (int rank = 0; rank < 2; ++rank) {
      INFO("rank " << rank << ": " << outcomes[rank].message);
      CHECK(outcomes[rank].code == Errc::rank_mismatch);
      CHECK_THAT(outcomes[rank].message,
                 Contains(std::string("rank 0 issued ") + c.rank0) && Contains("rank 1 issued") &&
                   Contains(c.rank1) && Contains("same order"));
    }
  }
  // The same collectives with the same sizes still work on a fresh group, back to back.
  auto group = make_group(2);
  run_ranks(2, [&](int rank) {
    auto t = at::full({100}, static_cast<float>(rank + 1));
    group[rank]->allreduce(t)->wait();
    if (!at::equal(t, at::full({100}, 3.0f)))
      throw std::runtime_error("wrong sum");
  });
}

TEST_CASE("a run's store server answers gets once their key is set, times them out, fails them "
          "when the run stops them, and rendezvouses gloo ranks",
          "[communicator][store]") {
  test::ActorSystem a;
  auto server = a.sys.spawn(store_server);
  ActorStore store(a.sys, server);
  store.set("k", {'a', 'b'});
  CHECK(store.get("k", 1s) == std::vector<char>{'a', 'b'});

  // A get waits for the key, set later by another client.
  std::thread setter([&] {
    std::this_thread::sleep_for(100ms);
    ActorStore(a.sys, server).set("late", {'x'});
  });
  CHECK(store.get("late", 10s) == std::vector<char>{'x'});
  setter.join();

  // add counts from zero, and sets its key for a get waiting on it.
  CHECK(store.add("n", 2) == 2);
  CHECK(store.add("n", 3) == 5);
  std::thread adder([&] {
    std::this_thread::sleep_for(100ms);
    ActorStore(a.sys, server).add("m", 7);
  });
  auto m = store.get("m", 10s);
  adder.join();
  REQUIRE(m.size() == sizeof(int64_t));
  int64_t value = 0;
  std::memcpy(&value, m.data(), sizeof(value));
  CHECK(value == 7);

  // A key never set: the get times out with a message naming the key.
  auto start = Clock::now();
  CHECK_THROWS_WITH(store.get("never", 200ms), Contains("'never'") && Contains("not set in time"));
  CHECK(ms_since(start) < 3000);

  // The trainer stops an attempt: its ranks' waiting gets fail at once, not at their timeout.
  std::thread stopper([&] {
    std::this_thread::sleep_for(200ms);
    caf::anon_send(server, store_fail_atom::value, make_caf_error(Errc::cancelled, "the attempt stopped"));
  });
  start = Clock::now();
  CHECK_THROWS_WITH(store.get("waits", 60s), Contains("the attempt stopped"));
  stopper.join();
  CHECK(ms_since(start) < 10000);
  CHECK(store.get("k", 1s) == std::vector<char>{'a', 'b'}); // keys stay

  // Two gloo ranks meet through it, as a run's workers do.
  Group group(2);
  run_ranks(2, [&](int rank) {
    auto client = std::make_shared<ActorStore>(a.sys, server);
    group[rank] = GlooCommunicator::create(std::make_shared<PrefixStore>("attempt_0", client), rank, 2);
  });
  std::vector<at::Tensor> t = {torch::full({5}, 1.0), torch::full({5}, 2.0)};
  run_ranks(2, [&](int rank) { group[rank]->allreduce(t[rank])->wait(); });
  CHECK(torch::allclose(t[0], torch::full({5}, 3.0)));
  CHECK(torch::allclose(t[1], torch::full({5}, 3.0)));
  caf::anon_send_exit(server, caf::exit_reason::user_shutdown);
}

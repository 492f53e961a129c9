// LocalCommunicator: every collective against a reference, reduction on arrival, mismatches,
// timeouts, close and bad inputs.
#include <catch2/catch.hpp>

#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/error.hpp"
#include "environment/local_communicator.hpp"
#include "helpers.hpp"

using namespace caftrain;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;
using Clock = std::chrono::steady_clock;
using test::run_ranks;

namespace {

// Over 3 chunks of the local backend's 64K elements: chunks are claimed by several ranks.
const std::vector<int64_t> kNumels = {1, 7, 1001, 200003};

/// Rank `rank`'s input: distinct per rank and element, small enough for exact products.
at::Tensor input_of(int rank, int64_t numel, at::ScalarType dtype = at::kFloat) {
  auto base = at::arange(numel, at::kDouble).remainder(5).add(rank + 1);
  return base.to(dtype);
}

at::Tensor reference(ReduceOp op, const std::vector<at::Tensor>& inputs) {
  auto acc = inputs[0].clone();
  for (size_t r = 1; r < inputs.size(); ++r) {
    switch (op) {
      case ReduceOp::sum:
      case ReduceOp::avg: acc.add_(inputs[r]); break;
      case ReduceOp::product: acc.mul_(inputs[r]); break;
      case ReduceOp::min: acc = at::minimum(acc, inputs[r]); break;
      case ReduceOp::max: acc = at::maximum(acc, inputs[r]); break;
    }
  }
  if (op == ReduceOp::avg)
    acc.div_(static_cast<double>(inputs.size()));
  return acc;
}

Errc code_of(const std::shared_ptr<Work>& work, std::string* message = nullptr) {
  try {
    work->wait();
  } catch (const Error& e) {
    if (message)
      *message = e.what();
    return e.code();
  }
  return Errc::none;
}

/// Sets an environment variable for one scope (tests run one per process under ctest).
struct ScopedEnv {
  ScopedEnv(const char* name, const char* value) : name(name) {
    ::setenv(name, value, 1);
  }
  ~ScopedEnv() {
    ::unsetenv(name);
  }
  const char* name;
};

} // namespace

TEST_CASE("The local backend's collectives match a reference on 1 to 4 ranks, all issued before any wait", "[communicator][local]") {
  for (int size = 1; size <= 4; ++size) {
    for (auto numel : kNumels) {
      auto group = LocalCommunicator::create_group(size);
      const std::vector<ReduceOp> ops = {ReduceOp::sum, ReduceOp::avg, ReduceOp::min,
                                         ReduceOp::max, ReduceOp::product};
      std::vector<std::vector<at::Tensor>> reduced(static_cast<size_t>(size));
      std::vector<at::Tensor> broadcast(static_cast<size_t>(size)), gathered(static_cast<size_t>(size)),
        scattered(static_cast<size_t>(size)), scatter_in(static_cast<size_t>(size));
      run_ranks(size, [&](int rank) {
        auto r = static_cast<size_t>(rank);
        auto& comm = *group[r];
        std::vector<std::shared_ptr<Work>> works;
        for (auto op : ops) {
          reduced[r].push_back(input_of(rank, numel, at::kDouble));
          works.push_back(comm.allreduce(reduced[r].back(), op));
        }
        broadcast[r] = input_of(rank, numel);
        works.push_back(comm.broadcast(broadcast[r], size - 1));
        gathered[r] = at::zeros({numel * size});
        works.push_back(comm.allgather(input_of(rank, numel), gathered[r]));
        scatter_in[r] = input_of(rank, numel * size);
        scattered[r] = at::zeros({numel});
        works.push_back(comm.reduce_scatter(scatter_in[r], scattered[r], ReduceOp::sum));
        works.push_back(comm.barrier());
        for (auto& work : works)
          work->wait();
      });
      std::vector<at::Tensor> inputs, wide;
      for (int rank = 0; rank < size; ++rank) {
        inputs.push_back(input_of(rank, numel, at::kDouble));
        wide.push_back(input_of(rank, numel * size));
      }
      auto all = reference(ReduceOp::sum, wide);
      for (int rank = 0; rank < size; ++rank) {
        auto r = static_cast<size_t>(rank);
        CAPTURE(size, numel, rank);
        for (size_t i = 0; i < ops.size(); ++i) {
          CAPTURE(to_string(ops[i]));
          CHECK(at::allclose(reduced[r][i], reference(ops[i], inputs)));
        }
        CHECK(at::equal(broadcast[r], input_of(size - 1, numel)));
        for (int from = 0; from < size; ++from)
          CHECK(at::equal(gathered[r].narrow(0, from * numel, numel), input_of(from, numel)));
        CHECK(at::equal(scattered[r], all.narrow(0, rank * numel, numel)));
        CHECK(at::equal(scatter_in[r], input_of(rank, numel * size))); // input untouched
      }
    }
  }
}

TEST_CASE("The local backend reduces a collective when its last rank posts it, before any rank waits", "[communicator][local]") {
  // With CAFTRAIN_LOCAL_REDUCE_ON_ARRIVAL=0 the work is left to the waits: the switch the
  // benchmark compares, and proof that the default does it on arrival.
  for (bool on_arrival : {true, false}) {
    std::unique_ptr<ScopedEnv> env;
    if (!on_arrival)
      env = std::make_unique<ScopedEnv>("CAFTRAIN_LOCAL_REDUCE_ON_ARRIVAL", "0");
    for (int size : {1, 2, 3}) {
      CAPTURE(on_arrival, size);
      constexpr int64_t numel = 300007;
      auto group = LocalCommunicator::create_group(size);
      std::vector<at::Tensor> tensors(static_cast<size_t>(size));
      std::vector<std::shared_ptr<Work>> works(static_cast<size_t>(size));
      std::atomic<int> posted{0};
      std::vector<bool> done_before_wait(static_cast<size_t>(size), false);
      run_ranks(size, [&](int rank) {
        auto r = static_cast<size_t>(rank);
        tensors[r] = input_of(rank, numel);
        if (rank == size - 1) // the last to arrive, as a rank still in its backward
          while (posted.load() < size - 1)
            std::this_thread::sleep_for(1ms);
        works[r] = group[r]->allreduce(tensors[r]);
        ++posted;
        // Nobody has waited yet: the collective is done once the last rank's post returns.
        while (posted.load() < size)
          std::this_thread::sleep_for(1ms);
        done_before_wait[r] = works[r]->is_completed();
      });
      std::vector<at::Tensor> inputs;
      for (int rank = 0; rank < size; ++rank)
        inputs.push_back(input_of(rank, numel));
      auto expected = reference(ReduceOp::sum, inputs);
      for (size_t r = 0; r < static_cast<size_t>(size); ++r) {
        CAPTURE(r);
        CHECK(done_before_wait[r] == on_arrival);
        works[r]->wait();
        CHECK(at::equal(tensors[r], expected));
      }
    }
  }
}

TEST_CASE("The local backend refuses mismatched collectives by name, times out on a missing rank, and fails waiters at once on close", "[communicator][local]") {
  SECTION("different sizes or operations are rank_mismatch on every rank") {
    auto group = LocalCommunicator::create_group(2);
    std::vector<Errc> codes(2);
    std::vector<std::string> messages(2);
    run_ranks(2, [&](int rank) {
      std::shared_ptr<Work> work;
      try {
        work = rank == 0 ? group[0]->allreduce(at::ones({100})) : group[1]->allreduce(at::ones({200}));
      } catch (const Error& e) {
        codes[static_cast<size_t>(rank)] = e.code();
        messages[static_cast<size_t>(rank)] = e.what();
        return;
      }
      codes[static_cast<size_t>(rank)] = code_of(work, &messages[static_cast<size_t>(rank)]);
    });
    for (size_t r = 0; r < 2; ++r) {
      CAPTURE(r, messages[r]);
      CHECK(codes[r] == Errc::rank_mismatch);
      CHECK_THAT(messages[r], Contains("differs between ranks") && Contains("100") &&
                                Contains("200"));
    }
  }
  SECTION("a rank that never joins: the others time out naming it") {
    auto group = LocalCommunicator::create_group(3, 300ms);
    std::vector<Errc> codes(2);
    std::vector<std::string> messages(2);
    auto start = Clock::now();
    run_ranks(2, [&](int rank) {
      auto r = static_cast<size_t>(rank);
      codes[r] = code_of(group[r]->allreduce(at::ones({10})), &messages[r]);
    });
    auto elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    for (size_t r = 0; r < 2; ++r) {
      CAPTURE(r, messages[r]);
      CHECK(codes[r] == Errc::collective_timeout);
      CHECK_THAT(messages[r], Contains("missing ranks: 2") && Contains("300 ms"));
    }
    CHECK(elapsed < 2.0);
  }
  SECTION("closing one rank fails the others' waits at once, and every later collective") {
    auto group = LocalCommunicator::create_group(3, 10s);
    std::vector<Errc> codes(3, Errc::none);
    std::atomic<int> waiting{0};
    Clock::time_point closed_at;
    std::vector<Clock::time_point> failed_at(3);
    run_ranks(3, [&](int rank) {
      auto r = static_cast<size_t>(rank);
      if (rank == 0) {
        while (waiting.load() < 2)
          std::this_thread::sleep_for(1ms);
        std::this_thread::sleep_for(50ms); // the others are inside wait() by now
        closed_at = Clock::now();
        group[0]->close();
        return;
      }
      auto work = group[r]->allreduce(at::ones({1000}));
      ++waiting;
      codes[r] = code_of(work);
      failed_at[r] = Clock::now();
    });
    for (size_t r = 1; r < 3; ++r) {
      CAPTURE(r);
      CHECK(codes[r] == Errc::collective_aborted);
      CHECK(std::chrono::duration<double>(failed_at[r] - closed_at).count() < 0.25);
    }
    CHECK(group[1]->closed());
    CHECK_THROWS_AS(group[2]->barrier(), Error);
  }
  SECTION("bad inputs are refused at once, naming the problem") {
    auto group = LocalCommunicator::create_group(2);
    auto& comm = *group[0];
    CHECK_THROWS_WITH(comm.allreduce(at::ones({4, 4}).t()), Contains("not contiguous"));
    CHECK_THROWS_WITH(comm.allreduce(at::ones({4}, at::kLong), ReduceOp::avg),
                      Contains("avg of an integer tensor"));
    CHECK_THROWS_WITH(comm.allgather(at::ones({4}), at::ones({7})), Contains("size() * input.numel()"));
    CHECK_THROWS_WITH(comm.reduce_scatter(at::ones({7}), at::ones({4})), Contains("size() * output.numel()"));
    CHECK_THROWS_WITH(comm.broadcast(at::ones({4}), 2), Contains("root 2"));
    CHECK_THROWS_WITH(comm.allreduce(at::Tensor()), Contains("undefined tensor"));
  }
}

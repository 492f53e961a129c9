// NcclCommunicator: every collective against a reference on 1 to N GPUs, stream ordering,
// bad inputs, timeouts and close. GPU test cases (tag [gpu]) skip by name, with a warning,
// where no CUDA GPU is visible; the others run everywhere.
#include <catch2/catch.hpp>

#include <torch/torch.h>

#ifndef CAFTRAIN_WITH_NCCL

TEST_CASE("the NCCL tests are skipped in a build without the NCCL backend", "[nccl]") {
  WARN("skipped: this build has no NCCL backend (configure where CUDA and NCCL are installed, "
       "with -DCAFTRAIN_WITH_NCCL=AUTO or ON)");
}

#else

#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/error.hpp"
#include "environment/nccl_communicator.hpp"
#include "environment/store.hpp"
#include "helpers.hpp"

using namespace caftrain;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;
using Clock = std::chrono::steady_clock;
using Group = std::vector<std::shared_ptr<NcclCommunicator>>;

namespace {

const std::vector<int64_t> kNumels = {1, 7, 1001, 262147}; // the last is > 256K elements
const std::vector<ReduceOp> kOps = {ReduceOp::sum, ReduceOp::avg, ReduceOp::min, ReduceOp::max,
                                    ReduceOp::product};

int gpu_count() {
  return static_cast<int>(torch::cuda::device_count());
}

/// Ends the test case with a warning, which names it as skipped, unless this process sees
/// at least `n` CUDA GPUs.
#define SKIP_UNLESS_GPUS(n)                                                                \
  do {                                                                                     \
    if (!torch::cuda::is_available()) {                                                    \
      WARN("skipped: no CUDA GPU");                                                        \
      return;                                                                              \
    }                                                                                      \
    if (gpu_count() < (n)) {                                                               \
      WARN("skipped: needs " << (n) << " CUDA GPUs, found " << gpu_count());               \
      return;                                                                              \
    }                                                                                      \
  } while (false)

at::Device gpu(int index) {
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
}

using test::run_ranks;

/// `size` communicators rendezvoused concurrently, rank r on GPU r, each rank through its
/// own PrefixStore over one shared store.
Group make_group(int size, NcclOptions options = {}) {
  static std::atomic<int> attempt{0};
  auto store = std::make_shared<InMemoryStore>();
  auto prefix = "attempt" + std::to_string(attempt++);
  Group group(size);
  run_ranks(size, [&](int rank) {
    group[rank] =
      NcclCommunicator::create(std::make_shared<PrefixStore>(prefix, store), rank, size, options);
  });
  return group;
}

/// Runs one allreduce on every rank, so that NCCL has connected them: the collectives
/// after it are queued at once and only their kernels wait for the peers.
void connect_ranks(const Group& group) {
  auto size = static_cast<int>(group.size());
  run_ranks(size, [&](int rank) {
    group[rank]->allreduce(at::ones({4}, at::TensorOptions().device(gpu(rank))))->wait();
  });
}

/// Rank `rank`'s input on the CPU: values of magnitude 0.5 to 1.5 with random signs (so
/// that products stay finite), integers from -3 to 3, or from 0 to 3 for uint8.
at::Tensor input_of(int rank, int64_t numel, at::ScalarType dtype) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + rank);
  if (dtype == at::kByte)
    return at::randint(0, 4, {numel}, gen, at::TensorOptions(dtype));
  if (!at::isFloatingType(dtype))
    return at::randint(-3, 4, {numel}, gen, at::TensorOptions(dtype));
  auto magnitude = at::rand({numel}, gen, at::kDouble) + 0.5;
  auto sign = at::randint(0, 2, {numel}, gen, at::kDouble) * 2 - 1;
  return (magnitude * sign).to(dtype);
}

/// The reduction of every rank's input, computed in float64 on the CPU.
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
  auto host = actual.cpu().to(at::kDouble);
  if (!at::isFloatingType(dtype))
    return at::equal(host, expected);
  double tolerance = dtype == at::kDouble ? 1e-12
                   : dtype == at::kFloat  ? 1e-5
                   : dtype == at::kHalf   ? 1e-2
                                          : 5e-2;
  return at::allclose(host, expected, tolerance, tolerance);
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

Outcome outcome_of(const std::function<std::shared_ptr<Work>()>& issue) {
  Outcome outcome;
  try {
    issue()->wait();
  } catch (const Error& e) {
    outcome.code = e.code();
    outcome.message = e.what();
  }
  outcome.at = Clock::now();
  return outcome;
}

Outcome outcome_of(const std::shared_ptr<Work>& work) {
  return outcome_of([&] { return work; });
}

} // namespace

// -- without a GPU ----------------------------------------------------------------------

TEST_CASE("check_nccl_tensor refuses CPU, sparse, non-contiguous and unsupported tensors, "
          "naming the fix",
          "[nccl]") {
  auto check = [](const at::Tensor& tensor, const std::string& needle) {
    auto e = error_of([&] { check_nccl_tensor(tensor, 0, "nccl rank 1 of 2: allreduce: tensor"); });
    INFO(e.what());
    CHECK(e.code() == Errc::invalid_argument);
    CHECK_THAT(e.what(), Contains("rank 1") && Contains("allreduce") && Contains(needle));
  };
  check(at::ones({4}), "CUDA tensors only");
  check(at::ones({4}), "use the local or gloo backend for CPU tensors");
  check(at::ones({4}, at::kDouble), "tensor.to(\"cuda:0\")");
  check(at::empty({4}, at::TensorOptions().device(at::kMeta)), "is on meta");
  check(at::ones({4, 4}).t(), "not contiguous");
  check(at::ones({4, 4}).to_sparse(), "not a dense tensor");
  check(at::ones({4}, at::kBool), "does not support");
  check(at::ones({4}, at::kComplexFloat), "does not support");
  check(at::Tensor(), "undefined");
}

TEST_CASE("NcclCommunicator::create refuses bad arguments before it looks for a GPU", "[nccl]") {
  auto store = std::make_shared<InMemoryStore>();
  auto code_of = [&](std::shared_ptr<Store> s, int rank, int size, NcclOptions options) {
    return error_of([&] { NcclCommunicator::create(std::move(s), rank, size, options); }).code();
  };
  CHECK(code_of(store, 2, 2, {}) == Errc::invalid_argument);
  CHECK(code_of(store, -1, 2, {}) == Errc::invalid_argument);
  CHECK(code_of(store, 0, 0, {}) == Errc::invalid_argument);
  CHECK(code_of(nullptr, 0, 1, {}) == Errc::invalid_argument);
  CHECK(code_of(store, 0, 1, {0ms, -1}) == Errc::invalid_argument);
  CHECK(code_of(store, 0, 1, {1000ms, -2}) == Errc::invalid_argument);
}

TEST_CASE("creating an NcclCommunicator without a GPU fails with unavailable at once", "[nccl]") {
  if (torch::cuda::is_available()) {
    WARN("skipped: a CUDA GPU is present");
    return;
  }
  auto store = std::make_shared<InMemoryStore>();
  for (int rank : {0, 1}) {
    auto start = Clock::now();
    auto e = error_of([&] { NcclCommunicator::create(store, rank, 2, {30000ms}); });
    INFO(e.what());
    CHECK(e.code() == Errc::unavailable);
    CHECK_THAT(e.what(), Contains("rank " + std::to_string(rank)) && Contains("no CUDA GPU") &&
                           Contains("gloo"));
    CHECK(ms_since(start) < 1000); // not the 30 s timeout: the store is never read
  }
  // Rank 0 published no unique id either.
  CHECK(error_of([&] { store->wait({"nccl_unique_id"}, 10ms); }).code() ==
        Errc::collective_timeout);
}

// -- collectives ------------------------------------------------------------------------

TEST_CASE("NCCL allreduce matches a reference for every op on 1 to N GPUs", "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(1);
  for (int size = 1; size <= gpu_count(); ++size) {
    auto group = make_group(size);
    for (int rank = 0; rank < size; ++rank) {
      CHECK(group[rank]->backend() == "nccl");
      CHECK(group[rank]->rank() == rank);
      CHECK(group[rank]->size() == size);
      CHECK(group[rank]->device() == rank);
    }
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
            results[rank].push_back(input_of(rank, numel, dtype).to(gpu(rank)));
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

TEST_CASE("NCCL allreduce reduces float16, bfloat16, int32 and uint8 within their precision",
          "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(1);
  for (int size = 1; size <= gpu_count(); ++size) {
    auto group = make_group(size);
    for (auto dtype : {at::kHalf, at::kBFloat16, at::kInt, at::kByte}) {
      for (auto op : kOps) {
        // avg refuses integers; a product of uint8 inputs wraps around.
        if ((op == ReduceOp::avg && !at::isFloatingType(dtype)) ||
            (op == ReduceOp::product && dtype == at::kByte))
          continue;
        std::vector<at::Tensor> results(size);
        run_ranks(size, [&](int rank) {
          results[rank] = input_of(rank, 1001, dtype).to(gpu(rank));
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

TEST_CASE("NCCL broadcast copies the root's tensor to every rank, from every root",
          "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(1);
  for (int size = 1; size <= gpu_count(); ++size) {
    auto group = make_group(size);
    for (auto dtype : {at::kFloat, at::kDouble, at::kLong, at::kByte}) {
      for (auto numel : kNumels) {
        // results[rank][root]: rank's tensor after the broadcast from root.
        std::vector<std::vector<at::Tensor>> results(size);
        run_ranks(size, [&](int rank) {
          std::vector<std::shared_ptr<Work>> works;
          for (int root = 0; root < size; ++root) {
            results[rank].push_back(input_of(rank, numel, dtype).to(gpu(rank)));
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
            CHECK(at::equal(results[rank][root].cpu(), expected));
          }
        }
      }
    }
  }
}

TEST_CASE("NCCL allgather concatenates every rank's input in rank order", "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(1);
  for (int size = 1; size <= gpu_count(); ++size) {
    auto group = make_group(size);
    for (auto dtype : {at::kFloat, at::kDouble, at::kLong, at::kBFloat16}) {
      for (auto numel : kNumels) {
        std::vector<at::Tensor> results(size);
        run_ranks(size, [&](int rank) {
          results[rank] = at::zeros({size * numel}, at::TensorOptions(dtype).device(gpu(rank)));
          group[rank]->allgather(input_of(rank, numel, dtype).to(gpu(rank)), results[rank])->wait();
        });
        std::vector<at::Tensor> inputs;
        for (int rank = 0; rank < size; ++rank)
          inputs.push_back(input_of(rank, numel, dtype));
        auto expected = at::cat(inputs);
        for (int rank = 0; rank < size; ++rank) {
          INFO(size << " ranks, rank " << rank << ", " << c10::toString(dtype) << ", numel "
                    << numel);
          CHECK(at::equal(results[rank].cpu(), expected));
        }
      }
    }
  }
}

TEST_CASE("NCCL reduce_scatter leaves rank r the r-th chunk of the reduction, input untouched",
          "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(1);
  for (int size = 1; size <= gpu_count(); ++size) {
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
          auto input = input_of(rank, size * chunk, dtype).to(gpu(rank));
          std::vector<std::shared_ptr<Work>> works;
          for (auto op : ops) {
            outputs[rank].push_back(at::zeros({chunk}, at::TensorOptions(dtype).device(gpu(rank))));
            works.push_back(group[rank]->reduce_scatter(input, outputs[rank].back(), op));
          }
          for (auto& work : works)
            work->wait();
          inputs_after[rank] = input.cpu();
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

TEST_CASE("NCCL collectives of empty tensors complete", "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(1);
  auto group = make_group(1);
  auto empty = at::empty({0}, at::TensorOptions().device(gpu(0)));
  group[0]->allreduce(empty)->wait();
  group[0]->broadcast(empty)->wait();
  group[0]->allgather(empty, empty)->wait();
  group[0]->reduce_scatter(empty, empty)->wait();
}

TEST_CASE("NCCL barrier completes once every rank has reached it", "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(1);
  for (int size = 1; size <= gpu_count(); ++size) {
    auto group = make_group(size);
    connect_ranks(group);
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

TEST_CASE("NCCL collectives of different kinds issued back to back complete in issue order",
          "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(1);
  const int size = gpu_count();
  auto group = make_group(size);
  std::vector<std::vector<at::Tensor>> results(size);
  run_ranks(size, [&](int rank) {
    auto& comm = *group[rank];
    auto on = [&](at::ScalarType dtype) { return at::TensorOptions(dtype).device(gpu(rank)); };
    std::vector<std::shared_ptr<Work>> works;
    auto& r = results[rank];
    for (int round = 0; round < 5; ++round) {
      r.push_back(at::full({10}, rank + round, on(at::kFloat)));
      works.push_back(comm.allreduce(r.back()));
      r.push_back(at::full({3}, rank * 10 + round, on(at::kLong)));
      works.push_back(comm.broadcast(r.back(), round % size));
      r.push_back(at::zeros({size * 2}, on(at::kDouble)));
      works.push_back(comm.allgather(at::full({2}, rank, on(at::kDouble)), r.back()));
      works.push_back(comm.barrier());
      r.push_back(at::zeros({4}, on(at::kFloat)));
      works.push_back(comm.reduce_scatter(at::arange(size * 4, on(at::kFloat)) * rank, r.back()));
    }
    for (auto& work : works)
      work->wait();
    for (auto& work : works)
      if (!work->is_completed() || work->exception())
        throw std::runtime_error("a completed work reports no completion or a failure");
  });
  auto rank_sum = size * (size - 1) / 2;
  auto gathered = at::arange(size, at::kDouble).repeat_interleave(2);
  for (int rank = 0; rank < size; ++rank) {
    auto& r = results[rank];
    for (int round = 0; round < 5; ++round) {
      INFO("rank " << rank << ", round " << round);
      CHECK(at::equal(r[4 * round].cpu(), at::full({10}, rank_sum + size * round, at::kFloat)));
      CHECK(at::equal(r[4 * round + 1].cpu(),
                      at::full({3}, (round % size) * 10 + round, at::kLong)));
      CHECK(at::equal(r[4 * round + 2].cpu(), gathered));
      CHECK(at::equal(r[4 * round + 3].cpu(),
                      at::arange(rank * 4, rank * 4 + 4, at::kFloat) * rank_sum));
    }
  }
}

TEST_CASE("an NCCL collective sees the computation queued before it on the default stream",
          "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(1);
  for (int size = 1; size <= gpu_count(); ++size) {
    auto group = make_group(size);
    connect_ranks(group);
    std::vector<at::Tensor> results(size);
    run_ranks(size, [&](int rank) {
      auto on = at::TensorOptions(at::kFloat).device(gpu(rank));
      // Tens of milliseconds of matrix products queued on the default stream; the tensor
      // to reduce is written only after them. A collective that did not wait for the
      // default stream would read the ones.
      auto m = at::randn({4096, 4096}, on) / 128.0; // norm near 1: no overflow
      auto busy = m;
      for (int i = 0; i < 20; ++i)
        busy = busy.mm(m);
      auto x = at::ones({1 << 20}, on);
      x.add_(busy.sum().mul(0)).add_(1.0); // 2, once the products are done
      auto work = group[rank]->allreduce(x);
      work->wait();
      results[rank] = x.mul(3.0).cpu(); // queued after the collective
    });
    for (int rank = 0; rank < size; ++rank) {
      INFO(size << " ranks, rank " << rank);
      CHECK(at::equal(results[rank], at::full({1 << 20}, 6.0f * size)));
    }
  }
}

// -- bad inputs -------------------------------------------------------------------------

TEST_CASE("bad inputs to NCCL collectives are refused at once with errors that name the "
          "problem",
          "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(1);
  auto group = make_group(1);
  auto& comm = *group[0];
  auto on = at::TensorOptions().device(gpu(0));
  auto check = [](const std::function<void()>& call, const std::string& needle) {
    auto e = error_of(call);
    INFO(e.what());
    CHECK(e.code() == Errc::invalid_argument);
    CHECK_THAT(e.what(), Contains(needle) && Contains("rank 0"));
  };
  check([&] { comm.allreduce(at::ones({4})); }, "CUDA tensors only");
  check([&] { comm.allreduce(at::ones({4, 4}, on).t()); }, "not contiguous");
  check([&] { comm.allreduce(at::ones({4}, on.dtype(at::kBool))); }, "does not support");
  check([&] { comm.allreduce(at::ones({4}, on.dtype(at::kLong)), ReduceOp::avg); },
        "avg of an integer");
  check([&] { comm.allreduce(at::Tensor()); }, "undefined");
  check([&] { comm.broadcast(at::ones({4}, on), 1); }, "root 1 is not a rank");
  check([&] { comm.allgather(at::ones({4}, on), at::ones({7}, on)); }, "size() * input.numel()");
  check([&] { comm.allgather(at::ones({4}, on), at::ones({4}, on.dtype(at::kDouble))); },
        "must match");
  check([&] { comm.allgather(at::ones({4}, on), at::ones({4})); }, "CUDA tensors only");
  check([&] { comm.reduce_scatter(at::ones({7}, on), at::ones({4}, on)); },
        "size() * output.numel()");
  check([&] { comm.reduce_scatter(at::ones({4}, on.dtype(at::kInt)),
                                  at::ones({4}, on.dtype(at::kInt)), ReduceOp::avg); },
        "avg of an integer");
  if (gpu_count() >= 2)
    check([&] { comm.allreduce(at::ones({4}, at::TensorOptions().device(gpu(1)))); },
          "drives cuda:0");
  else
    WARN("the wrong-device check needs 2 CUDA GPUs");

  // The communicator still works: the refused calls queued nothing.
  comm.barrier()->wait();
}

TEST_CASE("an NCCL device the process does not see is refused as unavailable", "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(1);
  auto store = std::make_shared<InMemoryStore>();
  auto e = error_of([&] { NcclCommunicator::create(store, 0, 1, {1000ms, gpu_count()}); });
  CHECK(e.code() == Errc::unavailable);
  CHECK_THAT(e.what(), Contains("NcclOptions::device"));
}

// -- timeouts, close, destruction -------------------------------------------------------

TEST_CASE("an NCCL rendezvous that a rank never joins fails with collective_timeout",
          "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(1);
  for (int rank : {0, 1}) {
    auto store = std::make_shared<PrefixStore>("lonely", std::make_shared<InMemoryStore>());
    auto start = Clock::now();
    auto e = error_of([&] { NcclCommunicator::create(store, rank, 2, {300ms}); });
    auto elapsed = ms_since(start);
    INFO("rank " << rank << " gave up after " << elapsed << " ms: " << e.what());
    CHECK(e.code() == Errc::collective_timeout);
    CHECK_THAT(e.what(), Contains("rank " + std::to_string(rank)));
    CHECK(elapsed < 300 + 2000);
  }
}

TEST_CASE("an NCCL collective that a rank never joins times out and aborts the communicator",
          "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(2);
  constexpr auto timeout = 500ms;
  // The first collectives block while NCCL connects the ranks; later ones are queued at
  // once and their kernels wait for the peer.
  for (bool connected : {false, true}) {
    auto group = make_group(2, {timeout});
    if (connected)
      connect_ranks(group);
    auto start = Clock::now();
    auto outcome = outcome_of([&] { return group[0]->allreduce(at::ones({100}, gpu(0))); });
    auto elapsed = std::chrono::duration<double, std::milli>(outcome.at - start).count();
    INFO((connected ? "connected: " : "first collective: ") << outcome.message << " after "
                                                             << elapsed << " ms");
    CHECK(outcome.code == Errc::collective_timeout);
    CHECK_THAT(outcome.message, Contains("allreduce") && Contains("rank 0") &&
                                  Contains("500 ms") && Contains("aborted"));
    CHECK(elapsed >= 450);
    CHECK(elapsed < 500 + 2000);
    // The communicator is unusable afterwards, and says why.
    auto later = outcome_of(group[0]->barrier());
    CHECK(later.code == Errc::collective_aborted);
    CHECK_THAT(later.message, Contains("barrier") && Contains("earlier collective failed"));
    CHECK_FALSE(group[0]->closed());
  }
}

TEST_CASE("Work::wait with a short timeout gives up while the NCCL collective goes on",
          "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(2);
  auto group = make_group(2, {5000ms});
  connect_ranks(group);
  std::vector<at::Tensor> results(2);
  std::vector<Errc> first(2, Errc::none);
  run_ranks(2, [&](int rank) {
    results[rank] = at::full({8}, rank + 1.0, at::TensorOptions().device(gpu(rank)));
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
  CHECK(at::equal(results[0].cpu(), at::full({8}, 3.0)));
  CHECK(at::equal(results[1].cpu(), at::full({8}, 3.0)));
}

TEST_CASE("closing an NCCL communicator fails its own pending work at once", "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(2);
  // Rank 1 never joins, so rank 0's allreduce kernel waits for it on the GPU.
  auto group = make_group(2, {10000ms});
  connect_ranks(group);
  auto pending = group[0]->allreduce(at::ones({1000}, gpu(0)));
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
  CHECK(latency < 250); // against a 10 s timeout
  CHECK(outcome_of(queued).code == Errc::collective_aborted);
  CHECK(pending->is_completed());
  CHECK(pending->exception() != nullptr);
  CHECK(group[0]->closed());

  auto start = Clock::now();
  group[0].reset();
  CHECK(ms_since(start) < 2500);
}

TEST_CASE("a peer of a closed NCCL rank fails by its own timeout at the latest",
          "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(2);
  // An aborted NCCL rank does not tell its peers: they stall until their timeout (or
  // until their own close, which the trainer sends every rank on teardown).
  auto group = make_group(2, {1000ms});
  connect_ranks(group);
  group[1]->close();
  auto start = Clock::now();
  auto outcome = outcome_of([&] { return group[0]->allreduce(at::ones({100}, gpu(0))); });
  INFO(outcome.message << " after " << ms_since(start) << " ms");
  CHECK((outcome.code == Errc::collective_timeout || outcome.code == Errc::collective_aborted));
  CHECK(ms_since(start) < 1000 + 2000);
}

TEST_CASE("NCCL collectives after close fail at once", "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(1);
  auto group = make_group(1);
  group[0]->close();
  REQUIRE(group[0]->closed());
  auto& comm = *group[0];
  auto on = at::TensorOptions().device(gpu(0));
  std::vector<std::shared_ptr<Work>> works = {
    comm.allreduce(at::ones({4}, on)), comm.broadcast(at::ones({4}, on)),
    comm.allgather(at::ones({2}, on), at::ones({2}, on)),
    comm.reduce_scatter(at::ones({2}, on), at::ones({2}, on)), comm.barrier()};
  for (auto& work : works) {
    auto start = Clock::now();
    auto outcome = outcome_of(work);
    CHECK(outcome.code == Errc::collective_aborted);
    CHECK_THAT(outcome.message, Contains("closed"));
    CHECK(ms_since(start) < 50);
  }
}

TEST_CASE("the destructor of an NCCL communicator with a collective pending returns quickly",
          "[nccl][gpu]") {
  SKIP_UNLESS_GPUS(2);
  auto group = make_group(2, {10000ms});
  connect_ranks(group);
  auto pending = group[0]->allreduce(at::ones({1000}, gpu(0)));
  auto start = Clock::now();
  group[0].reset(); // aborts: the kernel waiting for rank 1 ends
  CHECK(ms_since(start) < 2500);
  CHECK(outcome_of(pending).code == Errc::collective_aborted);
}

#endif // CAFTRAIN_WITH_NCCL

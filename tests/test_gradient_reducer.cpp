// GradientReducer: the bucket plan, launch order, transient buffers in flight, no_sync
// windows and unused parameters, below the strategies that use it.
#include <catch2/catch.hpp>

#include <algorithm>

#include "environment/local_communicator.hpp"
#include "helpers.hpp"
#include "strategies/gradient_reducer.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;

namespace {

/// Leaf parameters with the given sizes, each with a gradient of `value` everywhere.
std::vector<at::Tensor> leaves(const std::vector<int64_t>& sizes) {
  std::vector<at::Tensor> result;
  for (auto n : sizes)
    result.push_back(torch::zeros({n}, torch::kFloat).requires_grad_(true));
  return result;
}

std::vector<std::string> names_of(size_t n) {
  std::vector<std::string> names;
  for (size_t i = 0; i < n; ++i)
    names.push_back("p" + std::to_string(i));
  return names;
}

/// Gives parameter `k` a gradient (as backward would) and tells the reducer.
void produce(GradientReducer& reducer, std::vector<at::Tensor>& params, size_t k, float value) {
  auto& p = params[k];
  if (p.grad().defined())
    p.mutable_grad().add_(value);
  else
    p.mutable_grad() = torch::full_like(p, value);
  reducer.on_gradient(k);
}

} // namespace

TEST_CASE("plan_buckets: reverse registration order, first bucket small, new bucket at a dtype change",
          "[reducer]") {
  // 4-byte floats: 1000 elements = 4000 bytes.
  std::vector<at::Tensor> params{torch::zeros({1000}), torch::zeros({1000}), torch::zeros({1000}),
                                 torch::zeros({1000}, torch::kDouble), torch::zeros({1000})};
  auto plan = plan_buckets(params, 4000, 8000);
  // Reverse: 4 (first bucket, cap 4000: alone), 3 (double: its own), 2 1 (8000), 0.
  REQUIRE(plan.size() == 4);
  CHECK(plan[0] == std::vector<size_t>{4});
  CHECK(plan[1] == std::vector<size_t>{3});
  CHECK(plan[2] == std::vector<size_t>{2, 1});
  CHECK(plan[3] == std::vector<size_t>{0});
  // A parameter larger than the cap gets a bucket of its own, never none.
  auto big = plan_buckets({torch::zeros({10000}), torch::zeros({10})}, 100, 100);
  CHECK(big == std::vector<std::vector<size_t>>{{1}, {0}});
}

TEST_CASE("GradientReducer launches buckets in index order whatever order gradients arrive in",
          "[reducer]") {
  auto params = leaves({2, 3, 4, 5});
  auto buckets = contiguous_buckets(params, {{3}, {2, 1}, {0}});
  std::vector<size_t> launched;
  bool sync = true;
  GradientReducer::Policy policy{"test", true, false, 2};
  GradientReducer reducer(params, names_of(4), buckets, policy, nullptr, sync,
                          [&](size_t b, at::Tensor&) {
                            launched.push_back(b);
                            return std::shared_ptr<Work>();
                          });
  // Bucket 2 (parameter 0) completes first, but cannot launch before buckets 0 and 1.
  produce(reducer, params, 0, 1.0f);
  CHECK(launched.empty());
  produce(reducer, params, 1, 1.0f);
  CHECK(launched.empty()); // bucket 1 still waits for parameter 2
  produce(reducer, params, 3, 1.0f);
  CHECK(launched == std::vector<size_t>{0});
  produce(reducer, params, 2, 1.0f);
  CHECK(launched == std::vector<size_t>{0, 1, 2});
  // Persistent buffers: the gradients are views of the buckets.
  CHECK(params[1].grad().data_ptr() == reducer.view(1).data_ptr());
  CHECK(reducer.buffer(1).sum().item<float>() == Approx(7.0f)); // parameters 2 and 1: 4 + 3
  reducer.finish();

  SECTION("a parameter that gets its gradient twice in one step is an error naming it") {
    produce(reducer, params, 3, 1.0f);
    CHECK_THROWS_WITH(produce(reducer, params, 3, 1.0f), Contains("'p3' received its gradient twice"));
  }
  SECTION("a parameter without gradient is an error naming it, and the next step works") {
    produce(reducer, params, 3, 1.0f);
    CHECK_THROWS_WITH(reducer.finish(), Contains("p0, p1, p2 received no gradient"));
    launched.clear();
    for (size_t k : {3, 2, 1, 0})
      produce(reducer, params, k, 1.0f);
    reducer.finish();
    CHECK(launched == std::vector<size_t>{0, 1, 2});
  }
}

TEST_CASE("GradientReducer with transient buffers keeps at most in_flight buckets' buffers and "
          "folds every bucket once",
          "[reducer]") {
  auto params = leaves({4, 4, 4, 4, 4});
  auto buckets = contiguous_buckets(params, {{4}, {3}, {2}, {1}, {0}});
  bool sync = true;
  int64_t bytes = 0, peak = 0;
  std::vector<size_t> folded;
  std::vector<float> sums(5, 0.0f);
  GradientReducer::Policy policy{"test", false, true, 2};
  GradientReducer reducer(
    params, names_of(5), buckets, policy, nullptr, sync,
    [](size_t, at::Tensor&) { return std::shared_ptr<Work>(); },
    [&](size_t b, at::Tensor& buffer) {
      folded.push_back(b);
      sums[b] = buffer.sum().item<float>();
    },
    [&](int64_t delta) {
      bytes += delta;
      peak = std::max(peak, bytes);
    });
  for (size_t k = 5; k-- > 0;) {
    produce(reducer, params, k, static_cast<float>(k + 1));
    CHECK_FALSE(params[k].grad().defined()); // taken into the bucket's buffer
  }
  reducer.finish();
  CHECK(folded == std::vector<size_t>{0, 1, 2, 3, 4});
  // Bucket b holds parameter 4 - b, whose gradient was 5 - b everywhere.
  for (size_t b = 0; b < 5; ++b)
    CHECK(sums[b] == Approx(4.0f * static_cast<float>(5 - b)));
  CHECK(bytes == 0);
  CHECK(peak <= 3 * 16); // two in flight plus the one filling up
  CHECK(reducer.buffer_bytes() == 0);

  SECTION("inside a no_sync window nothing launches; the window's gradients add up") {
    sync = false;
    for (size_t k = 5; k-- > 0;)
      produce(reducer, params, k, 1.0f);
    reducer.finish(); // no synchronised backward: nothing to do
    CHECK(folded.size() == 5);
    sync = true;
    for (size_t k = 5; k-- > 0;)
      produce(reducer, params, k, 2.0f);
    reducer.finish();
    REQUIRE(folded.size() == 10);
    for (size_t b = 0; b < 5; ++b)
      CHECK(sums[b] == Approx(12.0f)); // 4 elements of 1 + 2
  }
}

TEST_CASE("GradientReducer over two ranks: opposite readiness orders, averages, and a parameter "
          "no rank used keeps no gradient",
          "[reducer]") {
  auto comms = LocalCommunicator::create_group(2, std::chrono::seconds(30));
  std::vector<std::vector<at::Tensor>> results(2);
  std::vector<std::vector<size_t>> unused(2);
  test::run_ranks(2, [&](int rank) {
    auto params = leaves({3, 3, 3});
    auto buckets = contiguous_buckets(params, {{2}, {1}, {0}});
    bool sync = true;
    GradientReducer::Policy policy{"test", true, true, 2};
    auto comm = comms[static_cast<size_t>(rank)];
    GradientReducer reducer(params, names_of(3), buckets, policy, comm, sync,
                            [comm](size_t, at::Tensor& buffer) {
                              return comm->allreduce(buffer, ReduceOp::avg);
                            });
    // Rank 0 produces 2 then 1; rank 1 produces 1 then 2; parameter 0 is used by no rank.
    std::vector<size_t> order = rank == 0 ? std::vector<size_t>{2, 1} : std::vector<size_t>{1, 2};
    for (auto k : order)
      produce(reducer, params, k, static_cast<float>(rank + 1) * static_cast<float>(k));
    reducer.finish();
    for (auto& p : params)
      results[static_cast<size_t>(rank)].push_back(p.grad().defined() ? p.grad().clone() : at::Tensor());
    unused[static_cast<size_t>(rank)] = reducer.unused();
  });
  for (int rank = 0; rank < 2; ++rank) {
    auto& r = results[static_cast<size_t>(rank)];
    CHECK_FALSE(r[0].defined()); // no rank used it
    CHECK(unused[static_cast<size_t>(rank)] == std::vector<size_t>{0});
    CHECK(torch::allclose(r[1], torch::full({3}, 1.5f))); // (1 + 2) / 2
    CHECK(torch::allclose(r[2], torch::full({3}, 3.0f))); // (2 + 4) / 2
  }
}

TEST_CASE("block_cache keeps large CPU blocks for reuse only while a user lives, up to its cap",
          "[reducer][block_cache]") {
  constexpr int64_t kMiB = 1 << 20;
  constexpr int64_t kFloats = 2 * kMiB / 4; // 2 MiB blocks
  auto options = torch::TensorOptions().dtype(torch::kFloat);
  REQUIRE(block_cache::cached_bytes() == 0);

  SECTION("without a user a freed block goes back to the allocator") {
    block_cache::empty(kFloats, options).fill_(1);
    CHECK(block_cache::cached_bytes() == 0);
  }

  SECTION("a freed block serves the next request of its size; trim and the last user free it") {
    auto user = std::make_unique<block_cache::User>();
    void* first = nullptr;
    {
      auto t = block_cache::empty(kFloats, options);
      first = t.data_ptr();
      t.fill_(3); // the memory is usable
      CHECK(t.sum().item<double>() == Approx(3.0 * kFloats));
    }
    CHECK(block_cache::cached_bytes() == 2 * kMiB);
    {
      auto again = block_cache::empty(kFloats, options);
      CHECK(again.data_ptr() == first); // the same block, not fresh pages
      CHECK(block_cache::cached_bytes() == 0);
      auto other = block_cache::empty(kFloats + 1, options); // another size: a new block
      CHECK(other.data_ptr() != first);
    }
    CHECK(block_cache::cached_bytes() == 4 * kMiB + 4);
    block_cache::trim();
    CHECK(block_cache::cached_bytes() == 0);

    block_cache::empty(kFloats, options);
    CHECK(block_cache::cached_bytes() == 2 * kMiB);
    user.reset(); // the last user: nothing stays cached after a fit
    CHECK(block_cache::cached_bytes() == 0);
  }

  SECTION("blocks under 1 MiB are never cached; the cache holds at most 3 of the largest block") {
    block_cache::User user;
    block_cache::empty(1000, options);
    CHECK(block_cache::cached_bytes() == 0);
    {
      std::vector<at::Tensor> blocks;
      for (int i = 0; i < 5; ++i)
        blocks.push_back(block_cache::empty(kFloats, options));
    }
    CHECK(block_cache::cached_bytes() == 3 * 2 * kMiB);
    block_cache::trim();
  }

  SECTION("allocate() gives DataPtrs that return to the cache") {
    block_cache::User user;
    {
      auto ptr = block_cache::allocate(2 * kMiB, c10::Device(c10::kCPU));
      CHECK(ptr.get() != nullptr);
      CHECK(ptr.device().is_cpu());
    }
    CHECK(block_cache::cached_bytes() == 2 * kMiB);
  }
  CHECK(block_cache::cached_bytes() == 0);
}

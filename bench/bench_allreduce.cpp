// Allreduce bandwidth of GlooCommunicator against raw gloo, 2 ranks as threads on loopback.
//
//   build-dir/bench/bench_allreduce
//
// For float32 buffers from 4 KiB to 64 MiB it times GlooCommunicator::allreduce(...)->wait()
// and gloo::allreduce on separately rendezvoused gloo contexts with the same algorithm,
// one operation of each in turn, and prints per size the median algorithm bandwidth
// (bytes / time) of both and their ratio, then the geometric mean of the ratios. The
// difference is the cost of our queue, communication thread and the cross-rank signature
// check (GlooOptions::check_signatures); a third column times ours without the check, and
// the last its ratio (checked / unchecked), the check's own cost. Medians of single
// operations, because on a busy machine a few operations wait a scheduler tick (4 ms).
#include <gloo/allreduce.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/hash_store.h>
#include <gloo/transport/tcp/device.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "bench/bench_util.hpp"
#include "environment/gloo_communicator.hpp"
#include "environment/store.hpp"

using namespace caftrain;
using Clock = std::chrono::steady_clock;

namespace {

using caftrain::bench::median;

constexpr int kRanks = 2;
constexpr size_t kBytesPerSize = 256u << 20; // repetitions move about this much per size,
constexpr int kMinRepetitions = 15;            // but no fewer than this
constexpr int kMaxRepetitions = 400;           // and no more than this
constexpr int kWarmup = 5;                     // untimed operations of each kind per size
constexpr std::chrono::milliseconds kTimeout{60000};
const std::vector<size_t> kSizes = {4u << 10, 64u << 10, 1u << 20, 4u << 20, 16u << 20, 64u << 20};

/// Runs `fn(rank)` on one thread per rank.
void run_ranks(const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  for (int rank = 0; rank < kRanks; ++rank)
    threads.emplace_back(fn, rank);
  for (auto& thread : threads)
    thread.join();
}

/// Raw gloo contexts, rendezvoused through gloo's own in-memory store.
std::vector<std::shared_ptr<gloo::Context>> raw_contexts() {
  gloo::rendezvous::HashStore store;
  std::vector<std::shared_ptr<gloo::Context>> contexts(kRanks);
  run_ranks([&](int rank) {
    gloo::transport::tcp::attr attr;
    attr.hostname = "127.0.0.1";
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<gloo::rendezvous::Context>(rank, kRanks);
    context->setTimeout(kTimeout);
    context->connectFullMesh(store, device);
    contexts[rank] = context;
  });
  return contexts;
}

std::vector<std::shared_ptr<GlooCommunicator>> our_communicators(bool check_signatures) {
  auto store = std::make_shared<InMemoryStore>();
  std::vector<std::shared_ptr<GlooCommunicator>> comms(kRanks);
  run_ranks([&](int rank) {
    GlooOptions options{kTimeout};
    options.check_signatures = check_signatures;
    comms[rank] = GlooCommunicator::create(std::make_shared<PrefixStore>("bench", store), rank,
                                           kRanks, options);
  });
  return comms;
}

void raw_allreduce(const std::shared_ptr<gloo::Context>& context, float* data, size_t count,
                   uint32_t tag) {
  gloo::AllreduceOptions opts(context);
  opts.setOutput(data, count);
  opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(
    &gloo::sum<float>));
  opts.setAlgorithm(gloo_allreduce_algorithm(count * sizeof(float), kRanks) ==
                        GlooAllreduceAlgorithm::bcube
                      ? gloo::AllreduceOptions::Algorithm::BCUBE
                      : gloo::AllreduceOptions::Algorithm::RING);
  opts.setTag(tag);
  gloo::allreduce(opts);
}

double seconds_of(const std::function<void()>& fn) {
  auto start = Clock::now();
  fn();
  return std::chrono::duration<double>(Clock::now() - start).count();
}


std::string human(size_t bytes) {
  return bytes >= (1u << 20) ? std::to_string(bytes >> 20) + " MiB"
                             : std::to_string(bytes >> 10) + " KiB";
}

} // namespace

int main() {
  auto comms = our_communicators(true);
  auto unchecked = our_communicators(false);
  auto contexts = raw_contexts();
  std::printf("allreduce, %d ranks as threads on loopback, float32, median of single "
              "operations, interleaved\n",
              kRanks);
  std::printf("%8s  %-9s %5s  %10s  %10s  %8s  %14s  %9s\n", "size", "algorithm", "reps",
              "ours GB/s", "raw GB/s", "ours/raw", "unchecked GB/s", "chk/unchk");
  double log_ratio_sum = 0, log_check_sum = 0;
  for (auto bytes : kSizes) {
    const size_t count = bytes / sizeof(float);
    const int reps = static_cast<int>(
      std::clamp<size_t>(kBytesPerSize / bytes, kMinRepetitions, kMaxRepetitions));
    std::vector<double> ours(reps), raw(reps), plain(reps); // seconds per op on rank 0
    run_ranks([&](int rank) {
      auto tensor = at::zeros({static_cast<int64_t>(count)}, at::kFloat);
      std::vector<float> buffer(count, 0.0f);
      uint32_t tag = 0;
      auto our_op = [&] { comms[rank]->allreduce(tensor)->wait(); };
      auto raw_op = [&] { raw_allreduce(contexts[rank], buffer.data(), count, tag++); };
      auto plain_op = [&] { unchecked[rank]->allreduce(tensor)->wait(); };
      for (int i = 0; i < kWarmup; ++i) { // first-touch pages, socket buffers, caches
        our_op();
        raw_op();
        plain_op();
      }
      for (int rep = 0; rep < reps; ++rep) {
        // Rotate which goes first, so that none always follows another.
        double t[3] = {0, 0, 0};
        std::function<void()> ops[3] = {our_op, raw_op, plain_op};
        for (int k = 0; k < 3; ++k) {
          int which = (rep + k) % 3;
          t[which] = seconds_of(ops[which]);
        }
        if (rank == 0) {
          ours[rep] = t[0];
          raw[rep] = t[1];
          plain[rep] = t[2];
        }
      }
    });
    double ours_gbs = bytes / median(ours) / 1e9;
    double raw_gbs = bytes / median(raw) / 1e9;
    double plain_gbs = bytes / median(plain) / 1e9;
    double ratio = ours_gbs / raw_gbs;
    double check = ours_gbs / plain_gbs;
    log_ratio_sum += std::log(ratio);
    log_check_sum += std::log(check);
    std::printf("%8s  %-9s %5d  %10.3f  %10.3f  %8.3f  %14.3f  %9.3f\n", human(bytes).c_str(),
                to_string(gloo_allreduce_algorithm(bytes, kRanks)), reps, ours_gbs, raw_gbs,
                ratio, plain_gbs, check);
  }
  std::printf("geometric mean of ours/raw over %zu sizes: %.3f\n", kSizes.size(),
              std::exp(log_ratio_sum / kSizes.size()));
  std::printf("geometric mean of checked/unchecked (the signature check's cost): %.3f\n",
              std::exp(log_check_sum / kSizes.size()));
  for (auto& context : contexts)
    context->closeConnections();
  return 0;
}

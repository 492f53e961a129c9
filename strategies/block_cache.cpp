#include "strategies/block_cache.hpp"

#include <algorithm>
#include <map>
#include <mutex>
#include <vector>

#include <torch/torch.h>

namespace caftrain::block_cache {

namespace {

/// A block the CPU allocator gave; `memory` frees it when the block is deleted.
struct Block {
  at::DataPtr memory;
  size_t bytes = 0;
};

struct Cache {
  std::mutex mtx;
  std::map<size_t, std::vector<Block*>> free; // by size
  int64_t cached = 0;
  int users = 0;
  size_t largest = 0; // the largest block asked for while a user lives
};

/// The cache holds at most this many of the largest block's bytes: about what FSDP has
/// gathered at once (two units, three with prefetch); a block beyond it is freed.
constexpr size_t kCapInLargest = 3;

Cache& cache() {
  static auto* instance = new Cache; // never destroyed: blocks may be freed at exit
  return *instance;
}

/// Blocks smaller than this come and go through the allocator as before (glibc keeps
/// them in its heap anyway).
constexpr size_t kMinBytes = 1u << 20;

void give_back(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  auto& c = cache();
  {
    std::lock_guard<std::mutex> guard(c.mtx);
    if (c.users > 0 &&
        static_cast<size_t>(c.cached) + block->bytes <= kCapInLargest * c.largest) {
      c.free[block->bytes].push_back(block);
      c.cached += static_cast<int64_t>(block->bytes);
      return;
    }
  }
  delete block; // no fit is using the cache: free it
}

Block* take(size_t bytes) {
  auto& c = cache();
  {
    std::lock_guard<std::mutex> guard(c.mtx);
    if (c.users > 0)
      c.largest = std::max(c.largest, bytes);
    auto it = c.free.find(bytes);
    if (it != c.free.end() && !it->second.empty()) {
      auto* block = it->second.back();
      it->second.pop_back();
      c.cached -= static_cast<int64_t>(bytes);
      return block;
    }
  }
  return new Block{c10::GetAllocator(c10::DeviceType::CPU)->allocate(bytes), bytes};
}

/// Takes every cached block out of the cache (mtx held); the caller deletes them.
std::vector<Block*> take_all(Cache& c) {
  std::vector<Block*> blocks;
  for (auto& [bytes, list] : c.free)
    blocks.insert(blocks.end(), list.begin(), list.end());
  c.free.clear();
  c.cached = 0;
  return blocks;
}

} // namespace

at::DataPtr allocate(size_t bytes, c10::Device device) {
  if (!device.is_cpu() || bytes < kMinBytes)
    return c10::GetAllocator(device.type())->allocate(bytes);
  auto* block = take(bytes);
  return at::DataPtr(block->memory.get(), block, &give_back, device);
}

at::Tensor empty(int64_t numel, const at::TensorOptions& options) {
  auto bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (options.device().type() != c10::DeviceType::CPU || bytes < kMinBytes)
    return torch::empty({numel}, options);
  auto* block = take(bytes);
  return torch::from_blob(block->memory.get(), {numel}, [block](void*) { give_back(block); },
                          options.requires_grad(false));
}

User::User() {
  auto& c = cache();
  std::lock_guard<std::mutex> guard(c.mtx);
  ++c.users;
}

User::~User() {
  {
    auto& c = cache();
    std::lock_guard<std::mutex> guard(c.mtx);
    if (--c.users > 0)
      return;
    c.largest = 0;
  }
  trim(); // the last user: nothing stays cached
}

void trim() {
  std::vector<Block*> blocks;
  {
    auto& c = cache();
    std::lock_guard<std::mutex> guard(c.mtx);
    blocks = take_all(c);
  }
  for (auto* block : blocks)
    delete block; // outside the lock: frees the memory
}

int64_t cached_bytes() {
  auto& c = cache();
  std::lock_guard<std::mutex> guard(c.mtx);
  return c.cached;
}

} // namespace caftrain::block_cache

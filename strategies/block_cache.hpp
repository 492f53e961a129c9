// block_cache: reuse of the large CPU blocks the sharded strategies allocate and free every
// step. Internal to the strategies (not part of caftrain.hpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

namespace caftrain::block_cache {

/// A block of `bytes` on `device`. On the CPU it comes from the cache when a block of that
/// exact size was freed before, and goes back to the cache when its DataPtr is destroyed.
/// FSDP gathers and frees every unit twice a step, and the reducer's transient gradient
/// buffers come and go with their buckets: glibc serves blocks this large with mmap and
/// gives them back with munmap, so each step faulted hundreds of MiB of fresh, zeroed
/// pages in again (bench_sharded: FSDP 1.72x of DDP's step time, 1.15x with glibc told
/// to keep freed memory). As CUDA's caching allocator does on GPUs, the cache keeps them.
/// Other devices use their own allocator (CUDA's caches already).
at::DataPtr allocate(size_t bytes, c10::Device device);

/// An uninitialised 1-d tensor of `numel` elements whose memory is a cached block.
at::Tensor empty(int64_t numel, const at::TensorOptions& options);

/// Blocks are cached only while some `User` lives (a strategy's gradient reducer, from
/// setup to teardown): when the last one goes, the cached blocks are freed, and blocks
/// freed later go straight back to the allocator. Nothing stays cached after a fit.
class User {
 public:
  User();
  ~User();
  User(const User&) = delete;
  User& operator=(const User&) = delete;
};

/// Frees the cached blocks (not those in use). The sharded strategies call it after each
/// optimizer step, so that the cache never holds memory between steps: FSDP's memory at
/// rest stays what its shards take. Within a step, blocks freed by forward serve
/// backward's gathers and buffers freed by one bucket serve the next.
void trim();

/// Bytes of the blocks cached now (not in use).
int64_t cached_bytes();

} // namespace caftrain::block_cache

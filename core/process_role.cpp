#include "core/process_role.hpp"

#include <atomic>

namespace caftrain {

namespace {

std::atomic<bool> single_rank{false};

} // namespace

void set_single_rank_process() noexcept {
  single_rank = true;
}

bool single_rank_process() noexcept {
  return single_rank.load();
}

} // namespace caftrain

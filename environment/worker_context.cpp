#include "environment/worker_context.hpp"

namespace caftrain {

namespace {

thread_local WorkerRuntime* current = nullptr;

} // namespace

WorkerRuntime::~WorkerRuntime() = default;

WorkerRuntime* current_worker() noexcept {
  return current;
}

ScopedWorker::ScopedWorker(WorkerRuntime* worker) : previous_(current) {
  current = worker;
}

ScopedWorker::~ScopedWorker() {
  current = previous_;
}

} // namespace caftrain

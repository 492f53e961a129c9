#include "environment/communicator.hpp"

namespace caftrain {

const char* to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return "sum";
    case ReduceOp::avg: return "avg";
    case ReduceOp::min: return "min";
    case ReduceOp::max: return "max";
    case ReduceOp::product: return "product";
  }
  return "unknown";
}

Work::~Work() = default;

Communicator::~Communicator() = default;

} // namespace caftrain

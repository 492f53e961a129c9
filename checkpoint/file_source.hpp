// A file's content as a function that produces it: how a checkpoint snapshot holds files
// whose serialization runs later, on another thread.
#pragma once

#include <cstddef>
#include <functional>

namespace caftrain {

/// Receives a file's bytes in order, piece by piece.
using ByteSink = std::function<void(const char* data, size_t size)>;

/// Produces a file's bytes into a sink. A checkpoint snapshot holds its files as sources:
/// taken on the training thread (tensors copied), serialized wherever they are written.
using FileSource = std::function<void(const ByteSink& out)>;

} // namespace caftrain

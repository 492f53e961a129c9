#include "data/idx.hpp"

#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <vector>

#include <torch/types.h>

#include "core/error.hpp"

namespace caftrain::data {

namespace {

/// IDX element type code of unsigned bytes; MNIST-style files use no other.
constexpr int kIdxUbyte = 0x08;

/// Largest dimension count the format allows in practice (magic byte 3 is the count).
constexpr int kIdxMaxDims = 4;

struct GzCloser {
  void operator()(gzFile f) const {
    gzclose(f);
  }
};

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw Error(Errc::data_error, "IDX file '" + path + "': " + what);
}

/// Reads exactly `n` bytes or fails naming what was being read.
void read_exact(gzFile f, void* out, size_t n, const std::string& path, const char* what) {
  auto* dst = static_cast<char*>(out);
  size_t done = 0;
  while (done < n) {
    auto chunk = static_cast<unsigned>(std::min<size_t>(n - done, 1u << 30));
    int got = gzread(f, dst + done, chunk);
    if (got < 0) {
      int code = 0;
      const char* msg = gzerror(f, &code);
      fail(path, std::string("corrupt compressed data while reading the ") + what + " (" + msg +
                   "); download the file again");
    }
    if (got == 0)
      fail(path, std::string("truncated: the ") + what + " needs " + std::to_string(n) +
                   " bytes but the file ends after " + std::to_string(done) +
                   "; the file is incomplete, download it again");
    done += static_cast<size_t>(got);
  }
}

uint32_t big_endian(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}

} // namespace

at::Tensor read_idx(const std::string& path, int expected_dims) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    fail(path, "no such file; install the data set (apt-get install dataset-fashion-mnist) or "
               "pass the directory that holds it");
  std::unique_ptr<gzFile_s, GzCloser> file{gzopen(path.c_str(), "rb")};
  if (!file)
    fail(path, "cannot be opened for reading");
  unsigned char magic[4];
  read_exact(file.get(), magic, 4, path, "magic number");
  if (magic[0] != 0 || magic[1] != 0)
    fail(path, "wrong magic number (first two bytes must be zero); this is not an IDX file");
  if (magic[2] != kIdxUbyte)
    fail(path, "element type 0x" + std::to_string(magic[2]) +
                 " is not supported; only unsigned bytes (0x08) are");
  int dims = magic[3];
  if (dims < 1 || dims > kIdxMaxDims)
    fail(path, "declares " + std::to_string(dims) + " dimensions; expected 1 to " +
                 std::to_string(kIdxMaxDims));
  if (expected_dims > 0 && dims != expected_dims)
    fail(path, "has " + std::to_string(dims) + " dimensions where " +
                 std::to_string(expected_dims) + " are expected (images have 3, labels 1); "
                 "is it the right file?");
  std::vector<int64_t> shape(dims);
  int64_t numel = 1;
  for (int i = 0; i < dims; ++i) {
    unsigned char size[4];
    read_exact(file.get(), size, 4, path, "header");
    shape[i] = big_endian(size);
    numel *= shape[i];
  }
  auto result = torch::empty(shape, torch::kUInt8);
  read_exact(file.get(), result.data_ptr<uint8_t>(), static_cast<size_t>(numel), path, "data");
  return result;
}

} // namespace caftrain::data

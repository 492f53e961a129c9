// Data: the IDX reader, Fashion-MNIST, the distributed sampler and the loader.
#include <catch2/catch.hpp>
#include <zlib.h>

#include <fstream>
#include <set>

#include "helpers.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;

namespace {

const std::string fmnist = data::FashionMNIST::default_root;

/// Writes `bytes` gzip-compressed to `path`.
void write_gz(const std::string& path, const std::vector<unsigned char>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  if (!bytes.empty())
    REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) ==
            static_cast<int>(bytes.size()));
  gzclose(f);
}

std::vector<unsigned char> idx_header(unsigned char dims, std::vector<uint32_t> sizes) {
  std::vector<unsigned char> out = {0, 0, 0x08, dims};
  for (auto s : sizes)
    for (int shift = 24; shift >= 0; shift -= 8)
      out.push_back(static_cast<unsigned char>((s >> shift) & 0xff));
  return out;
}

} // namespace

TEST_CASE("read_idx loads the real Fashion-MNIST files with their shapes and labels", "[data]") {
  auto images = data::read_idx(fmnist + "/train-images-idx3-ubyte.gz", 3);
  auto labels = data::read_idx(fmnist + "/train-labels-idx1-ubyte.gz", 1);
  CHECK(images.sizes() == std::vector<int64_t>{60000, 28, 28});
  CHECK(labels.sizes() == std::vector<int64_t>{60000});
  CHECK(images.scalar_type() == torch::kUInt8);
  // Fashion-MNIST is balanced: 6000 training images per class, labels 0..9.
  auto counts = torch::bincount(labels.to(torch::kLong), {}, 10);
  CHECK(counts.eq(6000).all().item<bool>());
  // The first training image is an ankle boot (label 9), as in every copy of the set.
  CHECK(labels[0].item<int>() == 9);
  auto test_labels = data::read_idx(fmnist + "/t10k-labels-idx1-ubyte.gz", 1);
  CHECK(test_labels.size(0) == 10000);
}

TEST_CASE("FashionMNIST normalises images to [-1, 1] as the seed's Normalize(0.5, 0.5)", "[data]") {
  auto test = data::FashionMNIST::test();
  CHECK(test->length() == 10000);
  CHECK(test->data().sizes() == std::vector<int64_t>{10000, 1, 28, 28});
  CHECK(test->data().min().item<float>() == Approx(-1.0f));
  CHECK(test->data().max().item<float>() == Approx(1.0f));
  CHECK(test->targets().scalar_type() == torch::kLong);
}

TEST_CASE("Decoded data sets are kept once per machine and a damaged cache file is decoded anew", "[data]") {
  test::TempDir cache;
  ::setenv("CAFTRAIN_CACHE_DIR", cache.path().c_str(), 1);
  auto root = data::FashionMNIST::default_root;
  data::Normalize norm{0.25, 0.5};
  auto first = data::FashionMNIST::test(root, norm);
  std::vector<std::filesystem::path> files;
  for (auto& e : std::filesystem::directory_iterator(cache.path()))
    files.push_back(e.path());
  REQUIRE(files.size() == 1);
  auto size = std::filesystem::file_size(files[0]);
  CHECK(size == 64 + 10000 * 784 * 4 + 10000 * 8);
  // Other normalisations push it out of this process's own cache (4 entries): the next
  // read comes from the file, as in a new process.
  auto evict = [&] {
    for (double mean : {0.1, 0.2, 0.3, 0.4})
      data::FashionMNIST::test(root, {mean, 0.5});
  };
  evict();
  auto again = data::FashionMNIST::test(root, norm);
  CHECK(again->data().data_ptr() != first->data().data_ptr());
  CHECK(torch::equal(again->data(), first->data()));
  CHECK(torch::equal(again->targets(), first->targets()));
  // A truncated file is not used: the files are decoded again and the cache rewritten.
  std::filesystem::resize_file(files[0], size / 2);
  evict();
  auto decoded = data::FashionMNIST::test(root, norm);
  CHECK(torch::equal(decoded->data(), first->data()));
  CHECK(std::filesystem::file_size(files[0]) == size);
  ::unsetenv("CAFTRAIN_CACHE_DIR");
}

TEST_CASE("read_idx refuses broken files with an error naming the file and the problem", "[data]") {
  test::TempDir dir;
  SECTION("a missing file") {
    auto path = dir / "nothing.gz";
    CHECK_THROWS_WITH(data::read_idx(path), Contains(path) && Contains("no such file"));
  }
  SECTION("a wrong magic number") {
    auto path = dir / "magic.gz";
    write_gz(path, {1, 2, 3, 4, 0, 0, 0, 1});
    CHECK_THROWS_WITH(data::read_idx(path), Contains(path) && Contains("wrong magic number"));
  }
  SECTION("a truncated data section") {
    auto path = dir / "short.gz";
    auto bytes = idx_header(3, {10, 28, 28});
    bytes.resize(bytes.size() + 100); // 100 of 7840 pixels
    write_gz(path, bytes);
    CHECK_THROWS_WITH(data::read_idx(path, 3), Contains(path) && Contains("truncated") &&
                                                 Contains("7840 bytes"));
  }
  SECTION("a truncated gzip stream") {
    auto bytes = idx_header(1, {1000});
    bytes.resize(bytes.size() + 1000, 7);
    auto path = dir / "cut.gz";
    write_gz(path, bytes);
    auto size = std::filesystem::file_size(path);
    std::filesystem::resize_file(path, size / 2);
    CHECK_THROWS_WITH(data::read_idx(path, 1), Contains(path));
  }
  SECTION("labels where images are expected") {
    CHECK_THROWS_WITH(data::read_idx(fmnist + "/t10k-labels-idx1-ubyte.gz", 3),
                      Contains("1 dimensions where 3 are expected"));
  }
  SECTION("images and labels of different sets") {
    auto root = dir.path();
    write_gz(dir / "t10k-images-idx3-ubyte.gz", [] {
      auto b = idx_header(3, {2, 28, 28});
      b.resize(b.size() + 2 * 28 * 28);
      return b;
    }());
    write_gz(dir / "t10k-labels-idx1-ubyte.gz", [] {
      auto b = idx_header(1, {3});
      b.resize(b.size() + 3);
      return b;
    }());
    CHECK_THROWS_WITH(data::FashionMNIST::test(root), Contains("do not belong together"));
  }
}

TEST_CASE("A small IDX file round-trips through read_idx", "[data]") {
  test::TempDir dir;
  auto bytes = idx_header(2, {2, 3});
  for (unsigned char v : {1, 2, 3, 4, 5, 6})
    bytes.push_back(v);
  write_gz(dir / "m.gz", bytes);
  auto t = data::read_idx(dir / "m.gz", 2);
  CHECK(t.sizes() == std::vector<int64_t>{2, 3});
  CHECK(t[1][2].item<int>() == 6);
}

TEST_CASE("DistributedSampler gives each rank a disjoint share, reshuffled per epoch", "[data]") {
  for (int64_t world : {1, 2, 3, 4}) {
    CAPTURE(world);
    const size_t n = 103;
    std::multiset<size_t> seen;
    std::vector<std::vector<size_t>> shares;
    for (int64_t r = 0; r < world; ++r) {
      data::DistributedSampler s(n, {.num_replicas = world, .rank = r, .seed = 7});
      s.set_epoch(3);
      CHECK(s.num_samples() == (n + world - 1) / world);
      shares.push_back(s.indices());
      seen.insert(s.indices().begin(), s.indices().end());
    }
    // Every index appears; only the padding (to a multiple of world) repeats.
    std::set<size_t> unique(seen.begin(), seen.end());
    CHECK(unique.size() == n);
    CHECK(seen.size() - n == (world - n % world) % world);
    // Another epoch, another order; the same epoch, the same order.
    data::DistributedSampler a(n, {.num_replicas = world, .rank = 0, .seed = 7});
    a.set_epoch(3);
    CHECK(a.indices() == shares[0]);
    a.set_epoch(4);
    if (world < 4)
      CHECK(a.indices() != shares[0]);
  }
}

TEST_CASE("DistributedSampler draws the same order as PyTorch's DistributedSampler", "[data][python]") {
  if (test::python_with_torch().empty()) {
    WARN("skipped: Debian's python3-torch is not installed");
    return;
  }
  std::string out;
  REQUIRE(test::run_python(R"(
import torch
from torch.utils.data import DistributedSampler
s = DistributedSampler(list(range(50)), num_replicas=3, rank=1, shuffle=True, seed=11)
s.set_epoch(2)
print(" ".join(str(i) for i in s))
)", out) == 0);
  data::DistributedSampler s(50, {.num_replicas = 3, .rank = 1, .seed = 11});
  s.set_epoch(2);
  std::string ours;
  for (auto i : s.indices())
    ours += (ours.empty() ? "" : " ") + std::to_string(i);
  CHECK(ours + "\n" == out);
}

TEST_CASE("DataLoader yields batches of batch_size, the last one shorter unless dropped", "[data]") {
  auto ds = test::regression_data(10);
  data::DataLoader loader(ds, {.batch_size = 4});
  CHECK(loader.size() == 3);
  std::vector<int64_t> sizes;
  for (auto batch : loader)
    sizes.push_back(batch.data.size(0));
  CHECK(sizes == std::vector<int64_t>{4, 4, 2});
  data::DataLoader dropping(ds, {.batch_size = 4, .drop_last = true});
  CHECK(dropping.size() == 2);
  // Unshuffled batches follow the data set's order.
  CHECK(torch::equal(loader.batch(1).data, ds->data().slice(0, 4, 8)));
  SECTION("its distributed copies split the data") {
    auto r0 = loader.distributed(0, 2);
    auto r1 = loader.distributed(1, 2);
    CHECK(r0.num_samples() == 5);
    CHECK(torch::equal(r0.batch(0).data[1], ds->data()[2]));
    CHECK(torch::equal(r1.batch(0).data[1], ds->data()[3]));
  }
  SECTION("bad options are refused") {
    CHECK_THROWS_WITH(data::DataLoader(ds, {.batch_size = 0}), Contains("batch_size"));
    CHECK_THROWS_WITH(data::DataLoader(nullptr), Contains("null"));
    CHECK_THROWS_WITH(data::TensorDataset(torch::zeros({3, 2}), torch::zeros({4})),
                      Contains("3 examples") && Contains("4"));
  }
}

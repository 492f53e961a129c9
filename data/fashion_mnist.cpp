#include "data/fashion_mnist.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <list>
#include <optional>
#include <sstream>
#include <mutex>
#include <tuple>

#include <torch/torch.h>

#include "core/error.hpp"
#include "data/idx.hpp"

namespace caftrain::data {

namespace {

// -- the machine's decode cache ----------------------------------------------------------
// Worker processes (and every new process of a program) would decode the gz files again:
// about 0.7 s for Fashion-MNIST's training half. The decoded, normalised tensors are kept
// once per machine, as torchvision keeps its processed/ files, and mapped copy-on-write:
// processes share the pages until one writes.

/// Magic of a cache file: "CAFTIDX1", then n, channels, height, width (int64), then the
/// float32 images and the int64 labels.
constexpr char kCacheMagic[8] = {'C', 'A', 'F', 'T', 'I', 'D', 'X', '1'};
constexpr size_t kCacheHeader = 64;

/// Where decoded data sets are kept: $CAFTRAIN_CACHE_DIR ("off" for nowhere), else
/// $XDG_CACHE_HOME/caftrain, else ~/.cache/caftrain.
std::string cache_dir() {
  if (const char* dir = std::getenv("CAFTRAIN_CACHE_DIR"))
    return std::string(dir) == "off" ? "" : dir;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg)
    return std::string(xdg) + "/caftrain";
  if (const char* home = std::getenv("HOME"); home && *home)
    return std::string(home) + "/.cache/caftrain";
  return "";
}

std::optional<std::pair<at::Tensor, at::Tensor>> read_cached(const std::string& file) {
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return std::nullopt;
  struct stat st {};
  int64_t header[5] = {0};
  bool ok = ::fstat(fd, &st) == 0 && static_cast<size_t>(st.st_size) >= kCacheHeader &&
            ::pread(fd, header, sizeof(header), 0) == static_cast<ssize_t>(sizeof(header)) &&
            std::memcmp(header, kCacheMagic, sizeof(kCacheMagic)) == 0;
  auto n = header[1], c = header[2], h = header[3], w = header[4];
  auto image_bytes = static_cast<size_t>(n * c * h * w) * sizeof(float);
  auto total = kCacheHeader + image_bytes + static_cast<size_t>(n) * sizeof(int64_t);
  ok = ok && n > 0 && c > 0 && h > 0 && w > 0 && static_cast<size_t>(st.st_size) == total;
  void* base = ok ? ::mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0) : MAP_FAILED;
  ::close(fd);
  if (base == MAP_FAILED)
    return std::nullopt;
  std::shared_ptr<void> mapping(base, [total](void* p) { ::munmap(p, total); });
  auto* bytes = static_cast<char*>(base);
  auto images = torch::from_blob(bytes + kCacheHeader, {n, c, h, w}, [mapping](void*) {},
                                 torch::kFloat32);
  auto labels = torch::from_blob(bytes + kCacheHeader + image_bytes, {n}, [mapping](void*) {},
                                 torch::kLong);
  return std::make_pair(images, labels);
}

/// Writes the cache file (durably, then renamed into place, so a reader sees all or
/// nothing); a cache that cannot be written is only slower, never an error.
void write_cached(const std::string& file, const at::Tensor& images, const at::Tensor& labels) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(file).parent_path(), ec);
  auto tmp = file + ".tmp" + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    return;
  char header[kCacheHeader] = {0};
  int64_t dims[4] = {images.size(0), images.size(1), images.size(2), images.size(3)};
  std::memcpy(header, kCacheMagic, sizeof(kCacheMagic));
  std::memcpy(header + 8, dims, sizeof(dims));
  auto put = [&](const void* data, size_t size) {
    auto* p = static_cast<const char*>(data);
    while (size > 0) {
      auto done = ::write(fd, p, size);
      if (done <= 0)
        return false;
      p += done;
      size -= static_cast<size_t>(done);
    }
    return true;
  };
  auto x = images.contiguous();
  auto y = labels.contiguous();
  bool ok = put(header, sizeof(header)) && put(x.data_ptr(), x.numel() * sizeof(float)) &&
            put(y.data_ptr(), y.numel() * sizeof(int64_t)) && ::fsync(fd) == 0;
  ::close(fd);
  if (!ok || ::rename(tmp.c_str(), file.c_str()) != 0)
    ::unlink(tmp.c_str());
}

/// Size and modification time of a file, so that a cached read notices a changed file.
std::tuple<std::string, uintmax_t, int64_t> identity(const std::string& path) {
  std::error_code ec;
  auto size = std::filesystem::file_size(path, ec);
  auto time = std::filesystem::last_write_time(path, ec);
  return {path, ec ? 0 : size, ec ? 0 : static_cast<int64_t>(time.time_since_epoch().count())};
}

/// The cache file of these files and this normalisation ("" without a cache directory).
std::string cache_file(const std::string& images, const std::string& labels, Normalize norm) {
  auto dir = cache_dir();
  if (dir.empty())
    return "";
  auto [ip, is, it] = identity(images);
  auto [lp, ls, lt] = identity(labels);
  std::ostringstream key;
  key << std::filesystem::absolute(ip).string() << '|' << is << '|' << it << '|'
      << std::filesystem::absolute(lp).string() << '|' << ls << '|' << lt << '|' << norm.mean
      << '|' << norm.std;
  char name[64];
  std::snprintf(name, sizeof(name), "idx-%016zx.bin", std::hash<std::string>{}(key.str()));
  return dir + "/" + name;
}

std::pair<at::Tensor, at::Tensor> load(const std::string& root, Split split, Normalize norm) {
  if (norm.std == 0.0)
    throw Error(Errc::invalid_argument, "Normalize: std must not be zero");
  std::string prefix = split == Split::train ? "train" : "t10k";
  auto images_path = (std::filesystem::path(root) / (prefix + "-images-idx3-ubyte.gz")).string();
  auto labels_path = (std::filesystem::path(root) / (prefix + "-labels-idx1-ubyte.gz")).string();
  auto cached = cache_file(images_path, labels_path, norm);
  if (!cached.empty()) {
    if (auto tensors = read_cached(cached))
      return *tensors;
  }
  auto images = read_idx(images_path, 3);
  auto labels = read_idx(labels_path, 1);
  if (images.size(0) != labels.size(0))
    throw Error(Errc::data_error, "'" + images_path + "' holds " +
                                    std::to_string(images.size(0)) + " images but '" +
                                    labels_path + "' holds " + std::to_string(labels.size(0)) +
                                    " labels; the two files do not belong together");
  auto x = images.unsqueeze(1).to(torch::kFloat32).div_(255.0).sub_(norm.mean).div_(norm.std);
  auto y = labels.to(torch::kLong);
  if (!cached.empty())
    write_cached(cached, x, y);
  return {x, y};
}

/// The decoded tensors of the last few files read in this process. Workers of a run (and
/// the workers of its next attempt after a failure) read the same files: they share one
/// decoded copy instead of decoding the gz files again (about 0.5 s and 190 MB each for
/// Fashion-MNIST's training half).
std::pair<at::Tensor, at::Tensor> cached_load(const std::string& root, Split split, Normalize norm) {
  using Key = std::tuple<std::tuple<std::string, uintmax_t, int64_t>,
                         std::tuple<std::string, uintmax_t, int64_t>, double, double>;
  static std::mutex mtx;
  static std::list<std::pair<Key, std::pair<at::Tensor, at::Tensor>>> entries; // newest first
  constexpr size_t capacity = 4;
  std::string prefix = split == Split::train ? "train" : "t10k";
  auto images = (std::filesystem::path(root) / (prefix + "-images-idx3-ubyte.gz")).string();
  auto labels = (std::filesystem::path(root) / (prefix + "-labels-idx1-ubyte.gz")).string();
  Key key{identity(images), identity(labels), norm.mean, norm.std};
  std::lock_guard<std::mutex> guard(mtx); // one decode at a time; the others then share it
  for (auto it = entries.begin(); it != entries.end(); ++it)
    if (it->first == key) {
      entries.splice(entries.begin(), entries, it);
      return entries.front().second;
    }
  auto tensors = load(root, split, norm);
  entries.emplace_front(key, tensors);
  if (entries.size() > capacity)
    entries.pop_back();
  return tensors;
}

} // namespace

ImageIdxDataset::ImageIdxDataset(const std::string& root, Split split, Normalize normalize)
  : ImageIdxDataset(root, cached_load(root, split, normalize)) {
  // nop
}

DataLoader ImageIdxDataset::loader(LoaderOptions options) const {
  return DataLoader(std::make_shared<TensorDataset>(data(), targets()), options);
}

const char* const FashionMNIST::classes[10] = {"T-shirt/top", "Trouser", "Pullover", "Dress",
                                               "Coat",        "Sandal",  "Shirt",    "Sneaker",
                                               "Bag",         "Ankle boot"};

std::shared_ptr<FashionMNIST> FashionMNIST::train(const std::string& root, Normalize normalize) {
  return std::make_shared<FashionMNIST>(root, Split::train, normalize);
}

std::shared_ptr<FashionMNIST> FashionMNIST::test(const std::string& root, Normalize normalize) {
  return std::make_shared<FashionMNIST>(root, Split::test, normalize);
}

std::shared_ptr<MNIST> MNIST::train(const std::string& root, Normalize normalize) {
  return std::make_shared<MNIST>(root, Split::train, normalize);
}

std::shared_ptr<MNIST> MNIST::test(const std::string& root, Normalize normalize) {
  return std::make_shared<MNIST>(root, Split::test, normalize);
}

DataLoader make_loader(std::shared_ptr<Dataset> dataset, LoaderOptions options) {
  return DataLoader(std::move(dataset), options);
}

} // namespace caftrain::data

// Fashion-MNIST and MNIST, read from the IDX .gz files that ship with the machine.
#pragma once

#include <memory>
#include <string>
#include <utility>

#include "data/dataset.hpp"
#include "data/loader.hpp"

namespace caftrain::data {

/// Per-channel normalisation applied to pixels scaled to [0, 1]: (x - mean) / std.
/// The default is the seed's `Normalize((0.5,), (0.5,))`.
struct Normalize {
  double mean = 0.5;
  double std = 0.5;
};

/// Which half of an MNIST-style data set.
enum class Split { train, test };

/// An MNIST-format image data set: images as float tensors [N, 1, 28, 28], normalised,
/// and labels as int64 [N]. `FashionMNIST` and `MNIST` differ only in where the files are.
class ImageIdxDataset : public TensorDataset {
 public:
  /// Reads `<root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`. The decoded tensors
  /// of the last 4 file pairs read are kept in this process and shared by every data set
  /// that reads the same unchanged files (the workers of a run, a restarted attempt):
  /// treat them as read-only. They are also kept once per machine, in
  /// $CAFTRAIN_CACHE_DIR (default ~/.cache/caftrain; "off" for none), and mapped
  /// copy-on-write by the next process that reads the same files (a worker process, a
  /// restarted program) instead of decoding them again. Throws
  /// `Error(data_error)` naming the file when one is missing or malformed, or when images
  /// and labels disagree on the number of examples.
  ImageIdxDataset(const std::string& root, Split split, Normalize normalize = {});

  /// A loader over this data set (shares the tensors; no copy).
  DataLoader loader(LoaderOptions options = {}) const;

  /// The directory the files were read from.
  const std::string& root() const noexcept {
    return root_;
  }

 private:
  ImageIdxDataset(const std::string& root, std::pair<at::Tensor, at::Tensor> tensors)
    : TensorDataset(std::move(tensors.first), std::move(tensors.second)), root_(root) {
    // nop
  }

  std::string root_;
};

/// Zalando's Fashion-MNIST (10 classes of clothing), by default from Debian's
/// dataset-fashion-mnist package.
class FashionMNIST : public ImageIdxDataset {
 public:
  /// Where Debian's dataset-fashion-mnist installs the files.
  static constexpr const char* default_root = "/usr/share/datasets/fashion-mnist";

  /// Class names, index = label.
  static const char* const classes[10];

  FashionMNIST(const std::string& root, Split split, Normalize normalize = {})
    : ImageIdxDataset(root, split, normalize) {
    // nop
  }

  static std::shared_ptr<FashionMNIST> train(const std::string& root = default_root,
                                             Normalize normalize = {});

  static std::shared_ptr<FashionMNIST> test(const std::string& root = default_root,
                                            Normalize normalize = {});
};

/// LeCun's MNIST digits, in the same format.
class MNIST : public ImageIdxDataset {
 public:
  static constexpr const char* default_root = "/usr/share/datasets/mnist";

  MNIST(const std::string& root, Split split, Normalize normalize = {})
    : ImageIdxDataset(root, split, normalize) {
    // nop
  }

  static std::shared_ptr<MNIST> train(const std::string& root = default_root,
                                      Normalize normalize = {});

  static std::shared_ptr<MNIST> test(const std::string& root = default_root,
                                     Normalize normalize = {});
};

/// A loader over `dataset`, sharing it (`FashionMNIST::train(root)->loader(...)` reads
/// the same as the seed's `DataLoader(FashionMNIST(...), ...)`).
DataLoader make_loader(std::shared_ptr<Dataset> dataset, LoaderOptions options = {});

} // namespace caftrain::data

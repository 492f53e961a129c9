#include "data/fashion_mnist.hpp"

#include <filesystem>

#include <torch/torch.h>

#include "core/error.hpp"
#include "data/idx.hpp"

namespace caftrain::data {

namespace {

std::pair<at::Tensor, at::Tensor> load(const std::string& root, Split split, Normalize norm) {
  if (norm.std == 0.0)
    throw Error(Errc::invalid_argument, "Normalize: std must not be zero");
  std::string prefix = split == Split::train ? "train" : "t10k";
  auto images_path = (std::filesystem::path(root) / (prefix + "-images-idx3-ubyte.gz")).string();
  auto labels_path = (std::filesystem::path(root) / (prefix + "-labels-idx1-ubyte.gz")).string();
  auto images = read_idx(images_path, 3);
  auto labels = read_idx(labels_path, 1);
  if (images.size(0) != labels.size(0))
    throw Error(Errc::data_error, "'" + images_path + "' holds " +
                                    std::to_string(images.size(0)) + " images but '" +
                                    labels_path + "' holds " + std::to_string(labels.size(0)) +
                                    " labels; the two files do not belong together");
  auto x = images.unsqueeze(1).to(torch::kFloat32).div_(255.0).sub_(norm.mean).div_(norm.std);
  return {x, labels.to(torch::kLong)};
}

} // namespace

ImageIdxDataset::ImageIdxDataset(const std::string& root, Split split, Normalize normalize)
  : ImageIdxDataset(root, load(root, split, normalize)) {
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

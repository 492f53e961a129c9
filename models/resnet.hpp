// ResNet18 with torchvision's parameter names, and the seed's MLP.
#pragma once

#include <cstdint>

#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

namespace caftrain::models {

/// torchvision's BasicBlock: two 3x3 convolutions with a residual connection.
class BasicBlockImpl : public torch::nn::Module {
 public:
  BasicBlockImpl(int64_t in_planes, int64_t planes, int64_t stride);

  torch::Tensor forward(const torch::Tensor& x);

 private:
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr};
  torch::nn::Conv2d conv2_{nullptr};
  torch::nn::BatchNorm2d bn2_{nullptr};
  torch::nn::Sequential downsample_{nullptr};
};
TORCH_MODULE(BasicBlock);

/// Options of `ResNet18`. The defaults are the seed's: one input channel (Fashion-MNIST)
/// with torchvision's 7x7 stride-2 stem, ten classes.
struct ResNetOptions {
  /// Channels of the input images. Default 1.
  int64_t in_channels = 1;
  /// Number of output classes. Default 10.
  int64_t num_classes = 10;
};

/// torchvision's `resnet18`, with its parameter and buffer names (`conv1.weight`,
/// `bn1.running_mean`, `layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`,
/// `fc.bias`, ...), so that a state dict saved from it loads into
/// `torchvision.models.resnet18(num_classes=10)` whose conv1 is replaced as in the seed.
/// Initialisation follows torchvision (Kaiming-normal convolutions, unit BatchNorm),
/// except conv1, which keeps the default initialisation of the seed's replacement layer.
class ResNet18Impl : public torch::nn::Module {
 public:
  explicit ResNet18Impl(ResNetOptions options = {});

  torch::Tensor forward(const torch::Tensor& x);

 private:
  torch::nn::Sequential make_layer(int64_t planes, int64_t stride);

  int64_t in_planes_ = 64;
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr};
  torch::nn::Sequential layer1_{nullptr}, layer2_{nullptr}, layer3_{nullptr}, layer4_{nullptr};
  torch::nn::Linear fc_{nullptr};
};
TORCH_MODULE(ResNet18);

/// The MLP of the seed's benchmark: 784 -> 1024 -> 1024 -> 10 with ReLU, on flattened
/// 28x28 images. Parameter names follow Python's `nn.Sequential(Flatten, Linear, ReLU,
/// Linear, ReLU, Linear)`: `1.weight`, `3.weight`, `5.weight`.
class MLPImpl : public torch::nn::Module {
 public:
  explicit MLPImpl(int64_t in_features = 784, int64_t hidden = 1024, int64_t classes = 10);

  torch::Tensor forward(const torch::Tensor& x);

 private:
  torch::nn::Linear fc1_{nullptr}, fc2_{nullptr}, fc3_{nullptr};
};
TORCH_MODULE(MLP);

} // namespace caftrain::models

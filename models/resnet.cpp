#include "models/resnet.hpp"

#include <torch/torch.h>

namespace caftrain::models {

namespace nn = torch::nn;

namespace {

nn::Conv2d conv(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t padding) {
  return nn::Conv2d(
    nn::Conv2dOptions(in, out, kernel).stride(stride).padding(padding).bias(false));
}

} // namespace

BasicBlockImpl::BasicBlockImpl(int64_t in_planes, int64_t planes, int64_t stride) {
  conv1_ = register_module("conv1", conv(in_planes, planes, 3, stride, 1));
  bn1_ = register_module("bn1", nn::BatchNorm2d(planes));
  conv2_ = register_module("conv2", conv(planes, planes, 3, 1, 1));
  bn2_ = register_module("bn2", nn::BatchNorm2d(planes));
  if (stride != 1 || in_planes != planes)
    downsample_ = register_module(
      "downsample", nn::Sequential(conv(in_planes, planes, 1, stride, 0), nn::BatchNorm2d(planes)));
}

torch::Tensor BasicBlockImpl::forward(const torch::Tensor& x) {
  auto out = torch::relu(bn1_->forward(conv1_->forward(x)));
  out = bn2_->forward(conv2_->forward(out));
  auto identity = downsample_ ? downsample_->forward(x) : x;
  return torch::relu(out + identity);
}

ResNet18Impl::ResNet18Impl(ResNetOptions options) {
  conv1_ = register_module("conv1", conv(options.in_channels, 64, 7, 2, 3));
  bn1_ = register_module("bn1", nn::BatchNorm2d(64));
  layer1_ = register_module("layer1", make_layer(64, 1));
  layer2_ = register_module("layer2", make_layer(128, 2));
  layer3_ = register_module("layer3", make_layer(256, 2));
  layer4_ = register_module("layer4", make_layer(512, 2));
  fc_ = register_module("fc", nn::Linear(512, options.num_classes));
  torch::NoGradGuard no_grad;
  for (auto& item : named_modules("", /*include_self=*/false)) {
    if (item.key() == "conv1")
      continue; // the seed replaces conv1 after construction: default initialisation
    if (auto* c = item.value()->as<nn::Conv2d>())
      nn::init::kaiming_normal_(c->weight, 0.0, torch::kFanOut, torch::kReLU);
    else if (auto* b = item.value()->as<nn::BatchNorm2d>()) {
      nn::init::ones_(b->weight);
      nn::init::zeros_(b->bias);
    }
  }
}

nn::Sequential ResNet18Impl::make_layer(int64_t planes, int64_t stride) {
  nn::Sequential layer(BasicBlock(in_planes_, planes, stride), BasicBlock(planes, planes, 1));
  in_planes_ = planes;
  return layer;
}

torch::Tensor ResNet18Impl::forward(const torch::Tensor& input) {
  auto x = torch::relu(bn1_->forward(conv1_->forward(input)));
  x = torch::max_pool2d(x, 3, 2, 1);
  x = layer4_->forward(layer3_->forward(layer2_->forward(layer1_->forward(x))));
  x = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1);
  return fc_->forward(x);
}

MLPImpl::MLPImpl(int64_t in_features, int64_t hidden, int64_t classes) {
  fc1_ = register_module("1", nn::Linear(in_features, hidden));
  fc2_ = register_module("3", nn::Linear(hidden, hidden));
  fc3_ = register_module("5", nn::Linear(hidden, classes));
}

torch::Tensor MLPImpl::forward(const torch::Tensor& x) {
  auto h = torch::relu(fc1_->forward(x.flatten(1)));
  h = torch::relu(fc2_->forward(h));
  return fc3_->forward(h);
}

} // namespace caftrain::models

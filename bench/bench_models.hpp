// The model the benchmarks train: the anchor's (../shared/anchors/torch_ddp_baseline.py),
// step for step: the seed's MLP or ResNet18, cross-entropy, Adam 1e-3.
#pragma once

#include <torch/torch.h>

#include <string>

#include "caftrain.hpp"

namespace caftrain::bench {

class Classifier : public caftrain::LightningModule {
 public:
  explicit Classifier(const std::string& kind) {
    if (kind == "resnet18")
      resnet = register_module("model", caftrain::models::ResNet18());
    else
      mlp = register_module("model", caftrain::models::MLP());
  }
  torch::Tensor training_step(const caftrain::Batch& b, int64_t) override {
    auto out = resnet ? resnet->forward(b.data) : mlp->forward(b.data);
    auto loss = torch::nn::functional::cross_entropy(out, b.target);
    log("loss", loss);
    return loss;
  }
  caftrain::Optimizers configure_optimizers() override {
    return std::make_shared<torch::optim::Adam>(parameters(), torch::optim::AdamOptions(1e-3));
  }
  caftrain::models::ResNet18 resnet{nullptr};
  caftrain::models::MLP mlp{nullptr};
};

} // namespace caftrain::bench

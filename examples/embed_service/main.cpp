// A CAF service that runs training jobs: it starts a TorchTrainer run by messages,
// receives every report as a message, and prints it — no blocking call anywhere.
//
//   build/examples/embed_service
//
// Prints one line per report (`report 3 of run mlp: loss=0.52 ...`) while 2 workers train
// an MLP on Fashion-MNIST for 4 short epochs, then the final result.
#include <torch/torch.h>

#include <caf/all.hpp>

#include <iomanip>
#include <iostream>
#include <memory>

#include "caftrain.hpp"

namespace {

using train_atom = caf::atom_constant<caf::atom("train")>;

class Mlp : public caftrain::LightningModule {
 public:
  Mlp() {
    net = register_module("net", caftrain::models::MLP(784, 256, 10));
  }
  torch::Tensor training_step(const caftrain::Batch& batch, int64_t) override {
    auto loss = torch::nn::functional::cross_entropy(net->forward(batch.data), batch.target);
    log("loss", loss, {.on_epoch = true});
    return loss;
  }
  caftrain::Optimizers configure_optimizers() override {
    return std::make_shared<torch::optim::Adam>(parameters(), torch::optim::AdamOptions(1e-3));
  }
  caftrain::models::MLP net{nullptr};
};

void train_func(const caftrain::Config& config) {
  auto data = caftrain::data::FashionMNIST::train();
  auto model = caftrain::with_seed(0, [] { return std::make_shared<Mlp>(); });
  caftrain::Trainer trainer({.max_epochs = config.get<int64_t>("epochs"),
                             .strategy = caftrain::DDPStrategy(),
                             .plugins = {caftrain::ActorEnvironment()},
                             .callbacks = {caftrain::ReportCallback({.checkpoint = false})},
                             .logger = false,
                             .limit_train_batches = 40,
                             .enable_progress_bar = false});
  trainer = caftrain::prepare_trainer(std::move(trainer));
  trainer.fit(model, data->loader({.batch_size = 128, .shuffle = true}));
}

struct ServiceState {
  std::unique_ptr<caftrain::TorchTrainer> job;
};

/// The service: (train_atom, name) starts a job; reports and the result arrive as messages.
caf::behavior service(caf::stateful_actor<ServiceState>* self) {
  return {
    [=](train_atom, const std::string& name) {
      caftrain::TorchTrainerOptions options;
      options.train_loop_config = {{"epochs", int64_t{4}}};
      options.scaling.num_workers = 2;
      options.run.name = name;
      options.run.storage_path = "runs/embed_service";
      self->state.job = std::make_unique<caftrain::TorchTrainer>(self->system(), train_func, options);
      auto run = self->state.job->start();
      self->send(run, caftrain::subscribe_atom::value, caf::actor{self});
      std::cout << "service: started run " << name << std::endl;
    },
    [=](const caftrain::ReportRecord& report) {
      std::cout << "report " << report.index << " of run " << report.run << ":";
      for (auto& [k, v] : report.metrics)
        std::cout << " " << k << "=" << std::setprecision(4) << v;
      std::cout << std::endl;
    },
    [=](caftrain::done_atom, const caftrain::Result& result) {
      if (result.ok())
        std::cout << "service: run finished after " << result.metrics_history.size()
                  << " reports, final loss " << result.metrics.at("loss") << std::endl;
      else
        std::cout << "service: run failed: " << result.error->message << std::endl;
      self->quit();
    },
  };
}

} // namespace

int main() {
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};
  auto svc = sys.spawn(service);
  caf::anon_send(svc, train_atom::value, std::string("mlp-" + std::to_string(::getpid())));
  sys.await_all_actors_done();
}

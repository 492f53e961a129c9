#include "restore_job.hpp"

#include <torch/torch.h>

#include <chrono>
#include <thread>

#include "caftrain.hpp"

namespace caftrain::test {

namespace {

class SmallClassifier : public LightningModule {
 public:
  SmallClassifier() {
    fc1 = register_module("fc1", torch::nn::Linear(8, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 3));
  }

  at::Tensor training_step(const Batch& batch, int64_t) override {
    auto logits = fc2->forward(torch::relu(fc1->forward(batch.data)));
    auto loss = torch::nn::functional::cross_entropy(logits, batch.target);
    log("loss", loss);
    return loss;
  }

  Optimizers configure_optimizers() override {
    auto opt = std::make_shared<torch::optim::Adam>(parameters(), torch::optim::AdamOptions(1e-2));
    return {opt, {std::make_shared<StepLR>(opt, 5, 0.5), Interval::step}};
  }

  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

/// Sleeps after every training batch (before the step's report).
class Pause : public Callback {
 public:
  explicit Pause(std::chrono::milliseconds pause) : pause_(pause) {}

  void on_train_batch_end(Trainer&, LightningModule&, const at::Tensor&, const Batch&,
                          int64_t) override {
    std::this_thread::sleep_for(pause_);
  }

 private:
  std::chrono::milliseconds pause_;
};

} // namespace

void restore_job(const Config& config) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  // 384 examples, batch 16 on 2 ranks: 12 steps per epoch.
  auto data = std::make_shared<data::TensorDataset>(torch::randn({384, 8}, gen),
                                                    torch::randint(0, 3, {384}, gen));
  auto model = with_seed(0, [] { return std::make_shared<SmallClassifier>(); });
  Trainer trainer({.max_epochs = 2,
                   .strategy = DDPStrategy(),
                   .plugins = {ActorEnvironment()},
                   .callbacks = {Pause(std::chrono::milliseconds(config.get<int64_t>("step_sleep_ms", 0))),
                                 ReportCallback({.every_n_epochs = 0,
                                                 .every_n_steps = 1,
                                                 .checkpoint_every = kRestoreJobCheckpointEvery})},
                   .logger = false,
                   .enable_progress_bar = false});
  trainer = prepare_trainer(std::move(trainer));
  auto checkpoint = train::get_checkpoint();
  trainer.fit(model, data::DataLoader(data, {.batch_size = 16, .shuffle = true, .seed = 5}),
              std::nullopt, checkpoint ? checkpoint->path() : "");
}

TorchTrainerOptions restore_job_options(const std::string& storage, const std::string& name,
                                        int64_t step_sleep_ms) {
  TorchTrainerOptions o;
  o.train_loop_config = {{"step_sleep_ms", step_sleep_ms}};
  o.scaling.num_workers = 2;
  o.run.name = name;
  o.run.storage_path = storage;
  return o;
}

} // namespace caftrain::test

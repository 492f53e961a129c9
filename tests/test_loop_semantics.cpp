// The loop as Lightning users rely on it: resuming after a finished fit, min_epochs and
// min_steps, validation across epochs, epoch-level logging, and metrics that are NaN.
#include <catch2/catch.hpp>

#include <cmath>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "helpers.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

std::shared_ptr<test::LinearModule> linear(double lr = 0.05) {
  return with_seed(1, [&] { return std::make_shared<test::LinearModule>(4, lr); });
}

/// 32 examples in batches of 8: four training batches per epoch.
data::DataLoader four_batches() {
  return data::DataLoader(test::regression_data(32), {.batch_size = 8, .shuffle = true, .seed = 3});
}

data::DataLoader val_data() {
  return data::DataLoader(test::regression_data(16, 4, 9), {.batch_size = 8});
}

/// Sets should_stop at every training batch from the first on.
struct StopAlways : Callback {
  void on_train_batch_end(Trainer& t, LightningModule&, const at::Tensor&, const Batch&,
                          int64_t) override {
    t.set_should_stop(true);
  }
};

/// Records the global step at each validation run.
struct ValidationSteps : Callback {
  void on_validation_end(Trainer& t, LightningModule&) override {
    if (!t.sanity_checking())
      steps.push_back(t.global_step());
  }
  std::vector<int64_t> steps;
};

nlohmann::json trainer_state_of(const std::string& path) {
  std::ifstream in(fs::path(path) / "trainer_state.json");
  return nlohmann::json::parse(in);
}

} // namespace

// -- resuming after a finished fit ------------------------------------------------------

TEST_CASE("A checkpoint saved at the end of a fit resumes at the next epoch: after 2 epochs, max_epochs = 3 trains exactly the third", "[trainer][checkpoint]") {
  test::TempDir dir;
  auto o = test::quiet_options(dir);
  o.max_epochs = 3;
  auto uninterrupted = linear();
  Trainer(o).fit(uninterrupted, four_batches());

  o.max_epochs = 2;
  auto path = dir / "end";
  auto first = linear();
  SECTION("saved from on_train_end") {
    struct SaveAtEnd : Callback {
      std::string path;
      void on_train_end(Trainer& t, LightningModule&) override {
        t.save_checkpoint(path);
      }
    };
    auto saver = std::make_shared<SaveAtEnd>();
    saver->path = path;
    o.callbacks = {saver};
    Trainer(o).fit(first, four_batches());
  }
  SECTION("saved with save_checkpoint after fit returns") {
    Trainer t(o);
    t.fit(first, four_batches());
    t.save_checkpoint(path);
  }
  auto state = trainer_state_of(path);
  CHECK(state.at("epoch") == 2);
  CHECK(state.at("batch") == 0);
  CHECK(state.at("global_step") == 8);
  CHECK(Checkpoint::open(path).metadata().epoch == 2);

  auto counter = std::make_shared<test::CountingCallback>();
  auto o3 = test::quiet_options(dir);
  o3.max_epochs = 3;
  o3.callbacks = {counter};
  // Other initial weights: everything must come from the checkpoint.
  auto resumed = with_seed(7, [] { return std::make_shared<test::LinearModule>(4, 0.05); });
  REQUIRE(test::max_param_diff(*first, *resumed) > 1e-3);
  Trainer t(o3);
  t.fit(resumed, four_batches(), std::nullopt, path);
  CHECK(t.current_epoch() == 3);
  CHECK(t.global_step() == 12);
  CHECK(counter->epoch_start == 1);
  CHECK(counter->batch_end == 4);
  CHECK(test::max_param_diff(*uninterrupted, *resumed) < 1e-6);
}

// -- min_epochs and min_steps -----------------------------------------------------------

TEST_CASE("should_stop before min_steps is deferred: limit_train_batches 3, min_steps 10 ends at step 10 in the fourth epoch", "[trainer]") {
  test::TempDir dir;
  auto counter = std::make_shared<test::CountingCallback>();
  auto o = test::quiet_options(dir);
  o.min_steps = 10;
  o.limit_train_batches = 3;
  o.callbacks = {std::make_shared<StopAlways>(), counter};
  Trainer t(o);
  t.fit(linear(), four_batches());
  CHECK(t.global_step() == 10);
  CHECK(counter->batch_end == 10);
  CHECK(counter->epoch_start == 4);
  CHECK(t.current_epoch() == 3); // stopped after the first batch of epoch 3 (0-based)
  CHECK(t.should_stop());
}

TEST_CASE("EarlyStopping before min_epochs is deferred until min_epochs epochs are done", "[trainer][callbacks]") {
  test::TempDir dir;
  auto o = test::quiet_options(dir);
  o.max_epochs = 50;
  // lr = 0: the loss never improves after the first check, so patience 1 stops at epoch 1.
  auto stopper = std::make_shared<EarlyStopping>(EarlyStoppingOptions{.monitor = "val_loss", .patience = 1});
  o.callbacks = {stopper};
  SECTION("without min_epochs it stops after two epochs") {
    Trainer t(o);
    t.fit(linear(0.0), four_batches(), val_data());
    CHECK(t.current_epoch() == 2);
  }
  SECTION("with min_epochs = 5 it trains five whole epochs, then stops") {
    o.min_epochs = 5;
    Trainer t(o);
    t.fit(linear(0.0), four_batches(), val_data());
    CHECK(t.current_epoch() == 5);
    CHECK(t.global_step() == 20);
  }
}

TEST_CASE("min_epochs and min_steps must both be reached, and max_epochs and max_steps still win", "[trainer]") {
  test::TempDir dir;
  auto o = test::quiet_options(dir);
  o.callbacks = {std::make_shared<StopAlways>()};
  SECTION("min_steps reached last: stops mid-epoch at min_steps") {
    o.min_epochs = 2;
    o.min_steps = 10;
    Trainer t(o);
    t.fit(linear(), four_batches());
    CHECK(t.global_step() == 10);
    CHECK(t.current_epoch() == 2);
  }
  SECTION("min_epochs reached last: stops at the end of the last required epoch") {
    o.min_epochs = 3;
    o.min_steps = 5;
    Trainer t(o);
    t.fit(linear(), four_batches());
    CHECK(t.global_step() == 12);
    CHECK(t.current_epoch() == 3);
  }
  SECTION("max_epochs ends the fit before min_epochs") {
    o.min_epochs = 10;
    o.max_epochs = 2;
    Trainer t(o);
    t.fit(linear(), four_batches());
    CHECK(t.current_epoch() == 2);
  }
  SECTION("max_steps ends the fit before min_steps") {
    o.min_steps = 100;
    o.max_steps = 7;
    Trainer t(o);
    t.fit(linear(), four_batches());
    CHECK(t.global_step() == 7);
  }
}

TEST_CASE("Negative min_epochs or min_steps is refused, naming it", "[trainer]") {
  CHECK_THROWS_WITH(Trainer({.min_epochs = -1}), Contains("min_epochs is -1"));
  CHECK_THROWS_WITH(Trainer({.min_steps = -3}), Contains("min_steps is -3"));
}

// -- validation across epochs -------------------------------------------------------------

TEST_CASE("With check_val_every_n_epoch unset an integer val_check_interval counts training batches across epochs", "[trainer]") {
  test::TempDir dir;
  auto recorder = std::make_shared<ValidationSteps>();
  auto o = test::quiet_options(dir);
  o.max_epochs = 3;
  o.val_check_interval = 3;
  o.check_val_every_n_epoch = std::nullopt;
  o.callbacks = {recorder};
  Trainer(o).fit(linear(), four_batches(), val_data());
  CHECK(recorder->steps == std::vector<int64_t>{3, 6, 9, 12});
  // A fraction of an epoch means nothing there: refused.
  o.val_check_interval = 0.5;
  CHECK_THROWS_WITH(Trainer(o), Contains("val_check_interval is the fraction") &&
                                  Contains("check_val_every_n_epoch is unset"));
}

TEST_CASE("An integer val_check_interval larger than an epoch, while validation is per epoch, is an error naming both numbers and the fix", "[trainer]") {
  test::TempDir dir;
  auto o = test::quiet_options(dir);
  o.max_epochs = 2;
  o.val_check_interval = 5;
  CHECK_THROWS_WITH(Trainer(o).fit(linear(), four_batches(), val_data()),
                    Contains("val_check_interval = 5") && Contains("only 4") &&
                      Contains("check_val_every_n_epoch = std::nullopt"));
  o.check_val_every_n_epoch = 0;
  CHECK_THROWS_WITH(Trainer(o), Contains("check_val_every_n_epoch is 0"));
}

// -- values logged in epoch-end hooks -------------------------------------------------------

namespace {

/// Logs its validation error only in on_validation_epoch_end, and a score that is best
/// (0) in epoch 2 only in on_train_epoch_end.
class EpochEndLogger : public test::LinearModule {
 public:
  using LinearModule::LinearModule;
  void validation_step(const Batch& batch, int64_t) override {
    squared += torch::mse_loss(linear->forward(batch.data), batch.target, at::Reduction::Sum)
                 .item<double>();
    count += batch.target.numel();
  }
  void on_validation_epoch_end() override {
    log("val_mse", squared / static_cast<double>(count));
    squared = 0;
    count = 0;
  }
  void on_train_epoch_end() override {
    log("epoch_score", std::abs(static_cast<double>(current_epoch()) - 2.0));
  }
  double squared = 0;
  int64_t count = 0;
};

} // namespace

TEST_CASE("A value logged only in on_validation_epoch_end reaches callback_metrics and EarlyStopping", "[trainer][callbacks]") {
  test::TempDir dir;
  auto o = test::quiet_options(dir);
  o.max_epochs = 50;
  auto stopper = std::make_shared<EarlyStopping>(EarlyStoppingOptions{.monitor = "val_mse", .patience = 2});
  o.callbacks = {stopper};
  Trainer t(o);
  auto m = with_seed(1, [] { return std::make_shared<EpochEndLogger>(4, 0.0); });
  t.fit(m, four_batches(), val_data());
  CHECK(t.current_epoch() == 3); // improves once, then two checks without improvement
  CHECK_THAT(stopper->reason(), Contains("val_mse"));
  REQUIRE(t.callback_metrics().count("val_mse") == 1);
  CHECK(stopper->best_score() == Approx(t.callback_metrics().at("val_mse")));
  auto validated = Trainer(test::quiet_options(dir)).validate(m, val_data());
  REQUIRE(validated.size() == 1);
  CHECK(validated[0].at("val_mse") == Approx(t.callback_metrics().at("val_mse")));
}

TEST_CASE("A value logged in on_train_epoch_end reaches ModelCheckpoint's monitor", "[trainer][callbacks][checkpoint]") {
  test::TempDir dir;
  auto o = test::quiet_options(dir);
  o.max_epochs = 5;
  auto cb = std::make_shared<ModelCheckpoint>(ModelCheckpointOptions{
    .dirpath = dir / "ckpts", .monitor = "epoch_score", .mode = "min", .save_top_k = 1});
  o.callbacks = {cb};
  Trainer t(o);
  t.fit(with_seed(1, [] { return std::make_shared<EpochEndLogger>(); }), four_batches());
  CHECK(fs::path(cb->best_model_path()).filename() == "epoch=2-step=12");
  CHECK(cb->best_model_score() == 0.0);
  CHECK(t.callback_metrics().at("epoch_score") == 2.0); // epoch 4
}

TEST_CASE("Values logged in the module's epoch-end hooks reach ReportCallback's reports", "[trainer][callbacks][torch_trainer]") {
  test::TempDir dir;
  test::ActorSystem s;
  auto fn = [](const Config&) {
    auto model = with_seed(1, [] { return std::make_shared<EpochEndLogger>(); });
    Trainer trainer({.max_epochs = 3,
                     .plugins = {ActorEnvironment()},
                     .callbacks = {ReportCallback()},
                     .logger = false,
                     .num_sanity_val_steps = 0,
                     .enable_progress_bar = false});
    trainer.fit(model, four_batches(), val_data());
  };
  TorchTrainerOptions o;
  o.scaling.num_workers = 1;
  o.run.storage_path = dir.path();
  o.run.name = "epoch_end";
  auto result = TorchTrainer(s.sys, fn, o).fit();
  INFO((result.error ? result.error->message : ""));
  REQUIRE(result.ok());
  REQUIRE(result.metrics_history.size() == 3);
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    auto& m = result.metrics_history[static_cast<size_t>(epoch)].metrics;
    CHECK(m.at("epoch_score") == std::abs(static_cast<double>(epoch) - 2.0));
    CHECK(m.count("val_mse") == 1);
  }
}

TEST_CASE("log with on_step in an epoch-end hook is refused, naming the key", "[trainer]") {
  struct StepAtEpochEnd : test::LinearModule {
    void on_train_epoch_end() override {
      log("bad", 1.0, {.on_step = true});
    }
  };
  test::TempDir dir;
  auto o = test::quiet_options(dir);
  o.max_epochs = 1;
  CHECK_THROWS_WITH(Trainer(o).fit(std::make_shared<StepAtEpochEnd>(), four_batches()),
                    Contains("log('bad')") && Contains("on_step"));
}

// -- metrics that are NaN or infinite ------------------------------------------------------

TEST_CASE("A fit whose logged metric becomes NaN writes checkpoints that reopen, validate and resume", "[trainer][checkpoint]") {
  struct GoesNaN : test::LinearModule {
    at::Tensor training_step(const Batch& batch, int64_t i) override {
      auto loss = LinearModule::training_step(batch, i);
      log("ratio", global_step() >= 5 ? std::numeric_limits<double>::quiet_NaN() : 1.0);
      log("spread", global_step() >= 5 ? std::numeric_limits<double>::infinity() : 1.0);
      return loss;
    }
  };
  test::TempDir dir;
  auto o = test::quiet_options(dir);
  o.max_epochs = 2;
  // Early stopping state holds the best values seen: 1.0 for ratio, +inf for spread.
  auto on_epoch_end = [](std::string monitor, std::string mode) {
    return std::make_shared<EarlyStopping>(EarlyStoppingOptions{
      .monitor = monitor, .mode = mode, .check_finite = false, .check_on_train_epoch_end = true});
  };
  auto saver = std::make_shared<ModelCheckpoint>(
    ModelCheckpointOptions{.dirpath = dir / "ckpts", .monitor = "ratio", .save_top_k = 2});
  o.callbacks = {on_epoch_end("ratio", "min"), on_epoch_end("spread", "max"), saver};
  Trainer t(o);
  t.fit(std::make_shared<GoesNaN>(), four_batches());
  CHECK(t.current_epoch() == 2);
  REQUIRE(std::isnan(t.callback_metrics().at("ratio")));
  t.save_checkpoint(dir / "after");
  auto ckpt = Checkpoint::open(dir / "after");
  CHECK_NOTHROW(ckpt.validate());
  CHECK(std::isnan(ckpt.metadata().metrics.at("ratio")));
  CHECK(ckpt.metadata().metrics.at("spread") == std::numeric_limits<double>::infinity());
  auto state = trainer_state_of(dir / "after");
  CHECK(state.at("callback_metrics").at("ratio") == "NaN");
  // The epoch-1 checkpoint (NaN) and the epoch-0 one (1.0) are kept; the finite one is best.
  CHECK_THAT(saver->best_model_path(), Contains("epoch=0"));
  CHECK(saver->best_k_models().size() == 2);

  auto o2 = test::quiet_options(dir);
  o2.max_epochs = 3;
  auto ratio = on_epoch_end("ratio", "min");
  auto spread = on_epoch_end("spread", "max");
  o2.callbacks = {ratio, spread};
  Trainer resumed(o2);
  CHECK_NOTHROW(resumed.fit(std::make_shared<GoesNaN>(), four_batches(), std::nullopt, dir / "after"));
  CHECK(resumed.global_step() == 12);
  // Restored from the checkpoint, neither lost to null nor reset.
  CHECK(ratio->best_score() == 1.0);
  CHECK(spread->best_score() == std::numeric_limits<double>::infinity());
}

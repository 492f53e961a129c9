// The Lightning-style loop: epochs, steps, accumulation, clipping, validation, logging.
#include <catch2/catch.hpp>

#include <fstream>
#include <sstream>

#include "helpers.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;

namespace {

/// Trainer options for quiet tests: no progress bar, no sanity check, logs under `dir`.
TrainerOptions quiet(const test::TempDir& dir) {
  TrainerOptions o;
  o.enable_progress_bar = false;
  o.num_sanity_val_steps = 0;
  o.default_root_dir = dir.path();
  return o;
}

std::shared_ptr<test::LinearModule> linear(double lr = 0.05) {
  return with_seed(1, [&] { return std::make_shared<test::LinearModule>(4, lr); });
}

/// SGD that records the global gradient norm and the largest gradient element it sees.
class RecordingSGD : public torch::optim::SGD {
 public:
  using SGD::SGD;
  torch::Tensor step(LossClosure closure = nullptr) override {
    double sq = 0, mx = 0;
    for (auto& group : param_groups())
      for (auto& p : group.params())
        if (p.grad().defined()) {
          sq += p.grad().pow(2).sum().item<double>();
          mx = std::max(mx, p.grad().abs().max().item<double>());
        }
    norms.push_back(std::sqrt(sq));
    max_abs.push_back(mx);
    return SGD::step(closure);
  }
  std::vector<double> norms, max_abs;
};

class ClippedModule : public test::LinearModule {
 public:
  ClippedModule() : LinearModule(4, 0.01) {}
  at::Tensor training_step(const Batch& batch, int64_t i) override {
    return LinearModule::training_step(batch, i) * 1000; // large gradients
  }
  Optimizers configure_optimizers() override {
    opt = std::make_shared<RecordingSGD>(parameters(), torch::optim::SGDOptions(lr));
    return opt;
  }
  std::shared_ptr<RecordingSGD> opt;
};

} // namespace

TEST_CASE("fit counts epochs, steps and hooks", "[trainer]") {
  test::TempDir dir;
  auto cb = std::make_shared<test::CountingCallback>();
  auto o = quiet(dir);
  o.max_epochs = 3;
  o.callbacks = {cb};
  Trainer trainer(o);
  auto data = test::regression_data(80);
  trainer.fit(linear(), data::DataLoader(data, {.batch_size = 8}));
  CHECK(trainer.current_epoch() == 3);
  CHECK(trainer.global_step() == 30);
  CHECK(trainer.num_training_batches() == 10);
  CHECK(cb->fit_start == 1);
  CHECK(cb->fit_end == 1);
  CHECK(cb->epoch_start == 3);
  CHECK(cb->epoch_end == 3);
  CHECK(cb->batch_end == 30);
  CHECK(cb->exceptions == 0);
}

TEST_CASE("max_steps stops in the middle of an epoch", "[trainer]") {
  test::TempDir dir;
  auto cb = std::make_shared<test::CountingCallback>();
  auto o = quiet(dir);
  o.max_steps = 15;
  o.callbacks = {cb};
  Trainer trainer(o);
  trainer.fit(linear(), data::DataLoader(test::regression_data(80), {.batch_size = 8}));
  CHECK(trainer.global_step() == 15);
  CHECK(cb->batch_end == 15);
  CHECK(cb->epoch_start == 2);
  CHECK(trainer.batch_idx() == 5); // stopped after the 5th batch of the second epoch
}

TEST_CASE("limit_train_batches counts batches or a fraction of the epoch", "[trainer]") {
  test::TempDir dir;
  auto o = quiet(dir);
  o.max_epochs = 2;
  SECTION("a count") {
    o.limit_train_batches = 3;
    Trainer t(o);
    t.fit(linear(), data::DataLoader(test::regression_data(80), {.batch_size = 8}));
    CHECK(t.global_step() == 6);
  }
  SECTION("a fraction") {
    o.limit_train_batches = 0.5;
    Trainer t(o);
    t.fit(linear(), data::DataLoader(test::regression_data(80), {.batch_size = 8}));
    CHECK(t.global_step() == 10);
  }
}

TEST_CASE("Accumulating k batches equals one batch k times larger", "[trainer]") {
  test::TempDir dir;
  auto data = test::regression_data(64);
  for (int64_t k : {2, 4}) {
    CAPTURE(k);
    auto accumulated = linear(0.1);
    auto large = linear(0.1);
    REQUIRE(test::max_param_diff(*accumulated, *large) == 0);
    auto o = quiet(dir);
    o.max_epochs = 1;
    o.logger = false;
    o.accumulate_grad_batches = k;
    Trainer a(o);
    a.fit(accumulated, data::DataLoader(data, {.batch_size = 4}));
    o.accumulate_grad_batches = 1;
    Trainer b(o);
    b.fit(large, data::DataLoader(data, {.batch_size = 4 * k}));
    CHECK(a.global_step() == b.global_step());
    CHECK(a.global_step() == 16 / k);
    CHECK(test::max_param_diff(*accumulated, *large) < 1e-5);
  }
}

TEST_CASE("Gradient clipping bounds the norm or the values the optimizer sees", "[trainer]") {
  test::TempDir dir;
  auto data = test::regression_data(64);
  auto o = quiet(dir);
  o.max_epochs = 1;
  o.logger = false;
  SECTION("without clipping the gradients are large") {
    auto m = std::make_shared<ClippedModule>();
    Trainer(o).fit(m, data::DataLoader(data, {.batch_size = 8}));
    CHECK(*std::max_element(m->opt->norms.begin(), m->opt->norms.end()) > 10);
  }
  SECTION("by norm") {
    auto m = std::make_shared<ClippedModule>();
    o.gradient_clip_val = 0.5;
    Trainer(o).fit(m, data::DataLoader(data, {.batch_size = 8}));
    REQUIRE(m->opt->norms.size() == 8);
    for (auto n : m->opt->norms)
      CHECK(n <= Approx(0.5).epsilon(1e-4));
  }
  SECTION("by value") {
    auto m = std::make_shared<ClippedModule>();
    o.gradient_clip_val = 0.25;
    o.gradient_clip_algorithm = "value";
    Trainer(o).fit(m, data::DataLoader(data, {.batch_size = 8}));
    for (auto v : m->opt->max_abs)
      CHECK(v <= 0.25 + 1e-7);
  }
}

TEST_CASE("Validation runs when it is configured, and only then", "[trainer]") {
  test::TempDir dir;
  auto data = test::regression_data(80);
  auto val = data::DataLoader(test::regression_data(32, 4, 9), {.batch_size = 8});
  auto o = quiet(dir);
  o.max_epochs = 4;
  auto cb = std::make_shared<test::CountingCallback>();
  o.callbacks = {cb};
  SECTION("at every epoch end by default") {
    Trainer t(o);
    auto m = linear();
    t.fit(m, data::DataLoader(data, {.batch_size = 8}), val);
    CHECK(cb->validation_runs == 4);
    CHECK(m->validation_batches == 16);
    CHECK(t.callback_metrics().count("val_loss") == 1);
  }
  SECTION("twice per epoch with val_check_interval = 0.5") {
    o.val_check_interval = 0.5;
    Trainer(o).fit(linear(), data::DataLoader(data, {.batch_size = 8}), val);
    CHECK(cb->validation_runs == 8);
  }
  SECTION("every 3 batches with val_check_interval = 3") {
    o.max_epochs = 1;
    o.val_check_interval = 3;
    Trainer(o).fit(linear(), data::DataLoader(data, {.batch_size = 8}), val);
    CHECK(cb->validation_runs == 3);
  }
  SECTION("every second epoch with check_val_every_n_epoch = 2") {
    o.check_val_every_n_epoch = 2;
    Trainer(o).fit(linear(), data::DataLoader(data, {.batch_size = 8}), val);
    CHECK(cb->validation_runs == 2);
  }
  SECTION("not with limit_val_batches = 0") {
    o.limit_val_batches = 0;
    Trainer(o).fit(linear(), data::DataLoader(data, {.batch_size = 8}), val);
    CHECK(cb->validation_runs == 0);
  }
  SECTION("not when the module has no validation_step") {
    auto m = with_seed(1, [] { return std::make_shared<test::LinearModule>(4, 0.05, false); });
    Trainer(o).fit(m, data::DataLoader(data, {.batch_size = 8}), val);
    CHECK(m->validation_batches == 0);
  }
  SECTION("a sanity check first, whose metrics are not recorded") {
    o.num_sanity_val_steps = 2;
    o.max_epochs = 0;
    Trainer t(o);
    auto m = linear();
    t.fit(m, data::DataLoader(data, {.batch_size = 8}), val);
    CHECK(cb->sanity_runs == 1);
    CHECK(m->validation_batches == 2);
    CHECK(t.callback_metrics().count("val_loss") == 0);
  }
}

TEST_CASE("Logged metrics reach callback_metrics, the progress bar and the CSV", "[trainer]") {
  test::TempDir dir;
  auto o = quiet(dir);
  o.max_epochs = 2;
  o.log_every_n_steps = 5;
  Trainer t(o);
  t.fit(linear(), data::DataLoader(test::regression_data(80), {.batch_size = 8}),
        data::DataLoader(test::regression_data(16, 4, 3), {.batch_size = 8}));
  auto& m = t.callback_metrics();
  // on_step and on_epoch: both variants, plus the plain name.
  for (auto* key : {"train_loss", "train_loss_step", "train_loss_epoch", "val_loss"})
    CHECK(m.count(key) == 1);
  CHECK(t.progress_bar_metrics().count("train_loss") == 1);
  // The CSV has a row per log: steps 5, 10, 15, 20 plus epoch ends and validations.
  auto csv = t.log_dir() + "/metrics.csv";
  std::ifstream in(csv);
  REQUIRE(in.good());
  std::string header;
  std::getline(in, header);
  CHECK_THAT(header, Contains("train_loss_step") && Contains("train_loss_epoch") &&
                       Contains("val_loss") && Contains("step") && Contains("epoch"));
  std::vector<std::string> rows;
  for (std::string line; std::getline(in, line);)
    rows.push_back(line);
  CHECK(rows.size() == 4 + 2 + 2);
}

TEST_CASE("The progress bar draws lines with steps, rate and metrics", "[trainer][callbacks]") {
  auto line = ProgressBar::render("Epoch 1/3", 50, 200, 10.0, {{"loss", 0.25}}, true);
  CHECK_THAT(line, Contains("Epoch 1/3") && Contains("25%") && Contains("50/200") &&
                     Contains("00:10<00:30") && Contains("5it/s") && Contains("loss=0.25"));
  test::TempDir dir;
  std::ostringstream out;
  auto o = quiet(dir);
  o.max_epochs = 1;
  o.callbacks = {ProgressBar({.tty = false, .out = &out})};
  Trainer(o).fit(linear(), data::DataLoader(test::regression_data(80), {.batch_size = 8}));
  auto text = out.str();
  CHECK(std::count(text.begin(), text.end(), '\n') == 10); // 9 interval lines + epoch end
  CHECK_THAT(text, Contains("10/10") && Contains("train_loss="));
}

TEST_CASE("EarlyStopping stops when the monitored metric stops improving", "[trainer][callbacks]") {
  test::TempDir dir;
  auto o = quiet(dir);
  o.max_epochs = 50;
  SECTION("patience runs out") {
    // lr = 0: the loss never improves after the first check.
    auto stopper = std::make_shared<EarlyStopping>(EarlyStoppingOptions{.monitor = "val_loss", .patience = 2});
    o.callbacks = {stopper};
    Trainer t(o);
    t.fit(linear(0.0), data::DataLoader(test::regression_data(40), {.batch_size = 8}),
          data::DataLoader(test::regression_data(16, 4, 3), {.batch_size = 8}));
    CHECK(t.current_epoch() == 3);
    CHECK(stopper->wait_count() == 2);
    CHECK_THAT(stopper->reason(), Contains("did not improve"));
  }
  SECTION("a metric that was never logged is an error naming it") {
    o.callbacks = {EarlyStopping({.monitor = "val_acc"})};
    CHECK_THROWS_WITH(Trainer(o).fit(linear(), data::DataLoader(test::regression_data(40), {.batch_size = 8}),
                                     data::DataLoader(test::regression_data(16, 4, 3), {.batch_size = 8})),
                      Contains("val_acc") && Contains("val_loss"));
  }
  SECTION("bad options") {
    CHECK_THROWS_WITH(EarlyStopping({.monitor = "x", .mode = "up"}), Contains("mode"));
  }
}

class ScheduledModule : public test::LinearModule {
 public:
  Optimizers configure_optimizers() override {
    auto opt = std::make_shared<torch::optim::SGD>(parameters(), torch::optim::SGDOptions(0.1));
    return {opt, {std::make_shared<StepLR>(opt, 2, 0.5)}};
  }
};

TEST_CASE("Schedulers step per epoch and LearningRateMonitor logs the rate", "[trainer][callbacks]") {
  test::TempDir dir;
  auto o = quiet(dir);
  o.max_epochs = 5;
  auto monitor = std::make_shared<LearningRateMonitor>(LearningRateMonitorOptions{.logging_interval = "epoch"});
  o.callbacks = {monitor};
  Trainer t(o);
  t.fit(std::make_shared<ScheduledModule>(), data::DataLoader(test::regression_data(16), {.batch_size = 8}));
  // StepLR(step_size 2, gamma 0.5): epochs 0-1 at 0.1, 2-3 at 0.05, 4 at 0.025; after the
  // fifth epoch's step the count is 5, still 0.025.
  CHECK(monitor->last_logged().at("lr-SGD") == Approx(0.025));
  CHECK(t.optimizers()[0]->param_groups()[0].options().get_lr() == Approx(0.025));
  CHECK(t.lr_scheduler_configs()[0].scheduler->last_epoch() == 5);
  std::ifstream in(t.log_dir() + "/metrics.csv");
  std::string header;
  std::getline(in, header);
  CHECK_THAT(header, Contains("lr-SGD"));
}

TEST_CASE("Bad Trainer options are refused before anything runs", "[trainer]") {
  CHECK_THROWS_WITH(Trainer({.max_epochs = -5}), Contains("max_epochs"));
  CHECK_THROWS_WITH(Trainer({.devices = "4"}), Contains("num_workers"));
  CHECK_THROWS_WITH(Trainer({.accelerator = "tpu"}), Contains("tpu"));
  CHECK_THROWS_WITH(Trainer({.precision = "8-bit"}), Contains("8-bit"));
  CHECK_THROWS_WITH(Trainer({.strategy = "nonsense"}).fit(linear(), data::DataLoader(test::regression_data(8))),
                    Contains("unknown strategy 'nonsense'"));
  TrainerOptions o;
  o.accumulate_grad_batches = 0;
  CHECK_THROWS_WITH(Trainer(o), Contains("accumulate_grad_batches"));
}

TEST_CASE("A fit resumed from a mid-run checkpoint ends where an uninterrupted one does", "[trainer][checkpoint]") {
  test::TempDir dir;
  auto data = test::regression_data(80);
  auto o = quiet(dir);
  o.max_epochs = 3;
  o.logger = false;
  auto loader = data::DataLoader(data, {.batch_size = 8, .shuffle = true, .seed = 5});

  auto full = linear();
  Trainer(o).fit(full, loader);

  // Save after batch 4 of epoch 1, stop, and resume from there in a new Trainer.
  struct SaveAt : Callback {
    std::string path;
    void on_train_batch_end(Trainer& t, LightningModule&, const at::Tensor&, const Batch&,
                            int64_t i) override {
      if (t.current_epoch() == 1 && i == 4) {
        t.save_checkpoint(path);
        t.set_should_stop(true);
      }
    }
  };
  auto saver = std::make_shared<SaveAt>();
  saver->path = dir / "mid";
  auto first = linear();
  o.callbacks = {saver};
  Trainer(o).fit(first, loader);
  o.callbacks = {};
  auto resumed = linear(); // fresh weights: everything must come from the checkpoint
  Trainer t(o);
  t.fit(resumed, loader, std::nullopt, dir / "mid");
  CHECK(t.global_step() == 30);
  CHECK(test::max_param_diff(*full, *resumed) < 1e-6);
}

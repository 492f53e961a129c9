// Checkpoints: what they hold, how they fail, what is kept.
#include <catch2/catch.hpp>

#include <caf/all.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "core/metrics_json.hpp"
#include "helpers.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

/// A module with parameters, BatchNorm buffers, Adam and a step scheduler.
class Net : public LightningModule {
 public:
  Net() {
    fc = register_module("fc", torch::nn::Linear(4, 8));
    bn = register_module("bn", torch::nn::BatchNorm1d(8));
    out = register_module("out", torch::nn::Linear(8, 1));
  }
  at::Tensor training_step(const Batch& b, int64_t) override {
    auto loss = torch::mse_loss(out->forward(torch::relu(bn->forward(fc->forward(b.data)))), b.target);
    log("train_loss", loss, {.on_epoch = true});
    return loss;
  }
  void validation_step(const Batch& b, int64_t) override {
    log("val_loss", torch::mse_loss(out->forward(torch::relu(bn->forward(fc->forward(b.data)))), b.target));
  }
  Optimizers configure_optimizers() override {
    auto opt = std::make_shared<torch::optim::Adam>(parameters(), torch::optim::AdamOptions(1e-2));
    return {opt, {std::make_shared<StepLR>(opt, 1, 0.5)}};
  }
  torch::nn::Linear fc{nullptr}, out{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
};

/// Commits a small checkpoint with `metrics` under `dir/name`.
Checkpoint make_checkpoint(const std::string& dir, const std::string& name, Metrics metrics,
                           int64_t index = 0) {
  CheckpointWriter w((fs::path(dir) / name).string());
  w.add_file("model.pt", serialize_state_dict(StateDict({{"w", torch::full({3}, double(index))}})));
  w.add_file("notes.txt", std::string("checkpoint ") + name);
  CheckpointMetadata m;
  m.report_index = index;
  m.metrics = std::move(metrics);
  return w.commit(m);
}

/// Tensors of Adam's state, in parameter order.
std::vector<at::Tensor> adam_moments(torch::optim::Optimizer& opt) {
  std::vector<at::Tensor> result;
  for (auto& p : opt.param_groups()[0].params()) {
    auto& state = static_cast<torch::optim::AdamParamState&>(
      *opt.state().at(c10::guts::to_string(p.unsafeGetTensorImpl())));
    result.push_back(state.exp_avg().clone());
    result.push_back(state.exp_avg_sq().clone());
  }
  return result;
}

} // namespace

TEST_CASE("Every part of a checkpoint round-trips: weights, buffers, optimizer, scheduler, progress, callbacks, RNG", "[checkpoint]") {
  test::TempDir dir;
  auto data = data::DataLoader(test::regression_data(64), {.batch_size = 8, .shuffle = true});
  auto val = data::DataLoader(test::regression_data(16, 4, 5), {.batch_size = 8});
  auto stopper = std::make_shared<EarlyStopping>(EarlyStoppingOptions{.monitor = "val_loss", .patience = 50});
  // Save at the end of epoch 1 and note what the state was.
  struct Saver : Callback {
    std::string path;
    StateDict weights;
    std::vector<at::Tensor> moments;
    at::Tensor next_random;
    void on_train_epoch_end(Trainer& t, LightningModule& m) override {
      if (t.current_epoch() != 1)
        return;
      t.save_checkpoint(path);
      for (auto& item : caftrain::state_dict(m))
        weights.insert(item.key(), item.value().clone());
      moments = adam_moments(*t.optimizers()[0]);
      next_random = torch::rand({4});
    }
  };
  auto saver = std::make_shared<Saver>();
  saver->path = dir / "ckpt";
  auto o = test::quiet_options(dir);
  o.max_epochs = 2;
  o.callbacks = {stopper, saver};
  auto first = with_seed(1, [] { return std::make_shared<Net>(); });
  Trainer(o).fit(first, data, val);
  auto ckpt = Checkpoint::open(saver->path);
  CHECK_NOTHROW(ckpt.validate());
  for (auto* f : {"model.pt", "optimizer.pt", "trainer_state.json", "rng.pt"})
    CHECK(ckpt.has_file(f));
  CHECK(ckpt.metadata().global_step == 16);
  CHECK(ckpt.metadata().metrics.count("val_loss") == 1);

  // A new Trainer resumed from it at the same point (max_epochs = 2: nothing left to
  // train) holds exactly what was saved.
  auto restored_stopper = std::make_shared<EarlyStopping>(EarlyStoppingOptions{.monitor = "val_loss", .patience = 50});
  o.callbacks = {restored_stopper};
  auto second = with_seed(2, [] { return std::make_shared<Net>(); });
  Trainer t(o);
  torch::manual_seed(12345); // the checkpoint's RNG state must win
  t.fit(second, data, val, saver->path);
  CHECK(t.current_epoch() == 2);
  CHECK(t.global_step() == 16);
  auto restored = state_dict(*second);
  for (auto& item : saver->weights) {
    CAPTURE(item.key());
    CHECK(torch::equal(item.value(), restored[item.key()]));
  }
  CHECK(restored["bn.num_batches_tracked"].item<int64_t>() == 16);
  auto moments = adam_moments(*t.optimizers()[0]);
  REQUIRE(moments.size() == saver->moments.size());
  for (size_t i = 0; i < moments.size(); ++i)
    CHECK(torch::equal(moments[i], saver->moments[i]));
  CHECK(t.lr_scheduler_configs()[0].scheduler->last_epoch() == 2);
  CHECK(t.optimizers()[0]->param_groups()[0].options().get_lr() == Approx(1e-2 * 0.25));
  CHECK(restored_stopper->best_score() == Approx(stopper->best_score()));
  CHECK(restored_stopper->wait_count() == stopper->wait_count());
  SECTION("and the RNG continues where it was") {
    auto o2 = test::quiet_options(dir);
    o2.max_epochs = 2;
    struct Draw : Callback {
      at::Tensor value;
      void on_fit_start(Trainer&, LightningModule&) override {
        value = torch::rand({4});
      }
    };
    auto draw = std::make_shared<Draw>();
    o2.callbacks = {draw};
    Trainer(o2).fit(with_seed(3, [] { return std::make_shared<Net>(); }), data, val, saver->path);
    CHECK(torch::equal(draw->value, saver->next_random));
  }
}

TEST_CASE("Python's torch.load reads a checkpoint's model.pt", "[checkpoint][python]") {
  if (test::python_with_torch().empty()) {
    WARN("skipped: Debian's python3-torch is not installed");
    return;
  }
  test::TempDir dir;
  auto o = test::quiet_options(dir);
  o.max_epochs = 1;
  auto model = std::make_shared<Net>();
  Trainer t(o);
  t.fit(model, data::DataLoader(test::regression_data(16), {.batch_size = 8}));
  t.save_checkpoint(dir / "c");
  std::string out;
  REQUIRE(test::run_python("import torch\nd = torch.load('" + dir.path() +
                             "/c/model.pt')\nprint(sorted(d.keys()))\n",
                           out) == 0);
  CHECK_THAT(out, Contains("'bn.running_mean'") && Contains("'fc.weight'") && Contains("'out.bias'"));
}

TEST_CASE("A truncated, bit-flipped or missing file is refused, and the manager falls back to the previous good checkpoint", "[checkpoint]") {
  test::TempDir dir;
  CheckpointManager manager;
  auto older = make_checkpoint(dir.path(), "checkpoint_000000", {{"acc", 0.5}}, 0);
  auto newer = make_checkpoint(dir.path(), "checkpoint_000001", {{"acc", 0.6}}, 1);
  manager.register_checkpoint(older, older.metadata().metrics);
  manager.register_checkpoint(newer, newer.metadata().metrics);
  auto model = newer.file("model.pt");
  SECTION("truncated") {
    fs::resize_file(model, fs::file_size(model) - 10);
    CHECK_THROWS_WITH(newer.validate(), Contains("model.pt") && Contains("truncated"));
  }
  SECTION("bit-flipped") {
    std::fstream f(model, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(100);
    char c;
    f.get(c);
    f.seekp(100);
    f.put(static_cast<char>(c ^ 0x10));
    f.close();
    CHECK_THROWS_WITH(newer.validate(), Contains("model.pt") && Contains("CRC-32"));
  }
  SECTION("missing") {
    fs::remove(newer.file("notes.txt"));
    CHECK_THROWS_WITH(newer.validate(), Contains("notes.txt") && Contains("missing"));
  }
  SECTION("metadata missing") {
    fs::remove(newer.file(kMetadataFile));
    CHECK_THROWS_WITH(Checkpoint::open(newer.path()), Contains("interrupted"));
    CHECK(find_checkpoints(dir.path()).size() == 1);
  }
  auto fallback = manager.latest_valid();
  REQUIRE(fallback);
  CHECK(fallback->path() == older.path());
  CHECK(fs::exists(newer.path())); // the corrupt one stays for inspection
}

TEST_CASE("A save interrupted at any step of the protocol never yields a valid but wrong checkpoint", "[checkpoint]") {
  test::TempDir dir;
  auto good = make_checkpoint(dir.path(), "checkpoint_000000", {{"acc", 0.1}}, 0);
  for (std::string step : {"files", "metadata", "rename"}) {
    CAPTURE(step);
    auto target = dir / ("checkpoint_" + step);
    {
      CheckpointWriter w(target);
      w.add_file("model.pt", serialize_state_dict(StateDict({{"w", torch::full({3}, 7.0)}})));
      w.set_fault_hook([&](const std::string& at) {
        if (at == step)
          throw std::runtime_error("crash at " + at);
      });
      CheckpointMetadata m;
      m.report_index = 1;
      CHECK_THROWS_WITH(w.commit(m), Contains("crash at " + step));
    }
    // Either nothing under the final name, or a complete checkpoint with the right data.
    auto found = find_checkpoints(dir.path());
    if (step == "rename") {
      REQUIRE(found.size() == 2);
      CHECK_NOTHROW(found.back().validate());
      CHECK(found.back().model_state_dict()["w"][0].item<double>() == 7.0);
      fs::remove_all(target);
    } else {
      CHECK_FALSE(fs::exists(target));
      REQUIRE(found.size() == 1);
      CHECK(found.front().path() == good.path());
    }
  }
  // No staging directory is left behind by a writer that did not commit.
  for (auto& entry : fs::directory_iterator(dir.path()))
    CHECK(entry.path().filename().string().rfind(".staging", 0) != 0);
  SECTION("an existing checkpoint is never overwritten") {
    CheckpointWriter w(good.path());
    w.add_file("model.pt", std::string("x"));
    CHECK_THROWS_WITH(w.commit({}), Contains("never overwritten"));
    CHECK_NOTHROW(Checkpoint::open(good.path()).validate());
  }
}

TEST_CASE("The manager keeps the best k by score in both orders, and always the latest", "[checkpoint]") {
  test::TempDir dir;
  std::vector<double> scores = {0.3, 0.9, 0.1, 0.7, 0.5};
  auto fill = [&](CheckpointManager& m) {
    for (size_t i = 0; i < scores.size(); ++i) {
      auto c = make_checkpoint(dir.path(), m.policy().score_order + std::to_string(i) +
                                             m.policy().score_attribute,
                               {{"acc", scores[i]}}, static_cast<int64_t>(i));
      m.register_checkpoint(c, c.metadata().metrics);
    }
  };
  auto scores_of = [](const CheckpointManager& m) {
    std::vector<double> r;
    for (auto& [c, metrics] : m.best())
      r.push_back(metrics.at("acc"));
    return r;
  };
  SECTION("max") {
    CheckpointManager m({.num_to_keep = 2, .score_attribute = "acc", .score_order = "max"});
    fill(m);
    CHECK(scores_of(m) == std::vector<double>{0.9, 0.7, 0.5}); // 0.5 is the latest
    CHECK(m.latest()->metadata().metrics.at("acc") == 0.5);
    CHECK_FALSE(fs::exists(dir / "max0acc")); // dropped ones are deleted
    CHECK(fs::exists(dir / "max1acc"));
  }
  SECTION("min") {
    CheckpointManager m({.num_to_keep = 2, .score_attribute = "acc", .score_order = "min"});
    fill(m);
    CHECK(scores_of(m) == std::vector<double>{0.1, 0.3, 0.5});
  }
  SECTION("without a score: the most recent") {
    CheckpointManager m({.num_to_keep = 2});
    fill(m);
    CHECK(scores_of(m) == std::vector<double>{0.5, 0.7});
  }
  SECTION("without a limit: all") {
    CheckpointManager m({.score_attribute = "acc"});
    fill(m);
    CHECK(m.kept().size() == 5);
  }
  SECTION("a missing score attribute is an error naming it, before anything changes") {
    CheckpointManager m({.num_to_keep = 1, .score_attribute = "val_accuracy"});
    auto c = make_checkpoint(dir.path(), "c", {{"acc", 1.0}});
    CHECK_THROWS_WITH(m.register_checkpoint(c, c.metadata().metrics),
                      Contains("val_accuracy") && Contains("acc"));
    CHECK(m.kept().empty());
    CHECK(fs::exists(c.path()));
  }
}

TEST_CASE("A run whose reports lack the score attribute fails at the first checkpoint, naming it", "[checkpoint]") {
  test::TempDir dir;
  caf::actor_system_config cfg;
  init(cfg);
  caf::actor_system sys{cfg};
  auto fn = [] {
    auto d = fs::path(train::get_context().run_dir) / ("mine" + std::to_string(train::get_context().world_rank));
    fs::create_directories(d);
    std::ofstream(d / "x.txt") << "x";
    train::report({{"loss", 1.0}}, Checkpoint::from_directory(d.string()));
  };
  TorchTrainerOptions o;
  o.scaling.num_workers = 2;
  o.run.storage_path = dir.path();
  o.run.name = "scored";
  o.run.failure.max_failures = 3;
  o.run.checkpoint.checkpoint_score_attribute = "val_accuracy";
  auto r = TorchTrainer(sys, fn, o).fit();
  REQUIRE(r.error);
  CHECK(r.error->code == Errc::invalid_config);
  CHECK(r.attempts == 1); // a configuration error is not retried
  CHECK_THAT(r.error->message, Contains("val_accuracy") && Contains("loss"));
}

TEST_CASE("ModelCheckpoint keeps the best k by its monitor and can resume from them", "[checkpoint][callbacks]") {
  test::TempDir dir;
  auto data = data::DataLoader(test::regression_data(64), {.batch_size = 8});
  auto val = data::DataLoader(test::regression_data(16, 4, 5), {.batch_size = 8});
  auto cb = std::make_shared<ModelCheckpoint>(ModelCheckpointOptions{
    .dirpath = dir / "ckpts", .monitor = "val_loss", .mode = "min", .save_top_k = 2, .save_last = true});
  auto o = test::quiet_options(dir);
  o.max_epochs = 5;
  o.callbacks = {cb};
  Trainer t(o);
  t.fit(std::make_shared<Net>(), data, val);
  auto kept = cb->best_k_models();
  CHECK(kept.size() >= 2);
  CHECK(kept.size() <= 3); // best 2, plus the latest when it is not among them
  REQUIRE_FALSE(cb->best_model_path().empty());
  auto best = Checkpoint::open(cb->best_model_path());
  CHECK(best.metadata().metrics.at("val_loss") == Approx(*cb->best_model_score()));
  for (auto& p : kept)
    CHECK(Checkpoint::open(p).metadata().metrics.at("val_loss") >= *cb->best_model_score());
  CHECK(fs::is_symlink(dir / "ckpts/last"));
  CHECK(fs::canonical(dir / "ckpts/last") == fs::canonical(cb->last_model_path()));
  CHECK(fs::path(cb->last_model_path()).filename() == "epoch=4-step=40");
  // Resume from the best: the epoch continues after it.
  auto o2 = test::quiet_options(dir);
  o2.max_epochs = 6;
  Trainer resumed(o2);
  resumed.fit(std::make_shared<Net>(), data, val, cb->best_model_path());
  CHECK(resumed.current_epoch() == 6);
  SECTION("a monitor that is never logged is an error naming it") {
    auto o3 = test::quiet_options(dir);
    o3.max_epochs = 1;
    o3.callbacks = {ModelCheckpoint({.dirpath = dir / "x", .monitor = "val_acc"})};
    CHECK_THROWS_WITH(Trainer(o3).fit(std::make_shared<Net>(), data, val),
                      Contains("val_acc") && Contains("val_loss"));
  }
}

// -- non-finite metrics ---------------------------------------------------------------------

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::string text_of(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

} // namespace

TEST_CASE("A checkpoint whose metrics are NaN or infinite reopens with them and validates", "[checkpoint]") {
  test::TempDir dir;
  auto c = make_checkpoint(dir.path(), "odd", {{"loss", kNaN}, {"up", kInf}, {"down", -kInf}, {"acc", 0.5}});
  auto text = text_of(c.file(kMetadataFile));
  CHECK_THAT(text, Contains("\"NaN\"") && Contains("\"Infinity\"") && Contains("\"-Infinity\""));
  auto reopened = Checkpoint::open(c.path());
  CHECK_NOTHROW(reopened.validate());
  auto& m = reopened.metadata().metrics;
  CHECK(std::isnan(m.at("loss")));
  CHECK(m.at("up") == kInf);
  CHECK(m.at("down") == -kInf);
  CHECK(m.at("acc") == 0.5);
  SECTION("metadata.json of older versions, with null for a NaN, opens as NaN") {
    auto pos = text.find("\"NaN\"");
    text.replace(pos, 5, "null");
    std::ofstream(c.file(kMetadataFile)) << text;
    CHECK(std::isnan(Checkpoint::open(c.path()).metadata().metrics.at("loss")));
  }
  SECTION("a metric that is no number is refused, naming it") {
    text.replace(text.find("\"NaN\""), 5, "\"lots\"");
    std::ofstream(c.file(kMetadataFile)) << text;
    CHECK_THROWS_WITH(Checkpoint::open(c.path()), Contains("metadata is not valid") &&
                                                     Contains("'loss'") && Contains("lots"));
  }
}

TEST_CASE("Metrics round-trip through JSON with NaN and infinities, and bad values are named", "[checkpoint]") {
  Metrics m = {{"a", 1.25}, {"nan", kNaN}, {"inf", kInf}, {"-inf", -kInf}};
  auto back = metrics_from_json(metrics_to_json(m));
  CHECK(back.size() == 4);
  CHECK(back.at("a") == 1.25);
  CHECK(std::isnan(back.at("nan")));
  CHECK(back.at("inf") == kInf);
  CHECK(back.at("-inf") == -kInf);
  CHECK(number_from_json(number_to_json(-0.0)) == 0.0);
  CHECK_THROWS_WITH(number_from_json(nlohmann::json::array()), Contains("not a number"));
  CHECK_THROWS_WITH(metrics_from_json(nlohmann::json{{"x", "fast"}}), Contains("'x'") && Contains("fast"));
}

TEST_CASE("A NaN score is never the best checkpoint and never breaks the ordering", "[checkpoint]") {
  test::TempDir dir;
  auto scores_of = [](const std::vector<std::pair<Checkpoint, Metrics>>& items) {
    std::vector<double> r;
    for (auto& [c, metrics] : items)
      r.push_back(metrics.at("acc"));
    return r;
  };
  int64_t index = 0; // report order across calls
  auto register_all = [&](CheckpointManager& m, const std::vector<double>& scores) {
    for (double score : scores) {
      auto c = make_checkpoint(dir.path(), "c" + std::to_string(index), {{"acc", score}}, index);
      ++index;
      m.register_checkpoint(c, c.metadata().metrics);
    }
  };
  std::vector<double> scores = {0.3, kNaN, 0.9, kNaN, 0.1, 0.7, kNaN};
  SECTION("max: the best two numbers, and the latest although it is NaN") {
    CheckpointManager m({.num_to_keep = 2, .score_attribute = "acc", .score_order = "max"});
    register_all(m, scores);
    auto best = scores_of(m.best());
    REQUIRE(best.size() == 3);
    CHECK(best[0] == 0.9);
    CHECK(best[1] == 0.7);
    CHECK(std::isnan(best[2]));
    CHECK(std::isnan(m.latest()->metadata().metrics.at("acc")));
  }
  SECTION("min: NaN is not the smallest either") {
    CheckpointManager m({.num_to_keep = 2, .score_attribute = "acc", .score_order = "min"});
    register_all(m, scores);
    auto best = scores_of(m.best());
    REQUIRE(best.size() == 3);
    CHECK(best[0] == 0.1);
    CHECK(best[1] == 0.3);
    CHECK(std::isnan(best[2]));
  }
  SECTION("many checkpoints, every third NaN: numbers sorted, NaNs last") {
    std::vector<double> many;
    for (int i = 0; i < 60; ++i)
      many.push_back(i % 3 == 1 ? kNaN : std::sin(i * 1.7));
    CheckpointManager all({.score_attribute = "acc", .score_order = "max"});
    register_all(all, many);
    auto best = scores_of(all.best());
    REQUIRE(best.size() == 60);
    CHECK(std::count_if(best.begin(), best.begin() + 40, [](double x) { return std::isnan(x); }) == 0);
    CHECK(std::all_of(best.begin() + 40, best.end(), [](double x) { return std::isnan(x); }));
    CHECK(std::is_sorted(best.begin(), best.begin() + 40, std::greater<double>()));
  }
  SECTION("NaN scores are kept while there is room, then dropped first") {
    CheckpointManager m({.num_to_keep = 2, .score_attribute = "acc", .score_order = "max",
                         .keep_latest = false});
    register_all(m, {kNaN, kNaN});
    CHECK(m.kept().size() == 2);
    register_all(m, {kNaN, kNaN, 0.2});
    auto best = scores_of(m.best());
    REQUIRE(best.size() == 2);
    CHECK(best[0] == 0.2);
    CHECK(std::isnan(best[1]));
  }
}

namespace {

/// Net whose validation loss reads NaN in the given epochs.
class SometimesNaN : public Net {
 public:
  explicit SometimesNaN(std::set<int64_t> epochs) : nan_epochs(std::move(epochs)) {}
  void validation_step(const Batch& b, int64_t i) override {
    if (nan_epochs.count(current_epoch()))
      log("val_loss", kNaN);
    else
      Net::validation_step(b, i);
  }
  std::set<int64_t> nan_epochs;
};

} // namespace

TEST_CASE("ModelCheckpoint never picks a NaN checkpoint as best in a real fit", "[checkpoint][callbacks]") {
  test::TempDir dir;
  auto data = data::DataLoader(test::regression_data(64), {.batch_size = 8});
  auto val = data::DataLoader(test::regression_data(16, 4, 5), {.batch_size = 8});
  auto o = test::quiet_options(dir);
  o.max_epochs = 5;
  SECTION("mixed: the best two are finite, and checkpoints with NaN still open") {
    auto cb = std::make_shared<ModelCheckpoint>(ModelCheckpointOptions{
      .dirpath = dir / "mixed", .monitor = "val_loss", .mode = "min", .save_top_k = 2});
    o.callbacks = {cb};
    Trainer t(o);
    t.fit(std::make_shared<SometimesNaN>(std::set<int64_t>{0, 2, 4}), data, val);
    auto kept = cb->best_k_models();
    REQUIRE(kept.size() == 2);
    for (auto& p : kept)
      CHECK(std::isfinite(Checkpoint::open(p).metadata().metrics.at("val_loss")));
    CHECK_THAT(cb->best_model_path(), Contains("epoch=1") || Contains("epoch=3"));
    REQUIRE(cb->best_model_score());
    CHECK(std::isfinite(*cb->best_model_score()));
    CHECK(*cb->best_model_score() ==
          Approx(Checkpoint::open(cb->best_model_path()).metadata().metrics.at("val_loss")));
  }
  SECTION("only NaN so far: saved, with the worst score of the mode, until a number comes") {
    auto cb = std::make_shared<ModelCheckpoint>(ModelCheckpointOptions{
      .dirpath = dir / "nan", .monitor = "val_loss", .mode = "min", .save_top_k = 1});
    o.max_epochs = 2;
    o.callbacks = {cb};
    Trainer t(o);
    t.fit(std::make_shared<SometimesNaN>(std::set<int64_t>{0, 1}), data, val);
    CHECK_THAT(cb->best_model_path(), Contains("epoch=0"));
    CHECK(cb->best_model_score() == kInf);
    auto resumed = std::make_shared<ModelCheckpoint>(ModelCheckpointOptions{
      .dirpath = dir / "nan", .monitor = "val_loss", .mode = "min", .save_top_k = 1});
    auto o2 = test::quiet_options(dir);
    o2.max_epochs = 3;
    o2.callbacks = {resumed};
    Trainer t2(o2);
    t2.fit(std::make_shared<SometimesNaN>(std::set<int64_t>{0, 1}), data, val, cb->best_model_path());
    CHECK_THAT(resumed->best_model_path(), Contains("epoch=2"));
    CHECK(std::isfinite(*resumed->best_model_score()));
    CHECK(resumed->best_k_models().size() == 1);
  }
}

TEST_CASE("ModelCheckpoint with save_top_k = 0 keeps only last, or with save_last off nothing", "[checkpoint][callbacks]") {
  test::TempDir dir;
  auto data = data::DataLoader(test::regression_data(64), {.batch_size = 8});
  auto val = data::DataLoader(test::regression_data(16, 4, 5), {.batch_size = 8});
  auto o = test::quiet_options(dir);
  o.max_epochs = 3;
  SECTION("save_last: one checkpoint, the latest, reachable as last") {
    auto cb = std::make_shared<ModelCheckpoint>(
      ModelCheckpointOptions{.dirpath = dir / "last_only", .save_top_k = 0, .save_last = true});
    o.callbacks = {cb};
    Trainer t(o);
    t.fit(std::make_shared<Net>(), data, val);
    std::vector<std::string> entries;
    for (auto& e : fs::directory_iterator(dir / "last_only"))
      entries.push_back(e.path().filename().string());
    std::sort(entries.begin(), entries.end());
    CHECK(entries == std::vector<std::string>{"epoch=2-step=24", "last"});
    CHECK(fs::canonical(dir / "last_only/last") == fs::canonical(cb->last_model_path()));
    CHECK(cb->best_model_path().empty()); // Lightning: no top-k, so no best
    CHECK(cb->best_k_models().empty());
    CHECK_NOTHROW(Checkpoint::open(cb->last_model_path()).validate());
    auto o2 = test::quiet_options(dir);
    o2.max_epochs = 4;
    Trainer resumed(o2);
    resumed.fit(std::make_shared<Net>(), data, val, (dir / "last_only/last"));
    CHECK(resumed.current_epoch() == 4);
    CHECK(resumed.global_step() == 32);
  }
  SECTION("without save_last: nothing is saved") {
    auto cb = std::make_shared<ModelCheckpoint>(
      ModelCheckpointOptions{.dirpath = dir / "none", .monitor = "val_loss", .save_top_k = 0});
    o.callbacks = {cb};
    Trainer(o).fit(std::make_shared<Net>(), data, val);
    CHECK_FALSE(fs::exists(dir / "none"));
    CHECK(cb->last_model_path().empty());
    CHECK(cb->best_model_path().empty());
  }
}

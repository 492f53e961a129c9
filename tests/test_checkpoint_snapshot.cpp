// Checkpoint snapshots: taken on the training thread (copies), serialized and written
// later, each file once with its checksum computed as it is written.
#include <catch2/catch.hpp>

#include <fstream>

#include <nlohmann/json.hpp>

#include "checkpoint/files.hpp"
#include "helpers.hpp"
#include "train/trainer_state.hpp"

using namespace caftrain;
using namespace caftrain::test;
namespace fs = std::filesystem;
namespace o = torch::optim;

namespace {

/// An optimizer of each kind optimizers_source copies, over `params`.
std::vector<std::pair<std::string, std::shared_ptr<o::Optimizer>>> every_kind(const std::vector<at::Tensor>& params) {
  return {
    {"Adam", std::make_shared<o::Adam>(params, o::AdamOptions(1e-2))},
    {"AdamW amsgrad", std::make_shared<o::AdamW>(params, o::AdamWOptions(1e-2).amsgrad(true))},
    {"SGD momentum", std::make_shared<o::SGD>(params, o::SGDOptions(1e-2).momentum(0.9))},
    {"RMSprop centered", std::make_shared<o::RMSprop>(params, o::RMSpropOptions(1e-2).momentum(0.5).centered(true))},
    {"Adagrad", std::make_shared<o::Adagrad>(params, o::AdagradOptions(1e-2))},
  };
}

void step(torch::nn::Linear& model, o::Optimizer& opt, int64_t seed) {
  torch::manual_seed(seed);
  opt.zero_grad();
  model->forward(torch::randn({5, 4})).pow(2).sum().backward();
  opt.step();
}

/// Every state tensor of the optimizer saved in `bytes` (libtorch's own load), in
/// parameter order, by "<param index>/<name>".
std::map<std::string, at::Tensor> loaded_state(const std::vector<char>& bytes, const std::shared_ptr<o::Optimizer>& like,
                                               torch::nn::Linear& model) {
  auto saved = read_saved_optimizers(bytes, {like}, "test");
  REQUIRE(saved.size() == 1);
  REQUIRE(saved[0].groups.size() == 1);
  std::map<std::string, at::Tensor> result;
  auto& group = saved[0].groups[0];
  REQUIRE(group.state.size() == model->parameters().size());
  for (size_t i = 0; i < group.state.size(); ++i)
    for (auto& [name, t] : group.state[i])
      result[std::to_string(i) + "/" + name] = t;
  return result;
}

bool same(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
  if (a.size() != b.size())
    return false;
  for (auto& [key, t] : a) {
    auto it = b.find(key);
    if (it == b.end() || !torch::equal(t, it->second))
      return false;
  }
  return true;
}

} // namespace

TEST_CASE("An optimizer snapshot holds the state of when it was taken, for every optimizer kind, and libtorch loads it", "[checkpoint][snapshot]") {
  for (int k = 0; k < 5; ++k) {
    torch::manual_seed(0);
    auto model = torch::nn::Linear(4, 3);
    auto [kind, opt] = every_kind(model->parameters())[static_cast<size_t>(k)];
    SECTION(kind) {
      step(model, *opt, 1);
      step(model, *opt, 2);
      TensorCopies copies;
      auto source = optimizers_source({opt}, copies);
      auto then = optimizers_bytes({opt});
      step(model, *opt, 3); // the optimizer goes on while the snapshot waits to be written
      auto now = optimizers_bytes({opt});
      auto written = bytes_of(source);
      auto snapshot = loaded_state(written, opt, model);
      CHECK_FALSE(snapshot.empty());
      CHECK(same(snapshot, loaded_state(then, opt, model)));
      CHECK_FALSE(same(snapshot, loaded_state(now, opt, model)));
      CHECK(copies.bytes() > 0);

      // libtorch's Optimizer::load reads the snapshot's archive as its own.
      auto fresh_model = torch::nn::Linear(4, 3);
      auto fresh = every_kind(fresh_model->parameters())[static_cast<size_t>(k)].second;
      torch::serialize::InputArchive archive;
      archive.load_from(written.data(), written.size());
      torch::serialize::InputArchive nested;
      archive.read("optimizer_0", nested);
      fresh->load(nested);
      CHECK(fresh->state().size() == opt->state().size());
    }
  }
}

TEST_CASE("An LBFGS optimizer, which has no snapshot copy, is serialized at once", "[checkpoint][snapshot]") {
  // (Not stepped: libtorch 1.13 cannot save LBFGS state after a step, with or without
  // snapshots: "Cannot access storage of UndefinedTensorImpl".)
  auto model = torch::nn::Linear(4, 1);
  auto opt = std::make_shared<o::LBFGS>(model->parameters(), o::LBFGSOptions(0.1));
  TensorCopies copies;
  auto source = optimizers_source({opt}, copies);
  CHECK(bytes_of(source) == optimizers_bytes({opt}));
  CHECK(copies.bytes() == 0);
}

TEST_CASE("TensorCopies reuses a buffer nobody holds, and never one a snapshot still holds", "[checkpoint][snapshot]") {
  TensorCopies copies;
  auto a = torch::arange(1000, torch::kFloat);
  auto first = copies.copy("x", a);
  CHECK(torch::equal(first, a));
  CHECK(first.data_ptr() != a.data_ptr());
  auto first_ptr = first.data_ptr();
  first = at::Tensor(); // written and dropped
  auto second = copies.copy("x", a * 2);
  CHECK(second.data_ptr() == first_ptr); // warm memory again
  CHECK(torch::equal(second, a * 2));
  auto third = copies.copy("x", a * 3); // `second` is still held (being written)
  CHECK(third.data_ptr() != second.data_ptr());
  CHECK(torch::equal(second, a * 2));
  CHECK(torch::equal(third, a * 3));
  auto reshaped = copies.copy("x", torch::ones({7}));
  CHECK(reshaped.sizes() == torch::IntArrayRef{7});
  CHECK_FALSE(copies.copy("undefined", at::Tensor()).defined());
  CHECK(copies.bytes() == 7 * 4);
}

TEST_CASE("write_file_streamed writes what its source gives, in small and large pieces, with their CRC-32", "[checkpoint][snapshot]") {
  TempDir dir;
  std::vector<char> all;
  std::vector<size_t> sizes = {1, 10, (size_t{2} << 20) + 5, 3, (size_t{1} << 20) - 1, 2, (size_t{1} << 20) + 1, 0, 7};
  char next = 0;
  std::vector<std::vector<char>> pieces;
  for (auto n : sizes) {
    std::vector<char> piece(n);
    for (auto& c : piece)
      c = next++;
    all.insert(all.end(), piece.begin(), piece.end());
    pieces.push_back(std::move(piece));
  }
  auto path = dir / "file.bin";
  auto written = write_file_streamed(path, [&](const ByteSink& out) {
    for (auto& p : pieces)
      out(p.data(), p.size());
  }, true);
  CHECK(written.size == all.size());
  CHECK(written.crc32 == crc32_of(all.data(), all.size()));
  CHECK(read_file(path) == all);
  CHECK(crc32_of_file(path) == written.crc32);
  CHECK_THROWS_WITH(write_file_streamed(dir / "missing/dir/file", bytes_source({'x'}), false),
                    Catch::Matchers::Contains("missing/dir/file"));
}

TEST_CASE("A staging directory's digests spare the persister a second read of each file; a file that does not match them is read", "[checkpoint][snapshot]") {
  TempDir dir;
  CheckpointFiles files;
  files["a.bin"] = bytes_source(std::vector<char>(5000, 'a'));
  files["sub/b.bin"] = bytes_source(std::vector<char>(300, 'b'));
  auto staged = dir / "staged";
  fs::create_directories(staged);
  write_staged_files(staged, files, true);
  REQUIRE(fs::exists(fs::path(staged) / kStagedDigestsFile));

  CheckpointWriter writer(dir / "ckpt");
  writer.move_directory(staged);
  auto ckpt = writer.commit({});
  CHECK(ckpt.metadata().files.size() == 2); // the digests file is not part of it
  CHECK_FALSE(ckpt.has_file(kStagedDigestsFile));
  CHECK_FALSE(fs::exists(staged));
  CHECK_NOTHROW(ckpt.validate());
  auto a = std::vector<char>(5000, 'a');
  CHECK(ckpt.metadata().files.at("a.bin").crc32 == crc32_of(a.data(), a.size()));

  // The persister takes a listed digest as its writer's (no re-read): a writer that lied
  // makes a checkpoint that validation refuses. A size that does not match is read.
  auto lying = dir / "lying";
  fs::create_directories(fs::path(lying) / "sub");
  std::ofstream(fs::path(lying) / "a.bin", std::ios::binary).write(a.data(), static_cast<std::streamsize>(a.size()));
  std::ofstream(fs::path(lying) / "sub/b.bin") << "bbb";
  write_staged_digests(lying, {{"a.bin", FileDigest{5000, 12345}}, {"sub/b.bin", FileDigest{99, 1}}}, false);
  CheckpointWriter second(dir / "ckpt2");
  second.move_directory(lying);
  auto ckpt2 = second.commit({});
  CHECK(ckpt2.metadata().files.at("a.bin").crc32 == 12345u);
  CHECK(ckpt2.metadata().files.at("sub/b.bin").size == 3u);
  CHECK(ckpt2.metadata().files.at("sub/b.bin").crc32 == crc32_of("bbb", 3));
  CHECK_THROWS_WITH(ckpt2.validate(), Catch::Matchers::Contains("a.bin") && Catch::Matchers::Contains("CRC-32"));
}

namespace {

/// Takes a snapshot at one step and keeps it; records the weights then.
class SnapshotAt : public Callback {
 public:
  explicit SnapshotAt(int64_t at_step) : at_step_(at_step) {}
  void on_train_batch_end(Trainer& t, LightningModule& m, const at::Tensor&, const Batch&, int64_t) override {
    if (t.global_step() != at_step_)
      return;
    files = checkpoint_files(t);
    for (auto& item : caftrain::state_dict(m))
      weights.insert(item.key(), item.value().clone());
  }
  CheckpointFiles files;
  StateDict weights;

 private:
  int64_t at_step_;
};

} // namespace

TEST_CASE("A fit's checkpoint snapshot is the fit at the snapshot, written after the fit went on", "[checkpoint][snapshot]") {
  TempDir dir;
  auto model = std::make_shared<LinearModule>();
  auto snap = std::make_shared<SnapshotAt>(3);
  auto options = quiet_options(dir);
  options.max_steps = 8;
  options.callbacks = {snap};
  Trainer trainer(options);
  trainer.fit(model, data::DataLoader(regression_data(64), {.batch_size = 8}));
  REQUIRE(snap->files.count("model.pt") == 1);
  REQUIRE(snap->files.count("optimizer.pt") == 1);
  auto staged = dir / "staged";
  fs::create_directories(staged);
  write_staged_files(staged, snap->files, true);
  CheckpointWriter writer(dir / "ckpt");
  writer.move_directory(staged);
  auto ckpt = writer.commit({});
  ckpt.validate();
  auto saved = ckpt.model_state_dict();
  bool moved_on = false;
  for (auto& item : snap->weights) {
    REQUIRE(saved.find(item.key()));
    CHECK(torch::equal(*saved.find(item.key()), item.value()));
    moved_on = moved_on || !torch::equal(item.value(), state_dict(*model)[item.key()]);
  }
  CHECK(moved_on); // training went on after the snapshot
  auto state = read_file(ckpt.file("trainer_state.json"));
  CHECK(nlohmann::json::parse(state.begin(), state.end()).at("global_step") == 3);
}

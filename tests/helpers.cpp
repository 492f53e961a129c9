#include "helpers.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <array>
#include <cstdlib>
#include <fstream>

namespace caftrain::test {

namespace fs = std::filesystem;

TempDir::TempDir() {
  // A worker process runs the test case up to its TorchTrainer and never ends it: it
  // makes no directory it would leave behind (its run's paths come from the driver).
  if (is_worker_process()) {
    path_ = "/nonexistent/caftrain-worker-process";
    return;
  }
  std::string pattern = (fs::temp_directory_path() / "caftrain-test-XXXXXX").string();
  if (!::mkdtemp(pattern.data()))
    throw std::runtime_error("mkdtemp failed");
  path_ = pattern;
}

TempDir::~TempDir() {
  if (is_worker_process())
    return;
  std::error_code ec;
  fs::remove_all(path_, ec);
}

void check_same_weights(const Result& a, const Result& b) {
  REQUIRE(a.checkpoint);
  REQUIRE(b.checkpoint);
  auto wa = a.checkpoint->model_state_dict();
  auto wb = b.checkpoint->model_state_dict();
  REQUIRE(wa.size() == wb.size());
  for (auto& item : wa) {
    CAPTURE(item.key());
    CHECK(torch::allclose(item.value(), wb[item.key()], 0, 1e-6));
  }
}

TrainerOptions quiet_options(const TempDir& dir) {
  TrainerOptions o;
  o.enable_progress_bar = false;
  o.num_sanity_val_steps = 0;
  o.logger = false;
  o.default_root_dir = dir.path();
  return o;
}

std::shared_ptr<data::TensorDataset> regression_data(int64_t n, int64_t features, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto x = torch::randn({n, features}, gen);
  auto w = torch::arange(1, features + 1, torch::kFloat).unsqueeze(1) / features;
  auto y = x.mm(w) + 0.5 + 0.01 * torch::randn({n, 1}, gen);
  return std::make_shared<data::TensorDataset>(x, y);
}

LinearModule::LinearModule(int64_t features, double lr, bool with_validation)
  : lr(lr), with_validation(with_validation) {
  linear = register_module("linear", torch::nn::Linear(features, 1));
}

at::Tensor LinearModule::training_step(const Batch& batch, int64_t) {
  auto loss = torch::mse_loss(linear->forward(batch.data), batch.target);
  log("train_loss", loss, {.prog_bar = true, .on_step = true, .on_epoch = true});
  return loss;
}

void LinearModule::validation_step(const Batch& batch, int64_t batch_idx) {
  if (!with_validation)
    return LightningModule::validation_step(batch, batch_idx);
  ++validation_batches;
  log("val_loss", torch::mse_loss(linear->forward(batch.data), batch.target), {.prog_bar = true});
}

Optimizers LinearModule::configure_optimizers() {
  return std::make_shared<torch::optim::SGD>(parameters(), torch::optim::SGDOptions(lr));
}

double max_param_diff(const torch::nn::Module& a, const torch::nn::Module& b) {
  auto pa = a.parameters();
  auto pb = b.parameters();
  double diff = 0;
  for (size_t i = 0; i < pa.size(); ++i)
    diff = std::max(diff, (pa[i] - pb[i]).abs().max().item<double>());
  return diff;
}

std::string python_with_torch() {
  static std::string cached = [] {
    if (::access("/usr/bin/python3", X_OK) != 0)
      return std::string();
    int rc = std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1");
    return rc == 0 ? std::string("/usr/bin/python3") : std::string();
  }();
  return cached;
}

int run_python(const std::string& script, std::string& output) {
  TempDir dir;
  auto file = dir / "script.py";
  std::ofstream(file) << script;
  auto cmd = python_with_torch() + " " + file + " 2>&1";
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (!pipe)
    return -1;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0)
    output.append(buf.data(), n);
  int status = ::pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

Classifier::Classifier() {
  fc1 = register_module("fc1", torch::nn::Linear(8, 16));
  fc2 = register_module("fc2", torch::nn::Linear(16, 3));
}

at::Tensor Classifier::training_step(const Batch& batch, int64_t) {
  auto loss = torch::nn::functional::cross_entropy(fc2->forward(torch::relu(fc1->forward(batch.data))),
                                                   batch.target);
  log("loss", loss);
  return loss;
}

Optimizers Classifier::configure_optimizers() {
  return {std::make_shared<torch::optim::Adam>(parameters(), torch::optim::AdamOptions(1e-2))};
}

bool process_exists(const std::string& pid) {
  std::ifstream stat("/proc/" + pid + "/stat");
  std::string line;
  if (!std::getline(stat, line))
    return false;
  auto state = line.find(") ");
  return state != std::string::npos && line[state + 2] != 'Z';
}

} // namespace caftrain::test

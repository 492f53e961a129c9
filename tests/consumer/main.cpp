// A program built against the installed caftrain package: 2 workers report the sum of
// their ranks over the run's communicator; prints "consumer: ok" when the run agrees.
#include <caftrain.hpp>

#include <caf/all.hpp>

#include <unistd.h>

#include <filesystem>
#include <iostream>

int main() {
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};
  auto dir = std::filesystem::temp_directory_path() / ("caftrain_consumer_" + std::to_string(::getpid()));
  caftrain::TorchTrainer trainer(sys, [] {
    auto& ctx = caftrain::train::get_context();
    auto comm = caftrain::train::session().communicator();
    auto x = torch::full({1}, static_cast<double>(ctx.world_rank));
    comm->allreduce(x)->wait();
    caftrain::train::report({{"rank_sum", x.item<double>()}});
  }, {.scaling = {.num_workers = 2}, .run = {.name = "consumer", .storage_path = dir.string()}});
  auto result = trainer.fit();
  std::filesystem::remove_all(dir);
  if (!result.ok() || result.metrics.at("rank_sum") != 1) {
    std::cerr << "consumer: " << (result.error ? result.error->message : "wrong rank_sum") << "\n";
    return 1;
  }
  std::cout << "consumer: ok\n";
}

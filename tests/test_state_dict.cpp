// State dicts: round trips, corruption, and Python interoperability.
#include <catch2/catch.hpp>

#include <fstream>

#include "helpers.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;

TEST_CASE("ResNet18 follows torchvision's parameter and buffer names", "[state_dict]") {
  models::ResNet18 net;
  auto sd = state_dict(*net);
  for (auto* key : {"conv1.weight", "bn1.weight", "bn1.running_mean", "bn1.num_batches_tracked",
                    "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                    "layer2.0.downsample.1.running_var", "layer4.1.bn2.bias", "fc.weight",
                    "fc.bias"}) {
    CAPTURE(key);
    CHECK(sd.contains(key));
  }
  CHECK(sd.size() == 122); // 62 parameters + 60 BatchNorm buffers, as torchvision's
  CHECK(sd["conv1.weight"].sizes() == std::vector<int64_t>{64, 1, 7, 7});
  CHECK(sd["fc.weight"].sizes() == std::vector<int64_t>{10, 512});
}

TEST_CASE("Saved weights round-trip into a fresh model", "[state_dict]") {
  test::TempDir dir;
  models::ResNet18 a;
  models::ResNet18 b;
  // Give the buffers non-default values too.
  a->train();
  a->forward(torch::randn({4, 1, 28, 28}));
  REQUIRE(test::max_param_diff(*a, *b) > 0);
  save_state_dict(state_dict(*a), dir / "w.pt");
  load_state_dict(*b, load_state_dict_file(dir / "w.pt"));
  auto sa = state_dict(*a);
  auto sb = state_dict(*b);
  for (auto& item : sa)
    CHECK(torch::equal(item.value(), sb[item.key()]));
}

TEST_CASE("A corrupted or mismatched weights file is refused with a clear error", "[state_dict]") {
  test::TempDir dir;
  models::ResNet18 net;
  auto path = dir / "w.pt";
  save_state_dict(state_dict(*net), path);
  SECTION("truncated") {
    std::filesystem::resize_file(path, std::filesystem::file_size(path) / 2);
    try {
      load_state_dict_file(path);
      FAIL("a truncated file loaded");
    } catch (const Error& e) {
      CHECK(e.code() == Errc::corrupt_checkpoint);
      CHECK_THAT(e.what(), Contains(path) && Contains("corrupt or truncated"));
    }
  }
  SECTION("overwritten with garbage") {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << "this is not a zip archive";
    CHECK_THROWS_WITH(load_state_dict_file(path), Contains(path));
  }
  SECTION("missing") {
    CHECK_THROWS_WITH(load_state_dict_file(dir / "none.pt"), Contains("none.pt"));
  }
  SECTION("into the wrong model") {
    models::MLP mlp;
    try {
      load_state_dict(*mlp, load_state_dict_file(path));
      FAIL("a ResNet state dict loaded into an MLP");
    } catch (const Error& e) {
      CHECK(e.code() == Errc::state_mismatch);
      CHECK_THAT(e.what(), Contains("missing keys: 1.weight") && Contains("unexpected keys"));
    }
  }
  SECTION("with a wrong shape") {
    auto sd = state_dict(*net);
    sd["fc.weight"] = torch::zeros({3, 512});
    CHECK_THROWS_WITH(load_state_dict(*net, sd), Contains("fc.weight") && Contains("shape"));
  }
}

TEST_CASE("Python's torch.load reads our ResNet18 weights into torchvision's resnet18", "[state_dict][python]") {
  if (test::python_with_torch().empty()) {
    WARN("skipped: Debian's python3-torch is not installed");
    return;
  }
  test::TempDir dir;
  models::ResNet18 net;
  net->eval();
  auto input = torch::randn({2, 1, 28, 28});
  auto expected = net->forward(input);
  save_state_dict(state_dict(*net), dir / "resnet18.pt");
  save_state_dict(StateDict({{"input", input}, {"expected", expected.detach()}}), dir / "io.pt");
  std::string out;
  int rc = test::run_python(R"(
import torch, torchvision
m = torchvision.models.resnet18(num_classes=10)
m.conv1 = torch.nn.Conv2d(1, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bias=False)
print(m.load_state_dict(torch.load(")" + dir.path() + R"(/resnet18.pt"), strict=True))
io = torch.load(")" + dir.path() + R"(/io.pt")
m.eval()
with torch.no_grad():
    print("max diff", (m(io["input"]) - io["expected"]).abs().max().item())
)", out);
  INFO(out);
  REQUIRE(rc == 0);
  CHECK_THAT(out, Contains("All keys matched successfully"));
  auto diff = std::stod(out.substr(out.find("max diff") + 9));
  CHECK(diff < 1e-4);
}

// Search spaces: Ray Tune's domains, their bounds, nested spaces and sample_from.
#include <catch2/catch.hpp>

#include <cmath>
#include <map>
#include <set>

#include "core/error.hpp"
#include "tune/domain.hpp"
#include "tune/param_space.hpp"
#include "tune/rng.hpp"

#include "tune_test_util.hpp"

using namespace caftrain;
using namespace caftrain::tune;
using test::error_of;

namespace {

// Share of each value among `n` draws of `d`.
std::map<ConfigValue, double> shares(const Domain& d, int n, uint64_t seed = 1) {
  Rng rng{seed};
  std::map<ConfigValue, double> out;
  for (int i = 0; i < n; ++i)
    out[d.sample(rng)] += 1.0 / n;
  return out;
}

} // namespace

TEST_CASE("the generator is the standard mt19937_64 and its transforms are our own",
          "[tune][search_space]") {
  // The C++ standard fixes the 10000th output of a default-seeded (5489) mt19937_64.
  Rng rng{5489};
  for (int i = 1; i < 10000; ++i)
    rng.next();
  CHECK(rng.next() == 9981545732273789042ull);
  // uniform01 is the top 53 bits of the next output scaled by 2^-53, on any library.
  Rng a{7};
  Rng b{7};
  CHECK(a.uniform01() == static_cast<double>(b.next() >> 11) * 0x1.0p-53);
}

TEST_CASE("randint excludes its upper bound and qrandint includes it", "[tune][search_space]") {
  auto r = shares(randint(0, 3), 3000);
  CHECK(r.size() == 3);
  CHECK(r.count(int64_t{3}) == 0);
  auto q = shares(qrandint(0, 3), 4000);
  CHECK(q.size() == 4);
  CHECK(q[int64_t{3}] == Approx(0.25).margin(0.03));
}

TEST_CASE("qrandint rounds a draw between lower and upper to the nearest multiple, half to even",
          "[tune][search_space]") {
  // qrandint(0, 10, 5) draws 0..9 uniformly and rounds x/5 half to even (np.round):
  // 0,1,2 -> 0 (2/5 = 0.4); 3..7 -> 5 (7/5 = 1.4); 8,9 -> 10. Shares 0.3, 0.5, 0.2.
  auto s = shares(qrandint(0, 10, 5), 20000);
  REQUIRE(s.size() == 3);
  CHECK(s[int64_t{0}] == Approx(0.3).margin(0.02));
  CHECK(s[int64_t{5}] == Approx(0.5).margin(0.02));
  CHECK(s[int64_t{10}] == Approx(0.2).margin(0.02));
}

TEST_CASE("quniform rounds to multiples of q, with half-width bins at the bounds",
          "[tune][search_space]") {
  // uniform(0, 1) rounded to quarters: 0 takes [0, 0.125), 1 takes [0.875, 1), each 1/8;
  // 0.25, 0.5, 0.75 take a quarter each.
  auto s = shares(quniform(0, 1, 0.25), 20000);
  REQUIRE(s.size() == 5);
  CHECK(s[0.0] == Approx(0.125).margin(0.015));
  CHECK(s[0.25] == Approx(0.25).margin(0.02));
  CHECK(s[0.5] == Approx(0.25).margin(0.02));
  CHECK(s[1.0] == Approx(0.125).margin(0.015));
}

TEST_CASE("log domains are uniform in the exponent", "[tune][search_space]") {
  Rng rng{3};
  int below_1e3 = 0;
  int below_10 = 0;
  int below_4 = 0;
  const int n = 6000;
  for (int i = 0; i < n; ++i) {
    // loguniform(1e-4, 1e-1): the exponent is uniform in [-4, -1): a third lies below 1e-3.
    double x = std::get<double>(loguniform(1e-4, 1e-1).sample(rng));
    REQUIRE(x >= 1e-4);
    REQUIRE(x < 1e-1);
    below_1e3 += x < 1e-3;
    // lograndint(1, 1000) = floor(10^u), u in [0, 3): 1..9 when u < 1, a third again.
    auto k = std::get<int64_t>(lograndint(1, 1000).sample(rng));
    REQUIRE(k >= 1);
    REQUIRE(k <= 999);
    below_10 += k < 10;
    // Base 2: lograndint(1, 16, 2) = floor(2^u), u in [0, 4): below 4 when u < 2, a half.
    auto b = std::get<int64_t>(lograndint(1, 16, 2).sample(rng));
    REQUIRE(b < 16);
    below_4 += b < 4;
  }
  CHECK(below_1e3 / double(n) == Approx(1.0 / 3).margin(0.03));
  CHECK(below_10 / double(n) == Approx(1.0 / 3).margin(0.03));
  CHECK(below_4 / double(n) == Approx(0.5).margin(0.03));
}

TEST_CASE("quantized log domains yield multiples of q up to and including upper",
          "[tune][search_space]") {
  Rng rng{4};
  bool saw_upper = false;
  for (int i = 0; i < 4000; ++i) {
    double x = std::get<double>(qloguniform(0.01, 1, 0.01).sample(rng));
    REQUIRE(x >= 0.01);
    REQUIRE(x <= 1.0 + 1e-12);
    REQUIRE(std::fabs(x / 0.01 - std::nearbyint(x / 0.01)) < 1e-9);
    auto k = std::get<int64_t>(qlograndint(10, 1000, 10).sample(rng));
    REQUIRE(k % 10 == 0);
    REQUIRE(k >= 10);
    REQUIRE(k <= 1000);
    saw_upper |= k == 1000;
  }
  CHECK(saw_upper);
}

TEST_CASE("randn has its mean and sd, and qrandn rounds to multiples of q",
          "[tune][search_space]") {
  Rng rng{5};
  const int n = 20000;
  double sum = 0;
  double sq = 0;
  for (int i = 0; i < n; ++i) {
    double x = std::get<double>(randn(5, 2).sample(rng));
    sum += x;
    sq += x * x;
    double y = std::get<double>(qrandn(0, 1, 0.5).sample(rng));
    REQUIRE(std::fabs(y / 0.5 - std::nearbyint(y / 0.5)) < 1e-12);
  }
  double mean = sum / n;
  CHECK(mean == Approx(5).margin(0.05));
  CHECK(std::sqrt(sq / n - mean * mean) == Approx(2).margin(0.05));
}

TEST_CASE("choice picks every category with equal chance", "[tune][search_space]") {
  auto s = shares(choice({int64_t{16}, int64_t{32}, "sgd", 0.5, true}), 10000);
  REQUIRE(s.size() == 5);
  for (auto& [v, share] : s)
    CHECK(share == Approx(0.2).margin(0.02));
}

TEST_CASE("bad bounds are errors naming the parameter and the fix", "[tune][search_space]") {
  auto msg = error_of([] { ParamSpace{{"lr", loguniform(0, 0.1)}}; });
  CHECK_THAT(msg, Catch::Contains("'lr'") && Catch::Contains("lower > 0"));
  msg = error_of([] { ParamSpace{{"lr", qloguniform(-1, 1, 0.5)}}; });
  CHECK_THAT(msg, Catch::Contains("lower > 0"));
  msg = error_of([] { ParamSpace{{"momentum", uniform(0.9, 0.9)}}; });
  CHECK_THAT(msg, Catch::Contains("'momentum'") && Catch::Contains("lower < upper"));
  msg = error_of([] { ParamSpace{{"layers", randint(5, 2)}}; });
  CHECK_THAT(msg, Catch::Contains("'layers'") && Catch::Contains("lower < upper"));
  msg = error_of([] { ParamSpace{{"dropout", quniform(0, 1, 0.3)}}; });
  CHECK_THAT(msg, Catch::Contains("'dropout'") && Catch::Contains("not multiples of q = 0.3"));
  msg = error_of([] { ParamSpace{{"width", qrandint(1, 64, 8)}}; });
  CHECK_THAT(msg, Catch::Contains("'width'") && Catch::Contains("not multiples of q = 8"));
  msg = error_of([] { ParamSpace{{"width", qrandint(0, 64, 0)}}; });
  CHECK_THAT(msg, Catch::Contains("q > 0"));
  msg = error_of([] { ParamSpace{{"optimizer", choice({})}}; });
  CHECK_THAT(msg, Catch::Contains("'optimizer'") && Catch::Contains("no values"));
  msg = error_of([] { ParamSpace{{"seed", grid_search({})}}; });
  CHECK_THAT(msg, Catch::Contains("'seed'") && Catch::Contains("no values"));
  msg = error_of([] { ParamSpace{{"noise", randn(0, 0)}}; });
  CHECK_THAT(msg, Catch::Contains("sd > 0"));
  msg = error_of([] { ParamSpace{{"x", loguniform(1, 10, 1)}}; });
  CHECK_THAT(msg, Catch::Contains("base"));
}

TEST_CASE("nested spaces reach the config as slash-joined keys and constants pass through",
          "[tune][search_space]") {
  ParamSpace space{{"lr", loguniform(1e-4, 1e-1)},
                   {"epochs", 10},
                   {"name", "mnist"},
                   {"model", ParamSpace{{"width", choice({int64_t{32}, int64_t{64}})},
                                        {"act", "relu"},
                                        {"head", ParamSpace{{"dropout", 0.5}}}}}};
  Rng rng{11};
  auto config = space.resolve({}, rng);
  CHECK(config.get<int64_t>("epochs") == 10);
  CHECK(config.get<std::string>("name") == "mnist");
  CHECK(config.get<std::string>("model/act") == "relu");
  CHECK(config.get<double>("model/head/dropout") == 0.5);
  auto width = config.get<int64_t>("model/width");
  CHECK((width == 32 || width == 64));
  CHECK(config.values().size() == 6);
  auto msg = error_of([] { ParamSpace{{"model/width", 1}, {"model", ParamSpace{{"width", 2}}}}; });
  CHECK_THAT(msg, Catch::Contains("'model/width' twice"));
}

TEST_CASE("the same seed gives the same configs and another seed other ones",
          "[tune][search_space]") {
  ParamSpace space{{"lr", loguniform(1e-4, 1e-1)},
                   {"batch_size", choice({int64_t{32}, int64_t{64}, int64_t{128}})},
                   {"layers", randint(1, 8)},
                   {"noise", randn()}};
  auto draw = [&](uint64_t seed) {
    Rng rng{seed};
    std::vector<Config> out;
    for (int i = 0; i < 5; ++i)
      out.push_back(space.resolve({}, rng));
    return out;
  };
  CHECK(draw(42) == draw(42));
  CHECK_FALSE(draw(42) == draw(43));
}

TEST_CASE("sample_from chains resolve in dependency order", "[tune][search_space]") {
  // Keys resolve in sorted order: "a" needs "b", which needs "c": "a" waits one pass.
  ParamSpace space{
    {"a", sample_from([](const Config& c) { return c.get<int64_t>("b") * 2; })},
    {"b", sample_from([](const Config& c) { return c.get<int64_t>("c") + 1; })},
    {"c", randint(10, 11)},
    {"d", sample_from([](const Config& c, Rng& rng) { return c.get<double>("a") + rng.uniform01(); })}};
  Rng rng{1};
  auto config = space.resolve({}, rng);
  CHECK(config.get<int64_t>("c") == 10);
  CHECK(config.get<int64_t>("b") == 11);
  CHECK(config.get<int64_t>("a") == 22);
  CHECK(config.get<double>("d") >= 22.0);
  CHECK(config.get<double>("d") < 23.0);
}

TEST_CASE("a cycle of sample_from is an error naming its keys", "[tune][search_space]") {
  ParamSpace space{{"a", sample_from([](const Config& c) { return c.get<int64_t>("b"); })},
                   {"b", sample_from([](const Config& c) { return c.get<int64_t>("a"); })},
                   {"c", sample_from([](const Config& c) { return c.get<int64_t>("e"); })},
                   {"d", 1}};
  Rng rng{1};
  auto msg = error_of([&] { space.resolve({}, rng); });
  CHECK_THAT(msg, Catch::Contains("cannot resolve 'a', 'b', 'c'") && Catch::Contains("cycle") &&
                    Catch::Contains("no key 'e'"));
}

TEST_CASE("a grid axis is assigned, never sampled", "[tune][search_space]") {
  ParamSpace space{{"lr", grid_search({0.1, 0.01})}};
  Rng rng{1};
  CHECK(space.resolve(Config{{"lr", 0.01}}, rng).get<double>("lr") == 0.01);
  CHECK_THAT(error_of([&] { space.resolve({}, rng); }), Catch::Contains("BasicVariantGenerator"));
}

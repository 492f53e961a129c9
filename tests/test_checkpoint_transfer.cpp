// Checkpoint files as messages (actors/checkpoint_transfer): the receiving side's checks,
// and uploads and downloads through an actor standing in for the trainer. The trainer's
// own handlers are exercised by the cluster test "[storage]".
#include <catch2/catch.hpp>

#include <caf/all.hpp>

#include <filesystem>
#include <fstream>

#include "actors/checkpoint_transfer.hpp"
#include "checkpoint/files.hpp"
#include "checkpoint/sharded.hpp"
#include "core/error.hpp"
#include "helpers.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;

namespace {

namespace fs = std::filesystem;
using test::TempDir;

std::string bytes_of(size_t n, uint32_t seed) {
  std::string out(n, '\0');
  for (size_t i = 0; i < n; ++i)
    out[i] = static_cast<char>((i * 2654435761u + seed) >> 13);
  return out;
}

uint32_t crc(const std::string& s) {
  return crc32_of(s.data(), s.size());
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

Errc code_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.code();
  }
  return Errc::none;
}

/// Stands in for the trainer: uploads go to a Receiver on `run_dir`, fetches read any
/// file, with one byte flipped when `corrupt` and the file's name starts with
/// `corrupt_prefix`. Every fetch's file name is appended to `fetched`.
caf::behavior stand_in(caf::event_based_actor*, std::string run_dir, bool corrupt,
                       std::string corrupt_prefix,
                       std::shared_ptr<std::vector<std::string>> fetched) {
  auto receiver = std::make_shared<transfer::Receiver>();
  return {
    [=](transfer::upload_atom, const std::string& name, const std::string& file, uint64_t offset,
        const std::string& bytes) { return receiver->write(run_dir, name, file, offset, bytes); },
    [=](transfer::upload_atom, const std::string& name, const std::string& file, uint64_t size,
        uint32_t crc) -> caf::result<bool> {
      try {
        receiver->finish_file(run_dir, name, file, size, crc);
        return true;
      } catch (const Error& e) {
        return caf::make_error(caf::sec::runtime_error, e.what());
      }
    },
    [=](transfer::upload_atom, const std::string& name) { return receiver->finish(run_dir, name); },
    [=](transfer::fetch_atom, const std::string& path, const std::string& file, uint64_t offset) {
      if (fetched)
        fetched->push_back(file);
      auto bytes = transfer::read_chunk((fs::path(path) / file).string(), offset);
      if (corrupt && file.rfind(corrupt_prefix, 0) == 0 && !bytes.empty())
        bytes[bytes.size() / 2] ^= 1;
      return bytes;
    },
  };
}

} // namespace

TEST_CASE("Uploaded checkpoint files arrive in pieces in order, each checked, inside their upload's directory", "[transfer]") {
  TempDir dir;
  auto payload = bytes_of(3 * 1000 + 7, 1);
  std::string staged;
  {
    transfer::Receiver r;
    CHECK(r.write(dir.path(), "a0-r1", "shards/rank_1.pt", 0, payload.substr(0, 3000)) == 3000);
    // A piece that is not the next one is refused (nothing is written at a gap).
    CHECK(code_of([&] { r.write(dir.path(), "a0-r1", "shards/rank_1.pt", 2000, payload); }) == Errc::io_error);
    CHECK(r.write(dir.path(), "a0-r1", "shards/rank_1.pt", 3000, payload.substr(3000)) == payload.size());
    // The upload cannot end while a file is open.
    CHECK(code_of([&] { r.finish(dir.path(), "a0-r1"); }) == Errc::io_error);
    r.finish_file(dir.path(), "a0-r1", "shards/rank_1.pt", payload.size(), crc(payload));
    r.write(dir.path(), "a0-r1", "empty", 0, "");
    r.finish_file(dir.path(), "a0-r1", "empty", 0, crc(""));
    staged = r.finish(dir.path(), "a0-r1");
    CHECK(staged == (fs::path(dir.path()) / ".staging" / "upload-a0-r1").string());
    CHECK(slurp(staged + "/shards/rank_1.pt") == payload);
    CHECK(fs::file_size(staged + "/empty") == 0);

    // A file that arrives altered is refused by name.
    r.write(dir.path(), "a0-r0", "model.pt", 0, payload);
    try {
      r.finish_file(dir.path(), "a0-r0", "model.pt", payload.size(), crc(payload) ^ 1);
      FAIL("an altered file was accepted");
    } catch (const Error& e) {
      CHECK(e.code() == Errc::corrupt_checkpoint);
      CHECK_THAT(e.what(), Contains("model.pt"));
    }
    // Names and paths that would leave the run's staging directory are refused.
    for (auto file : {"../run.json", "/etc/passwd", "a/../../b", "", "./x"})
      CHECK(code_of([&] { r.write(dir.path(), "a0-r2", file, 0, "x"); }) == Errc::invalid_argument);
    for (auto name : {"../up", "a/b", ".hidden", ""})
      CHECK(code_of([&] { r.write(dir.path(), name, "x", 0, "x"); }) == Errc::invalid_argument);
    CHECK_FALSE(fs::exists(fs::path(dir.path()) / "run.json"));
  }
  // Uploads that were never committed go with the receiver.
  CHECK_FALSE(fs::exists(staged));
  CHECK_FALSE(fs::exists(fs::path(dir.path()) / ".staging" / "upload-a0-r0"));
}

TEST_CASE("A checkpoint directory travels as messages both ways, and a file that arrives altered is refused", "[transfer]") {
  TempDir dir;
  test::ActorSystem s;
  auto source = fs::path(dir.path()) / "source";
  fs::create_directories(source / "shards");
  // Files larger than a message, of exactly one message, and empty.
  auto big = bytes_of(transfer::kChunkBytes * 2 + 123, 2);
  auto exact = bytes_of(transfer::kChunkBytes, 3);
  std::ofstream(source / "shards" / "rank_0.pt", std::ios::binary) << big;
  std::ofstream(source / "exact.pt", std::ios::binary) << exact;
  std::ofstream(source / "empty.json", std::ios::binary);
  auto run_dir = (fs::path(dir.path()) / "run").string();
  auto trainer = s.sys.spawn(stand_in, run_dir, false, std::string(), nullptr);
  auto timeout = std::chrono::seconds(30);
  auto remote = transfer::upload(s.sys, trainer, source.string(), "a0-r0-i2-1", timeout);
  CHECK(remote == run_dir + "/.staging/upload-a0-r0-i2-1");
  CHECK(slurp(remote + "/shards/rank_0.pt") == big);
  CHECK(slurp(remote + "/exact.pt") == exact);
  CHECK(fs::file_size(remote + "/empty.json") == 0);

  // Committed as the trainer's I/O actor does, then fetched into a local copy.
  CheckpointWriter writer(run_dir + "/checkpoint_000002");
  writer.move_directory(remote);
  auto committed = writer.commit(CheckpointMetadata{});
  auto copy = transfer::download(s.sys, trainer, committed, dir / "copy", timeout);
  CHECK(copy.path() == dir / "copy");
  CHECK(copy.committed());
  CHECK_NOTHROW(copy.validate());
  CHECK(slurp(copy.file("shards/rank_0.pt")) == big);
  CHECK(copy.metadata().files.size() == 3);

  auto corrupting = s.sys.spawn(stand_in, run_dir, true, std::string(), nullptr);
  try {
    transfer::download(s.sys, corrupting, committed, dir / "bad-copy", timeout);
    FAIL("an altered file was accepted");
  } catch (const Error& e) {
    CHECK(e.code() == Errc::corrupt_checkpoint);
    CHECK_THAT(e.what(), Contains("arrived with"));
  }
  caf::anon_send_exit(trainer, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(corrupting, caf::exit_reason::user_shutdown);
}

TEST_CASE("A worker process sees the driver's storage only where the driver's id is, unless told otherwise", "[transfer]") {
  TempDir dir;
  auto id = transfer::mark_storage(dir.path());
  REQUIRE(id.size() == 32);
  CHECK(transfer::sees_storage(dir.path(), id));
  CHECK_FALSE(transfer::sees_storage(dir.path(), "another-drivers-id"));
  CHECK_FALSE(transfer::sees_storage(dir / "elsewhere", id));
  CHECK_FALSE(transfer::sees_storage(dir.path(), ""));
  ::setenv("CAFTRAIN_SHARED_STORAGE", "0", 1);
  CHECK_FALSE(transfer::sees_storage(dir.path(), id));
  ::unsetenv("CAFTRAIN_SHARED_STORAGE");
}

TEST_CASE("A worker's copy of a sharded checkpoint fetches a rank shard only when the load names it, checked as it arrives", "[transfer]") {
  TempDir dir;
  test::ActorSystem s;
  // A sharded checkpoint of a 2-rank run, as the trainer's I/O actor commits it.
  auto run_dir = (fs::path(dir.path()) / "run").string();
  auto shard0 = bytes_of(transfer::kChunkBytes + 77, 4), shard1 = bytes_of(1000, 5);
  CheckpointWriter writer(run_dir + "/checkpoint_000003");
  writer.add_file(kLayoutFile, std::string("{}"));
  writer.add_file(kBuffersFile, std::string("buffers"));
  writer.add_file(shard_file(0), shard0);
  writer.add_file(shard_file(1), shard1);
  CheckpointMetadata meta;
  meta.world_size = 2;
  meta.strategy = "fsdp";
  auto committed = writer.commit(meta);
  auto fetched = std::make_shared<std::vector<std::string>>();
  auto trainer = s.sys.spawn(stand_in, run_dir, false, std::string(), fetched);
  auto timeout = std::chrono::seconds(30);
  auto local = dir / "copy";
  auto copy = transfer::download(s.sys, trainer, committed, local, timeout,
                                 transfer::Fetch::shards_on_demand);
  auto fetches_of = [&](const std::string& file) {
    return std::count(fetched->begin(), fetched->end(), file);
  };
  // Everything but the rank shards arrived; the copy validates without them.
  CHECK(fs::exists(local + "/" + kLayoutFile));
  CHECK(fs::exists(local + "/" + kBuffersFile));
  CHECK_FALSE(fs::exists(local + "/" + shard_file(0)));
  CHECK_FALSE(fs::exists(local + "/" + shard_file(1)));
  CHECK(fetches_of(shard_file(0)) == 0);
  CHECK_NOTHROW(copy.validate());
  // Rank 1's load names its shard: it arrives (checked), once, and rank 0's never does.
  CHECK(slurp(copy.file(shard_file(1))) == shard1);
  CHECK(slurp(Checkpoint::open(local).file(shard_file(1))) == shard1); // opened by path too
  CHECK(fetches_of(shard_file(1)) == 1);
  CHECK_FALSE(fs::exists(local + "/" + shard_file(0)));
  CHECK(fetches_of(shard_file(0)) == 0);
  CHECK_NOTHROW(copy.validate());
  // A shard altered on the way is refused when it is named, and not left behind.
  auto corrupting = s.sys.spawn(stand_in, run_dir, true, std::string("shards/"), nullptr);
  auto bad = transfer::download(s.sys, corrupting, committed, dir / "bad-copy", timeout,
                                transfer::Fetch::shards_on_demand);
  CHECK(code_of([&] { bad.file(shard_file(0)); }) == Errc::corrupt_checkpoint);
  CHECK_FALSE(fs::exists(dir / ("bad-copy/" + shard_file(0))));
  // A copy forgotten is gone, and its files no longer arrive.
  transfer::forget_copy(local);
  CHECK_FALSE(fs::exists(local));
  transfer::forget_copy(dir / "bad-copy");
  caf::anon_send_exit(trainer, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(corrupting, caf::exit_reason::user_shutdown);
}

// Precompiled header of caftrain and everything built beside it: libtorch alone costs
// ~20 s per translation unit on two cores, so it is parsed once per build.
#pragma once

#include <torch/torch.h>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

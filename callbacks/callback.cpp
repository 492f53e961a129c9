#include "callbacks/callback.hpp"

#include <cxxabi.h>

#include <cstdlib>
#include <memory>
#include <typeinfo>

#include <nlohmann/json.hpp>

#include "callbacks/logger.hpp"

namespace caftrain {

Callback::~Callback() = default;

std::string Callback::state_key() const {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> name(
    abi::__cxa_demangle(typeid(*this).name(), nullptr, nullptr, &status), std::free);
  std::string full = status == 0 && name ? name.get() : typeid(*this).name();
  auto colon = full.rfind("::");
  return colon == std::string::npos ? full : full.substr(colon + 2);
}

nlohmann::json Callback::state_dict() const {
  return nullptr;
}

void Callback::load_state_dict(const nlohmann::json&) {
  // nop
}

Logger::~Logger() = default;

} // namespace caftrain

// Handle<Base>: lets option structs take polymorphic values by value.
#pragma once

#include <memory>
#include <type_traits>
#include <utility>

namespace caftrain {

/// A shared, non-null pointer to a `Base` that converts from any value or shared pointer
/// of a type derived from `Base`. It lets options read like the seed:
/// `{.strategy = DDPStrategy(), .callbacks = {ReportCallback()}}`.
template <class Base>
class Handle {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Takes a copy of `value` (moved when given an rvalue).
  template <class T, class = std::enable_if_t<std::is_base_of_v<Base, std::decay_t<T>>>>
  Handle(T&& value) // NOLINT: implicit on purpose
    : ptr_(std::make_shared<std::decay_t<T>>(std::forward<T>(value))) {
    // nop
  }

  /// Shares `ptr`, which must not be null.
  template <class T, class = std::enable_if_t<std::is_base_of_v<Base, T>>>
  Handle(std::shared_ptr<T> ptr) // NOLINT: implicit on purpose
    : ptr_(std::move(ptr)) {
    // nop
  }

  // -- properties -------------------------------------------------------------------

  Base* get() const noexcept {
    return ptr_.get();
  }

  Base* operator->() const noexcept {
    return ptr_.get();
  }

  Base& operator*() const noexcept {
    return *ptr_;
  }

  const std::shared_ptr<Base>& shared() const noexcept {
    return ptr_;
  }

  /// The held object as `T`, or null when it is of another type.
  template <class T>
  std::shared_ptr<T> as() const {
    return std::dynamic_pointer_cast<T>(ptr_);
  }

 private:
  std::shared_ptr<Base> ptr_;
};

} // namespace caftrain

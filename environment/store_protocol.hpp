// The messages between an ActorStore and the actor that serves the store.
#pragma once

#include <caf/atom.hpp>

namespace caftrain {

/// (store_set_atom, key, value) -> unit: sets a key.
using store_set_atom = caf::atom_constant<caf::atom("st_set")>;

/// (store_get_atom, key, timeout_ms) -> value: waits for a key.
using store_get_atom = caf::atom_constant<caf::atom("st_get")>;

/// (store_add_atom, key, delta) -> int64_t: adds to an integer key.
using store_add_atom = caf::atom_constant<caf::atom("st_add")>;

/// (store_fail_atom, caf::error): fails the gets waiting now with the error.
using store_fail_atom = caf::atom_constant<caf::atom("st_fail")>;

/// (store_expire_atom, key): internal timer of a waiting get.
using store_expire_atom = caf::atom_constant<caf::atom("st_expire")>;

} // namespace caftrain

// Umbrella header of caftrain's Tune layer: search spaces, searchers, trial schedulers.
#pragma once

#include "tune/async_hyperband_scheduler.hpp"
#include "tune/basic_variant_generator.hpp"
#include "tune/concurrency_limiter.hpp"
#include "tune/domain.hpp"
#include "tune/fifo_scheduler.hpp"
#include "tune/fwd.hpp"
#include "tune/hyperband_scheduler.hpp"
#include "tune/median_stopping_rule.hpp"
#include "tune/mode.hpp"
#include "tune/mutation.hpp"
#include "tune/param_space.hpp"
#include "tune/population_based_training.hpp"
#include "tune/rng.hpp"
#include "tune/searcher.hpp"
#include "tune/tpe_search.hpp"
#include "tune/trial_scheduler.hpp"

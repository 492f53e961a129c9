// The default scheduler: trials run in the order they were created, none is stopped early.
#pragma once

#include "tune/trial_scheduler.hpp"

namespace caftrain::tune {

/// Ray's `FIFOScheduler`: every result is CONTINUE; waiting trials start first-created
/// first, PENDING before PAUSED.
class FIFOScheduler : public TrialScheduler {
 public:
  // -- constructors -----------------------------------------------------------------

  /// A FIFO scheduler (it needs no metric).
  FIFOScheduler();

  // -- TrialScheduler ---------------------------------------------------------------

  /// Always CONTINUE.
  Decision on_trial_result(const TrialId& trial, const Metrics& result,
                           const ResultContext& context) override;
};

} // namespace caftrain::tune

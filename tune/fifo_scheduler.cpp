#include "tune/fifo_scheduler.hpp"

namespace caftrain::tune {

FIFOScheduler::FIFOScheduler() : TrialScheduler("FIFOScheduler", "", "") {
  // nop
}

TrialScheduler::Decision FIFOScheduler::on_trial_result(const TrialId&, const Metrics&,
                                                        const ResultContext&) {
  return Decision::CONTINUE;
}

} // namespace caftrain::tune

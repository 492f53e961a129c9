#include "tune/searcher.hpp"

namespace caftrain::tune {

Searcher::~Searcher() {
  // nop
}

void Searcher::on_trial_result(const TrialId&, const Metrics&) {
  // nop
}

} // namespace caftrain::tune

// The trial table a Tuner prints while it runs (Ray's CLIReporter).
#pragma once

#include <string>

namespace caftrain::tune {

struct ExperimentStatus;
struct TrialSnapshot;

/// The table of every trial: id, status, each config key whose value differs between
/// trials (constants of the space are left out), iterations, the metric (last
/// value), and a header line with the counts by status and the best trial so far by
/// `metric`/`mode` (when given). Lines end with '\n'; at most `max_rows` trial rows, the
/// running ones first, then the others in creation order, and a line saying how many
/// were left out.
std::string render_trial_table(const ExperimentStatus& status, const std::string& metric,
                               const std::string& mode, int max_rows = 20);

/// One plain line about a trial event (for logs and pipes), e.g.
/// "Trial a1b2c_00002 RUNNING iter 3 loss=0.41 {"lr": 0.01}"; `event` is shown first
/// ("started", "result", "ended", ...).
std::string trial_event_line(const std::string& event, const TrialSnapshot& trial,
                             const std::string& metric);

} // namespace caftrain::tune

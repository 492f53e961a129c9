// Forward declarations and the trial id of caftrain's Tune layer.
#pragma once

#include <string>

namespace caftrain::tune {

/// A trial's id, unique within an experiment (Ray's `trial.trial_id`), e.g. "a1b2c_00003".
using TrialId = std::string;

class AsyncHyperBandScheduler;
class BasicVariantGenerator;
class ConcurrencyLimiter;
class Domain;
class FIFOScheduler;
class HyperBandScheduler;
class MedianStoppingRule;
class Mutation;
class Param;
class ParamSpace;
class PopulationBasedTraining;
class Rng;
class Searcher;
class TPESearch;
class TrialScheduler;

} // namespace caftrain::tune
